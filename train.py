"""
Train G3DR.

    python train.py                                     # small run on built-in synthetic scenes (CPU, minutes)
    python train.py --dataset imagenet --data_dir PATH  # the released ImageNet recipe (RECIPES), one GPU
    torchrun --standalone --nproc_per_node=6 train.py --dataset imagenet --data_dir PATH   # ... on six
    python train.py --stage rgbd                        # the class-conditional RGB-D diffusion model f_rgbd

Every key of `config` below can be overridden as `--key value` or `--key=value`;
`python train.py [--dataset imagenet] [--stage rgbd] --help` lists them with the values that apply.
"""
import contextlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

import diffusion
from configurator import ConfigError, parse_overrides
from data import one_line, resolve_device
from losses import WeightsUnavailable, depth_loss, load_perceptual, opacity_loss, recon_loss, tv_loss
from model import load_checkpoint
from render import CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera
from resume import (make_loader, plain_state, prepare_out_dir, rng_states, save_checkpoint, set_rng_state,
                    setup_distributed)

# -----------------------------------------------------------------------------
# config: one global dict, overridable from the command line. The values below are the synthetic recipe (a
# small G3DR that trains on a laptop CPU in minutes); `--dataset imagenet` puts the released recipe
# (RECIPES['imagenet']) on top, `--stage rgbd` the diffusion stage's (RGBD_RECIPES), and command-line keys win
# over both. `python train.py [--dataset imagenet] [--stage rgbd] --help` shows the values that apply.
config = dict(
    # what to train
    stage='trigen',          # 'trigen': f_trigen + f_dec (RGB-D -> 3D); 'rgbd': the f_rgbd diffusion model
    dataset='synthetic',     # 'synthetic' (built in, known 3D) or 'imagenet' (folders of photos + depth)
    data_dir='',             # imagenet: root of class folders with NAME.jpg + NAME_depth.png
    depth_dir='',            # imagenet: optional separate depth root mirroring data_dir
    skip_missing_depth=False,  # imagenet: skip images without depth instead of failing
    num_scenes=20_000,       # synthetic: size of the training set of procedural scenes
    out_dir='out',           # checkpoint, metrics.jsonl and sample grids go here
    init_from='',            # optional: start from a checkpoint (ours, or the authors' with init_official)
    init_official=False,     # init_from is in the authors' format
    resume=False,            # continue the run saved in out_dir/ckpt.pt
    trust_checkpoint=False,  # load init_from / resume files the safe loader refuses: runs code stored in them
    seed=1337,
    # model: the synthetic recipe learns 64 x 64 images with a small model and the corrected projection
    model_size='small',      # 'tiny', 'small' or 'paper' (see model.MODEL_PRESETS)
    image_size=64,           # side of the training images
    projection='yz',         # triplane projections: 'official' (released, no y-z plane) or 'yz' (corrected)
    levels=3,                # multi-resolution triplane levels (Sec. 3.3; 1 = single resolution)
    # optimisation (Adam + one-cycle)
    max_steps=1200,
    global_batch=4,          # images per optimiser step over all processes: batch_size x processes x accumulation
    batch_size=4,            # per process and micro-step
    lr=1e-3,
    beta1=0.9,               # fixed unless cycle_beta1
    beta2=0.99,
    cycle_beta1=False,       # True: beta1 follows the one-cycle schedule, 0.95 -> 0.85 -> 0.95, as released
    weight_decay=0.0,
    warmup_frac=0.1,         # one-cycle warm-up, fraction of max_steps (released 0.02)
    div_factor=25.0,         # one-cycle start lr = lr / div_factor
    grad_clip=1.0,           # gradient-norm clipping; 0 disables (released: none)
    nonfinite='skip',        # on a NaN/inf loss: 'skip' the step (stop after 20 in a row) or 'stop'
    # rendering during training: 64 x 64 images rendered at 32 x 32
    render_size=32,          # rays per side of the rendered training views
    n_coarse=16,
    n_fine=16,
    canonical_rays='random', # canonical steps render 'grid' (the whole image at render_size, as released) or
                             # 'random' (render_size^2 random pixels of the full-resolution image; a step
                             # with a canonical VGG/CLIP term, which needs an image, uses the grid)
    depth_guided_prob=0.4,   # canonical steps: P(fine samples placed around the ground-truth depth)
    rescale_s1=1.25,         # gradient-rescaling kernel k(x, t) = clamp(s1 exp(-(x-t)^2/s2), c_min, c_max)
    rescale_s2=0.03,
    # released 0.05; here densities in front of the surface must decay within 1200 steps rather than 300k
    # (with 0.05 the depth error is still ~1 scene unit after 200 steps, ~0.2 with 0.3)
    rescale_cmin=0.3,
    rescale_cmax=1.0,
    gradient_rescaling=True,  # the paper's gradient rescaling (Sec. 3.2) on canonical steps
    # losses (losses.py); image terms compare images in [-1, 1]
    recon='l1',              # 'l1' as released, 'l2' as the paper's text
    w_rgb=1.0,
    w_depth=2.0,
    w_vgg=1.0,               # canonical views, all five VGG levels, second half of training
    w_clip=0.175,            # canonical views, second half of training
    w_clip_novel=0.35,
    w_vgg_novel=2.0,         # novel views, deepest two VGG levels only
    w_tv_novel=0.1,
    w_opacity=1.0,           # rises linearly from 0 over the first opacity_ramp of training
    novel_opacity=False,     # the opacity term on novel steps too (released: True)
    opacity_ramp=0.5,
    perceptual_start=0.5,    # fraction of training after which w_vgg and w_clip switch on
    clip_model='ViT-B-16',
    clip_pretrained='openai',  # an open_clip tag, or a local weights file (open_clip's own loading)
    # VGG channel weights: 'lpips' (LPIPS' learned ones, from the installed lpips package, as released),
    # 'uniform' (all 1: the sum over channels, what the synthetic recipe was tuned with), or a vgg.pth file
    lpips_weights='uniform',
    # novel views (novel_camera)
    p_novel_max=0.1,         # P(novel) = min(p_novel_max, 2 step / max_steps) (released 0.4)
    yaw_div_start=24.0,      # yaw = pi/2 + U(-1, 1) pi / d, d falls linearly from start to end ...
    yaw_div_end=6.0,
    yaw_curriculum=1 / 3,    # ... over this fraction of training
    pitch_div=18.0,          # pitch = pi/2 + U(-1, 1) pi / pitch_div
    # f_rgbd diffusion stage (--stage rgbd)
    rgbd_size='small',       # denoiser size preset for f_rgbd ('small' or 'paper')
    p_uncond=0.1,            # class dropout for classifier-free guidance
    # logging
    log_every=10,
    sample_every=250,        # write a PNG grid every N steps
    save_every=250,          # write the checkpoint every N steps (and at the end)
    # system
    device='auto',           # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='float32',         # 'float32' (as released) or 'bfloat16' (autocast of f_trigen; f_dec and losses stay fp32)
    compile=False,           # torch.compile the UNet
    num_workers=0,
)

# `--dataset X` puts these on top of `config` (which is the synthetic recipe itself).
RECIPES = {
    'synthetic': {},
    # The released recipe: 6 GPUs x batch 8 = 48 images per step, 300k steps, Adam without gradient
    # clipping, beta1 cycling with the one-cycle lr, fp32, LPIPS with its learned channel weights. On fewer
    # GPUs, gradient accumulation makes up the 48.
    'imagenet': dict(model_size='paper', image_size=128, projection='official', max_steps=300_000, global_batch=48,
                     batch_size=8, lr=5e-5, cycle_beta1=True, grad_clip=0.0, render_size=128, n_coarse=32,
                     n_fine=32, rescale_cmin=0.05, lpips_weights='lpips', sample_every=2000, save_every=2000,
                     num_workers=8, num_scenes=0, rgbd_size='paper', canonical_rays='grid',
                     novel_opacity=True, warmup_frac=0.02, p_novel_max=0.4),
}

# `--stage rgbd` (the f_rgbd diffusion model) puts these on top of the dataset's recipe. On the CPU it learns
# at 32 x 32, where a pixel-space denoiser gets 4x the steps of 64 x 64 for the same time; sample.py resizes its
# samples to f_trigen's input size. (The paper's f_rgbd is a latent model; see diffusion.py.) It writes to
# out-rgbd, where sample.py looks for it, so that it does not collide with f_trigen's run in out.
RGBD_RECIPES = {
    'imagenet': dict(lr=1e-4, sample_every=5000, save_every=5000, out_dir='out-rgbd'),
    'synthetic': dict(image_size=32, max_steps=2400, global_batch=16, batch_size=16, lr=1e-3, sample_every=400,
                      save_every=400, out_dir='out-rgbd'),
}

DTYPES = {'float32': None, 'bfloat16': torch.bfloat16}  # autocast dtype of f_trigen / the f_rgbd denoiser


def _resolve(argv, base=None):
    """config, then the dataset's recipe, then the stage's, then the command line. With base (a resumed run's
    saved config, recipes already applied) only the command line goes on top."""
    overrides = parse_overrides(argv, config if base is None else base)
    if base is not None:
        return dict(base, **overrides)
    dataset = overrides.get('dataset', config['dataset'])
    stage = overrides.get('stage', config['stage'])
    if dataset not in RECIPES:
        raise ConfigError(f"--dataset must be one of {sorted(RECIPES)}, got {dataset!r}")
    if stage not in ('trigen', 'rgbd'):
        raise ConfigError(f"--stage must be 'trigen' or 'rgbd', got {stage!r}")
    cfg = dict(config, **RECIPES[dataset])
    if stage == 'rgbd':
        cfg.update(RGBD_RECIPES[dataset])
    cfg.update(overrides)
    return cfg


def parse_config(argv, base=None):
    """Apply the recipes and the `--key value` / `--key=value` overrides; return a new dict."""
    cfg = _resolve(argv, base)
    for key, allowed in (('nonfinite', ('skip', 'stop')), ('recon', ('l1', 'l2'))):
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    if cfg['dtype'] == 'float16':
        raise ConfigError("--dtype float16 is not supported (it needs loss scaling, which this loop does not do); "
                          "use --dtype bfloat16 or float32")
    if cfg['dtype'] not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    if cfg['dataset'] == 'imagenet' and not cfg['data_dir']:
        raise ConfigError("--dataset imagenet needs --data_dir PATH (class folders of NAME.jpg + NAME_depth.png)")
    for key in ('max_steps', 'global_batch', 'batch_size', 'image_size', 'render_size', 'n_coarse', 'save_every',
                'sample_every', 'log_every'):
        if cfg[key] <= 0:
            raise ConfigError(f"--{key} must be positive, got {cfg[key]}")
    return cfg


def accumulation_steps(cfg, world_size):
    """Micro-steps per optimiser step, so that every step sees global_batch images whatever the GPU count."""
    per_micro_step = cfg['batch_size'] * world_size
    if cfg['global_batch'] % per_micro_step:
        raise ConfigError(f"--global_batch {cfg['global_batch']} is not a multiple of --batch_size {cfg['batch_size']} "
                          f"x {world_size} process(es); change --batch_size or --global_batch")
    return cfg['global_batch'] // per_micro_step


def print_help(argv):
    """The docstring, then every key with the value it takes for this command line's dataset and stage."""
    print(__doc__)
    cfg = _resolve([a for a in argv if a not in ('-h', '--help')])
    print(f"values for --dataset {cfg['dataset']} --stage {cfg['stage']} ('*': differs from the synthetic recipe)")
    for key, value in cfg.items():
        print(f"--{key:20s} {value!r:>16s} {'*' if value != config[key] else ''}")


# -----------------------------------------------------------------------------
# schedules of the released recipe

def p_novel(step, cfg):
    """P(novel view) rises linearly and never exceeds p_novel_max."""
    return min(cfg['p_novel_max'], 2 * step / cfg['max_steps'])


def novel_camera(step, batch_size, cfg, generator):
    """Yaw range grows from +-pi/24 to +-pi/6 over the first third of training; pitch +-pi/18."""
    progress = min(1.0, step / max(1.0, cfg['yaw_curriculum'] * cfg['max_steps']))
    d = cfg['yaw_div_start'] + (cfg['yaw_div_end'] - cfg['yaw_div_start']) * progress
    u = torch.rand(2, batch_size, generator=generator) * 2 - 1
    return CANONICAL_YAW + u[0] * math.pi / d, CANONICAL_PITCH + u[1] * math.pi / cfg['pitch_div']


def term_weights(step, novel, cfg):
    """The loss terms of a canonical or novel step and their weights. Canonical: rgb, depth,
    VGG (all levels) and CLIP, the last two only after `perceptual_start`; novel: CLIP, VGG (deepest two
    levels) and TV(depth); both: the opacity term, its weight rising linearly over the first `opacity_ramp`.
    A perceptual term of weight 0 is not computed."""
    ramp = min(1.0, step / max(1.0, cfg['opacity_ramp'] * cfg['max_steps']))
    if novel:
        w = dict(clip=cfg['w_clip_novel'], vgg=cfg['w_vgg_novel'], tv=cfg['w_tv_novel'])
        return dict(w, opacity=cfg['w_opacity'] * ramp) if cfg['novel_opacity'] else w
    late = step >= cfg['perceptual_start'] * cfg['max_steps']
    return dict(rgb=cfg['w_rgb'], depth=cfg['w_depth'], vgg=cfg['w_vgg'] if late else 0.0,
                clip=cfg['w_clip'] if late else 0.0, opacity=cfg['w_opacity'] * ramp)


def draw_view(step, chunk, batch_size, cfg):
    """The canonical/novel coin and the novel poses of one micro-batch. As released, each process draws its
    own, so one step mixes both kinds. chunk = micro_step * world_size + rank numbers the step's micro-batches
    in the order of their images (StepBatchSampler), so one GPU accumulating 6 micro-batches draws what 6 GPUs
    draw; the draw depends only on (seed, step, chunk), so a resumed run continues exactly.
    Returns (novel, yaw (B,), pitch (B,), the generator, for the micro-batch's other random draws)."""
    # torch's CPU generator keeps 32 bits of a seed; chunk k adds k x 0x9E3779B9 (a Weyl sequence), which keeps
    # every (step, chunk) distinct for runs under 20M steps of up to 100 micro-batches
    gen = torch.Generator().manual_seed((cfg['seed'] * 1_000_003 + step + chunk * 0x9E3779B9) % 2 ** 32)
    novel = bool(torch.rand((), generator=gen) < p_novel(step, cfg))
    if novel:
        yaw, pitch = novel_camera(step, batch_size, cfg, gen)
    else:                                                             # the canonical camera
        yaw, pitch = torch.full((batch_size,), CANONICAL_YAW), torch.full((batch_size,), CANONICAL_PITCH)
    return novel, yaw, pitch, gen


def make_dataset(cfg):
    import data
    import scenes
    if cfg['dataset'] == 'synthetic':
        return scenes.SyntheticScenes(cfg['num_scenes'], image_size=cfg['image_size'], seed=cfg['seed'])
    return data.ImageNetDepth(cfg['data_dir'], image_size=cfg['image_size'], depth_root=cfg['depth_dir'] or None,
                              flip=True, skip_missing_depth=cfg['skip_missing_depth'])


# -----------------------------------------------------------------------------
# f_trigen stage: one canonical or novel training step

class _EncodeRender(torch.nn.Module):
    """encode + render as one forward(), so DistributedDataParallel sees (and syncs) the whole step.
    Under bf16 autocast only f_trigen runs in bf16: the field (f_dec) and the compositing stay float32."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, rgbd, rays_o, rays_d, render_opts):
        planes = self.model.encode(rgbd)                        # (B, 3, C, H, W)
        with torch.autocast(device_type=planes.device.type, enabled=False):
            return self.model.render(planes.float(), rays_o, rays_d, **render_opts)


def _to_image(x, size):
    """(B, R*R, K) ray values -> (B, K, R, R) image; ray index = row * R + col."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size, size)


def _at_render_size(x, size):
    """Targets at the render resolution. Rays pass through a corner-inclusive grid (render.get_rays),
    so bilinear resampling with align_corners=True reads the pixels exactly where the rays go."""
    if x.shape[-1] == size:
        return x
    return F.interpolate(x, size=(size, size), mode='bilinear', align_corners=True)


def _random_canonical_rays(image, depth, n_rays, generator):
    """n_rays random pixels per item of the full-resolution canonical view, instead of the whole view
    at render_size: the same work per step, but every pixel (and so all of the image's detail) can be
    learned. image (B, 3, S, S), depth (B, 1, S, S) -> rays_o, rays_d (B, n, 3) and the pixels' rgb
    (B, n, 3) and depth (B, n, 1)."""
    B, S = image.shape[0], image.shape[-1]
    idx = torch.rand(B, S * S, generator=generator).argsort(dim=1)[:, :n_rays].to(image.device)  # (B, n)
    yaw, pitch = torch.full((B,), CANONICAL_YAW), torch.full((B,), CANONICAL_PITCH)
    rays_o, rays_d = get_rays(orbit_camera(yaw, pitch).to(image.device), FOV_DEGREES, S)   # (B, S*S, 3)

    def take(x):  # (B, S*S, K) -> (B, n, K), ray index = row * S + col
        return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return take(rays_o), take(rays_d), take(image.flatten(2).transpose(1, 2)), take(depth.flatten(2).transpose(1, 2))


def trigen_losses(net, batch, step, chunk, cfg, perceptual, device, autocast):
    """One micro-batch of step `step` (chunk: see draw_view). Returns (total loss, dict of weighted terms,
    dict(novel=..., weights={term: weight applied})) ."""
    image = batch['image'].to(device, non_blocking=True) * 2 - 1      # (B, 3, S, S) in [-1, 1]
    depth = batch['depth'].to(device, non_blocking=True)              # (B, 1, S, S) scene units
    B, R = image.shape[0], cfg['render_size']
    novel, yaw, pitch, gen = draw_view(step, chunk, B, cfg)
    w = term_weights(step, novel, cfg)
    # a perceptual term is computed when it has a weight and its backbone was loaded (see load_perceptual)
    w = {k: v for k, v in w.items() if k not in ('vgg', 'clip') or (v and perceptual.get(k) is not None)}
    if not novel and cfg['canonical_rays'] == 'random' and 'vgg' not in w and 'clip' not in w:
        rays_o, rays_d, image_r, depth_r = _random_canonical_rays(image, depth, R * R, gen)  # (B, R*R, K) each
        as_image = lambda x: x                                        # per-ray losses need no image
    else:
        rays_o, rays_d = get_rays(orbit_camera(yaw.to(device), pitch.to(device)), FOV_DEGREES, R)  # (B, R*R, 3)
        image_r, depth_r = _at_render_size(image, R), _at_render_size(depth, R)
        as_image = lambda x: _to_image(x, R)                          # (B, R*R, K) -> (B, K, R, R)
    opts = dict(n_coarse=cfg['n_coarse'], n_fine=cfg['n_fine'], perturb=True)
    if not novel:
        # Sec. 3.2: gradient rescaling + depth-guided fine samples around the ground-truth depth (each
        # can be switched off on its own: gradient_rescaling=False, depth_guided_prob=0)
        surface = depth_r if depth_r.dim() == 3 else depth_r.flatten(2).transpose(1, 2)  # (B, R*R, 1)
        opts.update(surface_depth=surface, depth_guided_prob=cfg['depth_guided_prob'],
                    grad_rescale=cfg['gradient_rescaling'], s1=cfg['rescale_s1'], s2=cfg['rescale_s2'], c_min=cfg['rescale_cmin'], c_max=cfg['rescale_cmax'])
    with autocast():
        out = net(torch.cat([image, depth], 1), rays_o, rays_d, opts)
    rgb = as_image(out['rgb'].float())                                # (B, 3, R, R) or (B, R*R, 3), in [-1, 1]
    pred_depth = as_image(out['depth'].float())                       # (B, 1, R, R) or (B, R*R, 1)
    terms = {}
    if not novel:
        terms['rgb'] = w['rgb'] * recon_loss(rgb, image_r, kind=cfg['recon'])
        terms['depth'] = w['depth'] * depth_loss(pred_depth, depth_r)
        if 'vgg' in w:
            terms['vgg'] = w['vgg'] * perceptual['vgg'](rgb, image_r, levels=(0, 1, 2, 3, 4))
        if 'clip' in w:
            terms['clip'] = w['clip'] * perceptual['clip'](rgb, image_r)
    else:
        # Novel views get no pixels: CLIP and deep VGG features keep the input's semantics, TV keeps depth smooth.
        if 'clip' in w:
            terms['clip'] = w['clip'] * perceptual['clip'](rgb, image_r)
        if 'vgg' in w:
            terms['vgg'] = w['vgg'] * perceptual['vgg'](rgb, image_r, levels=(3, 4))
        terms['tv'] = w['tv'] * tv_loss(pred_depth)
    if 'opacity' in w:
        terms['opacity'] = w['opacity'] * opacity_loss(out['opacity'].float())
    return sum(terms.values()), terms, dict(novel=novel, weights=w)


# -----------------------------------------------------------------------------
# pictures people look at

@torch.no_grad()
def trigen_grid(model, batch, cfg, device, path):
    """Rows: scenes. Columns: input, canonical render, its depth, then two novel views and their depth."""
    import data
    image = batch['image'][:4].to(device)                                # (4, 3, S, S) in [0, 1]
    depth = batch['depth'][:4].to(device)
    S = cfg['image_size']
    planes = model.encode(torch.cat([image * 2 - 1, depth], 1))
    columns = [image]
    for yaw in (CANONICAL_YAW, CANONICAL_YAW - math.pi / 6, CANONICAL_YAW + math.pi / 6):
        rgb, d = model.render_view(planes, yaw, CANONICAL_PITCH, S, n_coarse=cfg['n_coarse'], n_fine=cfg['n_fine'])
        columns += [rgb, data.colorize_depth(d)]
    data.save_grid(torch.stack(columns, 1).flatten(0, 1), path, nrow=len(columns))


# -----------------------------------------------------------------------------

def _device(cfg):
    """The device asked for (data.resolve_device), except that 'auto' without a GPU is the CPU for synthetic
    runs only: an ImageNet run on the CPU (about 85 s a step at paper size) has to be asked for with --device cpu."""
    if cfg['device'] == 'auto' and cfg['dataset'] == 'imagenet' and not torch.cuda.is_available():
        raise ConfigError("--dataset imagenet: no CUDA GPU found (torch.cuda.is_available() is False); "
                          "pass --device cpu to train on the CPU anyway (about 85 s a step at paper size)")
    try:
        return resolve_device(cfg['device'])
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_model(cfg):
    """The trained model and the module whose forward() makes one training step's prediction."""
    if cfg['stage'] == 'rgbd':
        num_classes = make_dataset(cfg).num_classes
        model = diffusion.make_denoiser(num_classes, size=cfg['rgbd_size'], image_size=cfg['image_size'])
        return model, model
    from model import G3DR, MODEL_PRESETS
    if cfg['init_from']:
        load = G3DR.from_official if cfg['init_official'] else G3DR.from_checkpoint
        model = load(cfg['init_from'], trust=cfg['trust_checkpoint'])
    else:
        model = G3DR(dict(MODEL_PRESETS[cfg['model_size']], image_size=cfg['image_size'], projection=cfg['projection'],
                          levels=cfg['levels']))
    return model, _EncodeRender(model)


def main(argv):
    if any(a in ('-h', '--help') for a in argv):
        print_help(argv)
        return None
    cfg = parse_config(argv)
    out_dir = cfg['out_dir']
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    ckpt = None
    if cfg['resume']:
        if not os.path.exists(ckpt_path):
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path, trust=cfg['trust_checkpoint'])
        # the run's own config, with this command line's overrides on top (trust is never inherited; a run
        # saved before a key existed gets that key from its recipe)
        saved = {k: v for k, v in ckpt['config'].items() if k != 'trust_checkpoint'}
        cfg = parse_config(argv, base=dict(_resolve(['--dataset', saved['dataset'], '--stage', saved['stage']]),
                                           **saved))
        if ckpt.get('stage', 'trigen') != cfg['stage']:
            raise ConfigError(f"{ckpt_path} is a --stage {ckpt.get('stage')} checkpoint, not --stage {cfg['stage']}")
        if cfg['max_steps'] > ckpt['scheduler']['total_steps']:
            raise ConfigError(f"--max_steps {cfg['max_steps']} is beyond the one-cycle schedule of the run in {out_dir} "
                              f"({ckpt['scheduler']['total_steps']} steps); start a new run to train longer")
    elif os.path.exists(ckpt_path):
        raise ConfigError(f"{ckpt_path} already exists: pass --resume to continue that run, or pick another --out_dir")

    rank, world_size, device = setup_distributed(_device(cfg))
    torch.manual_seed(cfg['seed'] + rank)
    np.random.seed(cfg['seed'] + rank)
    random.seed(cfg['seed'] + rank)
    use_cuda = str(device).startswith('cuda')
    accumulation = accumulation_steps(cfg, world_size)
    # float32 (torch's defaults, as released) or the bf16 opt-in: autocast of f_trigen (or the f_rgbd denoiser)
    # with TF32 matmuls; f_dec, the compositing and the loss backbones stay float32 (_EncodeRender, losses.py)
    amp_dtype = DTYPES[cfg['dtype']]
    if amp_dtype is not None:
        torch.backends.cuda.matmul.allow_tf32 = True

        def autocast():
            return torch.autocast(device_type=torch.device(device).type, dtype=amp_dtype)
    else:
        autocast = contextlib.nullcontext

    dataset = make_dataset(cfg)
    model, net = build_model(cfg)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg['lr'], betas=(cfg['beta1'], cfg['beta2']),
                                 weight_decay=cfg['weight_decay'])
    # One-cycle: warm up from lr/25 over 2% of the steps, then cosine-anneal. With cycle_beta1 (released), Adam's
    # beta1 moves the other way, 0.95 -> 0.85 at the peak lr -> 0.95 (torch's defaults, which the release keeps).
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg['lr'], total_steps=cfg['max_steps'],
                                                    pct_start=cfg['warmup_frac'], div_factor=cfg['div_factor'],
                                                    cycle_momentum=cfg['cycle_beta1'], base_momentum=0.85,
                                                    max_momentum=0.95)
    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        start_step = ckpt['step']
        set_rng_state(ckpt.get('rng'), rank, start_step, cfg['seed'], device)
    if cfg['compile']:
        if cfg['stage'] == 'trigen':
            model.encode = torch.compile(model.encode)
        else:
            net = torch.compile(net)
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if use_cuda else None)

    if cfg['stage'] == 'trigen':
        perceptual = load_perceptual(cfg, device, rank)

        def step_fn(batch, step, chunk):
            return trigen_losses(net, batch, step, chunk, cfg, perceptual, device, autocast)
    else:
        def step_fn(batch, step, chunk):
            return diffusion.rgbd_losses(net, batch, step, cfg, device, autocast)

    if rank == 0:
        prepare_out_dir(out_dir, start_step)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage {cfg['stage']} | {cfg['dataset']} ({len(dataset)} items) | {n_params / 1e6:.2f}M parameters | "
              f"{world_size} x {device} | steps {start_step}->{cfg['max_steps']} of {cfg['global_batch']} images "
              f"({cfg['batch_size']} x {world_size} x {accumulation} accumulated) | out {out_dir}", flush=True)
    # a fixed batch for the picture grids: held-out scenes on synthetic data, the first images otherwise
    if cfg['dataset'] == 'synthetic':
        import scenes
        shown = scenes.SyntheticScenes(4, image_size=cfg['image_size'], seed=cfg['seed'] + 1)
    else:
        shown = dataset
    shown_batch = torch.utils.data.default_collate([shown[i] for i in range(min(4, len(shown)))])

    def save(step):
        """Called by every process: each contributes its own RNG state; rank 0 writes. Everything in the
        file is tensors and plain Python values, so torch.load(..., weights_only=True) reads it."""
        rng = rng_states(device, world_size)
        if rank != 0:
            return
        state = dict(stage=cfg['stage'], model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scheduler=plain_state(scheduler.state_dict()), step=step, config=cfg, rng=rng)
        if cfg['stage'] == 'trigen':
            state['model_config'] = model.config
        else:
            state['denoiser_config'] = dict(num_classes=dataset.num_classes, size=cfg['rgbd_size'],
                                            image_size=cfg['image_size'])
        save_checkpoint(ckpt_path, state)

    from tqdm import tqdm
    pbar = tqdm(total=cfg['max_steps'], initial=start_step, disable=rank != 0, dynamic_ncols=True, smoothing=0.1)
    batches = iter(make_loader(dataset, cfg, rank, world_size, start_step, accumulation))
    bad_in_row, t_last = 0, time.time()
    for step in range(start_step, cfg['max_steps']):
        net.train()
        optimizer.zero_grad(set_to_none=True)
        # Gradient accumulation (as nanoGPT): `accumulation` micro-batches per process, each loss divided by
        # their number, so the step's gradient is the mean over all global_batch images. DDP averages over the
        # processes once, on the last micro-batch; the others run under no_sync.
        # A non-finite loss or gradient never reaches the weights: every process agrees to skip (or stop).
        ok, views = True, []
        for micro in range(accumulation):
            batch = next(batches)  # consumed even when the step is being skipped, so the data stays in step
            if not ok:
                continue
            loss, terms, info = step_fn(batch, step, micro * world_size + rank)
            finite = torch.isfinite(loss.detach()).float()
            if world_size > 1:
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            if finite.item() != 1:
                ok = False
                continue
            last = micro == accumulation - 1
            with contextlib.nullcontext() if world_size == 1 or last else net.no_sync():
                (loss / accumulation).backward()
            views.append(dict(loss=loss.item(), **info, **{k: v.item() for k, v in terms.items()}))
        if ok:
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'] or float('inf'))
            ok = bool(torch.isfinite(grad_norm))  # gradients are already synchronised here
        if ok:
            optimizer.step()
            bad_in_row = 0
        else:
            bad_in_row += 1
            optimizer.zero_grad(set_to_none=True)
            if cfg['nonfinite'] == 'stop' or bad_in_row >= 20:
                raise FloatingPointError(f"non-finite loss or gradient at step {step} ({bad_in_row} in a row); "
                                         f"the last good checkpoint is {ckpt_path}")
            if rank == 0:
                tqdm.write(f"step {step}: non-finite loss or gradient, step skipped")
        lr, beta1 = optimizer.param_groups[0]['lr'], optimizer.param_groups[0]['betas'][0]  # this step's
        scheduler.step()
        done = step + 1
        pbar.update(1)
        if rank == 0:
            mean_loss = sum(v['loss'] for v in views) / len(views) if views else float('nan')
            postfix = {}
            if cfg['stage'] == 'trigen':
                postfix['novel'] = f"{sum(v['novel'] for v in views)}/{accumulation}"
            pbar.set_postfix(loss=f"{mean_loss:.4f}", **postfix, refresh=False)
            if done % cfg['log_every'] == 0 or done == cfg['max_steps']:
                now = time.time()
                # loss: this process's mean over its micro-batches; views: each micro-batch's terms (weighted),
                # and for f_trigen whether it was novel and the weights its terms were applied with
                record = dict(step=done, loss=mean_loss, lr=lr, beta1=beta1,
                              sec_per_step=(now - t_last) / cfg['log_every'], views=views)
                t_last = now
                with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f:
                    f.write(json.dumps(record) + '\n')
            if done % cfg['sample_every'] == 0 or done == cfg['max_steps']:
                model.eval()
                path = os.path.join(out_dir, f"samples_{done:07d}.png")
                if cfg['stage'] == 'trigen':
                    trigen_grid(model, shown_batch, cfg, device, path)
                else:
                    diffusion.rgbd_grid(model, dataset.num_classes, cfg, device, path)
        if done % cfg['save_every'] == 0 or done == cfg['max_steps']:
            save(done)
    pbar.close()
    if world_size > 1:
        torch.distributed.barrier()
    return model


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError, WeightsUnavailable) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
