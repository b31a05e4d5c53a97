"""
Train f_rgbd, G3DR's class-conditional RGB-D diffusion model (Sec. 3.5): class -> an RGB-D image, which
f_trigen (train.py) then lifts to 3D (sample.py --class_id).

    python train_rgbd.py                                     # synthetic classes at 32 x 32 (CPU, ~17 min)
    python train_rgbd.py --dataset imagenet --data_dir PATH  # ImageNet-with-depth at 128 x 128
    torchrun --standalone --nproc_per_node=8 train_rgbd.py --dataset imagenet --data_dir PATH

Every key of `config` below can be overridden as `--key value` or `--key=value`; `--help` lists them. On the
CPU it learns at 32 x 32, where a pixel-space denoiser gets 4x the steps of 64 x 64 for the same time;
sample.py resizes its samples to f_trigen's input size. (The paper's f_rgbd is a latent model; see
diffusion.py.) It writes to out-rgbd, where sample.py looks for it, apart from f_trigen's run in out.
"""
import os
import sys
import time

import torch
from tqdm import tqdm

import diffusion
import resume
from configurator import ConfigError, given, resolve, resolve_device, run_script

# -----------------------------------------------------------------------------
# config: the synthetic recipe; `--dataset imagenet` puts RECIPES['imagenet'] on top, the command line wins
config = dict(
    dataset='synthetic',     # 'synthetic' (built-in classes of shapes) or 'imagenet' (folders of photos + depth)
    data_dir='',             # imagenet: root of class folders with NAME.jpg + NAME_depth.png
    depth_dir='',            # imagenet: optional separate depth root mirroring data_dir
    skip_missing_depth=False,
    num_scenes=20_000,       # synthetic: size of the training set
    out_dir='out-rgbd',
    resume=False,            # continue the run saved in out_dir/ckpt.pt
    trust_checkpoint=False,  # load a --resume file the safe loader refuses: runs code stored in it
    seed=1337,
    size='small',            # denoiser preset (diffusion.DENOISER_PRESETS: 'small' or 'paper')
    image_size=32,
    p_uncond=0.1,            # class dropout for classifier-free guidance
    max_steps=2400,
    global_batch=16,         # images per optimiser step over all processes
    batch_size=16,           # the largest micro-batch per process (resume.split_batch)
    lr=1e-3,
    beta1=0.9,
    beta2=0.99,
    cycle_beta1=False,
    weight_decay=0.0,
    warmup_frac=0.1,
    div_factor=25.0,
    grad_clip=1.0,
    nonfinite='skip',        # on a NaN/inf loss: 'skip' the step (stop after 20 in a row) or 'stop'
    log_every=10,
    sample_every=400,        # write a PNG grid of generated RGB-D every N steps
    save_every=400,
    device='auto',
    dtype='float32',         # 'float32' or 'bfloat16' (autocast of the denoiser)
    compile=False,
    num_workers=0,
)

RECIPES = {
    'synthetic': {},
    # with f_trigen's released optimisation (48 images a step, one-cycle with beta1 cycling, no clipping)
    'imagenet': dict(size='paper', image_size=128, max_steps=300_000, global_batch=48, batch_size=8, lr=1e-4,
                     cycle_beta1=True, grad_clip=0.0, warmup_frac=0.02, sample_every=5000, save_every=5000,
                     num_workers=8, num_scenes=0),
}

DTYPES = {'float32': None, 'bfloat16': torch.bfloat16}


def _resolve(argv, base=None):
    """config, then the dataset's recipe, then the command line (configurator.resolve)."""
    return resolve(argv, config, RECIPES, base)


def parse_config(argv, base=None):
    """_resolve, then the checks of the values."""
    cfg = _resolve(argv, base)
    if cfg['dtype'] not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    if cfg['dataset'] == 'imagenet' and not cfg['data_dir']:
        raise ConfigError("--dataset imagenet needs --data_dir PATH (class folders of NAME.jpg + NAME_depth.png)")
    for key in ('max_steps', 'global_batch', 'batch_size', 'image_size', 'save_every', 'sample_every', 'log_every'):
        if cfg[key] <= 0:
            raise ConfigError(f"--{key} must be positive, got {cfg[key]}")
    return cfg


def make_dataset(cfg):
    """Labelled RGB-D images: the synthetic shape classes, or ImageNet-with-depth class folders."""
    if cfg['dataset'] == 'synthetic':
        import scenes
        return scenes.SyntheticScenes(cfg['num_scenes'], image_size=cfg['image_size'], seed=cfg['seed'])
    import data
    return data.ImageNetDepth(cfg['data_dir'], image_size=cfg['image_size'], depth_root=cfg['depth_dir'] or None,
                              flip=True, skip_missing_depth=cfg['skip_missing_depth'])


def rgbd_losses(net, batch, cfg, device, autocast):
    """The denoising loss (v-prediction, diffusion.diffusion_loss) of one micro-batch of RGB-D images."""
    x0 = diffusion.rgbd_to_x(batch['image'].to(device), batch['depth'].to(device))   # (B, 4, S, S) in [-1, 1]
    labels = batch['label'].to(device)                                               # (B,)
    with autocast():
        return diffusion.diffusion_loss(net, x0, labels, p_uncond=cfg['p_uncond'])


@torch.no_grad()
def rgbd_grid(model, num_classes, cfg, device, path):
    """One row per class (up to 8): generated RGB beside its colourised depth."""
    from outputs import colorize_depth, save_grid
    labels = torch.arange(min(num_classes, 8), device=device).repeat_interleave(2)
    gen = torch.Generator(device=device).manual_seed(cfg['seed'])
    x = diffusion.ddim_sample(model, (len(labels), 4, cfg['image_size'], cfg['image_size']), labels, steps=50,
                              generator=gen)
    image, depth = diffusion.x_to_rgbd(x)
    save_grid(torch.stack([image, colorize_depth(depth)], 1).flatten(0, 1), path, nrow=4)


def main(argv):
    if any(a in ('-h', '--help') for a in argv):
        print(__doc__)
        cfg = _resolve([a for a in argv if a not in ('-h', '--help')])  # no --data_dir needed to list them
        for key, value in cfg.items():
            print(f"--{key:20s} {value!r:>16s} {'*' if value != config[key] else ''}")
        return None
    cfg, ckpt = resume.continue_run(argv, parse_config(argv), 'rgbd', config, RECIPES, parse_config)
    device = resolve_device(cfg['device'])
    rank, world_size, device = resume.setup_distributed(device)
    resume.seed_all(cfg['seed'] + rank)
    batch_size, accumulation = resume.split_batch(cfg['global_batch'], world_size, cfg['batch_size'],
                                                  explicit=given(argv, 'batch_size'))
    autocast = resume.autocast_for(device, DTYPES[cfg['dtype']])
    dataset = make_dataset(cfg)
    model_config = dict(num_classes=dataset.num_classes, size=cfg['size'], image_size=cfg['image_size'])
    model = diffusion.make_denoiser(**model_config).to(device)
    optimizer, scheduler = resume.make_optimizer(model, cfg['lr'], (cfg['beta1'], cfg['beta2']), cfg['weight_decay'],
                                                 cfg['max_steps'], cfg['warmup_frac'], cfg['div_factor'],
                                                 cfg['cycle_beta1'])
    start_step = resume.restore(ckpt, model, optimizer, scheduler, rank, cfg['seed'], device)
    net = torch.compile(model) if cfg['compile'] else model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.startswith('cuda') else None)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if rank == 0:
        resume.prepare_out_dir(cfg['out_dir'], start_step)
        split = resume.describe(model, device, world_size, batch_size, accumulation, cfg['global_batch'])
        print(f"f_rgbd | {cfg['dataset']} ({len(dataset)} items, {dataset.num_classes} classes) | {split} | "
              f"steps {start_step}->{cfg['max_steps']} | out {cfg['out_dir']}", flush=True)
    batches = iter(resume.make_loader(dataset, batch_size, cfg['num_workers'], cfg['seed'], rank, world_size,
                                      start_step, accumulation, cfg['max_steps']))
    pbar = tqdm(total=cfg['max_steps'], initial=start_step, disable=rank != 0, dynamic_ncols=True, smoothing=0.1)
    bad_in_row, t_last = 0, time.time()
    for step in range(start_step, cfg['max_steps']):
        net.train()
        optimizer.zero_grad(set_to_none=True)
        ok, losses = True, []
        for micro in range(accumulation):  # accumulation and the non-finite skip as in train.py
            batch = next(batches)
            if ok:
                loss = rgbd_losses(net, batch, cfg, device, autocast)
                ok = resume.all_finite(loss, world_size)
            if ok:
                resume.backward(net, loss, accumulation, micro == accumulation - 1, world_size)
                losses.append(loss.item())
        ok = resume.apply_step(model, optimizer, cfg['grad_clip'], ok)
        bad_in_row = resume.count_bad(ok, bad_in_row, cfg['nonfinite'], step, ckpt_path)
        lr, beta1 = optimizer.param_groups[0]['lr'], optimizer.param_groups[0]['betas'][0]
        scheduler.step()
        done = step + 1
        pbar.update(1)
        mean_loss = sum(losses) / len(losses) if losses else float('nan')
        pbar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
        if rank == 0 and (done % cfg['log_every'] == 0 or done == cfg['max_steps']):
            now = time.time()
            resume.log_metrics(cfg['out_dir'], dict(step=done, loss=mean_loss, lr=lr, beta1=beta1,
                                                    sec_per_step=(now - t_last) / cfg['log_every'],
                                                    views=[dict(loss=v, diffusion=v) for v in losses]))
            t_last = now
        if rank == 0 and (done % cfg['sample_every'] == 0 or done == cfg['max_steps']):
            model.eval()
            rgbd_grid(model, dataset.num_classes, cfg, device, os.path.join(cfg['out_dir'], f"samples_{done:07d}.png"))
        if done % cfg['save_every'] == 0 or done == cfg['max_steps']:
            resume.save_run(ckpt_path, 'rgbd', model, model_config, optimizer, scheduler, done, cfg, device, rank,
                            world_size)
    pbar.close()
    if world_size > 1:
        torch.distributed.barrier()
    return model


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
