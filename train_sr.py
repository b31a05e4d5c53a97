"""
Train the 2x super-resolution network (sr.py; paper Sec. 3.5).

    python train_sr.py                                     # synthetic scenes, 64 -> 128, CPU, <= 10 minutes
    python train_sr.py --dataset imagenet --data_dir PATH  # photos, 128 -> 256 (the 'imagenet' preset), GPU
    torchrun --standalone --nproc_per_node=8 train_sr.py --dataset imagenet --data_dir PATH
    python train_sr.py --eval [--trigen_ckpt out/ckpt.pt]  # held-out PSNR of out-sr/ckpt.pt against bicubic

Training pairs. Synthetic: the scenes render their true image at any resolution, so low = the 64 x 64
render of a view and high = the 128 x 128 render of the same view, for views around the canonical one
(yaw and pitch offsets as train.py's novel views at the end of its curriculum, plus exact canonical ones),
drawn fresh every step (4 a step); the network trains on 24 x 24 crops of them, flipped: of 64 random crops
of a view, the 8 where bicubic upsampling misses most (random_crops; the error of a render sits at its edges),
each with its origin in the view, so that the network samples the view's exact output positions (sr.py).
ImageNet: high = the centred square of a photo Lanczos-resized to 256, low = the same square resized to
128: the antialiased resize that made f_trigen's 128 x 128 training images (data.crop_and_resize).
No depth maps are needed.

The loss. Photos (the ImageNet recipe): L1, as EDSR and RCAN (EDSR's authors found that it converged
better than L2 and ended at a higher PSNR). Synthetic renders: L2. They cast one ray per pixel, so they are aliased:
at an edge a high-resolution pixel is either one colour or the other, and from the 64 x 64 render it is
often not certain which. L1 is minimised by the more likely colour (a hard guess, very costly in squared
error when wrong), L2 by the expected colour, and PSNR is squared error: on held-out views an L1-trained
network lost PSNR as it trained (+0.09 dB over bicubic after 100 steps, +0.01 after 400) where an
L2-trained one gained (+0.65 dB after 400 steps, same data).
Adam with the one-cycle schedule of train.py (warm-up, then cosine annealing; resume.make_optimizer).

Writes out_dir/ckpt.pt (kind 'sr', sr.load_sr reads it), metrics.jsonl (with the held-out PSNR of SR and
of bicubic upsampling) and samples_STEP.png (rows: held-out images; columns: bicubic | SR | truth).
Every key of `config` can be overridden as `--key value`; `python train_sr.py --help` lists them.
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from PIL import Image

import checkpoint
import data
import resume
from configurator import ConfigError, resolve, resolve_device, run_script
from outputs import save_grid, write_json
from render import CANONICAL_PITCH, CANONICAL_YAW
from sr import SR_PRESETS, SRNet, count_parameters, evaluate_sr, psnr

config = dict(
    # what to train on
    dataset='synthetic',     # 'synthetic' (built in, exact high-resolution truth) or 'imagenet' (folders of photos)
    data_dir='',             # imagenet: a folder (of class folders) of photos; depth maps, if any, are ignored
    eval_dir='',             # imagenet: optional held-out photos for the PSNR measurement
    num_scenes=20_000,       # synthetic: training scenes (views are drawn fresh every step)
    low_size=64,             # side of the input images; the network outputs 2 x low_size
    crop=24,                 # train on low_size crops of this side (and the matching 2x crops); 0: whole images
    crops_per_image=8,       # crops taken from each image of a batch
    crop_candidates=8,       # > 1: the crops are the crops_per_image of this many times as many random ones
                             # where bicubic misses most (random_crops); 1: uniformly random crops
    p_canonical=0.25,        # synthetic: fraction of the training views that are the canonical one
    yaw_div=6.0,             # synthetic: yaw = pi/2 + U(-1, 1) pi / yaw_div (train.py's widest novel views)
    pitch_div=18.0,          # synthetic: pitch = pi/2 + U(-1, 1) pi / pitch_div
    out_dir='out-sr',
    resume=False,            # continue the run saved in out_dir/ckpt.pt
    trust_checkpoint=False,  # load checkpoints the safe loader refuses: runs code stored in them
    seed=1337,
    # network and optimisation
    preset='cpu',            # sr.SR_PRESETS: 'cpu' (32 channels, 2 x 3 blocks) or 'imagenet' (64, 5 x 10)
    loss='l2',               # 'l2' or 'l1' (see the module docstring)
    max_steps=1800,          # about 5 minutes on 2 CPU cores (0.16 s a step)
    batch_size=4,            # images (views) per process and step; the step trains on batch_size x crops_per_image crops
    lr=3e-3,
    beta2=0.99,
    warmup_frac=0.05,
    div_factor=25.0,         # one-cycle start lr = lr / div_factor
    grad_clip=1.0,           # 0 disables
    nonfinite='skip',        # on a NaN/inf loss or gradient: 'skip' the step (stop after 20 in a row) or 'stop'
    # measurement: held-out synthetic scenes (seed + 1), each seen canonically and from one novel view
    eval=False,              # only measure: out_dir/eval.json and eval.png (input | bicubic | SR | truth)
    sr_ckpt='',              # --eval: the SR checkpoint to measure (default out_dir/ckpt.pt)
    trigen_ckpt='',          # --eval: also measure on this G3DR's 64 x 64 renders (train.py's out/ckpt.pt)
    eval_scenes=16,
    # logging and system
    log_every=10,
    sample_every=200,        # held-out PSNR into metrics.jsonl and a picture grid, every N steps
    save_every=200,
    device='auto',
    num_workers=0,
)

LOSSES = {'l1': F.l1_loss, 'l2': F.mse_loss}  # mean |SR - truth| or mean (SR - truth)^2 over pixels

RECIPES = {
    'synthetic': {},
    # 128 -> 256 on a GPU. Sizes and lr in the range of RCAN's (which trained 1000 epochs of 48 x 48 patches,
    # batch 16, lr 1e-4); the authors' SR schedule is not known.
    'imagenet': dict(preset='imagenet', low_size=128, crop=48, crops_per_image=1, crop_candidates=1, loss='l1',
                     max_steps=200_000, batch_size=16, lr=2e-4, warmup_frac=0.01, grad_clip=0.0, sample_every=2000,
                     save_every=2000, num_workers=8),
}


def parse_config(argv, base=None):
    """config, the dataset's recipe and the command line (on top of `base`, a resumed run's config, if given)."""
    cfg = resolve(argv, config, RECIPES, base)
    if cfg['preset'] not in SR_PRESETS:
        raise ConfigError(f"--preset must be one of {sorted(SR_PRESETS)}, got {cfg['preset']!r}")
    if cfg['dataset'] == 'imagenet' and not cfg['data_dir'] and not cfg['eval']:
        raise ConfigError("--dataset imagenet needs --data_dir PATH (a folder of photos)")
    for key in ('max_steps', 'batch_size', 'low_size', 'crops_per_image', 'crop_candidates', 'save_every',
                'sample_every', 'log_every', 'eval_scenes'):
        if cfg[key] <= 0:
            raise ConfigError(f"--{key} must be positive, got {cfg[key]}")
    if not 0 <= cfg['crop'] <= cfg['low_size']:
        raise ConfigError(f"--crop must be in [0, --low_size {cfg['low_size']}] (0: whole images), got {cfg['crop']}")
    for key, allowed in (('loss', tuple(LOSSES)), ('nonfinite', ('skip', 'stop'))):
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    if cfg['dataset'] == 'synthetic' and cfg['low_size'] < 2:
        raise ConfigError(f"--low_size must be at least 2 for synthetic renders, got {cfg['low_size']}")
    return cfg


# -----------------------------------------------------------------------------
# training pairs

def draw_views(step, rank, batch_size, cfg):
    """Scene indices (B,) and cameras yaw, pitch (B,) of one process's synthetic batch. A function of
    (seed, step, rank) alone, so a resumed run continues exactly and no two processes draw alike."""
    gen = torch.Generator().manual_seed(resume.seed_from(cfg['seed'], step, rank))
    indices = torch.randint(cfg['num_scenes'], (batch_size,), generator=gen)
    u = torch.rand(2, batch_size, generator=gen) * 2 - 1                      # U(-1, 1) offsets
    canonical = torch.rand(batch_size, generator=gen) < cfg['p_canonical']
    yaw = torch.where(canonical, 0.0, u[0] * math.pi / cfg['yaw_div']) + CANONICAL_YAW
    pitch = torch.where(canonical, 0.0, u[1] * math.pi / cfg['pitch_div']) + CANONICAL_PITCH
    return indices.tolist(), yaw, pitch


def render_pairs(scenes, indices, yaw, pitch, low_size):
    """The true low and 2x renders of the same views: (B, 3, S, S) and (B, 3, 2S, 2S) in [0, 1]."""
    low, _ = scenes.render_views(indices, yaw, pitch, low_size)
    high, _ = scenes.render_views(indices, yaw, pitch, 2 * low_size)
    return low, high


def square_resize(image, size):
    """PIL image -> (3, size, size) in [0, 1]: its centred square, Lanczos-resized (data.crop_and_resize's
    image, without a depth map)."""
    side = min(image.width, image.height)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    square = image.crop((left, top, left + side, top + side)).resize((size, size), Image.LANCZOS)
    return data.rgb_tensor(square)


class PhotoPairs(torch.utils.data.Dataset):
    """Every photo under `root` (data.walk_images) as dict(low (3, S, S), high (3, 2S, 2S)) in [0, 1]."""

    def __init__(self, root, low_size):
        self.root, self.low_size = root, low_size
        self.files = data.walk_images(root)[0]
        if not self.files:
            raise data.DataError(f"no images found under {root}")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index):
        image = data.load_rgb(os.path.join(self.root, self.files[index]))
        return dict(low=square_resize(image, self.low_size), high=square_resize(image, 2 * self.low_size))


def random_crops(low, high, crop, per_image, gen, candidates=1, align_corners=True):
    """per_image random crops of side `crop` from each low image (B, 3, S, S) and the same region, 2 crop
    wide, of its high image: (B * per_image, 3, crop, crop), (B * per_image, 3, 2 crop, 2 crop) and the
    crops' first rows and columns (B * per_image, 2) in their low images. High pixels 2i and 2i + 1 lie
    at low pixel i, up to a sub-pixel shift that on corner-inclusive grids depends on i: the network
    takes the crop's origin to sample at the exact positions (sr.py).

    candidates > 1: of candidates x per_image random crops of an image, keep the per_image where bicubic
    upsampling (on the `align_corners` grid, as SRNet's skip) misses most, in squared error. On renders
    the error sits at edges (on held-out views 5% of the pixels hold 97% of it), and elsewhere the
    network's residual is already near zero, so crops of smooth shading teach it little. Before the
    network sampled exact positions: +0.42 dB over bicubic with uniform 32 x 32 crops of 2 views a step,
    +0.83 dB with these, in 1,800 steps."""
    S = low.shape[-1]
    offsets = torch.randint(S - crop + 1, (low.shape[0], candidates * per_image, 2), generator=gen)  # (B, n, 2)
    if candidates > 1:
        miss = (F.interpolate(low, scale_factor=2, mode='bicubic', align_corners=align_corners) - high).square()
        table = F.pad(miss.sum(1).cumsum(1).cumsum(2), (1, 0, 1, 0))  # (B, 2S + 1, 2S + 1) summed-area table
        b = torch.arange(low.shape[0])[:, None]
        top, left = 2 * offsets[..., 0], 2 * offsets[..., 1]             # (B, n) crop corners on the high grid
        bottom, right = top + 2 * crop, left + 2 * crop
        energy = table[b, bottom, right] - table[b, top, right] - table[b, bottom, left] + table[b, top, left]
        keep = energy.topk(per_image, dim=1).indices                    # (B, per_image)
        offsets = offsets.gather(1, keep[..., None].expand(-1, -1, 2))
    lows, highs = [], []
    for b, image_offsets in enumerate(offsets.tolist()):
        for top, left in image_offsets:
            lows.append(low[b, :, top:top + crop, left:left + crop])
            highs.append(high[b, :, 2 * top:2 * (top + crop), 2 * left:2 * (left + crop)])
    return torch.stack(lows), torch.stack(highs), offsets.flatten(0, 1)


def augment(low, high, step, rank, cfg):
    """Random horizontal flips (the same for both images of a pair) and crops (crop > 0), drawn from
    (seed, step, rank): a function of the step alone. Returns low, high and the crops' origins in their
    images (B, 2) (zeros without crops: whole images). All 8 flips and transpositions of the pixel grid,
    as RCAN augments photos, did worse on renders (lit from above, ground below): +0.42 dB over bicubic
    after 1,400 of 1,800 steps, against +0.59 with horizontal flips alone."""
    gen = torch.Generator().manual_seed(resume.seed_from(cfg['seed'], step, rank, 1))
    flip = (torch.rand(low.shape[0], generator=gen) < 0.5).view(-1, 1, 1, 1)
    low, high = torch.where(flip, low.flip(-1), low), torch.where(flip, high.flip(-1), high)
    if not cfg['crop']:
        return low, high, torch.zeros(low.shape[0], 2, dtype=torch.long)
    return random_crops(low, high, cfg['crop'], cfg['crops_per_image'], gen, cfg['crop_candidates'],
                        align_corners=cfg['dataset'] == 'synthetic')


def heldout_views(cfg):
    """The measurement's cameras yaw, pitch (2n,): n = eval_scenes held-out scenes canonically, then each
    from one novel view (drawn as the training views are, from seed + 1)."""
    n = cfg['eval_scenes']
    _, yaw, pitch = draw_views(0, 0, n, dict(cfg, p_canonical=0.0, seed=cfg['seed'] + 1))
    return torch.cat([torch.full((n,), CANONICAL_YAW), yaw]), torch.cat([torch.full((n,), CANONICAL_PITCH), pitch])


def heldout_pairs(cfg):
    """The measurement's pairs (low, high) on the CPU, or None (imagenet without --eval_dir). Synthetic:
    scenes of seed + 1 (never trained on) from heldout_views; imagenet: the first 2 x eval_scenes photos."""
    if cfg['dataset'] == 'imagenet':
        if not cfg['eval_dir']:
            return None
        photos = PhotoPairs(cfg['eval_dir'], cfg['low_size'])
        items = [photos[i] for i in range(min(len(photos), 2 * cfg['eval_scenes']))]
        return torch.stack([x['low'] for x in items]), torch.stack([x['high'] for x in items])
    import scenes
    n = cfg['eval_scenes']
    heldout = scenes.SyntheticScenes(n, image_size=cfg['low_size'], seed=cfg['seed'] + 1)
    yaw, pitch = heldout_views(cfg)
    return render_pairs(heldout, list(range(n)) * 2, yaw, pitch, cfg['low_size'])


# -----------------------------------------------------------------------------
# measurement

def summary(result, halves=False):
    """The numbers of an sr.evaluate_sr result; halves=True adds the canonical and novel halves of
    heldout_pairs' synthetic views."""
    out = {k: result[k] for k in ('psnr_sr', 'psnr_bicubic', 'gain_db', 'n')}
    if halves:
        n = result['n'] // 2
        for name, part in (('canonical', slice(0, n)), ('novel', slice(n, None))):
            sr, bicubic = result['each_sr'][part], result['each_bicubic'][part]
            out[name] = dict(psnr_sr=sr.mean().item(), psnr_bicubic=bicubic.mean().item(),
                             gain_db=(sr - bicubic).mean().item())
    return out


def comparison_grid(low, bicubic, sr, high, path, rows=8, show_input=True):
    """A picture, one row per image: [input (pixels doubled) |] bicubic | SR | truth."""
    pick = torch.linspace(0, low.shape[0] - 1, min(rows, low.shape[0])).round().long()  # canonical and novel
    columns = [bicubic[pick], sr[pick], high[pick]]
    if show_input:
        columns.insert(0, F.interpolate(low[pick], scale_factor=2, mode='nearest'))
    save_grid(torch.stack(columns, 1).flatten(0, 1), path, nrow=len(columns))


@torch.no_grad()
def g3dr_pairs(trigen_ckpt, cfg, device, trust=False):
    """A G3DR's renders as SR inputs: it encodes each held-out scene's canonical image and renders the
    measurement's views at low_size (low); high = the true 2x render; native = the G3DR's own 2x render
    (the alternative to SR). Returns (low, high, native) on the CPU."""
    import scenes
    model, train_cfg = checkpoint.load_g3dr(trigen_ckpt, trust=trust)
    model.to(device).eval()
    n, S = cfg['eval_scenes'], cfg['low_size']
    if model.config['image_size'] != S:
        raise ConfigError(f"--trigen_ckpt {trigen_ckpt}: that G3DR takes {model.config['image_size']}^2 images, "
                          f"but --low_size is {S}")
    heldout = scenes.SyntheticScenes(n, image_size=S, seed=cfg['seed'] + 1)
    items = [heldout[i] for i in range(n)]
    image = torch.stack([x['image'] for x in items]).to(device)             # (n, 3, S, S) canonical views
    depth = torch.stack([x['depth'] for x in items]).to(device)             # (n, 1, S, S)
    planes = model.encode(image, depth).repeat(2, 1, 1, 1, 1)               # (2n, 3, C, S, S)
    yaw, pitch = heldout_views(cfg)
    opts = dict(n_coarse=train_cfg.get('n_coarse', 32), n_fine=train_cfg.get('n_fine', 32))
    low = model.render_view(planes, yaw.to(device), pitch.to(device), S, **opts)[0].cpu()
    native = model.render_view(planes, yaw.to(device), pitch.to(device), 2 * S, **opts)[0].cpu()
    _, high = render_pairs(heldout, list(range(n)) * 2, yaw, pitch, S)
    return low, high, native


def run_eval(cfg):
    """--eval: held-out PSNR of an SR checkpoint against bicubic, on true renders and (--trigen_ckpt) on a
    G3DR's renders; writes out_dir/eval.json, eval.png (and eval_g3dr.png). Returns the report."""
    from sr import load_sr
    device = resolve_device(cfg['device'])
    path = cfg['sr_ckpt'] or os.path.join(cfg['out_dir'], 'ckpt.pt')
    net = load_sr(path, device=device, trust=cfg['trust_checkpoint'])
    pairs = heldout_pairs(cfg)
    if pairs is None:
        raise ConfigError("--eval on imagenet needs --eval_dir PATH (held-out photos)")
    synthetic = cfg['dataset'] == 'synthetic'
    result = evaluate_sr(net, *pairs)
    report = dict(sr_ckpt=str(path), low_size=cfg['low_size'], true_images=summary(result, halves=synthetic))
    comparison_grid(pairs[0], result['bicubic'], result['sr'], pairs[1], os.path.join(cfg['out_dir'], 'eval.png'))
    if cfg['trigen_ckpt']:
        if not synthetic:
            raise ConfigError("--trigen_ckpt is measured on held-out synthetic scenes (--dataset synthetic)")
        low, high, native = g3dr_pairs(cfg['trigen_ckpt'], cfg, device, cfg['trust_checkpoint'])
        result = evaluate_sr(net, low, high)
        report['g3dr_renders'] = dict(summary(result, halves=True), trigen_ckpt=cfg['trigen_ckpt'],
                                      psnr_native_2x=psnr(native, high).mean().item())
        comparison_grid(low, result['bicubic'], result['sr'], high, os.path.join(cfg['out_dir'], 'eval_g3dr.png'))
    write_json(report, os.path.join(cfg['out_dir'], 'eval.json'))
    for what in ('true_images', 'g3dr_renders'):
        if what in report:
            r = report[what]
            native = f" | the G3DR rendered at 2x {r['psnr_native_2x']:.2f} dB" if 'psnr_native_2x' in r else ''
            print(f"{what} ({r['n']} held-out, {cfg['low_size']} -> {2 * cfg['low_size']}): SR {r['psnr_sr']:.2f} dB "
                  f"| bicubic {r['psnr_bicubic']:.2f} dB | gain {r['gain_db']:+.2f} dB{native}")
    return report


# -----------------------------------------------------------------------------
# training

def _device(cfg):
    """--device (configurator.resolve_device); 'auto' without a GPU refuses an ImageNet run (hours a step)."""
    if cfg['device'] == 'auto' and cfg['dataset'] == 'imagenet' and not torch.cuda.is_available():
        raise ConfigError("--dataset imagenet: no CUDA GPU found; pass --device cpu to train on the CPU anyway")
    return resolve_device(cfg['device'])


def build(cfg, device):
    """A new SRNet (seeded, so every process starts alike), Adam and the one-cycle schedule (resume.py)."""
    resume.seed_all(cfg['seed'])
    # the preset's sizes; the pixel-grid convention is the data's (sr.py): corner-inclusive renders, or photos
    model_config = dict(SR_PRESETS[cfg['preset']], align_corners=cfg['dataset'] == 'synthetic')
    net = SRNet(**model_config).to(device)
    optimizer, scheduler = resume.make_optimizer(net, cfg['lr'], (0.9, cfg['beta2']), 0.0, cfg['max_steps'],
                                                 cfg['warmup_frac'], cfg['div_factor'], cycle_beta1=False)
    return net, optimizer, scheduler, model_config


def batch_source(cfg, rank, world_size, start_step, device):
    """step -> this process's (low (B, 3, s, s), high (B, 3, 2s, 2s), origin (B, 2)) on device, a function of the
    step alone: crops of side s and their origins in their S x S images (augment)."""
    if cfg['dataset'] == 'synthetic':
        import scenes
        train_scenes = scenes.SyntheticScenes(cfg['num_scenes'], image_size=cfg['low_size'], seed=cfg['seed'])

        def synthetic(step):
            indices, yaw, pitch = draw_views(step, rank, cfg['batch_size'], cfg)
            low, high, origin = augment(*render_pairs(train_scenes, indices, yaw, pitch, cfg['low_size']), step,
                                        rank, cfg)
            return low.to(device), high.to(device), origin.to(device)
        return synthetic
    photos = PhotoPairs(cfg['data_dir'], cfg['low_size'])
    batches = iter(resume.make_loader(photos, cfg['batch_size'], cfg['num_workers'], cfg['seed'], rank, world_size,
                                      start_step, 1, cfg['max_steps']))

    def imagenet(step):
        batch = next(batches)
        low, high, origin = augment(batch['low'], batch['high'], step, rank, cfg)
        return low.to(device, non_blocking=True), high.to(device, non_blocking=True), origin.to(device)
    return imagenet


def report_progress(cfg, net, heldout, step, record, pbar):
    """Rank 0 after a step: metrics.jsonl every log_every steps; every sample_every steps (and at the end)
    the held-out PSNR (logged too) and a picture grid (bicubic | SR | truth)."""
    last = step == cfg['max_steps']
    if heldout is not None and (step % cfg['sample_every'] == 0 or last):
        result = evaluate_sr(net, *heldout)
        record.update(psnr_sr=result['psnr_sr'], psnr_bicubic=result['psnr_bicubic'], gain_db=result['gain_db'])
        pbar.write(f"step {step}: held-out PSNR SR {result['psnr_sr']:.2f} dB, bicubic {result['psnr_bicubic']:.2f} dB "
                   f"({result['gain_db']:+.2f} dB)")
        comparison_grid(heldout[0], result['bicubic'], result['sr'], heldout[1],
                        os.path.join(cfg['out_dir'], f"samples_{step:07d}.png"), rows=4, show_input=False)
    if step % cfg['log_every'] == 0 or last or 'psnr_sr' in record:
        resume.log_metrics(cfg['out_dir'], record)


def train(cfg, ckpt):
    """The training loop; returns the SRNet (on its device)."""
    rank, world_size, device = resume.setup_distributed(_device(cfg))
    net, optimizer, scheduler, model_config = build(cfg, device)
    if ckpt is not None and ckpt['model_config'] != model_config:
        raise ConfigError(f"--resume: the run in {cfg['out_dir']} trained SRNet({ckpt['model_config']}), "
                          f"not SRNet({model_config})")
    start_step = resume.restore(ckpt, net, optimizer, scheduler, rank, cfg['seed'], device)
    model = net
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if device.startswith('cuda') else None)
    next_batch = batch_source(cfg, rank, world_size, start_step, device)
    heldout = heldout_pairs(cfg) if rank == 0 else None
    path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if rank == 0:
        resume.prepare_out_dir(cfg['out_dir'], start_step)
        print(f"SR {cfg['preset']} ({count_parameters(model):,} parameters) | {cfg['dataset']} {cfg['low_size']} -> "
              f"{2 * cfg['low_size']} | {world_size} x {device} | steps {start_step}->{cfg['max_steps']} of "
              f"{cfg['batch_size']} x {world_size} pairs | out {cfg['out_dir']}", flush=True)
    from tqdm import tqdm
    pbar = tqdm(total=cfg['max_steps'], initial=start_step, disable=rank != 0, dynamic_ncols=True, smoothing=0.1)
    bad_in_row, t_last = 0, time.time()
    for step in range(start_step, cfg['max_steps']):
        low, high, origin = next_batch(step)
        optimizer.zero_grad(set_to_none=True)
        sr = net(low, origin, (cfg['low_size'],) * 2)                  # (B, 3, 2s, 2s) at the crops' true positions
        loss = LOSSES[cfg['loss']](sr, high)                            # images in [0, 1]
        ok = resume.all_finite(loss, world_size)                        # a bad step is skipped by every process
        if ok:
            loss.backward()
        lr = optimizer.param_groups[0]['lr']                            # this step's
        ok = resume.apply_step(model, optimizer, cfg['grad_clip'], ok)
        bad_in_row = resume.count_bad(ok, bad_in_row, cfg['nonfinite'], step, path)
        scheduler.step()
        done = step + 1
        pbar.update(1)
        if rank == 0:
            pbar.set_postfix(loss=f"{loss.item():.3g}", refresh=False)
            record = dict(step=done, loss=loss.item(), lr=lr, sec_per_step=time.time() - t_last)
            report_progress(cfg, net, heldout, done, record, pbar)
        if done % cfg['save_every'] == 0 or done == cfg['max_steps']:
            resume.save_run(path, 'sr', model, model_config, optimizer, scheduler, done, cfg, device, rank, world_size)
        t_last = time.time()  # sec_per_step: the step's own time, not the measurement's or the checkpoint's
    pbar.close()
    if world_size > 1:
        torch.distributed.barrier()
    return model


def main(argv):
    if any(a in ('-h', '--help') for a in argv):
        print(__doc__)
        cfg = {**config, **RECIPES['imagenet' if 'imagenet' in argv else 'synthetic']}
        for key, value in cfg.items():
            print(f"--{key:18s} {value!r}")
        return None
    cfg = parse_config(argv)
    if cfg['eval']:
        return run_eval(cfg)
    return train(*resume.continue_run(argv, cfg, 'sr', config, RECIPES, parse_config))


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
