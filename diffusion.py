"""
f_rgbd: the class-conditional RGB-D diffusion model that lets G3DR generate 3D from a class label
(class --f_rgbd--> RGB-D image --f_trigen--> triplane). A compact diffusion core
in plain PyTorch, meant to be read top to bottom:

  1. RGB-D <-> model space          rgbd_to_x, x_to_rgbd
  2. noise schedule                 cosine_schedule (default), linear_schedule, q_sample
  3. training loss                  diffusion_loss (v-prediction, class dropout for guidance)
  4. sampler                        ddim_step, ddim_sample (DDIM with eta, classifier-free guidance)
  5. the denoiser                   make_denoiser (unet.UNet: 4 channels, real time, classes)

Its training loop is train_rgbd.py, its checkpoints are read by checkpoint.load_denoiser, and what
scores its samples (NFS, sample quality, FID / IS / KID) is in evaluate.py.

Choices (each explained where it is implemented):
* Pixel space. The paper trains f_rgbd as a latent diffusion model; the authors did not release it.
  The minimal faithful choice here is a pixel-space model at the training resolution (4 channels:
  rgb and depth, both in [-1, 1]). Everything below only sees "a (B, C, H, W) tensor x and a
  denoiser", so a latent variant is a drop-in: encode RGB-D to latents before `diffusion_loss`,
  sample latents with `ddim_sample(shape=latent shape, clip_x0=False)`, decode afterwards.
* Discrete time, T = 1000 steps, t in {0, ..., T-1} (t = 0 is the least noisy), passed to the
  denoiser as a float (B,) tensor: the UNet's sinusoidal embedding is the DDPM one, made for this
  range.
* Cosine schedule by default, v-prediction, plain MSE (see `cosine_schedule`, `diffusion_loss`).
* Classifier-free guidance with scale s: eps = eps_uncond + s (eps_cond - eps_uncond), so s = 0 is
  the unconditional model and s = 1 the conditional model alone (no guidance); s > 1 sharpens class
  fidelity. The null class is the denoiser's `null_class` (an extra row of its class embedding).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from render import DEPTH_NEAR, DEPTH_FAR  # the depth range of the data, mapped to [-1, 1]

T = 1000                 # number of discrete diffusion steps

# -----------------------------------------------------------------------------
# 1. RGB-D <-> model space


def rgbd_to_x(image01, depth, near=DEPTH_NEAR, far=DEPTH_FAR):
    """image01 (B, 3, H, W) in [0, 1], depth (B, 1, H, W) in scene units -> x (B, 4, H, W) in [-1, 1].

    [-1, 1] is the diffusion model's own data space (the range its noise schedule is made for), not an
    image convention of G3DR: rgb and depth ([near, far] mapped linearly) both land on it, so all four
    channels have the same range and one schedule fits them."""
    if image01.dim() != 4 or image01.shape[1] != 3 or depth.dim() != 4 or depth.shape[1] != 1:
        raise ValueError(f"rgbd_to_x expects image (B,3,H,W) and depth (B,1,H,W), "
                         f"got {tuple(image01.shape)} and {tuple(depth.shape)}")
    rgb = (image01 - 0.5) / 0.5                                    # (B, 3, H, W) in [-1, 1]
    unit = (depth - near) / (far - near)                           # (B, 1, H, W) in [0, 1]
    return torch.cat([rgb, (2 * unit - 1).to(image01.dtype)], dim=1)


def x_to_rgbd(x, near=DEPTH_NEAR, far=DEPTH_FAR):
    """Inverse of rgbd_to_x, clamped: x (B, 4, H, W) -> (image01 (B, 3, H, W) in [0, 1],
    depth (B, 1, H, W) in [near, far])."""
    if x.dim() != 4 or x.shape[1] != 4:
        raise ValueError(f"x_to_rgbd expects x of shape (B,4,H,W), got {tuple(x.shape)}")
    x = x.clamp(-1, 1)
    image01 = (x[:, :3] + 1) / 2
    depth = (x[:, 3:] + 1) / 2 * (far - near) + near
    return image01, depth


# -----------------------------------------------------------------------------
# 2. Noise schedule and forward noising
# alphas_cumprod[t] = abar_t, the fraction of signal variance left at step t:
#   q(x_t | x_0) = N(sqrt(abar_t) x_0, (1 - abar_t) I)


def cosine_schedule(num_steps=T, s=0.008, max_beta=0.999):
    """The cosine schedule (Nichol & Dhariwal 2021), the default: alphas_cumprod (T,) float64.

    abar(u) = f(u) / f(0), f(u) = cos((u + s) / (1 + s) * pi / 2)^2 at u = (t + 1) / T, built
    through betas clipped at max_beta (which only touches the last step). Why the default: at the
    low resolutions of pixel-space RGB-D (16..128 px) the linear schedule has wiped out the image
    after the first third of the steps, so most of training and sampling is spent on pure noise;
    the cosine schedule spreads the signal-to-noise ratio evenly and ends at essentially zero
    signal (abar_{T-1} ~ 2e-9), so sampling from N(0, I) matches what the model was trained on."""
    u = torch.arange(num_steps + 1, dtype=torch.float64) / num_steps
    f = torch.cos((u + s) / (1 + s) * math.pi / 2) ** 2
    betas = (1 - f[1:] / f[:-1]).clamp(max=max_beta)              # (T,)
    return torch.cumprod(1 - betas, dim=0)


def linear_schedule(num_steps=T, beta_start=1e-4, beta_end=0.02):
    """The DDPM linear-beta schedule (Ho et al. 2020): alphas_cumprod (T,) float64."""
    betas = torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)
    return torch.cumprod(1 - betas, dim=0)


def make_schedule(kind='cosine', num_steps=T):
    if kind == 'cosine':
        return cosine_schedule(num_steps)
    if kind == 'linear':
        return linear_schedule(num_steps)
    raise ValueError(f"unknown noise schedule {kind!r} (expected 'cosine' or 'linear')")


def _abar(alphas_cumprod, t, x):
    """abar_t for a (B,) tensor of steps, shaped (B, 1, 1, 1) like x, in x's dtype."""
    if alphas_cumprod is None:
        alphas_cumprod = cosine_schedule()
    a = alphas_cumprod.to(t.device)[t]
    return a.to(x.dtype).view(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, t, noise, alphas_cumprod=None):
    """Forward noising: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise (B, C, H, W),
    t (B,) long. alphas_cumprod defaults to the cosine schedule."""
    a = _abar(alphas_cumprod, t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


# -----------------------------------------------------------------------------
# 3. Training loss: v-prediction
# The denoiser predicts v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022). Given x_t, v
# converts linearly to both other parametrisations:
#   x0 = sqrt(abar) x_t - sqrt(1 - abar) v,   eps = sqrt(1 - abar) x_t + sqrt(abar) v.
# Why v and not eps: with the cosine schedule abar_{T-1} ~ 2e-9, where recovering x0 from an eps
# prediction divides by sqrt(abar) ~ 5e-5 and blows any error up; v stays well conditioned at both
# ends, and its MSE weights the high-noise steps (which decide global shape -- the class) more than
# eps-MSE does, which helps the short CPU runs. Guidance is still applied to eps (section 4); since
# eps is linear in v at fixed x_t, that is the same as guiding v.


def v_to_x0_eps(v, x_t, abar):
    """(v, x_t, abar broadcastable) -> (x0, eps)."""
    a, b = abar ** 0.5, (1 - abar) ** 0.5
    return a * x_t - b * v, b * x_t + a * v


def _null_class(denoiser, null_class):
    """The label of the null (unconditional) class: given, or the denoiser's `null_class` (also
    found through a DistributedDataParallel / compile wrapper)."""
    if null_class is not None:
        return null_class
    for m in (denoiser, getattr(denoiser, 'module', None), getattr(denoiser, '_orig_mod', None)):
        if m is not None and getattr(m, 'null_class', None) is not None:
            return m.null_class
    raise ValueError("the denoiser has no `null_class` attribute; pass null_class= explicitly")


def diffusion_loss(denoiser, x0, class_labels, p_uncond=0.1, alphas_cumprod=None, null_class=None,
                   generator=None):
    """One training loss: mean squared error of the v-prediction at a uniformly drawn step.

    x0 (B, C, H, W) in model space, class_labels (B,) long (None: unconditional model, all null).
    With probability p_uncond each label is replaced by the null class, so the same network also
    learns the unconditional model that classifier-free guidance needs (Ho & Salimans 2022).
    The denoiser is called as denoiser(x_t, t.float(), labels)."""
    if alphas_cumprod is None:
        alphas_cumprod = cosine_schedule()
    B, dev = x0.shape[0], x0.device
    null = _null_class(denoiser, null_class)
    g_dev = generator.device if generator is not None else dev      # draw where the generator lives
    t = torch.randint(0, len(alphas_cumprod), (B,), generator=generator, device=g_dev).to(dev)   # (B,)
    noise = torch.randn(x0.shape, generator=generator, device=g_dev).to(dev, x0.dtype)
    drop = torch.rand(B, generator=generator, device=g_dev).to(dev) < p_uncond                # (B,)
    labels = torch.full((B,), null, dtype=torch.long, device=dev)
    if class_labels is not None:
        labels = torch.where(drop, labels, class_labels.to(dev).long())
    x_t = q_sample(x0, t, noise, alphas_cumprod)
    a = _abar(alphas_cumprod, t, x0)
    v_target = a.sqrt() * noise - (1 - a).sqrt() * x0
    v_pred = denoiser(x_t, t.float(), labels)
    return F.mse_loss(v_pred.float(), v_target.float())


# -----------------------------------------------------------------------------
# 4. DDIM sampler (Song, Meng & Ermon 2021) with classifier-free guidance


def ddim_step(x_t, eps, abar_t, abar_prev, eta=0.0, noise=None, clip_x0=True):
    """One DDIM update x_t -> x_{t_prev} (Song et al. eq. 12), from the noise estimate eps.

    x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)          (clamped to [-1, 1] if clip_x0; eps
                                                               is then re-derived from the clamped x0)
    sigma = eta sqrt((1 - abar_prev) / (1 - abar_t)) sqrt(1 - abar_t / abar_prev)
    x_prev = sqrt(abar_prev) x0 + sqrt(1 - abar_prev - sigma^2) eps + sigma noise
    eta = 0 is the deterministic DDIM sampler; eta = 1 between consecutive steps is DDPM ancestral
    sampling. abar_* are python floats; abar_prev = 1 for the final step (returns x0).
    Returns (x_prev, x0)."""
    x0 = (x_t - (1 - abar_t) ** 0.5 * eps) / abar_t ** 0.5
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x_t - abar_t ** 0.5 * x0) / (1 - abar_t) ** 0.5
    sigma = eta * ((1 - abar_prev) / (1 - abar_t)) ** 0.5 * (1 - abar_t / abar_prev) ** 0.5
    x_prev = abar_prev ** 0.5 * x0 + max(1 - abar_prev - sigma ** 2, 0.0) ** 0.5 * eps
    if sigma > 0:
        x_prev = x_prev + sigma * (torch.randn_like(x_t) if noise is None else noise)
    return x_prev, x0


def ddim_timesteps(steps, num_steps=T):
    """`steps` evenly spaced steps from T-1 down to 0 (both included): starting at T-1 is what makes
    x_T ~ N(0, I) right (abar_{T-1} ~ 0); ending at 0 leaves the least noise for the last x0."""
    if not 1 <= steps <= num_steps:
        raise ValueError(f"steps must be in [1, {num_steps}], got {steps}")
    return torch.linspace(num_steps - 1, 0, steps).round().long().tolist()


def guided_eps(denoiser, x_t, t, class_labels, null, guidance_scale, abar):
    """eps = eps_uncond + s (eps_cond - eps_uncond) at step t (abar = abar_t). s = 0 and s = 1 call
    only the unconditional / only the conditional branch, so they are exactly those models;
    otherwise both branches run as one batch of 2B."""
    B = x_t.shape[0]
    time = torch.full((B,), float(t), device=x_t.device)
    uncond = torch.full((B,), null, dtype=torch.long, device=x_t.device)

    def eps_of(v):
        return v_to_x0_eps(v.to(x_t.dtype), x_t, abar)[1]

    if guidance_scale == 1:
        return eps_of(denoiser(x_t, time, class_labels))
    if guidance_scale == 0:
        return eps_of(denoiser(x_t, time, uncond))
    v_cond, v_uncond = denoiser(torch.cat([x_t, x_t]), torch.cat([time, time]),
                                torch.cat([class_labels, uncond])).chunk(2)
    eps_cond, eps_uncond = eps_of(v_cond), eps_of(v_uncond)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


@torch.no_grad()
def ddim_sample(denoiser, shape, class_labels=None, steps=50, eta=0.0, guidance_scale=2.0,
                generator=None, alphas_cumprod=None, null_class=None, clip_x0=True, device=None,
                progress=False):
    """Sample x (B, C, H, W) in model space (map to RGB-D with x_to_rgbd).

    class_labels (B,) long, or None for unconditional samples (all null). guidance_scale s:
    eps = eps_uncond + s (eps_cond - eps_uncond); s = 0 unconditional, s = 1 conditional only,
    s > 1 stronger class fidelity (default 2). eta: 0 deterministic DDIM, 1 DDPM-like.
    generator: a torch.Generator for the starting noise and the eta noise; the noise is drawn on
    the generator's device and moved, so a CPU generator with a fixed seed gives the same samples
    on any device. progress: show a tqdm bar. The caller chooses train/eval mode of the denoiser."""
    if alphas_cumprod is None:
        alphas_cumprod = cosine_schedule()
    if device is None:
        if class_labels is not None:
            device = class_labels.device
        else:
            p = next(iter(denoiser.parameters()), None) if isinstance(denoiser, nn.Module) else None
            device = p.device if p is not None else torch.device('cpu')
    B = shape[0]
    null = _null_class(denoiser, null_class)
    if class_labels is None:
        class_labels, guidance_scale = torch.full((B,), null, dtype=torch.long), 0.0
    class_labels = class_labels.to(device).long()
    if class_labels.shape != (B,):
        raise ValueError(f"class_labels must have shape ({B},), got {tuple(class_labels.shape)}")
    g_dev = generator.device if generator is not None else device

    def _randn():
        return torch.randn(shape, generator=generator, device=g_dev).to(device)

    ts = ddim_timesteps(steps, len(alphas_cumprod))
    abars = alphas_cumprod.tolist()
    x = _randn()                                                       # x_T ~ N(0, I)
    for i, t in enumerate(tqdm(ts, desc='ddim', disable=not progress)):
        abar_t = abars[t]
        abar_prev = abars[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = guided_eps(denoiser, x, t, class_labels, null, guidance_scale, abar_t)
        noise = _randn() if eta > 0 and i + 1 < len(ts) else None
        x, _ = ddim_step(x, eps, abar_t, abar_prev, eta=eta, noise=noise, clip_x0=clip_x0)
    return x


# -----------------------------------------------------------------------------
# 5. The denoiser f_rgbd: the UNet family of f_trigen (unet.UNet) with a real time input, a class
# embedding (num_classes + 1 rows, the last one the null class) and 4 channels in and out.
# Pixel space at the training resolution (the paper's f_rgbd is a latent diffusion model, not
# released); no learned positional embedding (pos_channels = 0): a diffusion denoiser should treat
# every pixel alike, and the model then runs at any resolution divisible by 2^(stages - 1).

DENOISER_PRESETS = {
    # the f_trigen widths (unet.py, model.MODEL_PRESETS['paper']) as a 128 x 128 pixel-space denoiser
    'paper': dict(dim=128, dim_mults=(1, 2, 4, 8)),
    # trains on a laptop CPU at 64 x 64
    'small': dict(dim=32, dim_mults=(1, 2, 4)),
}


def make_denoiser(num_classes, size='small', image_size=64):
    """f_rgbd: unet.UNet with 4 channels in and out, the diffusion time as its time input and a
    class embedding of num_classes + 1 rows (row num_classes = `null_class`, for guidance).
    Called as denoiser(x_t (B, 4, S, S), t (B,) float, labels (B,) long) -> v (B, 4, S, S)."""
    from unet import UNet
    if size not in DENOISER_PRESETS:
        raise ValueError(f"unknown denoiser size {size!r} (expected one of {sorted(DENOISER_PRESETS)})")
    if int(num_classes) < 1:
        raise ValueError(f"make_denoiser needs num_classes >= 1, got {num_classes}")
    return UNet(**DENOISER_PRESETS[size], in_channels=4, out_channels=4, image_size=int(image_size),
                pos_channels=0, num_classes=int(num_classes))
