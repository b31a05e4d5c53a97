"""
Volume rendering for G3DR: the orbit camera, pinhole rays, and EG3D's two-pass importance renderer
with G3DR's depth regularisation (depth-guided fine samples and gradient rescaling, paper Sec. 3.2).
Depends on torch only; with perturb=False the renderer reproduces the authors' released one
(forward and gradients, to float rounding).

    field = model.make_field(planes, decoder)          # field(points, dirs) -> (rgb, raw density)
    rays_o, rays_d = get_rays(orbit_camera(CANONICAL_YAW, CANONICAL_PITCH), FOV_DEGREES, resolution=128)
    out = render_rays(field, rays_o, rays_d, surface_depth=depth)   # canonical view, training
    out["rgb"] (B, R, 3) in [-1, 1], out["depth"] (B, R, 1), out["opacity"] (B, R, 1)

Conventions (those of the authors' code):
* The scene is the box [-1, 1]^3 (box_size 2).
* The orbit camera at (yaw, pitch, radius) sits at r (sin(pitch) sin(-yaw), cos(pitch), sin(pitch) cos(yaw)),
  looks at the origin with world up +y; its cam2world columns are (right, up, backward). The canonical
  camera, the one every training image is seen from, is yaw = pitch = pi/2, radius 5, field of view
  18 degrees: it sits at (-5, 0, 0) and looks along +x.
* An S x S image has a ray per pixel through x = linspace(-1, 1, S) (columns, left to right) and
  y = linspace(1, -1, S) (rows, top to bottom) on the image plane z = -1/tan(fov/2): the outer rays
  pass through the pixel grid's corners. Ray index = row * S + col; every ray starts at the camera.
* Depth is the distance along the unit ray, in scene units. Seen from the canonical camera the box
  spans depths [DEPTH_NEAR, DEPTH_FAR) = [4, 6), its front and back faces; depth maps are stored in that range.
* A ray that misses the box is sampled between the smallest near and the largest *near* of the rays
  of the batch that hit it (the release's rule), where the field is empty.
"""
import math

import torch
import torch.nn.functional as F

# The canonical camera and the depth range it sees the box in (radius -+ box_size / 2).
CANONICAL_YAW = CANONICAL_PITCH = math.pi / 2
CAMERA_RADIUS = 5.0
FOV_DEGREES = 18.0
DEPTH_NEAR, DEPTH_FAR = 4.0, 6.0

# ---------------------------------------------------------------------------------------------
# Camera and rays


def _normalize(v):
    return v / torch.norm(v, dim=-1, keepdim=True)


def orbit_camera(yaw, pitch, radius=CAMERA_RADIUS):
    """Camera on a sphere of `radius` around the origin, looking at it, world up +y.

    yaw, pitch: floats or (B,) tensors (radians). The canonical camera yaw = pitch = pi/2 sits at
    (-radius, 0, 0) and looks along +x. Returns cam2world (B, 4, 4), float32, whose rotation
    columns are the camera's (right, up, backward) axes (the camera looks along its -z) and whose
    translation is its position radius (sin(pitch) sin(-yaw), cos(pitch), sin(pitch) cos(yaw))."""
    yaw = torch.as_tensor(yaw, dtype=torch.float32).reshape(-1)
    pitch = torch.as_tensor(pitch, dtype=torch.float32, device=yaw.device).reshape(-1)
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)  # (B,)
    origin = torch.stack([radius * torch.sin(pitch) * torch.sin(-yaw),
                          radius * torch.cos(pitch),
                          radius * torch.sin(pitch) * torch.cos(yaw)], dim=-1)  # (B, 3)
    forward = _normalize(_normalize(-origin))  # to the look-at point, the origin
    up = torch.zeros_like(forward)
    up[:, 1] = 1  # world up +y (built in place: no host-to-device copy)
    left = _normalize(torch.linalg.cross(up, forward, dim=-1))
    up = _normalize(torch.linalg.cross(forward, left, dim=-1))
    cam2world = torch.eye(4, device=yaw.device).repeat(len(yaw), 1, 1)
    cam2world[:, :3, :3] = torch.stack([-left, up, -forward], dim=-1)
    cam2world[:, :3, 3] = origin
    return cam2world


def get_rays(cam2world, fov_degrees, resolution):
    """Rays through the pixel grid of an S x S pinhole camera (S = resolution).

    cam2world (B, 4, 4), fov_degrees a float or (B,) tensor (full field of view). Pixel (row, col)
    looks at x = linspace(-1, 1, S)[col], y = linspace(1, -1, S)[row] on the image plane at
    z = -1/tan(fov/2): the outer rays pass through the pixel grid's corners, not centres.
    Returns rays_o, rays_d (B, S*S, 3), ray index row * S + col (row 0 at the top), unit rays_d."""
    if cam2world.ndim != 3 or cam2world.shape[1:] != (4, 4):
        raise ValueError(f"cam2world must be (B, 4, 4), got {tuple(cam2world.shape)}")
    B, S, dev = cam2world.shape[0], int(resolution), cam2world.device
    if S < 2:
        raise ValueError(f"resolution must be >= 2, got {resolution}")
    x = torch.linspace(-1, 1, S, device=dev).repeat(S)  # (S*S,) varies along a row
    y = torch.linspace(1, -1, S, device=dev).repeat_interleave(S)  # (S*S,) varies down the rows
    fov = torch.as_tensor(fov_degrees, dtype=torch.float32, device=dev).reshape(-1, 1)  # (B or 1, 1)
    z = -torch.ones(fov.shape[0], S * S, device=dev) / torch.tan(fov / 360 * 2 * math.pi * 0.5)
    d_cam = _normalize(torch.stack([x.expand_as(z), y.expand_as(z), z], dim=-1)).expand(B, -1, -1)
    rays_d = torch.bmm(cam2world[:, :3, :3], d_cam.transpose(1, 2)).transpose(1, 2)  # (B, S*S, 3)
    rays_d = F.normalize(rays_d, dim=-1)
    rays_o = cam2world[:, None, :3, 3].expand(B, S * S, 3).contiguous()
    return rays_o, rays_d


def ray_box_limits(rays_o, rays_d, box_size=2.0):
    """Slab-method intersection of rays (B, R, 3) with the box [-box/2, box/2]^3.

    Returns near, far (B, R) and hit (B, R) bool (far > near; a box behind the camera counts as
    hit, as in the release). Rays that miss get the release's values: near = the smallest near of
    the hitting rays of the whole batch, far = the *largest near* of them: a missed ray is sampled
    over that stretch of depths, where the field along it is empty. If no ray hits: near -1, far -2.
    Computed without a host-device sync."""
    half = box_size / 2
    with torch.no_grad():
        inv = 1 / rays_d  # +-inf for rays parallel to a slab
        t_lo, t_hi = (-half - rays_o) * inv, (half - rays_o) * inv  # (B, R, 3) per-axis entries/exits
        near = torch.minimum(t_lo, t_hi).amax(dim=-1)  # the last entry ...
        far = torch.maximum(t_lo, t_hi).amin(dim=-1)  # ... before the first exit
        hit = far > near
        any_hit = hit.any()  # a 0-d tensor, not a Python bool: stays on the device
        near_min = torch.where(any_hit, torch.where(hit, near, math.inf).amin(), -1.0)
        near_max = torch.where(any_hit, torch.where(hit, near, -math.inf).amax(), -2.0)
        near, far = torch.where(hit, near, near_min), torch.where(hit, far, near_max)
    return near, far, hit


# ---------------------------------------------------------------------------------------------
# Compositing with G3DR's gradient rescaling


class GradRescale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the incoming gradients by k in the backward.

    GradRescale.apply(k, alpha, rgb_mid) with k, alpha (B, R, S-1) and rgb_mid (B, R, S-1, 3):
    dL/dalpha_i <- k_i dL/dalpha_i and dL/dc_i <- k_i dL/dc_i (paper Sec. 3.2, depth regularisation
    by gradient rescaling). k gets no gradient."""

    @staticmethod
    def forward(ctx, k, alpha, rgb_mid):
        ctx.save_for_backward(k)
        return alpha.view_as(alpha), rgb_mid.view_as(rgb_mid)

    @staticmethod
    def backward(ctx, grad_alpha, grad_rgb):
        (k,) = ctx.saved_tensors
        return None, grad_alpha * k, grad_rgb * k[..., None]


def rescale_kernel(t, x, s1=1.25, s2=0.03, c_min=0.05, c_max=1.0):
    """Eq. 3, the gradient-rescaling kernel: k(x, t) = clamp(s1 exp(-(x - t)^2 / s2), c_min, c_max).

    t (B, R, S) sample distances, x (B, R, 1) the ray's expected surface distance (its ground-truth
    depth). s1 is the Gaussian's height: above 1, k sits at c_max on a plateau around x; s2 sets its
    width in squared scene units (the paper: half the spacing of the coarse samples, 2/31/2 ~ 0.032);
    c_max is the factor at the surface (1: gradients there pass unchanged) and c_min the floor far
    from it (positive, so that density far from the surface still decays from its initial value).
    The result: density in front of the surface learns slowly, and the input view cannot be
    explained by semi-transparent clouds (volume collapse). Released: 1.25, 0.03, 0.05, 1."""
    return (s1 * torch.exp(-((t - x) ** 2) / s2)).clamp(c_min, c_max)


def composite(rgb, density, t, k=None):
    """MipNeRF-style compositing of S samples per ray (volume rendering on interval midpoints).

    rgb (B, R, S, 3) in [0, 1], density (B, R, S) raw (before softplus), t (B, R, S) sorted
    distances; k (B, R, S-1) optional gradient-rescaling factors. Every quantity is taken at the
    S-1 interval midpoints. Returns rgb (B, R, 3) in [-1, 1], depth (B, R, 1), opacity (B, R, 1),
    weights (B, R, S-1), t_mid (B, R, S-1)."""
    delta = t[..., 1:] - t[..., :-1]  # (B, R, S-1)
    rgb_mid = (rgb[..., :-1, :] + rgb[..., 1:, :]) / 2  # (B, R, S-1, 3)
    density_mid = (density[..., :-1] + density[..., 1:]) / 2
    t_mid = (t[..., :-1] + t[..., 1:]) / 2
    sigma = F.softplus(density_mid - 1)  # the -1 bias makes a fresh field start transparent
    alpha = 1 - torch.exp(-sigma * delta)  # alpha_i = 1 - exp(-sigma_i delta_i), the interval's opacity
    if k is not None:  # after alpha, before the transmittance product (Sec. 3.2)
        alpha, rgb_mid = GradRescale.apply(k, alpha, rgb_mid)
    # transmittance T_i = prod_{j<i} (1 - alpha_j), with the release's +1e-10
    trans = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], dim=-1), dim=-1)
    weights = alpha * trans[..., :-1]  # w_i = alpha_i T_i, (B, R, S-1)
    opacity = weights.sum(dim=-1, keepdim=True)  # sum_i w_i, (B, R, 1)
    out_rgb = (weights[..., None] * rgb_mid).sum(dim=-2)  # sum_i w_i c_i, (B, R, 3)
    depth = (weights * t_mid).sum(dim=-1, keepdim=True) / (opacity + 0.001)  # sum_i w_i t_i / (opacity + eps)
    return {"rgb": out_rgb * 2 - 1, "depth": depth, "opacity": opacity, "weights": weights, "t_mid": t_mid}


# ---------------------------------------------------------------------------------------------
# Sample placement


def _coarse_samples(near, far, n, perturb):
    """n stratified samples on [near, far] (B, R) -> (B, R, n): a linspace, each jittered forward
    by U(0, 1) of the spacing (so the last one may pass `far`, as in the release)."""
    steps = torch.arange(n, dtype=torch.float32, device=near.device) / (n - 1)
    t = near[..., None] + steps * (far - near)[..., None]
    if perturb:
        t = t + torch.rand_like(t) * ((far - near) / (n - 1))[..., None]
    return t


def _sample_pdf(bins, weights, n, perturb, eps=1e-5):
    """Inverse-CDF sampling (NeRF): bins (N, K+1) edges, weights (N, K) -> n samples (N, n)."""
    N, K = weights.shape
    weights = weights + eps
    pdf = weights / weights.sum(dim=-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[:, :1]), torch.cumsum(pdf, dim=-1)], dim=-1)  # (N, K+1)
    if perturb:
        u = torch.rand(N, n, device=bins.device)
    else:
        u = torch.linspace(0, 1, n, device=bins.device).expand(N, n).contiguous()
    inds = torch.searchsorted(cdf, u, right=True)
    below, above = (inds - 1).clamp(min=0), inds.clamp(max=K)
    both = torch.stack([below, above], dim=-1).view(N, 2 * n)
    cdf_g = torch.gather(cdf, 1, both).view(N, n, 2)
    bins_g = torch.gather(bins, 1, both).view(N, n, 2)
    denom = cdf_g[..., 1] - cdf_g[..., 0]
    denom = torch.where(denom < eps, torch.ones_like(denom), denom)  # an empty bin is never chosen
    return bins_g[..., 0] + (u - cdf_g[..., 0]) / denom * (bins_g[..., 1] - bins_g[..., 0])


def _importance_samples(t, weights, n, perturb):
    """Fine samples from the coarse weights: t (B, R, Nc), weights (B, R, Nc-1) -> (B, R, n).

    The weights are smoothed (max-pool 2, then avg-pool 2) and floored at 0.01, and the PDF lives
    on the Nc-1 midpoints of t using the inner weights[1:-1], as in the release."""
    B, R, Nc = t.shape
    w = F.max_pool1d(weights.reshape(B * R, 1, Nc - 1), 2, 1, padding=1)  # (B*R, 1, Nc)
    w = F.avg_pool1d(w, 2, 1).squeeze(1) + 0.01  # (B*R, Nc-1)
    bins = 0.5 * (t[..., :-1] + t[..., 1:]).reshape(B * R, Nc - 1)
    return _sample_pdf(bins, w[:, 1:-1], n, perturb).view(B, R, n)


def _query(field, rays_o, rays_d, t):
    """Evaluate the field at rays_o + t rays_d: t (B, R, S) -> rgb (B, R, S, 3), density (B, R, S)."""
    B, R, S = t.shape
    points = (rays_o[:, :, None] + t[..., None] * rays_d[:, :, None]).reshape(B, R * S, 3)
    dirs = rays_d[:, :, None].expand(B, R, S, 3).reshape(B, R * S, 3)
    rgb, density = field(points, dirs)  # (B, R*S, 3), (B, R*S, 1)
    return rgb.view(B, R, S, 3), density.view(B, R, S)


# ---------------------------------------------------------------------------------------------
# The renderer


def render_rays(field, rays_o, rays_d, n_coarse=32, n_fine=32, perturb=True, surface_depth=None,
                depth_guided_prob=0.4, box_size=2.0, grad_rescale=True, s1=1.25, s2=0.03, c_min=0.05,
                c_max=1.0, guided_width=0.05, chunk=None):
    """Render rays through a radiance field with EG3D's importance renderer + G3DR's extension.

    field(points (B, M, 3), dirs (B, M, 3)) -> (rgb in [0, 1] (B, M, 3), raw density (B, M, 1)),
    e.g. model.make_field(planes, decoder). rays_o, rays_d (B, R, 3), rays_d unit length.
    n_coarse stratified samples inside the box, then n_fine more; all are merged, sorted and
    composited. perturb=False is the deterministic mode (no jitter, linspace importance u).

    surface_depth (B, R, 1), the ray's expected surface distance x (ground-truth depth, canonical
    view only), switches on G3DR's depth regularisation:
      * gradient rescaling (grad_rescale=True): the gradients of every merged interval's alpha and
        colour are multiplied by Eq. 3's k = clamp(s1 exp(-(x - t)^2 / s2), c_min, c_max); the forward
        pass is unchanged. Released values s1=1.25, s2=0.03, c_min=0.05, c_max=1; s2="half_spacing"
        gives the paper's rule s2 = box_size / (n_coarse - 1) / 2 (half the coarse spacing).
      * depth-guided fine samples with probability depth_guided_prob (0.4 in the release; 1.0
        forces them on): t = x + linspace(-guided_width, guided_width, n_fine) instead of
        importance sampling. The coin is tossed once per call.
    chunk: render at most `chunk` rays (of every batch item) at a time, e.g. to render large
    images under torch.no_grad(); ray limits and the coin are decided once for the whole call,
    so with perturb=False a chunked render equals the unchunked one.

    Returns a dict: rgb (B, R, 3) in [-1, 1], depth (B, R, 1) (expected distance, normalised by
    opacity + 0.001), opacity (B, R, 1), weights (B, R, S-1) and t_mid (B, R, S-1) of the merged
    S = n_coarse + n_fine samples, t (B, R, S) their sorted distances, depth_guided (bool)."""
    if rays_o.ndim != 3 or rays_o.shape[-1] != 3 or rays_d.shape != rays_o.shape:
        raise ValueError(f"rays_o and rays_d must both be (B, R, 3), got {tuple(rays_o.shape)} and "
                         f"{tuple(rays_d.shape)}")
    if n_coarse < 2 or (n_fine > 0 and n_coarse < 4):
        raise ValueError(f"n_coarse must be >= 2 (>= 4 with fine samples), got {n_coarse}")
    B, R, _ = rays_o.shape
    if surface_depth is not None:
        if surface_depth.numel() != B * R:
            raise ValueError(f"surface_depth must be (B, R, 1) = ({B}, {R}, 1), got {tuple(surface_depth.shape)}")
        surface_depth = surface_depth.reshape(B, R)
    if s2 == "half_spacing":
        s2 = box_size / (n_coarse - 1) / 2  # 2/31/2 = 0.032 for 32 samples over the box
    elif not isinstance(s2, (int, float)) or s2 <= 0:
        raise ValueError(f"s2 must be a positive number or 'half_spacing', got {s2!r}")

    near, far, _ = ray_box_limits(rays_o, rays_d, box_size)  # (B, R) each, for the whole batch
    guided = surface_depth is not None and n_fine > 0 and bool(torch.rand(()) < depth_guided_prob)

    def render(rays):  # the rays rays_o[:, rays] of every batch item
        return _render(field, rays_o[:, rays], rays_d[:, rays], near[:, rays], far[:, rays],
                       None if surface_depth is None else surface_depth[:, rays], n_coarse=n_coarse,
                       n_fine=n_fine, perturb=perturb, guided=guided, guided_width=guided_width,
                       grad_rescale=grad_rescale, s1=s1, s2=s2, c_min=c_min, c_max=c_max)

    if chunk is None or chunk >= R:
        out = render(slice(None))
    else:
        parts = [render(slice(i, i + chunk)) for i in range(0, R, chunk)]
        out = {key: torch.cat([p[key] for p in parts], dim=1) for key in parts[0]}
    out["depth_guided"] = guided
    return out


def _render(field, rays_o, rays_d, near, far, surface_depth, *, n_coarse, n_fine, perturb, guided, guided_width,
            grad_rescale, s1, s2, c_min, c_max):
    """The two passes of render_rays over rays (B, R, 3) whose limits near, far (B, R) are known.

    1. n_coarse stratified samples between near and far go through the field.
    2. n_fine more: with guided=True the comb surface_depth + linspace(-guided_width, guided_width),
       else importance-sampled from the coarse weights (placement needs no gradient).
    3. All samples are merged and sorted by distance; coarse and fine ones alike keep their gradient.
    4. Compositing, with the gradient-rescaling kernel k(surface_depth, t_mid) when surface_depth is
       given and grad_rescale is on (s1, s2, c_min, c_max as in rescale_kernel).
    Returns composite()'s dict plus t (B, R, n_coarse + n_fine), the sorted distances."""
    t_coarse = _coarse_samples(near, far, n_coarse, perturb)  # (B, R, Nc)
    if guided:
        # depth-guided fine samples: a narrow comb around the known surface. They do not depend
        # on the coarse pass, so both passes go through the field in one call.
        offsets = torch.linspace(-guided_width, guided_width, n_fine, device=surface_depth.device)
        t = torch.cat([t_coarse, surface_depth[..., None] + offsets], dim=-1)  # (B, R, Nc+Nf)
        rgb, density = _query(field, rays_o, rays_d, t)
    else:
        rgb, density = _query(field, rays_o, rays_d, t_coarse)  # (B, R, Nc, 3), (B, R, Nc)
        t = t_coarse
        if n_fine > 0:
            with torch.no_grad():  # sample placement needs no graph
                weights = composite(rgb, density, t_coarse)["weights"]
                t_fine = _importance_samples(t_coarse, weights, n_fine, perturb)
            rgb_f, density_f = _query(field, rays_o, rays_d, t_fine)
            t = torch.cat([t_coarse, t_fine], dim=-1)
            rgb, density = torch.cat([rgb, rgb_f], dim=2), torch.cat([density, density_f], dim=-1)
    # merge: every sample, coarse and fine, keeps its gradient
    t, order = torch.sort(t, dim=-1)
    rgb = torch.gather(rgb, 2, order[..., None].expand_as(rgb))
    density = torch.gather(density, 2, order)
    k = None
    if surface_depth is not None and grad_rescale:
        with torch.no_grad():  # Eq. 3 at the interval midpoints t_mid
            k = rescale_kernel((t[..., :-1] + t[..., 1:]) / 2, surface_depth[..., None], s1, s2, c_min, c_max)
    out = composite(rgb, density, t, k)
    out["t"] = t
    return out
