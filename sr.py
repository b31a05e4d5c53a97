"""
The 2x super-resolution stage (paper Sec. 3.5): renders at twice the resolution f_trigen was trained at.

    net = SRNet(**SR_PRESETS['cpu'])       # an RCAN-style network, untrained
    net = load_sr('out-sr/ckpt.pt')        # a trained one (train_sr.py), in eval mode
    high = net(low)                        # (B, 3, H, W) in [0, 1] -> (B, 3, 2H, 2W) in [0, 1]

The paper brings 128 x 128 renders to 256 x 256 with a super-resolution network "in training and in
sampling". The authors released its weights but not its code; their visualize.py calls a `model_sr_rcan`,
so the network here follows RCAN (Zhang et al., ECCV 2018): residual groups of residual channel-attention
blocks, a long skip over the whole body, and pixel-shuffle upsampling. Two choices of ours on top:
- the network predicts a residual over bicubic upsampling of its input (a skip from input to output), so
  it only has to learn the detail bicubic misses (a bilinear skip learned less in a short synthetic run:
  +0.60 dB over bicubic after 400 steps, against +0.72 with the bicubic one);
- the last convolution starts at zero, so an untrained network *is* bicubic upsampling and training can only
  move it away from there where that lowers the loss.

`align_corners` says how the low and high images' pixel grids sit on each other. The synthetic scenes and
G3DR's renders cast rays through a corner-inclusive grid (render.get_rays: the outer rays go through the
image corners), so a 64 and a 128 render of one view share their corner pixels: align_corners=True, and
output pixel j sits at input coordinate j (S - 1) / (2S - 1). Photos resized by PIL (data.py) share their
outer pixel *edges* instead: align_corners=False, output pixel j at (j + 1/2) / 2 - 1/2. Pixel shuffle puts
output pixel j at (j - 1/2) / 2: the second rule, up to a constant shift a network can learn. Against the
corner-inclusive rule it is off by a shift that varies across the image, from half an output pixel one
way at one border to half a pixel the other way at the other, and no convolution can learn a shift that
depends on where it is. So the network samples both its bicubic skip and its residual (bicubic, from the
pixel-shuffle grid) at the exact output positions (output_positions); crops of a render keep the
positions of the image they were cut from (SRNet.forward's origin). On held-out renders a network without
this gained +1.44 dB over bicubic in the middle of the image and +0.53 dB near the border, where the
shift is largest; +0.80 dB in all after 3,000 steps, against +1.09 dB with it after 1,800.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

import checkpoint

# Sizes, and the parameter counts test_sr.py checks:
#   'cpu'       32 channels, 2 groups x 3 blocks:      179,227 parameters (64 -> 128 in minutes on 2 CPU cores)
#   'imagenet'  64 channels, 5 groups x 10 blocks:   4,094,603 parameters (128 -> 256; RCAN itself has
#                                                    10 groups x 20 blocks, 15.6M parameters)
# align_corners is the training data's pixel grid (see above); train_sr.py sets it from the dataset.
SR_PRESETS = {
    'cpu': dict(channels=32, groups=2, blocks=3, reduction=8, align_corners=True),
    'imagenet': dict(channels=64, groups=5, blocks=10, reduction=16, align_corners=False),
}

# Inputs are images in [0, 1]; a little overshoot (bicubic, Lanczos ringing) is fine, but values beyond these
# bounds mean another range: [-1, 1] (the released code's), or [0, 255].
_INPUT_LOW, _INPUT_HIGH = -0.25, 1.25


class ChannelAttention(nn.Module):
    """RCAN's channel attention: a per-channel gate from the globally pooled features (squeeze-and-excite)."""

    def __init__(self, channels, reduction):
        super().__init__()
        hidden = max(1, channels // reduction)
        self.gate = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),                  # (B, C, 1, 1) the mean of each channel
            nn.Conv2d(channels, hidden, 1), nn.ReLU(inplace=True),
            nn.Conv2d(hidden, channels, 1), nn.Sigmoid())  # (B, C, 1, 1) in (0, 1)

    def forward(self, x):                             # (B, C, H, W)
        return x * self.gate(x)


class RCAB(nn.Module):
    """Residual channel-attention block: x + CA(conv(relu(conv(x))))."""

    def __init__(self, channels, reduction):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
            ChannelAttention(channels, reduction))

    def forward(self, x):                             # (B, C, H, W) -> (B, C, H, W)
        return x + self.body(x)


class ResidualGroup(nn.Module):
    """`blocks` RCABs and a convolution, with a skip over the group (RCAN's short skip)."""

    def __init__(self, channels, blocks, reduction):
        super().__init__()
        self.body = nn.Sequential(*[RCAB(channels, reduction) for _ in range(blocks)],
                                  nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, x):                             # (B, C, H, W) -> (B, C, H, W)
        return x + self.body(x)


class SRNet(nn.Module):
    """2x super-resolution: (B, 3, H, W) in [0, 1] -> (B, 3, 2H, 2W), any H, W >= 1.

    In training mode the output is the raw prediction (not clamped, so that the loss has a gradient
    everywhere); in eval mode it is clamped to [0, 1] and the input's values are checked as well."""

    def __init__(self, channels=32, groups=2, blocks=3, reduction=8, align_corners=True):
        super().__init__()
        self.config = dict(channels=channels, groups=groups, blocks=blocks, reduction=reduction,
                           align_corners=align_corners)
        self.align_corners = bool(align_corners)
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Sequential(*[ResidualGroup(channels, blocks, reduction) for _ in range(groups)],
                                  nn.Conv2d(channels, channels, 3, padding=1))
        self.upsample = nn.Sequential(
            nn.Conv2d(channels, 4 * channels, 3, padding=1),   # 4 = 2 x 2 sub-pixel positions per pixel
            nn.PixelShuffle(2))                                # (B, 4C, H, W) -> (B, C, 2H, 2W)
        self.tail = nn.Conv2d(channels, 3, 3, padding=1)
        nn.init.zeros_(self.tail.weight)  # untrained, the network is bicubic upsampling (see the docstring)
        nn.init.zeros_(self.tail.bias)

    def positions(self, x, origin=None, image_size=None):
        """Where the output pixels of x (B, 3, H, W) sit on its pixel grid: rows (B, 2H), cols (B, 2W), for
        whole images or (origin, image_size) crops (see forward)."""
        B, _, H, W = x.shape
        if origin is None:
            origin = torch.zeros(B, 2, device=x.device)
        full_h, full_w = image_size or (H, W)
        return (output_positions(2 * H, full_h, origin[:, 0], self.align_corners),
                output_positions(2 * W, full_w, origin[:, 1], self.align_corners))

    def bicubic(self, x):
        """x (B, 3, H, W) -> (B, 3, 2H, 2W): bicubic upsampling of whole images on this network's pixel grid,
        the skip alone (what the untrained network outputs, and evaluate_sr's baseline). Not clamped; equal
        to F.interpolate(x, scale_factor=2, mode='bicubic', align_corners=self.align_corners) up to rounding."""
        return sample_at(x, *self.positions(x))

    def forward(self, x, origin=None, image_size=None):
        """x (B, 3, H, W) -> (B, 3, 2H, 2W). For crops (training): origin (B, 2) the row and column of each
        crop's first pixel in the image it was cut from, image_size that image's (height, width); by default
        x is a whole image."""
        check_input(x, values=not self.training)
        rows, cols = self.positions(x, origin, image_size)  # (B, 2H), (B, 2W) in input pixels
        features = self.head(x - 0.5)                 # (B, C, H, W); inputs centred on 0
        features = features + self.body(features)     # (B, C, H, W); RCAN's long skip
        shuffled = self.tail(self.upsample(features))  # (B, 3, 2H, 2W), its pixel k at input coordinate (k - 1/2) / 2
        residual = sample_at(shuffled, 2 * rows + 0.5, 2 * cols + 0.5)  # (B, 3, 2H, 2W) at the output pixels
        out = sample_at(x, rows, cols) + residual     # (B, 3, 2H, 2W): bicubic skip + residual
        return out if self.training else out.clamp(0, 1)


def output_positions(n_out, full_size, origin, align_corners):
    """Where output pixels 0..n_out-1 of a crop sit on its input's pixel grid (input pixel units, 0 = the
    crop's first pixel): (B, n_out). The crop starts at input pixel origin (B,) of an image full_size
    wide, so its outputs are the full 2x image's pixels 2 origin + j (see the module docstring)."""
    origin = origin.float()[:, None]                              # (B, 1)
    j = 2 * origin + torch.arange(n_out, device=origin.device)    # (B, n_out) pixels of the full 2x image
    if align_corners:
        u = j * (full_size - 1) / max(2 * full_size - 1, 1)      # corner pixels coincide
    else:
        u = (j + 0.5) / 2 - 0.5                                   # outer pixel edges coincide
    return u - origin


def sample_at(image, rows, cols):
    """Bicubic samples (A = -0.75, edges repeated, as F.interpolate) of image (B, C, H, W) at rows (B, h) x
    cols (B, w), in pixel units: (B, C, h, w)."""
    B, _, H, W = image.shape
    gy = (2 * rows / max(H - 1, 1) - 1)[:, :, None].expand(-1, -1, cols.shape[1])   # (B, h, w)
    gx = (2 * cols / max(W - 1, 1) - 1)[:, None, :].expand(-1, rows.shape[1], -1)   # (B, h, w)
    return F.grid_sample(image, torch.stack([gx, gy], -1), mode='bicubic', padding_mode='border',
                         align_corners=True)


def check_input(x, values=True):
    """One-line ValueErrors for what callers get wrong. Shape, channels, dtype and emptiness would otherwise
    fail deep in a convolution with a message about weights; with values=True (one host sync), NaN/inf and
    a range other than [0, 1] would not fail at all but give wrong pictures: a [-1, 1] image (the released
    code's range) or a [0, 255] one is the likely mistake in this project. Odd sizes are fine: any H, W
    doubles, so they are not checked."""
    if not torch.is_tensor(x):
        raise ValueError(f"super-resolution input must be a torch tensor (B, 3, H, W), got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 3:
        hint = " (one image? use x[None])" if x.ndim == 3 and x.shape[0] == 3 else ""
        raise ValueError(f"super-resolution input must be (B, 3, H, W) RGB, got shape {tuple(x.shape)}{hint}")
    if not x.is_floating_point():
        raise ValueError(f"super-resolution input must be a float image in [0, 1], got dtype {x.dtype} "
                         f"(for uint8 pictures use x.float() / 255)")
    if x.numel() == 0:
        raise ValueError(f"super-resolution input is empty: shape {tuple(x.shape)}")
    if values:
        if not bool(torch.isfinite(x).all()):
            raise ValueError("super-resolution input contains NaN or inf")
        low, high = (v.item() for v in x.detach().aminmax())
        if low < _INPUT_LOW or high > _INPUT_HIGH:
            raise ValueError(f"super-resolution input must be in [0, 1], got values in [{low:.3g}, {high:.3g}] "
                             f"(a [-1, 1] image: pass (x + 1) / 2; a [0, 255] one: x / 255)")


def count_parameters(net):
    return sum(p.numel() for p in net.parameters())


# -----------------------------------------------------------------------------
# measurement: how much the network adds over plain resampling

def psnr(pred, target):
    """Per-image PSNR in dB of images in [0, 1]: (B, 3, H, W) x2 -> (B,)."""
    mse = (pred.clamp(0, 1) - target).square().flatten(1).mean(1)
    return 10 * torch.log10(1 / mse.clamp_min(1e-10))


@torch.no_grad()
def evaluate_sr(net, low, high, batch_size=16):
    """PSNR (dB, mean over images) of net(low) and of bicubic upsampling of low, against high.
    low (N, 3, S, S), high (N, 3, 2S, 2S) in [0, 1]; net an SRNet (or its DDP wrapper) on any device.
    Bicubic uses the network's pixel-grid convention (SRNet.bicubic), clamped to [0, 1] as SR is.
    Returns the means, gain_db (SR - bicubic), per-image PSNRs each_sr, each_bicubic (N,) and the
    images sr, bicubic (on the CPU)."""
    model = getattr(net, 'module', net)
    was_training, device = model.training, next(model.parameters()).device
    model.eval()
    upsampled, bicubic = [], []
    for i in range(0, low.shape[0], batch_size):
        x = low[i:i + batch_size].to(device)
        upsampled.append(model(x).cpu())                          # (b, 3, 2S, 2S), clamped in eval mode
        bicubic.append(model.bicubic(x).clamp(0, 1).cpu())
    model.train(was_training)
    upsampled, bicubic = torch.cat(upsampled), torch.cat(bicubic)
    each_sr, each_bicubic = psnr(upsampled, high), psnr(bicubic, high)
    return dict(psnr_sr=each_sr.mean().item(), psnr_bicubic=each_bicubic.mean().item(),
                gain_db=(each_sr - each_bicubic).mean().item(), n=low.shape[0],
                each_sr=each_sr, each_bicubic=each_bicubic, sr=upsampled, bicubic=bicubic)


# -----------------------------------------------------------------------------
# loading

def load_sr(path, device='cpu', trust=False):
    """The trained network of a 'sr' checkpoint (train_sr.py's out-sr/ckpt.pt, or a model-only one), in
    eval mode on `device`: (B, 3, H, W) in [0, 1] -> (B, 3, 2H, 2W) in [0, 1]. Loaded with the safe loader
    (checkpoint.load); trust: see there."""
    ckpt = checkpoint.load(path, trust=trust)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('model'), dict):
        raise ValueError(f"{path}: not a checkpoint of ours (a dict with 'kind', 'model_config' and 'model')")
    kind = ckpt.get('kind', 'rgbd' if 'denoiser_config' in ckpt else 'trigen')  # files from before 'kind' existed
    if kind != 'sr':
        raise ValueError(f"{path}: a {kind!r} checkpoint ({checkpoint.KINDS.get(kind, 'unknown kind')}), not a "
                         f"super-resolution ('sr') one: train_sr.py writes those")
    if not isinstance(ckpt.get('model_config'), dict):
        raise ValueError(f"{path}: an 'sr' checkpoint without its 'model_config' dict")
    try:
        net = SRNet(**ckpt['model_config'])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad SR model_config {ckpt['model_config']}: {e}") from None
    try:
        net.load_state_dict(checkpoint.strip_prefixes(ckpt['model']))
    except RuntimeError as e:
        raise ValueError(f"{path}: the weights do not fit SRNet({ckpt['model_config']}): "
                         f"{' '.join(str(e).split())[:300]}") from None
    return net.to(device).eval()
