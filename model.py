"""
G3DR model: the triplane field (multi-resolution sampler + decoder f_dec) and the G3DR module that
ties f_trigen (unet.UNet: one RGB-D image -> a triplane), f_dec and the renderer together. Images at
G3DR's API are in [0, 1]. Its checkpoints (ours and the authors') are read and written by checkpoint.py.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from render import CAMERA_RADIUS, FOV_DEGREES, get_rays, orbit_camera, render_rays
from unet import UNet

# === triplane field (f_dec + multi-resolution sampler) ===
# The field of paper Sec. 3.3: a point is projected onto the three planes, every plane is sampled
# bilinearly (zero padding, align_corners=False) at every level of an antialiased pyramid, the
# samples are summed over the levels and averaged over the planes, and f_dec turns the feature into
# (colour, raw density). The points get no gradient, as in the release (its projection runs under
# no_grad). Two samplers compute that sum; they agree to float rounding (test_render.py):
#   'grid_sample'  the plain EG3D way: one F.grid_sample per level, the three planes as a batch.
#   'table'        the same sum, as one gather: the 3 planes x L levels x 4 bilinear corners of a
#                  point are 12 L weighted rows of one channels-last table, so the forward is one
#                  embedding_bag and the backward one sparse (rows x points) product. On a CPU the
#                  training render is 3-4x faster than with grid_sample, whose backward scatters
#                  channel by channel across the (C, H, W) planes.
# sampler='auto' (the default) is 'table' on a CPU and 'grid_sample' on a GPU, where the table has
# not been measured yet (`python bench.py gpu` does).
SAMPLERS = ("grid_sample", "table")

# The 2D coordinates each plane is sampled at, as indices into (x, y, z). The release (from EG3D)
# uses (x, y), (x, z), (z, x): the y-z plane is never seen. 'yz' is the corrected projection, its
# third plane the y-z plane oriented as the canonical camera sees it: u = z (image columns, left to
# right) and v = -y (image rows, top to bottom). f_trigen's output planes are pixel-aligned with its
# input image; with aligned_plane (align_yz_plane, the synthetic recipe) the third one is resampled so that a
# feature sits where its pixel's ray crosses the box centre, under its pixel for surfaces at that depth.
_PROJECTIONS = {"official": (0, 1, 0, 2, 2, 0), "yz": (0, 1, 0, 2, 2, 1)}
_FLIP_V3 = {"official": False, "yz": True}  # negate v on the third plane


class _FullyConnected(nn.Module):
    """StyleGAN2's FullyConnectedLayer: weight stored N(0, 1), scaled by 1/sqrt(fan_in) at run time."""

    def __init__(self, fan_in, fan_out):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(fan_out, fan_in))
        self.bias = nn.Parameter(torch.zeros(fan_out))
        self.weight_gain = 1 / math.sqrt(fan_in)  # an equalised learning rate

    def forward(self, x):  # (N, fan_in) -> (N, fan_out)
        return torch.addmm(self.bias, x, (self.weight * self.weight_gain).t())


class Decoder(nn.Module):
    """f_dec: features (B, M, C) -> rgb (B, M, 3) in [-0.001, 1.001], raw density (B, M, 1).
    The view direction is not used."""

    def __init__(self, n_features, hidden=64):
        super().__init__()
        self.net = nn.Sequential(_FullyConnected(n_features, hidden), nn.Softplus(), _FullyConnected(hidden, 4))

    def forward(self, features):
        B, M, C = features.shape
        x = self.net(features.reshape(B * M, C)).view(B, M, 4)
        rgb = torch.sigmoid(x[..., 1:]) * (1 + 2 * 0.001) - 0.001  # MipNeRF's widened sigmoid
        return rgb, x[..., :1]


def triplane_pyramid(planes, levels=3):
    """planes G (B, 3, C, H, W) -> [G, G/2, G/4, ...]: `levels` tensors (B, 3, C, H/2^l, W/2^l).

    Every level is resampled from G itself (bilinear, antialiased), as in the release, not from
    the level above (for random planes the two differ by 10-20% at level 2). Build it once per
    render."""
    if planes.ndim != 5 or planes.shape[1] != 3:
        raise ValueError(f"planes must be (B, 3, C, H, W), got {tuple(planes.shape)}")
    if levels < 1:
        raise ValueError(f"levels must be >= 1, got {levels}")
    B, _, C, H, W = planes.shape
    flat = planes.reshape(B, 3 * C, H, W)  # the 3 planes as channels: one resize per level
    pyramid = [planes]
    for level in range(1, levels):
        small = F.interpolate(flat, scale_factor=0.5 ** level, mode="bilinear", antialias=True)
        pyramid.append(small.view(B, 3, C, *small.shape[-2:]))
    return pyramid


def _sample_grid(pyramid, points, box_size, projection):
    """The readable sampler: points (B, M, 3) -> features (B, M, C) with F.grid_sample."""
    B, M, _ = points.shape
    uv = (2 / box_size) * points.detach()[..., list(_PROJECTIONS[projection])].view(B, M, 3, 2)  # (u, v) per plane
    if _FLIP_V3[projection]:
        uv[:, :, 2, 1] *= -1  # v = -y
    grid = uv.nan_to_num(nan=-2.0).transpose(1, 2).reshape(B * 3, 1, M, 2).to(pyramid[0].dtype)  # NaN: outside
    total = 0
    for level in pyramid:  # (B, 3, C, H_l, W_l) -> (B * 3, C, 1, M), summed over the levels
        total = total + F.grid_sample(level.flatten(0, 1), grid, mode="bilinear", padding_mode="zeros",
                                      align_corners=False)
    return total.view(B, 3, -1, M).mean(dim=1).transpose(1, 2)  # the mean over the planes


def _plane_table(pyramid):
    """pyramid -> (table (B * rows, C), layout): layout = (rows per batch item, sizes (L, 1, 2, 1) as
    (W_l, H_l), padded widths (L, 1, 1), plane starts (L, 3, 1)), the constants of _bilinear_taps,
    made once per render here (on a GPU each is a host-to-device copy, a wait, if made per call).

    The table holds every pixel of every plane and level as one channels-last row, each plane
    framed by a 1-pixel border of zeros (zero padding for free) and each batch item's block
    followed by W_0 + 3 zero rows, so that the indices of zero-weight corners just past a border
    stay inside the table. Pixel (row, col) of plane p of item b at level l is the row
    b * rows + start_l + (p * (H_l + 2) + row + 1) * (W_l + 2) + col + 1."""
    B, _, C, H, W = pyramid[0].shape
    shapes = [tuple(p.shape[-2:]) for p in pyramid]
    starts, n = [], 0
    for h, w in shapes:
        starts.append(n)
        n += 3 * (h + 2) * (w + 2)
    rows = n + W + 3
    table = pyramid[0].new_zeros(B, rows, C)
    for p, (h, w), s in zip(pyramid, shapes, starts):
        block = table[:, s:s + 3 * (h + 2) * (w + 2)].view(B, 3, h + 2, w + 2, C)
        block[:, :, 1:-1, 1:-1].copy_(p.permute(0, 1, 3, 4, 2))  # autograd records the copy
    L, dev = len(shapes), table.device
    itype = torch.int32 if B * rows < 2 ** 31 else torch.int64
    size = torch.tensor([[w, h] for h, w in shapes], dtype=table.dtype).view(L, 1, 2, 1)
    padded_widths = torch.tensor([w + 2 for _, w in shapes], dtype=itype).view(L, 1, 1)
    plane_starts = torch.tensor([[s + p * (h + 2) * (w + 2) for p in range(3)] for (h, w), s in zip(shapes, starts)],
                                dtype=itype).view(L, 3, 1)
    return table.view(B * rows, C), (rows, size.to(dev), padded_widths.to(dev), plane_starts.to(dev))


def _bilinear_taps(points, layout, box_size, projection):
    """points (B, M, 3) -> table indices idx (B*M, 12 L) and weights w (B*M, 12 L): the feature of
    a point is sum_k w_k table[idx_k] over L levels x 3 planes x 4 bilinear corners, with the 1/3
    of the mean over the planes folded into the weights.

    The arithmetic runs on (..., B*M) tensors, whose long contiguous rows vectorise well, and is
    transposed once at the end: math on (B*M, 3, L, 2)-shaped tensors is several times slower."""
    B, M, _ = points.shape
    rows, size, wp, plane_start = layout
    N, L, itype, dev = B * M, len(size), wp.dtype, points.device
    # (u, v) on each plane: u runs along the plane's width, v along its height
    uv = ((2 / box_size) * points).reshape(N, 3).t()[list(_PROJECTIONS[projection])].view(1, 3, 2, N)
    if _FLIP_V3[projection]:
        uv[0, 2, 1].neg_()  # v = -y
    # grid_sample's unnormalisation (align_corners=False: -1 and 1 are the outer pixel edges)
    pos = (uv + 1) * (size / 2) - 0.5  # (L, 3, 2, N) in pixels
    # past -1 or the far edge both corners are in the zero border; clamping keeps indices valid
    pos = torch.minimum(torch.nan_to_num(pos, nan=-1.0).clamp_(min=-1), size)
    p0 = pos.floor()
    f = torch.stack([(p0 + 1) - pos, pos - p0], dim=2)  # (L, 3, 2 corners, 2 axes (u, v), N)
    f[:, :, :, 1] *= 1 / 3  # the mean over the three planes
    w = f[:, :, :, None, 1] * f[:, :, None, :, 0]  # (L, 3, 2 (v), 2 (u), N)

    i0 = p0.to(itype) + 1  # (L, 3, 2, N) near corner, in pixels of the padded plane
    near = plane_start + i0[:, :, 1] * wp + i0[:, :, 0]  # (L, 3, N) table row of the near corner
    if B > 1:
        near = near + (torch.arange(B, dtype=itype, device=dev) * rows).repeat_interleave(M)
    wp = wp.view(L, 1)
    corners = torch.stack([torch.zeros_like(wp), torch.ones_like(wp), wp, wp + 1], dim=-1)  # (L, 1, 4)
    idx = near[:, :, None] + corners[..., None]  # (L, 3, 4, N): (v, u) = 00, 01, 10, 11
    # one transposing copy each into the (point, tap) layout of embedding_bag
    return idx.view(-1, N).t().contiguous(), w.view(-1, N).t().contiguous()


class _WeightedGather(torch.autograd.Function):
    """out[m] = sum_k w[m, k] table[idx[m, k]] (embedding_bag); gradient for the table only.

    The backward is grad_table = S^T grad_out with S the sparse (points x rows) matrix of the
    weights. torch's COO sparse x dense product walks the nonzeros in order and needs no sort,
    which makes it several times faster on a CPU than embedding_bag's own (sorting) backward."""

    @staticmethod
    def forward(ctx, table, idx, w):
        ctx.save_for_backward(idx, w)
        ctx.n_rows = table.shape[0]
        return F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")

    @staticmethod
    def backward(ctx, grad_out):  # (N, C)
        idx, w = ctx.saved_tensors
        N, K = idx.shape
        ind = torch.empty(2, N, K, dtype=torch.int64, device=idx.device)  # (table row, point) pairs
        ind[0].copy_(idx)
        ind[1].copy_(torch.arange(N, device=idx.device)[:, None])
        s_t = torch.sparse_coo_tensor(ind.view(2, -1), w.view(-1), (ctx.n_rows, N), check_invariants=False)
        return torch.sparse.mm(s_t, grad_out.contiguous()), None, None


def _sample_table(table, layout, points, box_size, projection):
    """The fast sampler: points (B, M, 3) -> features (B, M, C) from the table of _plane_table."""
    B, M, _ = points.shape
    with torch.no_grad():  # the sample positions are constants
        idx, w = _bilinear_taps(points, layout, box_size, projection)
    w = w.to(table.dtype)
    if table.device.type == "cpu":
        features = _WeightedGather.apply(table, idx, w)
    else:  # on GPUs embedding_bag's own (sorting) backward is the usual choice
        features = F.embedding_bag(idx, table, per_sample_weights=w, mode="sum")
    return features.view(B, M, -1)


def _resolve_sampler(sampler, device):
    if sampler == "auto":  # the default, by the device of the planes
        return "table" if torch.device(device).type == "cpu" else "grid_sample"
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be 'auto' or one of {SAMPLERS}, got {sampler!r}")
    return sampler


def _triplane_sampler(planes_or_pyramid, levels, box_size, projection, sampler):
    """points (B, M, 3) -> features (B, M, C), with the pyramid (and table) built once, here."""
    if projection not in _PROJECTIONS:
        raise ValueError(f"projection must be one of {sorted(_PROJECTIONS)}, got {projection!r}")
    if torch.is_tensor(planes_or_pyramid):
        pyramid = triplane_pyramid(planes_or_pyramid, levels)
    else:
        pyramid = list(planes_or_pyramid)
        if len(pyramid) != levels:
            raise ValueError(f"got a pyramid of {len(pyramid)} levels but levels={levels}")
    B = pyramid[0].shape[0]
    table = _plane_table(pyramid) if _resolve_sampler(sampler, pyramid[0].device) == "table" else None

    def sample(points):
        if points.ndim != 3 or points.shape[-1] != 3 or points.shape[0] != B:
            raise ValueError(f"points must be (B, M, 3) with B = {B} (the planes' batch), got {tuple(points.shape)}")
        if table is None:
            return _sample_grid(pyramid, points, box_size, projection)
        return _sample_table(*table, points, box_size, projection)

    return sample


def sample_triplane(planes_or_pyramid, points, levels=3, box_size=2.0, projection="official", sampler="auto"):
    """Multi-resolution triplane features (paper Sec. 3.3): planes (B, 3, C, H, W) or their pyramid
    (triplane_pyramid), points (B, M, 3) -> (B, M, C) = mean over the 3 planes of the sum over the
    levels of the bilinear samples (zero outside the box). sampler: 'grid_sample', 'table' or
    'auto' (table on a CPU, grid_sample on a GPU)."""
    return _triplane_sampler(planes_or_pyramid, levels, box_size, projection, sampler)(points)


def make_field(planes_or_pyramid, decoder, levels=3, box_size=2.0, projection="official", sampler="auto"):
    """The `field(points, dirs) -> (rgb (B, M, 3), raw density (B, M, 1))` callable of render_rays
    for one batch of triplanes; options as in sample_triplane. The pyramid (and the table) are
    built once, here, and shared by every pass of the render."""
    sample = _triplane_sampler(planes_or_pyramid, levels, box_size, projection, sampler)
    return lambda points, dirs=None: decoder(sample(points))  # dirs unused: f_dec is view independent
# === end triplane field ===

# === the G3DR module: f_trigen (unet.UNet) + f_dec, rendered through the field ===
# Images at its API are in [0, 1] (what scenes.py and data.py give); the [-1, 1] of the released network
# stays inside: encode maps its input, render maps render.py's output. f_dec lives under `decoder.` in
# our state dict and in the authors' (checkpoint.py reads and writes both).


def align_yz_plane(plane, radius=CAMERA_RADIUS, fov=FOV_DEGREES, box_size=2.0):
    """f_trigen's third plane, pixel-aligned with its input image, (B, C, S, S) -> the y-z plane (B, C, S, S)
    ('yz' projection) with each feature where the canonical camera sees its pixel on the plane x = 0
    through the box centre.

    Why: a pixel's ray meets the y-z plane coordinates (z, -y) = a * d tan(fov/2) at depth d, for its
    corner-inclusive image coordinate a in [-1, 1]. Used as it is, the plane puts pixel a at a: for d = 5 that
    is 1 / (5 tan 9 deg) = 1.26 times too far out (1.6 at the box front), so f_trigen has to learn a
    depth-dependent shrink of up to 12 pixels before a feature sits under its own pixel. Read at
    a = p / (radius tan(fov/2)) instead, every texel p holds the feature of the pixel whose ray crosses the
    box centre's depth there, and the shrink left to learn is d / radius (0.8 - 1.2). Texels outside the
    canonical view's cone at x = 0 (|p| > 0.79) repeat the image border."""
    S = plane.shape[-1]
    texel = (torch.arange(S, device=plane.device, dtype=plane.dtype) * 2 + 1) / S - 1  # texel centres, in [-1, 1]
    a = texel * (box_size / 2) / (radius * math.tan(math.radians(fov) / 2))  # image coordinate, corners at +-1
    grid = torch.stack(torch.meshgrid(a, a, indexing="xy"), -1).expand(plane.shape[0], S, S, 2)  # (B, S, S, (u, v))
    return F.grid_sample(plane, grid, mode="bilinear", padding_mode="border", align_corners=True)


MODEL_PRESETS = {
    # the released model: 147,406,212 parameters with f_dec
    "paper": dict(dim=128, dim_mults=(1, 2, 4, 8), image_size=128, plane_channels=64, pos_channels=256,
                  levels=3, decoder_hidden=64, projection="official", aligned_plane=False),
    # trains on a laptop CPU at 64 x 64: narrow (16) but as deep as the paper's (4 stages, so the
    # middle attention sees the whole 8 x 8 image); f_trigen forward+backward at batch 4 takes
    # ~0.24 s on 2 cores, vs ~0.38 s for width 32 with 3 stages
    "small": dict(dim=16, dim_mults=(1, 2, 4, 8), image_size=64, plane_channels=32, pos_channels=16,
                  levels=3, decoder_hidden=64, projection="official"),
    # for tests: the size of the authors' tiny test checkpoint, with a small positional embedding
    "tiny": dict(dim=16, dim_mults=(1, 2), image_size=32, plane_channels=8, pos_channels=8,
                 levels=3, decoder_hidden=64, projection="official"),
}


class G3DR(nn.Module):
    """f_trigen (RGB-D image -> triplane) + f_dec, rendered through the multi-resolution field."""

    def __init__(self, config=None, sampler="auto", **sizes):
        """G3DR(MODEL_PRESETS['small']), G3DR(**MODEL_PRESETS['small']) or G3DR(dim=32, ...): keys as in
        MODEL_PRESETS; whatever is not given takes the paper's value. sampler: the triplane sampler
        of every render ('auto', 'grid_sample' or 'table', see make_field); not a size, so not saved."""
        super().__init__()
        _resolve_sampler(sampler, "cpu")  # a bad name fails here, not at the first render
        self.sampler = sampler
        config = {**MODEL_PRESETS["paper"], **(config or {}), **sizes}
        unknown = set(config) - set(MODEL_PRESETS["paper"])
        if unknown:
            raise ValueError(f"unknown G3DR config keys {sorted(unknown)}; known: {sorted(MODEL_PRESETS['paper'])}")
        if config["projection"] not in _PROJECTIONS:
            raise ValueError(f"projection must be one of {sorted(_PROJECTIONS)}, got {config['projection']!r}")
        if config["aligned_plane"] and config["projection"] != "yz":
            raise ValueError("aligned_plane needs projection='yz' (the 'official' projection has no y-z plane)")
        config["dim_mults"] = tuple(config["dim_mults"])
        self.config = config
        self.unet = UNet(config["dim"], config["dim_mults"], in_channels=4, out_channels=3 * config["plane_channels"],
                         image_size=config["image_size"], pos_channels=config["pos_channels"])  # f_trigen
        self.decoder = Decoder(config["plane_channels"], hidden=config["decoder_hidden"])  # f_dec

    def encode(self, image, depth):
        """image (B, 3, H, W) in [0, 1], depth (B, 1, H, W) in scene units -> planes (B, 3, C, H, W)."""
        if image.ndim != 4 or image.shape[1] != 3:
            raise ValueError(f"encode: image must be (B, 3, H, W) in [0, 1], got {tuple(image.shape)}")
        B, _, H, W = image.shape
        if tuple(depth.shape) != (B, 1, H, W):
            raise ValueError(f"encode: depth must be (B, 1, H, W) = {(B, 1, H, W)} like the image, "
                             f"got {tuple(depth.shape)}")
        # f_trigen sees rgb in [-1, 1], the range the released network was trained with: the one place
        # where the project's [0, 1] images are mapped to it
        rgbd = torch.cat([image * 2 - 1, depth], 1)  # (B, 4, H, W)
        planes = self.unet(rgbd).view(B, 3, self.config["plane_channels"], H, W)
        if self.config["aligned_plane"]:  # the y-z plane where the canonical camera sees it (align_yz_plane)
            planes = torch.stack([planes[:, 0], planes[:, 1], align_yz_plane(planes[:, 2])], 1)
        return planes

    def render(self, planes, rays_o, rays_d, box_size=2.0, sampler=None, **render_opts):
        """planes (B, 3, C, H, W), rays (B, R, 3) -> the dict of render_rays with rgb (B, R, 3) in
        [0, 1], depth (B, R, 1), opacity (B, R, 1), ... sampler: None takes the model's (self.sampler)."""
        # the field samples float32 planes: under bf16 autocast f_trigen hands back bf16 ones
        field = make_field(planes.float(), self.decoder, self.config["levels"], box_size, self.config["projection"],
                           self.sampler if sampler is None else sampler)
        out = render_rays(field, rays_o, rays_d, box_size=box_size, **render_opts)
        out["rgb"] = (out["rgb"] + 1) / 2  # render.py's [-1, 1] (the release's) -> [0, 1]
        return out

    def forward(self, image, depth, rays_o, rays_d, **render_opts):
        """encode + render as one call (a training step's prediction), so that DistributedDataParallel,
        wrapping the G3DR, sees and syncs the whole step. f_trigen runs under whatever autocast the
        caller set; the field (f_dec) and the compositing always run in float32."""
        planes = self.encode(image, depth)  # (B, 3, C, H, W)
        with torch.autocast(device_type=planes.device.type, enabled=False):
            return self.render(planes.float(), rays_o, rays_d, **render_opts)

    def render_view(self, planes, yaw, pitch, resolution, radius=CAMERA_RADIUS, fov=FOV_DEGREES, chunk=None,
                    box_size=2.0, surface_depth=None, with_opacity=False, perturb=False, **render_opts):
        """Render an S x S view from the orbit camera (yaw, pitch, radius), about `chunk` rays (summed
        over the batch) at a time, so memory stays bounded at any resolution (inference). chunk None:
        4096 on a CPU, 65536 on a GPU (a 128 x 128 view of 4 scenes in one pass; no chunk waits for
        the host, so a view is one stream of kernels).

        yaw/pitch: floats or (B,) tensors; surface_depth (B, 1, S, S) enables the depth-guided
        samples and gradient rescaling (canonical view). perturb=False (default): the deterministic
        samples of inference, no jitter. Returns images (B, 3, S, S) in [0, 1], as
        scenes.SyntheticScenes.render_view, and depth (B, 1, S, S) (+ opacity (B, 1, S, S) with with_opacity=True)."""
        B, S = planes.shape[0], resolution
        if chunk is None:
            chunk = 4096 if planes.device.type == "cpu" else 65536
        cam2world = orbit_camera(yaw, pitch, radius).to(device=planes.device, dtype=torch.float32)
        cam2world = cam2world.expand(B, 4, 4) if cam2world.shape[0] == 1 else cam2world  # (B, 4, 4)
        rays_o, rays_d = get_rays(cam2world, fov, S)  # (B, S*S, 3) each
        if surface_depth is not None:
            surface_depth = surface_depth.reshape(B, S * S, 1)  # (B, R, 1), ray index = row * S + col
        # render_rays chunks per scene and decides the ray limits and the depth-guided coin once
        # for the whole view, so a chunked view is the same render as an unchunked one
        out = self.render(planes, rays_o, rays_d, box_size=box_size, surface_depth=surface_depth,
                          chunk=max(1, chunk // B), perturb=perturb, **render_opts)
        images = out["rgb"].transpose(1, 2).reshape(B, 3, S, S)  # (B, R, 3) -> (B, 3, S, S), in [0, 1]
        depth = out["depth"].reshape(B, 1, S, S)
        if with_opacity:
            return images, depth, out["opacity"].reshape(B, 1, S, S)
        return images, depth


# === end G3DR module ===
