"""
The UNet family of G3DR. f_trigen is a denoising-diffusion-style UNet whose time input is
pinned to t = 1; with a real time input and a class embedding the same network is the f_rgbd
denoiser (diffusion.py). Module and attribute names follow the authors' release, so their state dict
loads into `G3DR.unet` (model.py) with nothing more than the 'module.' prefix stripped.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def _norm_eps(dtype):
    # as released: eps 1e-5 when the statistics are computed in float32, 1e-3 otherwise
    return 1e-5 if dtype == torch.float32 else 1e-3


class WSConv2d(nn.Conv2d):
    """Conv whose filters are standardised (per output channel: zero mean, unit biased variance)."""

    def forward(self, x):
        # The statistics are computed in the weight's dtype. Under autocast the weight stays float32,
        # so eps is 1e-5 exactly as in a full-precision run. Keying eps on x.dtype instead would turn
        # it to 1e-3 for just the layers fed by a bf16 conv: larger than a filter's variance
        # (~1/(3 fan_in) at init, 3e-4 for 128 x 3 x 3), so the network would compute another function.
        w = self.weight  # (O, I, k, k)
        var, mean = torch.var_mean(w, dim=(1, 2, 3), correction=0, keepdim=True)
        w = (w - mean) * torch.rsqrt(var + _norm_eps(w.dtype))
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of a (B, C, H, W) map, with a gain g and no bias."""

    def __init__(self, dim):
        super().__init__()
        self.g = nn.Parameter(torch.ones(1, dim, 1, 1))

    def forward(self, x):
        # Under autocast x often arrives in bf16 (the output of a conv). Like autocast's own norm
        # layers we take the statistics in float32, so the eps rule sees float32 as in training.
        if torch.is_autocast_enabled(x.device.type):
            x = x.float()
        var, mean = torch.var_mean(x, dim=1, correction=0, keepdim=True)
        return (x - mean) * torch.rsqrt(var + _norm_eps(x.dtype)) * self.g


class Residual(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


class PreNorm(nn.Module):
    def __init__(self, dim, fn):
        super().__init__()
        self.fn = fn
        self.norm = ChannelLayerNorm(dim)

    def forward(self, x):
        return self.fn(self.norm(x))


class LinearAttention(nn.Module):
    """Attention linear in the number of pixels: a (d x d) context per head instead of (N x N)."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1, bias=False)
        self.to_out = nn.Sequential(nn.Conv2d(heads * dim_head, dim, 1), ChannelLayerNorm(dim))

    def forward(self, x):
        B, _, H, W = x.shape
        q, k, v = self.to_qkv(x).reshape(B, 3, self.heads, -1, H * W).unbind(1)  # each (B, h, d, N)
        q = q.softmax(dim=-2) * self.scale  # softmax over each head's channels
        k = k.softmax(dim=-1)  # softmax over positions
        v = v / (H * W)
        context = k @ v.transpose(-1, -2)  # (B, h, d, d): sum_n k[d, n] v[e, n]
        out = context.transpose(-1, -2) @ q  # (B, h, d, N): sum_d context[d, e] q[d, n]
        return self.to_out(out.reshape(B, -1, H, W))


class Attention(nn.Module):
    """Standard softmax attention over all pixels (used only at the lowest resolution)."""

    def __init__(self, dim, heads=4, dim_head=32):
        super().__init__()
        self.heads, self.scale = heads, dim_head ** -0.5
        self.to_qkv = nn.Conv2d(dim, 3 * heads * dim_head, 1, bias=False)
        self.to_out = nn.Conv2d(heads * dim_head, dim, 1)

    def forward(self, x):
        B, _, H, W = x.shape
        qkv = self.to_qkv(x).reshape(B, 3, self.heads, -1, H * W).transpose(-1, -2)  # (B, 3, h, N, d)
        q, k, v = qkv.unbind(1)
        out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, h, N, d)
        return self.to_out(out.transpose(-1, -2).reshape(B, -1, H, W))


class Block(nn.Module):
    """Weight-standardised conv 3x3 -> GroupNorm -> optional x (scale + 1) + shift -> SiLU."""

    def __init__(self, dim, dim_out, groups=8):
        super().__init__()
        self.proj = WSConv2d(dim, dim_out, 3, padding=1)
        self.norm = nn.GroupNorm(groups, dim_out)

    def forward(self, x, scale_shift=None):
        x = self.norm(self.proj(x))
        if scale_shift is not None:
            scale, shift = scale_shift
            x = x * (scale + 1) + shift
        return F.silu(x)


class ResBlock(nn.Module):
    """Two Blocks; the time embedding modulates the first one (scale, shift); 1x1 conv skip."""

    def __init__(self, dim, dim_out, time_dim, groups=8):
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(time_dim, 2 * dim_out))
        self.block1 = Block(dim, dim_out, groups)
        self.block2 = Block(dim_out, dim_out, groups)
        self.res_conv = nn.Conv2d(dim, dim_out, 1) if dim != dim_out else nn.Identity()

    def forward(self, x, t):  # x (B, dim, H, W), t (B, time_dim)
        scale_shift = self.mlp(t)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, dim_out, 1, 1)
        h = self.block2(self.block1(x, scale_shift))
        return h + self.res_conv(x)


class SinusoidalEmbedding(nn.Module):
    """t (B,) -> (B, dim): [sin(t f_i), cos(t f_i)] with f_i = exp(-log(10000) i / (dim/2 - 1))."""

    def __init__(self, dim):
        super().__init__()
        self.dim = dim

    def forward(self, t):
        half = self.dim // 2
        freqs = torch.exp(torch.arange(half, device=t.device) * (-math.log(10000) / (half - 1)))
        args = t.float()[:, None] * freqs[None]  # (B, half)
        return torch.cat([args.sin(), args.cos()], dim=-1)


def _downsample(dim_in, dim_out):
    # 2x2 space-to-depth (channel index c*4 + 2*row + col), then a 1x1 conv: no information lost
    return nn.Sequential(nn.PixelUnshuffle(2), nn.Conv2d(4 * dim_in, dim_out, 1))


def _upsample(dim_in, dim_out):
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(dim_in, dim_out, 3, padding=1))


class UNet(nn.Module):
    """The f_trigen UNet family.

    f_trigen: in_channels 4 (rgb in [-1, 1], depth in scene units), out_channels 3 C, a learned
    positional embedding, no time input (the constant t = 1). As the f_rgbd diffusion denoiser:
    pass the diffusion time, and set num_classes > 0 for a class embedding (index num_classes is
    the null class used by classifier-free guidance); pos_channels = 0 drops the positional
    embedding. With num_classes = 0 the parameters and keys are exactly the authors'.
    """

    def __init__(self, dim=128, dim_mults=(1, 2, 4, 8), in_channels=4, out_channels=192,
                 image_size=128, pos_channels=256, num_classes=0, groups=8):
        super().__init__()
        self.image_size, self.pos_channels, self.num_classes = image_size, pos_channels, num_classes
        self.n_down = len(dim_mults) - 1  # the last stage keeps its resolution
        self.null_class = num_classes if num_classes > 0 else None  # extra class row, for guidance
        time_dim = 4 * dim
        if any((dim * m) % groups for m in (1, *dim_mults)):
            raise ValueError(f"UNet widths {dim} x {tuple(dim_mults)} must all be multiples of {groups} (GroupNorm)")

        if pos_channels > 0:  # a learned (pos_channels, S, S) input, initialised to ones
            self.pos_embed = nn.Parameter(torch.ones(1, pos_channels, image_size, image_size))
        self.init_conv = nn.Conv2d(in_channels + pos_channels, dim, 7, padding=3)
        self.time_mlp = nn.Sequential(SinusoidalEmbedding(dim), nn.Linear(dim, time_dim), nn.GELU(),
                                      nn.Linear(time_dim, time_dim))
        if num_classes > 0:
            self.class_emb = nn.Embedding(num_classes + 1, time_dim)

        dims = [dim] + [dim * m for m in dim_mults]
        stages = list(zip(dims[:-1], dims[1:]))  # (dim_in, dim_out) per resolution
        self.downs = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(stages):
            last = i == len(stages) - 1
            self.downs.append(nn.ModuleList([
                ResBlock(d_in, d_in, time_dim, groups),
                ResBlock(d_in, d_in, time_dim, groups),
                Residual(PreNorm(d_in, LinearAttention(d_in))),
                nn.Conv2d(d_in, d_out, 3, padding=1) if last else _downsample(d_in, d_out),
            ]))
        self.mid_block1 = ResBlock(dims[-1], dims[-1], time_dim, groups)
        self.mid_attn = Residual(PreNorm(dims[-1], Attention(dims[-1])))
        self.mid_block2 = ResBlock(dims[-1], dims[-1], time_dim, groups)
        self.ups = nn.ModuleList()
        for i, (d_in, d_out) in enumerate(reversed(stages)):
            last = i == len(stages) - 1
            self.ups.append(nn.ModuleList([
                ResBlock(d_out + d_in, d_out, time_dim, groups),
                ResBlock(d_out + d_in, d_out, time_dim, groups),
                Residual(PreNorm(d_out, LinearAttention(d_out))),
                nn.Conv2d(d_out, d_in, 3, padding=1) if last else _upsample(d_out, d_in),
            ]))
        self.final_res_block = ResBlock(2 * dim, 2 * dim, time_dim, groups)
        self.final_conv = nn.Conv2d(2 * dim, out_channels, 1)

    def forward(self, x, time=None, class_labels=None):
        """x (B, in_channels, H, W); time None (t = 1), a number or (B,); class_labels (B,) long or
        None (the null class) -> (B, out_channels, H, W)."""
        B, _, H, W = x.shape
        if H % 2 ** self.n_down or W % 2 ** self.n_down:
            raise ValueError(f"UNet input size {H}x{W} must be divisible by {2 ** self.n_down}")
        if self.pos_channels > 0:
            if (H, W) != (self.image_size, self.image_size):
                raise ValueError(f"UNet input size {H}x{W} differs from its positional embedding "
                                 f"({self.image_size}x{self.image_size})")
            x = torch.cat([x, self.pos_embed.expand(B, -1, -1, -1)], dim=1)
        x = self.init_conv(x)  # (B, dim, H, W)
        r = x  # kept for the final block

        # f_trigen runs at the constant t = 1, so its time embedding is just a learned bias
        time = torch.ones(B, device=x.device) if time is None else torch.as_tensor(time, device=x.device)
        t = self.time_mlp(time.expand(B))  # (B, 4 dim)
        if self.num_classes > 0:
            if class_labels is None:
                class_labels = torch.full((B,), self.num_classes, device=x.device)  # null class
            t = t + self.class_emb(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels given to a UNet built with num_classes=0")

        skips = []
        for res1, res2, attn, down in self.downs:
            x = res1(x, t)
            skips.append(x)
            x = attn(res2(x, t))
            skips.append(x)
            x = down(x)  # (B, dim_out, H/2, W/2); same size at the last stage
        x = self.mid_block2(self.mid_attn(self.mid_block1(x, t)), t)
        for res1, res2, attn, up in self.ups:
            x = res1(torch.cat([x, skips.pop()], dim=1), t)
            x = res2(torch.cat([x, skips.pop()], dim=1), t)
            x = up(attn(x))  # (B, dim_in, 2H, 2W); same size at the last stage
        x = self.final_res_block(torch.cat([x, r], dim=1), t)  # (B, 2 dim, H, W)
        return self.final_conv(x)
