"""
Train G3DR's f_trigen and f_dec: one RGB-D image in, a triplane radiance field out, from single views only.

    python train.py                                     # small run on built-in synthetic scenes (CPU, minutes)
    python train.py --dataset imagenet --data_dir PATH  # the released ImageNet recipe (RECIPES), one GPU
    torchrun --standalone --nproc_per_node=8 train.py --dataset imagenet --data_dir PATH   # ... on eight

Every key of `config` below can be overridden as `--key value` or `--key=value`;
`python train.py [--dataset imagenet] --help` lists them with the values that apply. The class-conditional
RGB-D diffusion model f_rgbd trains from its own script, train_rgbd.py.
"""
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import resume
from configurator import ConfigError, given, resolve, resolve_device, run_script
from losses import WeightsUnavailable, depth_loss, load_perceptual, opacity_loss, recon_loss, tv_loss
from render import CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera
from sr import load_sr

# -----------------------------------------------------------------------------
# config: one global dict, overridable from the command line. The values below are the synthetic recipe (a
# small G3DR that trains on a laptop CPU in minutes); `--dataset imagenet` puts the released recipe
# (RECIPES['imagenet']) on top, and command-line keys win over both.
config = dict(
    # data
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
    aligned_plane=True,      # yz: the y-z plane holds each pixel's feature where its canonical ray crosses the box
                             # centre (model.align_yz_plane); released: image-aligned, as f_trigen outputs it
    levels=3,                # multi-resolution triplane levels (Sec. 3.3; 1 = single resolution)
    # optimisation (Adam + one-cycle)
    max_steps=1200,
    global_batch=4,          # images per optimiser step over all processes: processes x batch_size x accumulation
    batch_size=4,            # the largest micro-batch per process; left out, a smaller one may be chosen so that
                             # global_batch splits over the processes (resume.split_batch)
    lr=2e-3,                 # released 5e-5 (300k steps); 400-step screens with the aligned plane: 1e-3 24.95 dB
                             # canonical / 23.07 novel, 2e-3 26.94 / 24.02, 4e-3 26.92 / 23.59
    beta1=0.9,               # fixed unless cycle_beta1
    beta2=0.99,
    cycle_beta1=False,       # True: beta1 follows the one-cycle schedule, 0.95 -> 0.85 -> 0.95, as released
    weight_decay=0.0,
    warmup_frac=0.1,         # one-cycle warm-up, fraction of max_steps (released 0.02) ...
    # ... but at least this many steps in runs of twice that or more: after a 6-step warm-up the 60-step check
    # rendered every held-out scene as the same average scene (canonical 17.4 dB); after 30 steps 19.6 (16 held-out
    # scenes). Runs of 300 steps or more (the default, the ImageNet recipe) are not affected.
    warmup_min_steps=30,
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
    # The paper's gradient rescaling (Sec. 3.2, Eq. 3) on canonical steps: off in the synthetic recipe, on in the
    # released one. Here, where the depth loss sees exact depth, it made the geometry worse: without it the
    # novel-view depth error of a 1,200-step run was 0.124 against 0.173 (canonical 0.069 against 0.118), PSNR
    # as good (bench.py ablate, README: Results).
    gradient_rescaling=False,
    rescale_s1=1.25,         # its kernel k(x, t) = clamp(s1 exp(-(x-t)^2/s2), c_min, c_max)
    rescale_s2=0.03,
    # released 0.05; with rescaling on, densities in front of the surface must decay within 1200 steps rather
    # than 300k (with 0.05 the depth error is still ~1 scene unit after 200 steps, ~0.2 with 0.3)
    rescale_cmin=0.3,
    rescale_cmax=1.0,
    # losses (losses.py). The perceptual terms (VGG16, CLIP) are off in the synthetic recipe, so that it trains
    # the same way on every machine; a nonzero weight loads its pretrained backbone or stops with one line.
    recon='l1',              # 'l1' as released, 'l2' as the paper's text
    w_rgb=1.0,
    w_depth=2.0,
    w_vgg=0.0,               # canonical views, all five VGG levels, second half of training (released 1)
    w_clip=0.0,              # canonical views, second half of training (released 0.175)
    w_clip_novel=0.0,        # (released 0.35)
    w_vgg_novel=0.0,         # novel views, deepest two VGG levels only (released 2)
    w_tv_novel=0.1,
    w_opacity=1.0,           # rises linearly from 0 over the first opacity_ramp of training
    novel_opacity=False,     # the opacity term on novel steps too (released: True)
    # released: half the run. Here a tenth, because early on the field is half transparent: a 60-step run renders
    # with mean opacity 0.69 after a half ramp, 0.99 after a tenth, and its canonical PSNR is 16.6 against 19.2 dB
    opacity_ramp=0.1,
    perceptual_start=0.5,    # fraction of training after which w_vgg and w_clip switch on
    # ImageNet: the VGG/CLIP terms compare SR(render) with the photo at twice the size (paper Sec. 3.5: SR "in
    # training"; that only the perceptual terms see it, frozen, is our reading, see the README)
    sr_ckpt='',              # a train_sr.py checkpoint (its 'imagenet' preset); '' = no SR in training
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
    # clipping, beta1 cycling with the one-cycle lr, fp32, VGG (LPIPS with its learned channel weights) and
    # CLIP. On other GPU counts the micro-batch and gradient accumulation make up the 48 (resume.split_batch).
    'imagenet': dict(model_size='paper', image_size=128, projection='official', aligned_plane=False, max_steps=300_000,
                     global_batch=48, batch_size=8, lr=5e-5, cycle_beta1=True, grad_clip=0.0, render_size=128,
                     n_coarse=32, n_fine=32, gradient_rescaling=True, rescale_cmin=0.05, lpips_weights='lpips',
                     sample_every=2000, save_every=2000, num_workers=8, num_scenes=0, canonical_rays='grid',
                     novel_opacity=True, opacity_ramp=0.5, warmup_frac=0.02, p_novel_max=0.4, w_vgg=1.0, w_clip=0.175,
                     w_clip_novel=0.35, w_vgg_novel=2.0),
}

DTYPES = {'float32': None, 'bfloat16': torch.bfloat16}  # autocast dtype of f_trigen


def _resolve(argv, base=None):
    """config, then the dataset's recipe, then the command line (configurator.resolve)."""
    if given(argv, 'stage'):
        raise ConfigError("--stage is gone: train.py trains f_trigen, train_rgbd.py trains f_rgbd")
    return resolve(argv, config, RECIPES, base)


def parse_config(argv, base=None):
    """Apply the recipe and the `--key value` / `--key=value` overrides; return a new dict."""
    cfg = _resolve(argv, base)
    for key, allowed in (('nonfinite', ('skip', 'stop')), ('recon', ('l1', 'l2')),
                         ('canonical_rays', ('grid', 'random'))):
        if cfg[key] not in allowed:
            raise ConfigError(f"--{key} must be one of {', '.join(allowed)}, got {cfg[key]!r}")
    if cfg['dtype'] == 'float16':
        raise ConfigError("--dtype float16 is not supported (it needs loss scaling, which this loop does not do); "
                          "use --dtype bfloat16 or float32")
    if cfg['dtype'] not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {cfg['dtype']!r}")
    if cfg['projection'] != 'yz' and not given(argv, 'aligned_plane'):
        cfg['aligned_plane'] = False  # only the 'yz' projection has a y-z plane to align
    if cfg['dataset'] == 'imagenet' and not cfg['data_dir']:
        raise ConfigError("--dataset imagenet needs --data_dir PATH (class folders of NAME.jpg + NAME_depth.png)")
    if cfg['sr_ckpt'] and (cfg['dataset'] != 'imagenet' or cfg['canonical_rays'] != 'grid'):
        raise ConfigError("--sr_ckpt (SR in training) needs --dataset imagenet with --canonical_rays grid")
    for key in ('max_steps', 'global_batch', 'batch_size', 'image_size', 'render_size', 'n_coarse', 'save_every',
                'sample_every', 'log_every'):
        if cfg[key] <= 0:
            raise ConfigError(f"--{key} must be positive, got {cfg[key]}")
    return cfg


def batch_split(cfg, argv, world_size):
    """(micro-batch, accumulation) of this run: --batch_size as given, or chosen (resume.split_batch)."""
    return resume.split_batch(cfg['global_batch'], world_size, cfg['batch_size'], explicit=given(argv, 'batch_size'))


def print_help(argv):
    """The docstring, then every key with the value it takes for this command line's dataset."""
    print(__doc__)
    cfg = _resolve([a for a in argv if a not in ('-h', '--help')])
    print(f"values for --dataset {cfg['dataset']} ('*': differs from the synthetic recipe)")
    for key, value in cfg.items():
        print(f"--{key:20s} {value!r:>16s} {'*' if value != config[key] else ''}")


# -----------------------------------------------------------------------------
# schedules of the released recipe

def warmup_fraction(cfg):
    """The one-cycle warm-up as a fraction of the run: warmup_frac, but at least warmup_min_steps steps in runs
    of twice that or more (shorter ones are smoke tests; there it would be half the run or more)."""
    if cfg['max_steps'] >= 2 * cfg['warmup_min_steps']:
        return max(cfg['warmup_frac'], cfg['warmup_min_steps'] / cfg['max_steps'])
    return cfg['warmup_frac']


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
    A perceptual term of weight 0 is left out (not computed)."""
    ramp = min(1.0, step / max(1.0, cfg['opacity_ramp'] * cfg['max_steps']))
    if novel:
        w = dict(clip=cfg['w_clip_novel'], vgg=cfg['w_vgg_novel'], tv=cfg['w_tv_novel'])
        if cfg['novel_opacity']:
            w['opacity'] = cfg['w_opacity'] * ramp
    else:
        late = step >= cfg['perceptual_start'] * cfg['max_steps']
        w = dict(rgb=cfg['w_rgb'], depth=cfg['w_depth'], vgg=cfg['w_vgg'] if late else 0.0,
                 clip=cfg['w_clip'] if late else 0.0, opacity=cfg['w_opacity'] * ramp)
    return {k: v for k, v in w.items() if v or k not in ('vgg', 'clip')}


def draw_view(step, micro_index, batch_size, cfg):
    """The canonical/novel coin and the novel poses of one micro-batch. As released, each process draws its
    own, so one step mixes both kinds. micro_index = micro_step * world_size + rank numbers the step's
    micro-batches in the order of their images (resume.StepBatchSampler), so one GPU accumulating 6
    micro-batches draws what 6 GPUs draw; the draw depends only on (seed, step, micro_index), so a resumed run
    continues exactly. Returns (novel, yaw (B,), pitch (B,), the generator, for the micro-batch's other draws)."""
    # torch's CPU generator keeps 32 bits of a seed; micro-batch k adds k x 0x9E3779B9 (a Weyl sequence), which
    # keeps every (step, k) distinct for runs under 20M steps of up to 100 micro-batches
    gen = torch.Generator().manual_seed((cfg['seed'] * 1_000_003 + step + micro_index * 0x9E3779B9) % 2 ** 32)
    novel = bool(torch.rand((), generator=gen) < p_novel(step, cfg))
    if novel:
        yaw, pitch = novel_camera(step, batch_size, cfg, gen)
    else:                                                             # the canonical camera
        yaw, pitch = torch.full((batch_size,), CANONICAL_YAW), torch.full((batch_size,), CANONICAL_PITCH)
    return novel, yaw, pitch, gen


# -----------------------------------------------------------------------------
# one micro-batch: a canonical or a novel step (Sec. 3.2 - 3.4)

def _to_image(x, side):
    """(B, side*side, K) ray values -> (B, K, side, side) image; ray index = row * side + col."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], side, side)


def _at_render_size(x, side):
    """Targets at the render resolution. Rays pass through a corner-inclusive grid (render.get_rays),
    so bilinear resampling with align_corners=True reads the pixels exactly where the rays go."""
    if x.shape[-1] == side:
        return x
    return F.interpolate(x, size=(side, side), mode='bilinear', align_corners=True)


def _random_canonical_rays(image, depth, n_rays, generator):
    """n_rays random pixels per item of the full-resolution canonical view, instead of the whole view
    at render_size: the same work per step, but every pixel (and so all of the image's detail) can be
    learned. image (B, 3, S, S), depth (B, 1, S, S) -> rays_o, rays_d (B, R, 3) and the pixels' rgb
    (B, R, 3) and depth (B, R, 1), R = n_rays."""
    B, S = image.shape[0], image.shape[-1]
    idx = torch.rand(B, S * S, generator=generator).argsort(dim=1)[:, :n_rays].to(image.device)  # (B, R)
    yaw, pitch = torch.full((B,), CANONICAL_YAW), torch.full((B,), CANONICAL_PITCH)
    rays_o, rays_d = get_rays(orbit_camera(yaw, pitch).to(image.device), FOV_DEGREES, S)   # (B, S*S, 3)

    def take(x):  # (B, S*S, K) -> (B, R, K), ray index = row * S + col
        return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return take(rays_o), take(rays_d), take(image.flatten(2).transpose(1, 2)), take(depth.flatten(2).transpose(1, 2))


def _training_rays(image, depth, novel, yaw, pitch, gen, cfg, per_ray):
    """The rays of one micro-batch and the targets they see: per_ray (random canonical pixels) gives
    (B, R, K) targets, else the whole view at render_size, images (B, K, side, side)."""
    side = cfg['render_size']
    if per_ray:
        return _random_canonical_rays(image, depth, side * side, gen)
    rays_o, rays_d = get_rays(orbit_camera(yaw.to(image.device), pitch.to(image.device)), FOV_DEGREES, side)
    return rays_o, rays_d, _at_render_size(image, side), _at_render_size(depth, side)


def trigen_losses(model, batch, step, micro_index, cfg, perceptual, device, autocast, sr=None):
    """One micro-batch of step `step` (micro_index: see draw_view). model: the G3DR or its DDP wrapper;
    perceptual: {'vgg': ..., 'clip': ...} backbones of the terms that have a weight; autocast: a callable
    giving the context f_trigen runs in; sr: the frozen 2x network the perceptual terms look through (--sr_ckpt),
    or None. Returns (total loss, {term: weighted value},
    dict(novel=..., weights={term: weight applied}))."""
    image = batch['image'].to(device, non_blocking=True)              # (B, 3, S, S) in [0, 1]
    depth = batch['depth'].to(device, non_blocking=True)              # (B, 1, S, S) scene units
    novel, yaw, pitch, gen = draw_view(step, micro_index, image.shape[0], cfg)
    w = term_weights(step, novel, cfg)
    # canonical steps with per-pixel terms only can use random full-resolution pixels; VGG/CLIP need an image
    per_ray = not novel and cfg['canonical_rays'] == 'random' and 'vgg' not in w and 'clip' not in w
    rays_o, rays_d, image_r, depth_r = _training_rays(image, depth, novel, yaw, pitch, gen, cfg, per_ray)
    opts = dict(n_coarse=cfg['n_coarse'], n_fine=cfg['n_fine'], perturb=True)
    if not novel:
        # Sec. 3.2: gradient rescaling (Eq. 3) + depth-guided fine samples around the ground-truth depth (each
        # can be switched off on its own: gradient_rescaling=False, depth_guided_prob=0)
        surface = depth_r if per_ray else depth_r.flatten(2).transpose(1, 2)  # (B, R, 1)
        opts.update(surface_depth=surface, depth_guided_prob=cfg['depth_guided_prob'],
                    grad_rescale=cfg['gradient_rescaling'], s1=cfg['rescale_s1'], s2=cfg['rescale_s2'],
                    c_min=cfg['rescale_cmin'], c_max=cfg['rescale_cmax'])
    with autocast():
        out = model(image, depth, rays_o, rays_d, **opts)
    as_image = (lambda x: x) if per_ray else (lambda x: _to_image(x, cfg['render_size']))
    rgb = as_image(out['rgb'].float())                                # (B, 3, side, side) or (B, R, 3), in [0, 1]
    pred_depth = as_image(out['depth'].float())                       # (B, 1, side, side) or (B, R, 1)
    rgb_p, image_p = rgb, image_r                                     # what the perceptual terms compare
    if sr is not None and ('vgg' in w or 'clip' in w):
        rgb_p, image_p = sr(rgb), _at_render_size(batch['image_hr'].to(device), 2 * cfg['render_size'])
    terms = {}
    if not novel:  # Sec. 3.4, canonical view: the pixels and depth are known
        terms['rgb'] = w['rgb'] * recon_loss(rgb, image_r, kind=cfg['recon'])
        terms['depth'] = w['depth'] * depth_loss(pred_depth, depth_r)
        if 'vgg' in w:
            terms['vgg'] = w['vgg'] * perceptual['vgg'](rgb_p, image_p, levels=(0, 1, 2, 3, 4))
        if 'clip' in w:
            terms['clip'] = w['clip'] * perceptual['clip'](rgb_p, image_p)
    else:
        # Novel views get no pixels: CLIP and deep VGG features keep the input's semantics, TV keeps depth smooth.
        if 'clip' in w:
            terms['clip'] = w['clip'] * perceptual['clip'](rgb_p, image_p)
        if 'vgg' in w:
            terms['vgg'] = w['vgg'] * perceptual['vgg'](rgb_p, image_p, levels=(3, 4))
        terms['tv'] = w['tv'] * tv_loss(pred_depth)
    if 'opacity' in w:
        terms['opacity'] = w['opacity'] * opacity_loss(out['opacity'].float())
    return sum(terms.values()), terms, dict(novel=novel, weights=w)


# -----------------------------------------------------------------------------
# what a run is made of

@torch.no_grad()
def trigen_grid(model, batch, cfg, device, path):
    """Rows: scenes. Columns: input, canonical render, its depth, then two novel views and their depth."""
    from outputs import colorize_depth, save_grid
    image = batch['image'][:4].to(device)                                # (4, 3, S, S) in [0, 1]
    depth = batch['depth'][:4].to(device)
    planes = model.encode(image, depth)
    columns = [image]
    for yaw in (CANONICAL_YAW, CANONICAL_YAW - math.pi / 6, CANONICAL_YAW + math.pi / 6):
        rgb, d = model.render_view(planes, yaw, CANONICAL_PITCH, cfg['image_size'], n_coarse=cfg['n_coarse'],
                                   n_fine=cfg['n_fine'])
        columns += [rgb, colorize_depth(d)]
    save_grid(torch.stack(columns, 1).flatten(0, 1), path, nrow=len(columns))


def make_dataset(cfg, num_scenes=None, seed=None):
    """The training set (synthetic scenes, or ImageNet-with-depth folders)."""
    import scenes
    if cfg['dataset'] == 'synthetic':
        return scenes.SyntheticScenes(num_scenes or cfg['num_scenes'], image_size=cfg['image_size'],
                                      seed=cfg['seed'] if seed is None else seed)
    import data
    return data.ImageNetDepth(cfg['data_dir'], image_size=cfg['image_size'], depth_root=cfg['depth_dir'] or None,
                              flip=True, skip_missing_depth=cfg['skip_missing_depth'],
                              hr_size=2 * cfg['image_size'] if cfg['sr_ckpt'] else None)


def shown_batch(cfg, dataset):
    """A fixed batch for the picture grids: held-out scenes on synthetic data, the first images otherwise."""
    shown = make_dataset(cfg, num_scenes=4, seed=cfg['seed'] + 1) if cfg['dataset'] == 'synthetic' else dataset
    return torch.utils.data.default_collate([shown[i] for i in range(min(4, len(shown)))])


def build_model(cfg, ckpt=None):
    """The resumed run's own G3DR (ckpt: its saved sizes, whatever the recipe says now), a new one of the
    recipe's size, or the one in --init_from (ours, or the authors' with init_official)."""
    import checkpoint
    from model import G3DR, MODEL_PRESETS
    if ckpt is not None:  # e.g. a run saved before aligned_plane existed keeps its image-aligned plane
        return G3DR(ckpt['model_config'])
    if cfg['init_from']:
        return checkpoint.load_g3dr(cfg['init_from'], official=cfg['init_official'], trust=cfg['trust_checkpoint'])[0]
    return G3DR(dict(MODEL_PRESETS[cfg['model_size']], image_size=cfg['image_size'], projection=cfg['projection'],
                     levels=cfg['levels'], aligned_plane=cfg['aligned_plane']))


def frozen_networks(cfg, device):
    """The frozen VGG16 / CLIP of the terms that have a weight, and the SR network of --sr_ckpt (or None).
    Weights that cannot be had stop the run (WeightsUnavailable, one line): a recipe never changes because
    of what a cache happens to hold."""
    wanted = [name for name, keys in (('vgg', ('w_vgg', 'w_vgg_novel')), ('clip', ('w_clip', 'w_clip_novel')))
              if any(cfg[k] for k in keys)]
    perceptual = load_perceptual(wanted, device, lpips_weights=cfg['lpips_weights'], clip_model=cfg['clip_model'],
                                 clip_pretrained=cfg['clip_pretrained'])
    sr = None
    if cfg['sr_ckpt']:
        sr = load_sr(cfg['sr_ckpt'], device, trust=cfg['trust_checkpoint']).requires_grad_(False)
    return perceptual, sr


def device_of(cfg):
    """The device asked for, except that 'auto' without a GPU is the CPU for synthetic runs only: an
    ImageNet run on the CPU (about 85 s a step at paper size) has to be asked for with --device cpu."""
    if cfg['device'] == 'auto' and cfg['dataset'] == 'imagenet' and not torch.cuda.is_available():
        raise ConfigError("--dataset imagenet: no CUDA GPU found (torch.cuda.is_available() is False); "
                          "pass --device cpu to train on the CPU anyway (about 85 s a step at paper size)")
    return resolve_device(cfg['device'])


# -----------------------------------------------------------------------------

def main(argv):
    if any(a in ('-h', '--help') for a in argv):
        print_help(argv)
        return None
    cfg, ckpt = resume.continue_run(argv, parse_config(argv), 'trigen', config, RECIPES, parse_config)
    rank, world_size, device = resume.setup_distributed(device_of(cfg))
    resume.seed_all(cfg['seed'] + rank)
    batch_size, accumulation = batch_split(cfg, argv, world_size)
    # float32 (as released), or the bf16 opt-in: autocast of f_trigen with TF32 matmuls; f_dec, the compositing
    # and the loss backbones stay float32 (G3DR.forward, losses.py)
    autocast = resume.autocast_for(device, DTYPES[cfg['dtype']])

    dataset = make_dataset(cfg)
    model = build_model(cfg, ckpt).to(device)
    cfg['aligned_plane'] = model.config['aligned_plane']  # what the run trains (a resumed or loaded model's own)
    optimizer, scheduler = resume.make_optimizer(model, cfg['lr'], (cfg['beta1'], cfg['beta2']), cfg['weight_decay'],
                                                 cfg['max_steps'], warmup_fraction(cfg), cfg['div_factor'],
                                                 cfg['cycle_beta1'])
    start_step = resume.restore(ckpt, model, optimizer, scheduler, rank, cfg['seed'], device)
    if cfg['compile']:
        model.encode = torch.compile(model.encode)
    # DDP wraps the G3DR itself: its forward() is encode + render, the whole step's prediction
    net = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith('cuda') else None) \
        if world_size > 1 else model
    perceptual, sr = frozen_networks(cfg, device)
    ckpt_path = os.path.join(cfg['out_dir'], 'ckpt.pt')
    if rank == 0:
        resume.prepare_out_dir(cfg['out_dir'], start_step)
        split = resume.describe(model, device, world_size, batch_size, accumulation, cfg['global_batch'])
        print(f"f_trigen | {cfg['dataset']} ({len(dataset)} items) | {split} | steps {start_step}->{cfg['max_steps']} | out {cfg['out_dir']}", flush=True)
    shown = shown_batch(cfg, dataset)
    batches = iter(resume.make_loader(dataset, batch_size, cfg['num_workers'], cfg['seed'], rank, world_size,
                                      start_step, accumulation, cfg['max_steps']))
    pbar = tqdm(total=cfg['max_steps'], initial=start_step, disable=rank != 0, dynamic_ncols=True, smoothing=0.1)
    bad_in_row, t_last = 0, time.time()
    for step in range(start_step, cfg['max_steps']):
        # Gradient accumulation (as nanoGPT): `accumulation` micro-batches per process, each loss divided by
        # their number, so the step's gradient is the mean over all global_batch images. A non-finite loss or
        # gradient never reaches the weights: every process agrees to skip the step (or stop).
        net.train()
        optimizer.zero_grad(set_to_none=True)
        ok, views = True, []
        for micro in range(accumulation):
            batch = next(batches)  # consumed even when the step is being skipped, so the data stays in step
            if not ok:
                continue
            micro_index = micro * world_size + rank  # this micro-batch's place in the step's image order
            loss, terms, info = trigen_losses(net, batch, step, micro_index, cfg, perceptual, device, autocast, sr)
            ok = resume.all_finite(loss, world_size)
            if ok:
                resume.backward(net, loss, accumulation, micro == accumulation - 1, world_size)
                views.append(dict(loss=loss.item(), **info, **{k: v.item() for k, v in terms.items()}))
        ok = resume.apply_step(model, optimizer, cfg['grad_clip'], ok)
        bad_in_row = resume.count_bad(ok, bad_in_row, cfg['nonfinite'], step, ckpt_path)
        if not ok and rank == 0:
            tqdm.write(f"step {step}: non-finite loss or gradient, step skipped")
        lr, beta1 = optimizer.param_groups[0]['lr'], optimizer.param_groups[0]['betas'][0]  # this step's
        scheduler.step()
        done = step + 1
        pbar.update(1)
        if rank == 0:
            mean_loss = sum(v['loss'] for v in views) / len(views) if views else float('nan')
            pbar.set_postfix(loss=f"{mean_loss:.4f}", novel=f"{sum(v['novel'] for v in views)}/{accumulation}",
                             refresh=False)
            if done % cfg['log_every'] == 0 or done == cfg['max_steps']:
                # loss: this process's mean over its micro-batches; views: each micro-batch's weighted terms,
                # whether it was novel and the weights its terms were applied with
                now = time.time()
                resume.log_metrics(cfg['out_dir'], dict(step=done, loss=mean_loss, lr=lr, beta1=beta1,
                                                        sec_per_step=(now - t_last) / cfg['log_every'], views=views))
                t_last = now
            if done % cfg['sample_every'] == 0 or done == cfg['max_steps']:
                model.eval()
                trigen_grid(model, shown, cfg, device, os.path.join(cfg['out_dir'], f"samples_{done:07d}.png"))
        if done % cfg['save_every'] == 0 or done == cfg['max_steps']:
            resume.save_run(ckpt_path, 'trigen', model, model.config, optimizer, scheduler, done, cfg, device, rank,
                            world_size)
    pbar.close()
    if world_size > 1:
        torch.distributed.barrier()
    return model


if __name__ == '__main__':
    run_script(main, sys.argv[1:], (ValueError, OSError, FloatingPointError, WeightsUnavailable))
