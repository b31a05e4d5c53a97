"""
Train G3DR.

    python train.py                                     # small run on built-in synthetic scenes (CPU, minutes)
    python train.py --dataset imagenet --data_dir PATH  # the released ImageNet recipe (README §5)
    torchrun --standalone --nproc_per_node=8 train.py --dataset imagenet --data_dir PATH
    python train.py --stage rgbd                        # the class-conditional RGB-D diffusion model f_rgbd

Every key of `config` below can be overridden as `--key value` or `--key=value`; `python train.py --help`
lists them. Keys left at None take their value from the dataset's recipe (RECIPES below).
"""
import json
import logging
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from losses import WeightsUnavailable, depth_loss, opacity_loss, recon_loss, tv_loss
from model import load_checkpoint
from render import get_rays, orbit_camera

# -----------------------------------------------------------------------------
# config: one global dict, overridable from the command line
config = dict(
    # what to train
    stage='trigen',          # 'trigen': f_trigen + f_dec (RGB-D -> 3D); 'rgbd': the f_rgbd diffusion model
    dataset='synthetic',     # 'synthetic' (built in, known 3D) or 'imagenet' (folders of photos + depth)
    data_dir='',             # imagenet: root of class folders with NAME.jpg + NAME_depth.png
    depth_dir='',            # imagenet: optional separate depth root mirroring data_dir
    skip_missing_depth=False,  # imagenet: skip images without depth instead of failing
    num_scenes=None,         # synthetic: size of the training set of procedural scenes
    out_dir='out',           # checkpoint, metrics.jsonl and sample grids go here
    init_from='',            # optional: start from a checkpoint (ours, or the authors' with init_official)
    init_official=False,     # init_from is in the authors' format
    resume=False,            # continue the run saved in out_dir/ckpt.pt
    seed=1337,
    # model
    model_size=None,         # 'small' or 'paper' (see model.MODEL_PRESETS)
    image_size=None,         # side of the training images
    projection=None,         # triplane projections: 'official' (released, no y-z plane) or 'yz' (corrected)
    levels=3,                # multi-resolution triplane levels (Sec. 3.3; 1 = single resolution)
    # optimisation (Adam + one-cycle, README §5)
    max_steps=None,
    batch_size=None,         # per process
    lr=None,
    beta1=0.9,
    beta2=0.99,
    weight_decay=0.0,
    warmup_frac=None,        # one-cycle warm-up, fraction of max_steps (released 0.02)
    div_factor=25.0,         # one-cycle start lr = lr / div_factor
    grad_clip=1.0,           # 0 disables
    nonfinite='skip',        # on a NaN/inf loss: 'skip' the step (stop after 20 in a row) or 'stop'
    # rendering during training
    render_size=None,        # rays per side of the rendered training views
    n_coarse=None,
    n_fine=None,
    canonical_rays=None,     # canonical steps render 'grid' (the whole image at render_size, released) or
                             # 'random' (render_size^2 random pixels of the full-resolution image; steps
                             # with a canonical VGG/CLIP term, which need an image, use the grid)
    depth_guided_prob=0.4,   # canonical steps: P(fine samples placed around the ground-truth depth)
    rescale_s1=1.25,         # gradient-rescaling kernel k(x, t) = clamp(s1 exp(-(x-t)^2/s2), c_min, c_max)
    rescale_s2=0.03,
    rescale_cmin=None,       # released 0.05; the short CPU recipe lets far densities decay faster (0.3)
    rescale_cmax=1.0,
    gradient_rescaling=True,  # the paper's gradient rescaling (Sec. 3.2) on canonical steps
    # losses (README §5); image terms compare images in [-1, 1]
    recon='l1',              # 'l1' as released, 'l2' as the paper's text
    w_rgb=1.0,
    w_depth=2.0,
    w_vgg=1.0,               # canonical views, all five VGG levels, second half of training
    w_clip=0.175,            # canonical views, second half of training
    w_clip_novel=0.35,
    w_vgg_novel=2.0,         # novel views, deepest two VGG levels only
    w_tv_novel=0.1,
    w_opacity=1.0,           # rises linearly from 0 over the first opacity_ramp of training
    novel_opacity=None,      # the opacity term on novel steps too (released: True)
    opacity_ramp=0.5,
    perceptual_start=0.5,    # fraction of training after which w_vgg and w_clip switch on
    clip_model='ViT-B-16',
    clip_pretrained='openai',
    lpips_weights='',        # optional file with LPIPS' learned channel weights (vgg.pth layout)
    # novel views (README §5)
    p_novel_max=None,        # P(novel) = min(p_novel_max, 2 step / max_steps) (released 0.4)
    yaw_div_start=24.0,      # yaw = pi/2 + U(-1, 1) pi / d, d falls linearly from start to end ...
    yaw_div_end=6.0,
    yaw_curriculum=1 / 3,    # ... over this fraction of training
    pitch_div=18.0,          # pitch = pi/2 + U(-1, 1) pi / pitch_div
    # f_rgbd diffusion stage (--stage rgbd)
    rgbd_size=None,          # denoiser size preset for f_rgbd ('small' or 'paper')
    p_uncond=0.1,            # class dropout for classifier-free guidance
    # logging
    log_every=10,
    sample_every=None,       # write a PNG grid every N steps
    save_every=None,         # write the checkpoint every N steps (and at the end)
    # system
    device='auto',           # 'auto', 'cpu', 'cuda', 'cuda:1', ...
    dtype='bfloat16',        # autocast dtype on CUDA ('float32' disables autocast)
    compile=False,           # torch.compile the UNet
    num_workers=None,
)

# What `--dataset X` means: keys left at None take these values.
RECIPES = {
    # The released recipe (README §5): 6 GPUs x batch 8, 300k steps.
    'imagenet': dict(model_size='paper', image_size=128, projection='official', max_steps=300_000, batch_size=8,
                     lr=5e-5, render_size=128, n_coarse=32, n_fine=32, rescale_cmin=0.05, sample_every=2000,
                     save_every=2000, num_workers=8, num_scenes=0, rgbd_size='paper', canonical_rays='grid',
                     novel_opacity=True, warmup_frac=0.02, p_novel_max=0.4),
    # The same recipe scaled down to a laptop CPU (each deviation and its measured effect: README "The
    # synthetic recipe"):
    # * a small model, 64 x 64 images, the corrected projection, batch 4, 16 + 16 samples;
    # * c_min = 0.3 so that densities in front of the surface decay within 1200 steps rather than 300k
    #   (with 0.05 the depth error is still ~1 scene unit after 200 steps, ~0.2 with 0.3);
    # * canonical steps render 32 x 32 = 1024 random pixels of the full 64 x 64 image rather than the image
    #   downsampled to 32 x 32: the same work, but the 64 x 64 detail is learned;
    # * lr 1e-3 with a 10% warm-up (2e-3 with 2% let short runs collapse: a 60-step run ended at 4.8 dB);
    # * no opacity term on novel steps: without VGG/CLIP weights (not available offline) it was a novel step's
    #   only strong term, and it pushes f_dec's biases, hence density everywhere (outside the box too), up:
    #   the 60-step run above went fully opaque and black between steps 10 and 20;
    # * P(novel) at most 0.1: with that term gone a novel step carries only 0.1 TV(depth), ~1e-4, so it
    #   teaches almost nothing; with VGG/CLIP weights cached pass --p_novel_max 0.4 --novel_opacity true.
    'synthetic': dict(model_size='small', image_size=64, projection='yz', max_steps=1200, batch_size=4,
                      lr=1e-3, render_size=32, n_coarse=16, n_fine=16, rescale_cmin=0.3, sample_every=250,
                      save_every=250, num_workers=0, num_scenes=20_000, rgbd_size='small', canonical_rays='random',
                      novel_opacity=False, warmup_frac=0.1, p_novel_max=0.1),
}

# --stage rgbd (the f_rgbd diffusion model) takes these first. On the CPU it learns at 32 x 32, where a
# pixel-space denoiser gets 4x the steps of 64 x 64 for the same time; sample.py resizes its samples
# to f_trigen's input size. (The paper's f_rgbd is a latent model; see diffusion.py.)
RGBD_RECIPES = {
    'imagenet': dict(lr=1e-4, sample_every=5000, save_every=5000),
    'synthetic': dict(image_size=32, max_steps=2400, batch_size=16, lr=1e-3, sample_every=400, save_every=400),
}


class ConfigError(ValueError):
    pass


def _parse_value(key, text, default):
    """Turn a command-line string into the type of the key's default."""
    if isinstance(default, bool):
        if text.lower() in ('1', 'true', 'yes', 'on'):
            return True
        if text.lower() in ('0', 'false', 'no', 'off'):
            return False
        raise ConfigError(f"--{key} expects true/false, got {text!r}")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{key} expects an integer, got {text!r}") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"--{key} expects a number, got {text!r}") from None
    if default is None:  # recipe keys: take the type of the recipe's value
        recipe_value = RECIPES['synthetic'].get(key)
        if recipe_value is not None and not isinstance(recipe_value, str):
            return _parse_value(key, text, recipe_value)
    return text


def parse_config(argv, base=None):
    """Apply `--key value` / `--key=value` overrides and the dataset's recipe; return a new dict."""
    cfg = dict(config if base is None else base)
    overrides, i = {}, 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith('--'):
            raise ConfigError(f"unexpected argument {arg!r} (use --key value or --key=value)")
        key, eq, value = arg[2:].partition('=')
        key = key.replace('-', '_')
        if key not in cfg:
            raise ConfigError(f"unknown config key --{key} (python train.py --help lists them)")
        if not eq:
            if isinstance(cfg[key], bool) and (i + 1 == len(argv) or argv[i + 1].startswith('--')):
                value = 'true'  # a bare boolean flag: --resume
            elif i + 1 < len(argv):
                i += 1
                value = argv[i]
            else:
                raise ConfigError(f"--{key} needs a value")
        overrides[key] = _parse_value(key, value, cfg[key])
        i += 1
    cfg.update(overrides)
    if cfg['dataset'] not in RECIPES:
        raise ConfigError(f"--dataset must be one of {sorted(RECIPES)}, got {cfg['dataset']!r}")
    if cfg['stage'] not in ('trigen', 'rgbd'):
        raise ConfigError(f"--stage must be 'trigen' or 'rgbd', got {cfg['stage']!r}")
    if cfg['nonfinite'] not in ('skip', 'stop'):
        raise ConfigError(f"--nonfinite must be 'skip' or 'stop', got {cfg['nonfinite']!r}")
    if cfg['recon'] not in ('l1', 'l2'):
        raise ConfigError(f"--recon must be 'l1' or 'l2', got {cfg['recon']!r}")
    recipes = [RECIPES[cfg['dataset']]]
    if cfg['stage'] == 'rgbd':
        recipes.insert(0, RGBD_RECIPES[cfg['dataset']])
    for recipe in recipes:
        for key, value in recipe.items():
            if cfg[key] is None:
                cfg[key] = value
    if cfg['dataset'] == 'imagenet' and not cfg['data_dir']:
        raise ConfigError("--dataset imagenet needs --data_dir PATH (class folders of NAME.jpg + NAME_depth.png)")
    for key in ('max_steps', 'batch_size', 'image_size', 'render_size', 'n_coarse', 'save_every', 'sample_every'):
        if cfg[key] <= 0:
            raise ConfigError(f"--{key} must be positive, got {cfg[key]}")
    return cfg


def print_help():
    print(__doc__)
    print(f"{'key':22s} {'default':>14s}   imagenet recipe")
    for key, value in config.items():
        recipe = RECIPES['imagenet'].get(key, '')
        shown = RECIPES['synthetic'].get(key, value) if value is None else value
        print(f"--{key:20s} {str(shown):>14s}   {recipe}")


# -----------------------------------------------------------------------------
# schedules of the released recipe (README §5)

def p_novel(step, cfg):
    """P(novel view) rises linearly and never exceeds p_novel_max."""
    return min(cfg['p_novel_max'], 2 * step / cfg['max_steps'])


def novel_camera(step, batch_size, cfg, generator):
    """Yaw range grows from +-pi/24 to +-pi/6 over the first third of training; pitch +-pi/18."""
    progress = min(1.0, step / max(1.0, cfg['yaw_curriculum'] * cfg['max_steps']))
    d = cfg['yaw_div_start'] + (cfg['yaw_div_end'] - cfg['yaw_div_start']) * progress
    u = torch.rand(2, batch_size, generator=generator) * 2 - 1
    return math.pi / 2 + u[0] * math.pi / d, math.pi / 2 + u[1] * math.pi / cfg['pitch_div']


def loss_weights(step, cfg):
    """Weights of step `step`: VGG and CLIP on canonical views switch on after `perceptual_start`;
    the opacity weight rises linearly over the first `opacity_ramp` of training."""
    late = step >= cfg['perceptual_start'] * cfg['max_steps']
    ramp = min(1.0, step / max(1.0, cfg['opacity_ramp'] * cfg['max_steps']))
    return dict(vgg=cfg['w_vgg'] if late else 0.0, clip=cfg['w_clip'] if late else 0.0,
                opacity=cfg['w_opacity'] * ramp)


# -----------------------------------------------------------------------------
# data: a deterministic, resumable, distributed stream of batches

class StepBatchSampler:
    """Yields the dataset indices of this process's batch for steps start_step, start_step + 1, ...
    Global sample g = (step * world_size + rank) * batch_size + i reads position g mod n of the
    permutation of epoch g // n. The batches are a function of the step alone, so a resumed run
    continues exactly where it stopped, and no two processes see the same sample in an epoch."""

    def __init__(self, n, batch_size, rank, world_size, seed, start_step, max_steps):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory flat
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def batch(self, step):
        first = (step * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(first, first + self.batch_size)]

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            yield self.batch(step)

    def __len__(self):
        return max(0, self.max_steps - self.start_step)


def make_loader(dataset, cfg, rank, world_size, start_step):
    sampler = StepBatchSampler(len(dataset), cfg['batch_size'], rank, world_size, cfg['seed'],
                               start_step, cfg['max_steps'])
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg['num_workers'],
                                       pin_memory=torch.cuda.is_available())


def make_dataset(cfg):
    import data
    if cfg['dataset'] == 'synthetic':
        return data.SyntheticScenes(cfg['num_scenes'], image_size=cfg['image_size'], seed=cfg['seed'])
    return data.ImageNetDepth(cfg['data_dir'], image_size=cfg['image_size'], depth_root=cfg['depth_dir'] or None,
                              flip=True, skip_missing_depth=cfg['skip_missing_depth'])


# -----------------------------------------------------------------------------
# f_trigen stage: one canonical or novel training step (README §5)

class _EncodeRender(torch.nn.Module):
    """encode + render as one forward(), so DistributedDataParallel sees (and syncs) the whole step."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, rgbd, rays_o, rays_d, render_opts):
        planes = self.model.encode(rgbd)                        # (B, 3, C, H, W)
        return self.model.render(planes, rays_o, rays_d, **render_opts)


def _to_image(x, size):
    """(B, R*R, K) ray values -> (B, K, R, R) image; ray index = row * R + col."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], size, size)


def _at_render_size(x, size):
    """Targets at the render resolution. Rays pass through a corner-inclusive grid (README §2),
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
    canonical = torch.full((B,), math.pi / 2)
    rays_o, rays_d = get_rays(orbit_camera(canonical, canonical).to(image.device), 18.0, S)   # (B, S*S, 3)

    def take(x):  # (B, S*S, K) -> (B, n, K), ray index = row * S + col
        return x.gather(1, idx[..., None].expand(-1, -1, x.shape[-1]))
    return take(rays_o), take(rays_d), take(image.flatten(2).transpose(1, 2)), take(depth.flatten(2).transpose(1, 2))


def trigen_losses(net, batch, step, cfg, perceptual, device, autocast):
    """Returns (total loss, dict of weighted terms, was_novel) for one step."""
    image = batch['image'].to(device, non_blocking=True) * 2 - 1      # (B, 3, S, S) in [-1, 1]
    depth = batch['depth'].to(device, non_blocking=True)              # (B, 1, S, S) scene units
    B, R = image.shape[0], cfg['render_size']
    gen = torch.Generator().manual_seed(cfg['seed'] * 1_000_003 + step)  # same choice on every process
    novel = bool(torch.rand((), generator=gen) < p_novel(step, cfg))
    if novel:
        yaw, pitch = novel_camera(step, B, cfg, gen)
    else:                                                             # the canonical camera
        yaw = pitch = torch.full((B,), math.pi / 2)
    w = loss_weights(step, cfg)
    image_terms = (w['vgg'] and perceptual.get('vgg') is not None) or (w['clip'] and perceptual.get('clip') is not None)
    if not novel and cfg['canonical_rays'] == 'random' and not image_terms:
        rays_o, rays_d, image_r, depth_r = _random_canonical_rays(image, depth, R * R, gen)  # (B, R*R, K) each
        as_image = lambda x: x                                        # per-ray losses need no image
    else:
        rays_o, rays_d = get_rays(orbit_camera(yaw.to(device), pitch.to(device)), 18.0, R)  # (B, R*R, 3)
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
        terms['rgb'] = cfg['w_rgb'] * recon_loss(rgb, image_r, kind=cfg['recon'])
        terms['depth'] = cfg['w_depth'] * depth_loss(pred_depth, depth_r)
        if w['vgg'] and perceptual.get('vgg') is not None:
            terms['vgg'] = w['vgg'] * perceptual['vgg'](rgb, image_r, levels=(0, 1, 2, 3, 4))
        if w['clip'] and perceptual.get('clip') is not None:
            terms['clip'] = w['clip'] * perceptual['clip'](rgb, image_r)
    else:
        # Novel views get no pixels: CLIP and deep VGG features keep the input's semantics, TV keeps depth smooth.
        if cfg['w_clip_novel'] and perceptual.get('clip') is not None:
            terms['clip'] = cfg['w_clip_novel'] * perceptual['clip'](rgb, image_r)
        if cfg['w_vgg_novel'] and perceptual.get('vgg') is not None:
            terms['vgg'] = cfg['w_vgg_novel'] * perceptual['vgg'](rgb, image_r, levels=(3, 4))
        terms['tv'] = cfg['w_tv_novel'] * tv_loss(pred_depth)
    if not novel or cfg['novel_opacity']:
        terms['opacity'] = w['opacity'] * opacity_loss(out['opacity'].float())
    return sum(terms.values()), terms, novel


def load_perceptual(cfg, device, rank):
    """The frozen VGG16 / CLIP backbones. Synthetic runs use them only when their pretrained weights are
    already in the local cache (no download: on a CPU they would also cost more than the rest of the step)
    and otherwise go on without them, said once at start-up; ImageNet runs download them as needed and
    fail when they cannot be had, unless the terms are turned off."""
    import losses
    perceptual, download = {}, cfg['dataset'] != 'synthetic'
    wanted = {'vgg': cfg['w_vgg'] or cfg['w_vgg_novel'], 'clip': cfg['w_clip'] or cfg['w_clip_novel']}
    for name, needed in wanted.items():
        if not needed:
            continue
        logging.disable(logging.ERROR)  # open_clip logs its failed download before raising; we say it once below
        try:
            if name == 'vgg':
                module = losses.VGGPerceptual(pretrained=True, calibration_path=cfg['lpips_weights'] or None,
                                              download=download)
            else:
                module = losses.CLIPEmbeddingLoss(cfg['clip_model'], pretrained=cfg['clip_pretrained'],
                                                  download=download)
        except WeightsUnavailable as e:
            if cfg['dataset'] != 'synthetic':
                raise
            if rank == 0:
                off = 'w_vgg=0 --w_vgg_novel=0' if name == 'vgg' else 'w_clip=0 --w_clip_novel=0'
                what = str(e).split(', failed with')[0].split(': ', 1)[-1]  # which weights, where looked for
                print(f"note: training without the {name.upper()} loss, its pretrained weights are not in the "
                      f"local cache ({what}); see losses.py for how to provide them, or silence this with --{off}",
                      flush=True)
            continue
        finally:
            logging.disable(logging.NOTSET)
        perceptual[name] = module.to(device)
    return perceptual


# -----------------------------------------------------------------------------
# checkpoints: written atomically, so a run killed at any moment leaves the last good one intact

def save_checkpoint(path, state):
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, 'wb') as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half of one
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _rng_state():
    state = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if 'cuda' in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def _trim_metrics(path, last_step):
    """On resume, drop metric lines logged after the checkpoint we continue from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= last_step]
    with open(path + '.tmp', 'w') as f:
        f.writelines(lines)
    os.replace(path + '.tmp', path)


# -----------------------------------------------------------------------------
# pictures people look at

@torch.no_grad()
def trigen_grid(model, batch, cfg, device, path):
    """Rows: scenes. Columns: input, canonical render, its depth, then two novel views and their depth."""
    import data
    image = batch['image'][:4].to(device) * 2 - 1
    depth = batch['depth'][:4].to(device)
    S = cfg['image_size']
    planes = model.encode(torch.cat([image, depth], 1))
    columns = [image]
    for yaw in (math.pi / 2, math.pi / 2 - math.pi / 6, math.pi / 2 + math.pi / 6):
        rgb, d = model.render_view(planes, yaw, math.pi / 2, S, n_coarse=cfg['n_coarse'], n_fine=cfg['n_fine'])
        columns += [rgb, data.colorize_depth(d) * 2 - 1]
    data.save_grid(torch.stack(columns, 1).flatten(0, 1).add(1).div(2), path, nrow=len(columns))


# -----------------------------------------------------------------------------

def setup_distributed(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is one process."""
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        local_rank = int(os.environ['LOCAL_RANK'])
        use_cuda = torch.cuda.is_available() and cfg['device'] != 'cpu'
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend='nccl' if use_cuda else 'gloo')
        device = f'cuda:{local_rank}' if use_cuda else 'cpu'
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
    device = cfg['device']
    if device == 'auto':
        device = 'cuda' if torch.cuda.is_available() else 'cpu'
    return 0, 1, device


def build_model(cfg):
    """The trained model and the module whose forward() makes one training step's prediction."""
    if cfg['stage'] == 'rgbd':
        import diffusion
        num_classes = make_dataset(cfg).num_classes
        model = diffusion.make_denoiser(num_classes, size=cfg['rgbd_size'], image_size=cfg['image_size'])
        return model, model
    from model import G3DR, MODEL_PRESETS
    if cfg['init_from']:
        model = G3DR.from_official(cfg['init_from']) if cfg['init_official'] else G3DR.from_checkpoint(cfg['init_from'])
    else:
        model = G3DR(dict(MODEL_PRESETS[cfg['model_size']], image_size=cfg['image_size'], projection=cfg['projection'],
                          levels=cfg['levels']))
    return model, _EncodeRender(model)


def rgbd_losses(net, batch, step, cfg, device, autocast):
    """f_rgbd stage: the denoising loss on RGB-D images (rgb and depth mapped to [-1, 1])."""
    import diffusion
    x0 = diffusion.rgbd_to_x(batch['image'].to(device), batch['depth'].to(device))   # (B, 4, S, S)
    labels = batch['label'].to(device)
    with autocast():
        loss = diffusion.diffusion_loss(net, x0, labels, p_uncond=cfg['p_uncond'])
    return loss, {'diffusion': loss}, False


@torch.no_grad()
def rgbd_grid(model, num_classes, cfg, device, path):
    """One row per class (up to 8): generated RGB beside its colourised depth."""
    import data
    import diffusion
    k = min(num_classes, 8)
    labels = torch.arange(k, device=device).repeat_interleave(2)
    gen = torch.Generator(device=device).manual_seed(cfg['seed'])
    x = diffusion.ddim_sample(model, (len(labels), 4, cfg['image_size'], cfg['image_size']), labels,
                              steps=50, generator=gen)
    image, depth = diffusion.x_to_rgbd(x)
    cells = torch.stack([image, data.colorize_depth(depth)], 1).flatten(0, 1)
    data.save_grid(cells, path, nrow=4)


def main(argv):
    if any(a in ('-h', '--help') for a in argv):
        print_help()
        return None
    cfg = parse_config(argv)
    out_dir = cfg['out_dir']
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    ckpt = None
    if cfg['resume']:
        if not os.path.exists(ckpt_path):
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = load_checkpoint(ckpt_path)
        # the run's own config, with this command line's overrides on top
        cfg = parse_config(argv, base=dict(config, **ckpt['config']))
        if ckpt.get('stage', 'trigen') != cfg['stage']:
            raise ConfigError(f"{ckpt_path} is a --stage {ckpt.get('stage')} checkpoint, not --stage {cfg['stage']}")
        if cfg['max_steps'] > ckpt['scheduler']['total_steps']:
            raise ConfigError(f"--max_steps {cfg['max_steps']} is beyond the one-cycle schedule of the run in {out_dir} "
                              f"({ckpt['scheduler']['total_steps']} steps); start a new run to train longer")
    elif os.path.exists(ckpt_path):
        raise ConfigError(f"{ckpt_path} already exists: pass --resume to continue that run, or pick another --out_dir")

    rank, world_size, device = setup_distributed(cfg)
    torch.manual_seed(cfg['seed'] + rank)
    np.random.seed(cfg['seed'] + rank)
    random.seed(cfg['seed'] + rank)
    use_cuda = str(device).startswith('cuda')
    if use_cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = {'bfloat16': torch.bfloat16, 'float16': torch.float16}.get(cfg['dtype'])
    if use_cuda and amp_dtype is not None:
        def autocast():
            return torch.autocast(device_type='cuda', dtype=amp_dtype)
    else:
        from contextlib import nullcontext as autocast

    dataset = make_dataset(cfg)
    model, net = build_model(cfg)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg['lr'], betas=(cfg['beta1'], cfg['beta2']),
                                 weight_decay=cfg['weight_decay'])
    # One-cycle: warm up from lr/25 over 2% of the steps, then cosine-anneal. Betas stay fixed.
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg['lr'], total_steps=cfg['max_steps'],
                                                    pct_start=cfg['warmup_frac'], div_factor=cfg['div_factor'],
                                                    cycle_momentum=False)
    start_step = 0
    if ckpt is not None:
        model.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        start_step = ckpt['step']
        _set_rng_state(ckpt['rng'])
    if cfg['compile']:
        if cfg['stage'] == 'trigen':
            model.encode = torch.compile(model.encode)
        else:
            net = torch.compile(net)
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device] if use_cuda else None)

    if cfg['stage'] == 'trigen':
        perceptual = load_perceptual(cfg, device, rank)

        def step_fn(batch, step):
            return trigen_losses(net, batch, step, cfg, perceptual, device, autocast)
    else:
        def step_fn(batch, step):
            return rgbd_losses(net, batch, step, cfg, device, autocast)

    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        _trim_metrics(os.path.join(out_dir, 'metrics.jsonl'), start_step)
        for name in os.listdir(out_dir):  # what a run killed in the middle of a save left behind
            if name.startswith('ckpt.pt.tmp-'):
                os.remove(os.path.join(out_dir, name))
        n_params = sum(p.numel() for p in model.parameters())
        print(f"stage {cfg['stage']} | {cfg['dataset']} ({len(dataset)} items) | {n_params / 1e6:.2f}M parameters | "
              f"{world_size} x {device} | steps {start_step}->{cfg['max_steps']} | out {out_dir}", flush=True)
    # a fixed batch for the picture grids: held-out scenes on synthetic data, the first images otherwise
    if cfg['dataset'] == 'synthetic':
        import data
        shown = data.SyntheticScenes(4, image_size=cfg['image_size'], seed=cfg['seed'] + 1)
    else:
        shown = dataset
    shown_batch = torch.utils.data.default_collate([shown[i] for i in range(min(4, len(shown)))])

    def save(step):
        state = dict(stage=cfg['stage'], model=model.state_dict(), optimizer=optimizer.state_dict(),
                     scheduler=scheduler.state_dict(), step=step, config=cfg, rng=_rng_state())
        if cfg['stage'] == 'trigen':
            state['model_config'] = model.config
        else:
            state['denoiser_config'] = dict(num_classes=dataset.num_classes, size=cfg['rgbd_size'],
                                            image_size=cfg['image_size'])
        save_checkpoint(ckpt_path, state)

    from tqdm import tqdm
    pbar = tqdm(total=cfg['max_steps'], initial=start_step, disable=rank != 0, dynamic_ncols=True, smoothing=0.1)
    loader = make_loader(dataset, cfg, rank, world_size, start_step)
    bad_in_row, t_last = 0, time.time()
    for step, batch in zip(range(start_step, cfg['max_steps']), loader):
        net.train()
        loss, terms, novel = step_fn(batch, step)
        # A non-finite loss or gradient never reaches the weights: every process agrees to skip (or stop).
        ok = torch.isfinite(loss.detach()).float()
        if world_size > 1:
            torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
        optimizer.zero_grad(set_to_none=True)
        if ok.item() == 1:
            loss.backward()
            grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg['grad_clip'] or float('inf'))
            ok = torch.isfinite(grad_norm).float()  # gradients are already synchronised here
        if ok.item() == 1:
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
        scheduler.step()
        done = step + 1
        pbar.update(1)
        if rank == 0:
            values = {k: v.item() for k, v in terms.items()}
            postfix = dict(view='novel' if novel else 'canonical') if cfg['stage'] == 'trigen' else {}
            pbar.set_postfix(loss=f"{loss.item():.4f}", **postfix, refresh=False)
            if done % cfg['log_every'] == 0 or done == cfg['max_steps']:
                now = time.time()
                record = dict(step=done, loss=loss.item(), novel=novel, lr=scheduler.get_last_lr()[0],
                              sec_per_step=(now - t_last) / cfg['log_every'], **values)
                t_last = now
                with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f:
                    f.write(json.dumps(record) + '\n')
            if done % cfg['sample_every'] == 0 or done == cfg['max_steps']:
                model.eval()
                path = os.path.join(out_dir, f"samples_{done:07d}.png")
                if cfg['stage'] == 'trigen':
                    trigen_grid(model, shown_batch, cfg, device, path)
                else:
                    rgbd_grid(model, dataset.num_classes, cfg, device, path)
            if done % cfg['save_every'] == 0 or done == cfg['max_steps']:
                save(done)
    pbar.close()
    if world_size > 1:
        torch.distributed.barrier()
    return model


def one_line(error):
    """A user-facing error as one line. Errors raised inside DataLoader workers arrive wrapped in a
    multi-line report whose last line is the original 'module.Error: message'."""
    lines = [l for l in str(error).strip().splitlines() if l.strip()] or [type(error).__name__]
    if len(lines) > 1 and 'Original Traceback' in str(error):
        return lines[-1].split(': ', 1)[-1]
    return ' '.join(l.strip() for l in lines)


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (ConfigError, FileNotFoundError, ValueError, FloatingPointError, WeightsUnavailable) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(1)
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
