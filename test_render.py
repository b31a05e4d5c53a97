"""Tests of render.py and the triplane field of model.py (run: python -m pytest -q test_render.py)."""
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import model
from model import Decoder, make_field, sample_triplane, triplane_pyramid
from render import (GradRescale, composite, get_rays, orbit_camera, ray_box_limits, render_rays,
                    rescale_kernel)

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "official_render.pt"  # see fixtures/README.md
# the renderer's and the sampler's tests also run on a GPU where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))]


@pytest.fixture(autouse=True)
def _no_tf32():
    """CUDA runs are held to the float32 references: TF32 matmuls and convs (10-bit mantissa) would
    miss them by ~1e-3."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _rel(a, b):
    """max |a - b| / max |b|: the relative error of a tensor as a whole."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _canonical_rays(S, B=1, device="cpu"):
    return get_rays(orbit_camera(math.pi / 2, math.pi / 2).expand(B, 4, 4).to(device), 18.0, S)


def _small_field(seed=0, B=1, C=8, H=16, W=16, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    planes = torch.randn(B, 3, C, H, W, generator=g, dtype=dtype).to(device).requires_grad_(True)
    torch.manual_seed(seed)
    decoder = Decoder(C).to(device, dtype)
    return planes, decoder


# --- the authors' renderer (fixtures/official_render.pt) -----------

@pytest.fixture(scope="module")
def official():
    return torch.load(FIXTURE, weights_only=True)


def _official_field(fx, device="cpu"):
    decoder = Decoder(fx["planes"].shape[2])
    decoder.load_state_dict(fx["decoder"])  # strict: the official key names
    planes = fx["planes"].to(device, copy=True).requires_grad_(True)
    return planes, decoder.to(device)


def _surface(fx, device="cpu"):
    B, _, S, _ = fx["surface_depth"].shape
    return fx["surface_depth"].reshape(B, S * S, 1).to(device)  # (B, 1, S, S) -> (B, R, 1), ray = row * S + col


def test_official_cameras_and_rays(official):
    fx = official
    cam2world = orbit_camera(fx["cam_angles"][:, 0], fx["cam_angles"][:, 1])
    torch.testing.assert_close(cam2world, fx["cam2world"], rtol=0, atol=1e-6)
    rays_o, rays_d = get_rays(fx["cam2world"], fx["fov"], fx["res"])
    torch.testing.assert_close(rays_o, fx["rays_o"], rtol=0, atol=1e-6)
    torch.testing.assert_close(rays_d, fx["rays_d"], rtol=0, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", model.SAMPLERS)
def test_official_plain_render(official, sampler, device):
    fx = official
    planes, decoder = _official_field(fx, device)
    with torch.no_grad():
        out = render_rays(make_field(planes, decoder, sampler=sampler), fx["rays_o"].to(device),
                          fx["rays_d"].to(device), fx["n_coarse"], fx["n_fine"], perturb=False)
    assert out["depth_guided"] is False
    for key in ("rgb", "depth", "opacity"):
        assert _rel(out[key].cpu(), fx["plain"][key]) < 1e-5, key


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", model.SAMPLERS)
def test_official_guided_render_and_gradients(official, sampler, device):
    fx = official
    planes, decoder = _official_field(fx, device)
    x = _surface(fx, device)
    out = render_rays(make_field(planes, decoder, sampler=sampler), fx["rays_o"].to(device), fx["rays_d"].to(device),
                      fx["n_coarse"], fx["n_fine"], perturb=False, surface_depth=x, depth_guided_prob=1.0)
    assert out["depth_guided"] is True
    loss = out["rgb"].square().sum() + (out["depth"] - x).abs().sum() + out["opacity"].sum()
    loss.backward()
    ref = fx["guided"]
    for key in ("rgb", "depth", "opacity"):
        assert _rel(out[key].cpu(), ref[key]) < 1e-5, key
    assert _rel(loss.detach().cpu(), ref["loss"]) < 1e-5
    assert _rel(planes.grad.cpu(), ref["grad_planes"]) < 1e-5
    for name, p in decoder.named_parameters():
        assert _rel(p.grad.cpu(), ref["grad_decoder"][name]) < 1e-5, name


def test_official_fixture_needs_the_released_pyramid(official):
    """The fixture tells the pyramid variants apart: each level resampled from the previous one
    (instead of from G) misses it by far more than the tolerance."""
    fx = official
    planes, decoder = _official_field(fx)
    flat = planes.detach().flatten(1, 2)
    chained = [planes.detach()]
    for _ in range(2):
        flat = F.interpolate(flat, scale_factor=0.5, mode="bilinear", antialias=True)
        chained.append(flat.view(*planes.shape[:3], *flat.shape[-2:]))
    with torch.no_grad():
        out = render_rays(make_field(chained, decoder), fx["rays_o"], fx["rays_d"], 8, 8, perturb=False)
    assert _rel(out["rgb"], fx["plain"]["rgb"]) > 1e-3


# --- camera and rays (README §2) --------------------------------------------------------

def test_canonical_camera():
    c2w = orbit_camera(math.pi / 2, math.pi / 2)
    assert c2w.shape == (1, 4, 4)
    torch.testing.assert_close(c2w[0, :3, 3], torch.tensor([-5.0, 0.0, 0.0]), rtol=0, atol=1e-5)
    torch.testing.assert_close(-c2w[0, :3, 2], torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=1e-6)  # looks along +x
    torch.testing.assert_close(c2w[0, :3, 1], torch.tensor([0.0, 1.0, 0.0]), rtol=0, atol=1e-6)  # up is +y
    torch.testing.assert_close(c2w[0, 3], torch.tensor([0.0, 0.0, 0.0, 1.0]))


def test_orbit_camera_batch_looks_at_origin():
    yaw, pitch = torch.tensor([0.3, 1.5, 2.8, -1.0]), torch.tensor([0.4, 1.2, 1.9, 2.5])
    c2w = orbit_camera(yaw, pitch, radius=3.0)
    assert c2w.shape == (4, 4, 4)
    R, origin = c2w[:, :3, :3], c2w[:, :3, 3]
    torch.testing.assert_close(R.transpose(1, 2) @ R, torch.eye(3).expand(4, 3, 3), rtol=0, atol=1e-6)
    torch.testing.assert_close(torch.linalg.det(R), torch.ones(4), rtol=0, atol=1e-6)  # right-handed
    torch.testing.assert_close(origin.norm(dim=-1), torch.full((4,), 3.0))
    torch.testing.assert_close(-R[:, :, 2], -origin / 3.0, rtol=0, atol=1e-6)  # forward points at the origin
    assert (R[:, 1, 1] > 0).all()  # the image's up has a +y component (no roll)
    assert torch.equal(orbit_camera(0.3, 0.4, 3.0), c2w[:1])  # floats and tensors agree


def test_get_rays_conventions():
    S = 5  # odd: the middle pixel looks straight ahead
    rays_o, rays_d = _canonical_rays(S, B=2)
    assert rays_o.shape == rays_d.shape == (2, S * S, 3)
    torch.testing.assert_close(rays_d.norm(dim=-1), torch.ones(2, S * S))
    torch.testing.assert_close(rays_o, torch.tensor([-5.0, 0, 0]).expand(2, S * S, 3), rtol=0, atol=1e-5)
    d = rays_d[0].view(S, S, 3)  # (row, col, xyz)
    torch.testing.assert_close(d[2, 2], torch.tensor([1.0, 0.0, 0.0]), rtol=0, atol=1e-6)
    # the outer columns / rows pass through the pixel grid's corners: 18 degrees apart in total
    assert math.degrees(torch.acos((d[2, 0] * d[2, 4]).sum()).item()) == pytest.approx(18.0, abs=1e-3)
    assert math.degrees(torch.acos((d[0, 2] * d[4, 2]).sum()).item()) == pytest.approx(18.0, abs=1e-3)
    # row 0 is the top of the image (+y), columns run to the camera's right (+z for this camera)
    assert d[0, 2, 1] > 0 and d[4, 2, 1] < 0
    assert d[2, 4, 2] > 0 and d[2, 0, 2] < 0
    tan = math.tan(math.radians(9.0))
    torch.testing.assert_close(d[0, 0], F.normalize(torch.tensor([1.0, tan, -tan]), dim=0), rtol=0, atol=1e-6)


# --- ray limits -----------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_ray_box_limits(device):
    o = torch.tensor([[[-5.0, 0.0, 0.0], [-5.0, 0.5, -0.5], [0.0, 0.0, 0.0], [-5.0, 3.0, 0.0], [-5.0, -0.5, 0.0]]])
    d = F.normalize(torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0],
                                   [1.0, 0.3, 0.0]]]), dim=-1)
    near, far, hit = (x.cpu() for x in ray_box_limits(o.to(device), d.to(device), box_size=2.0))
    assert hit.tolist() == [[True, True, True, False, True]]
    torch.testing.assert_close(near[0, :3], torch.tensor([4.0, 4.0, -1.0]))
    torch.testing.assert_close(far[0, :3], torch.tensor([6.0, 6.0, 1.0]))
    # the oblique ray enters through the face x = -1 and leaves through the top y = 1 at x = 0
    torch.testing.assert_close(near[0, 4], torch.tensor(4.0 * math.sqrt(1.09)))
    torch.testing.assert_close(far[0, 4], torch.tensor(5.0 * math.sqrt(1.09)))
    # the miss (parallel to the slab y in [-1, 1], outside it) takes the release's quirky limits:
    # the smallest near and the largest *near* of the rays that hit
    assert near[0, 3].item() == near[0, hit[0]].min().item() == -1.0
    assert far[0, 3].item() == near[0, hit[0]].max().item()
    # a bigger box scales the limits
    near2, far2, _ = ray_box_limits(o[:, :1].to(device), d[:, :1].to(device), box_size=4.0)
    assert (near2.item(), far2.item()) == (3.0, 7.0)
    # when no ray of the batch hits, the release's empty limits: near -1, far -2
    near3, far3, hit3 = ray_box_limits(o[:, 3:4].to(device), d[:, 3:4].to(device))
    assert not hit3.any() and (near3.item(), far3.item()) == (-1.0, -2.0)


def test_rays_that_miss_are_rendered_in_front_of_the_box():
    o = torch.tensor([[[-5.0, 0.0, 0.0], [-5.0, 0.0, 0.3], [-5.0, 5.0, 0.0]]])
    d = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]])
    seen = []

    def field(points, dirs):
        seen.append(points.detach())
        return torch.zeros(*points.shape[:2], 3), torch.zeros(*points.shape[:2], 1)

    out = render_rays(field, o, d, n_coarse=4, n_fine=0, perturb=False)
    t_miss = out["t"][0, 2]
    assert torch.allclose(t_miss, torch.full((4,), 4.0))  # near = min near = 4, far = max near = 4
    assert torch.isfinite(out["rgb"]).all() and torch.isfinite(out["depth"]).all()


# --- compositing against closed forms -------------------------------------------------------------

def _constant_field(raw_density, color):
    def field(points, dirs):
        B, M, _ = points.shape
        return color.to(points.device).expand(B, M, 3), torch.full((B, M, 1), raw_density, device=points.device)
    return field


@pytest.mark.parametrize("device", DEVICES)
def test_constant_density_matches_beer_lambert(device):
    """Inside the box a constant density sigma gives opacity 1 - exp(-sigma L) over the chord L."""
    rays_o, rays_d = _canonical_rays(7)
    raw = 0.7
    sigma = F.softplus(torch.tensor(raw - 1.0)).item()
    color = torch.tensor([0.2, 0.5, 0.9])
    out = render_rays(_constant_field(raw, color), rays_o.to(device), rays_d.to(device), n_coarse=16, n_fine=16,
                      perturb=False)
    out = {k: v.cpu() for k, v in out.items() if torch.is_tensor(v)}
    L = 2.0 / rays_d[..., 0:1]  # these rays enter at x = -1 and leave at x = +1
    expected = 1 - torch.exp(-sigma * L)
    torch.testing.assert_close(out["opacity"], expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(out["rgb"], 2 * color * expected - 1, rtol=0, atol=1e-6)
    # the expected depth of an exponential distribution truncated to [near, near + L]
    near = 4.0 / rays_d[..., 0:1]
    mean = near + 1 / sigma - L * torch.exp(-sigma * L) / expected
    torch.testing.assert_close(out["depth"], mean * expected / (expected + 0.001), rtol=0, atol=2e-3)


def test_density_slab_opacity():
    """A slab |x| < 0.4 of constant density, empty elsewhere: opacity 1 - exp(-sigma L) with
    L = 0.8 / cos(angle to the x axis)."""
    rays_o, rays_d = _canonical_rays(5)
    sigma = 1.5

    def field(points, dirs):
        inside = points[..., 0:1].abs() < 0.4
        raw = torch.where(inside, torch.tensor(1 + math.log(math.expm1(sigma))), torch.tensor(-60.0))
        return torch.ones_like(points), raw

    out = render_rays(field, rays_o, rays_d, n_coarse=801, n_fine=0, perturb=False)
    expected = 1 - torch.exp(-sigma * 0.8 / rays_d[..., 0:1])
    torch.testing.assert_close(out["opacity"], expected, rtol=0, atol=5e-3)


def test_hard_sphere_depth():
    """An opaque ball of radius 0.5: rays that hit it stop at the analytic distance."""
    S, r = 12, 0.5
    rays_o, rays_d = get_rays(orbit_camera(torch.tensor([1.2]), torch.tensor([1.4])), 18.0, S)

    def field(points, dirs):
        inside = points.norm(dim=-1, keepdim=True) < r
        return torch.ones_like(points) * 0.5, torch.where(inside, torch.tensor(300.0), torch.tensor(-60.0))

    out = render_rays(field, rays_o, rays_d, n_coarse=64, n_fine=64, perturb=False)
    b = (rays_o * rays_d).sum(-1, keepdim=True)  # |o + t d| = r  ->  t^2 + 2 b t + |o|^2 - r^2 = 0
    disc = b ** 2 - (rays_o.square().sum(-1, keepdim=True) - r ** 2)
    hit = disc[..., 0] > 0.01  # keep clear of grazing rays
    t_hit = -b - disc.clamp(min=0).sqrt()
    assert hit.sum() > 20 and (~hit).sum() > 20
    assert (out["opacity"][hit] > 0.99).all()
    assert (out["opacity"][disc[..., 0] < -0.01] < 1e-3).all()
    assert (out["depth"][hit] - t_hit[hit]).abs().max() < 0.02


# --- gradient rescaling (paper Sec. 3.2) ------------------------------------------------------------

def test_rescale_kernel_values():
    x = torch.tensor([[5.0]])
    t = torch.tensor([[5.0, 5.05, 5.1, 5.2, 6.0]])
    k = rescale_kernel(t, x)
    raw = 1.25 * torch.exp(-((t - x) ** 2) / 0.03)
    torch.testing.assert_close(k, raw.clamp(0.05, 1.0))
    assert k[0, 0] == 1.0 and k[0, -1] == 0.05 and 0.05 < k[0, 2] < 1.0
    torch.testing.assert_close(rescale_kernel(t, x, 2.0, 0.1, 0.2, 1.5),
                               (2.0 * torch.exp(-((t - x) ** 2) / 0.1)).clamp(0.2, 1.5))


def test_grad_rescale_function_is_exact():
    g = torch.Generator().manual_seed(0)
    alpha = torch.rand(2, 3, 7, generator=g, requires_grad=True)
    rgb = torch.rand(2, 3, 7, 3, generator=g, requires_grad=True)
    k = torch.rand(2, 3, 7, generator=g) * 0.95 + 0.05
    ga, gc = torch.randn(2, 3, 7, generator=g), torch.randn(2, 3, 7, 3, generator=g)
    a2, c2 = GradRescale.apply(k, alpha, rgb)
    assert torch.equal(a2, alpha) and torch.equal(c2, rgb)  # identity forward
    torch.autograd.backward([a2, c2], [ga, gc])
    assert torch.equal(alpha.grad, ga * k)
    assert torch.equal(rgb.grad, gc * k[..., None])


def _guided_render(planes, decoder, **kw):
    rays_o, rays_d = _canonical_rays(6, B=planes.shape[0])
    x = 4.6 + 0.8 * torch.rand(planes.shape[0], 36, 1, generator=torch.Generator().manual_seed(3))
    out = render_rays(make_field(planes, decoder), rays_o, rays_d, n_coarse=8, n_fine=8, perturb=False,
                      surface_depth=x, depth_guided_prob=1.0, **kw)
    loss = out["rgb"].square().sum() + (out["depth"] - x).abs().sum() + out["opacity"].sum()
    params = [planes, *decoder.parameters()]
    return out, torch.autograd.grad(loss, params)


def test_rescaling_leaves_forward_unchanged_and_scales_gradients():
    planes, decoder = _small_field(B=2)
    plain, g_plain = _guided_render(planes, decoder, grad_rescale=False)
    scaled, g_scaled = _guided_render(planes, decoder)  # released kernel
    for key in ("rgb", "depth", "opacity", "weights", "t"):
        assert torch.equal(plain[key], scaled[key]), key  # the hook does not touch the forward pass
    assert not torch.allclose(g_plain[0], g_scaled[0])
    # with a constant k = 1/4 (a power of two) every gradient is exactly k times the plain one
    _, g_quarter = _guided_render(planes, decoder, c_min=0.25, c_max=0.25)
    for a, b in zip(g_plain, g_quarter):
        assert torch.equal(b, 0.25 * a)


def test_half_spacing_rule():
    planes, decoder = _small_field()
    _, g_rule = _guided_render(planes, decoder, s2="half_spacing")
    _, g_explicit = _guided_render(planes, decoder, s2=2.0 / 7 / 2)  # 8 coarse samples over the box
    _, g_released = _guided_render(planes, decoder)
    for a, b in zip(g_rule, g_explicit):
        assert torch.equal(a, b)
    assert not torch.equal(g_rule[0], g_released[0])


# --- compositor and sampler gradients ---------------------------------------------------------------

def test_composite_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    rgb = torch.rand(2, 3, 6, 3, generator=g, dtype=torch.float64, requires_grad=True)
    density = (torch.randn(2, 3, 6, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    t = (4 + torch.rand(2, 3, 6, generator=g, dtype=torch.float64).cumsum(-1) / 3).requires_grad_(True)

    def f(rgb, density, t):
        out = composite(rgb, density, t)
        return out["rgb"], out["depth"], out["opacity"], out["weights"]

    assert torch.autograd.gradcheck(f, (rgb, density, t))
    ones = torch.ones(2, 3, 5, dtype=torch.float64)  # k = 1: the rescaling hook is an identity
    assert torch.autograd.gradcheck(lambda *a: composite(*a, k=ones)["rgb"], (rgb, density, t))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sampler", model.SAMPLERS)
def test_sample_triplane_gradcheck_float64(sampler, device):
    g = torch.Generator().manual_seed(0)
    planes = torch.randn(2, 3, 2, 6, 4, generator=g, dtype=torch.float64).to(device).requires_grad_(True)
    points = (torch.rand(2, 9, 3, generator=g, dtype=torch.float64) * 2.4 - 1.2).to(device)  # some outside the box
    assert torch.autograd.gradcheck(lambda p: sample_triplane(p, points, levels=2, sampler=sampler), (planes,))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("projection", ["official", "yz"])
def test_table_sampler_equals_grid_sample(projection, device):
    """The fast sampler (one gather from a table) and the plain EG3D one (F.grid_sample per level),
    on the device, against the plain one on the CPU: features and plane gradients."""
    g = torch.Generator().manual_seed(1)
    planes = torch.randn(2, 3, 5, 16, 24, generator=g)  # H != W: axes must not swap
    points = torch.rand(2, 300, 3, generator=g) * 2.2 - 1.1  # ~25% outside the box
    nan = float("nan")
    points[0, :5] = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0], [1.05, 0, 0], [nan, 0, 0], [nan, nan, nan]])
    cot = torch.randn(2, 300, 5, generator=g)

    def run(sampler, dev):
        p = planes.to(dev).requires_grad_(True)
        out = sample_triplane(p, points.to(dev), levels=3, projection=projection, sampler=sampler)
        (grad,) = torch.autograd.grad(out, p, cot.to(dev))
        return out.detach().cpu(), grad.cpu()

    ref, ref_grad = run("grid_sample", "cpu")
    assert (ref[0, 4] == 0).all() and (ref[1] != 0).any(dim=-1).all()  # NaN counts as outside the box
    for sampler in model.SAMPLERS:
        out, grad = run(sampler, device)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-5)


def test_grid_sample_sampler_is_the_papers_formula():
    """One point, one level, by hand: the bilinear blend of a plane's 4 nearest pixels (pixel
    centres at align_corners=False positions), averaged over the three planes."""
    planes = torch.randn(1, 3, 2, 4, 6, generator=torch.Generator().manual_seed(2))
    x, y, z = 0.1, -0.3, 0.55
    expected = 0
    for p, (u, v) in enumerate([(x, y), (x, z), (z, x)]):  # the released projections
        cu, cv = (u + 1) * 6 / 2 - 0.5, (v + 1) * 4 / 2 - 0.5  # in pixels
        c0, r0 = math.floor(cu), math.floor(cv)
        fu, fv = cu - c0, cv - r0
        img = planes[0, p]
        expected = expected + ((1 - fv) * ((1 - fu) * img[:, r0, c0] + fu * img[:, r0, c0 + 1])
                               + fv * ((1 - fu) * img[:, r0 + 1, c0] + fu * img[:, r0 + 1, c0 + 1])) / 3
    for sampler in model.SAMPLERS:
        out = sample_triplane(planes, torch.tensor([[[x, y, z]]]), levels=1, sampler=sampler)
        torch.testing.assert_close(out[0, 0], expected, rtol=0, atol=1e-6)


def test_sampler_choice():
    assert model._resolve_sampler("auto", "cpu") == "table"  # the declared default on each device
    assert model._resolve_sampler("auto", "cuda:0") == "grid_sample"
    planes, decoder = _small_field()
    with pytest.raises(ValueError, match="'bilinear'"):
        make_field(planes, decoder, sampler="bilinear")
    with pytest.raises(ValueError, match="'bilinear'"):
        sample_triplane(planes, torch.zeros(1, 2, 3), sampler="bilinear")


def test_projection_choice_matters_only_for_the_third_plane():
    planes = torch.zeros(1, 3, 1, 8, 8)
    planes[0, 2, 0] = torch.arange(64.0).view(8, 8)  # only the third plane carries features
    points = torch.tensor([[[0.1, -0.6, 0.35]]])
    official = sample_triplane(planes, points, projection="official")
    yz = sample_triplane(planes, points, projection="yz")
    assert not torch.allclose(official, yz)
    torch.testing.assert_close(yz, sample_triplane(planes, points, projection="yz", sampler="grid_sample"))
    planes[0, 2] = 0
    planes[0, :2] = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(sample_triplane(planes, points, projection="official"),
                               sample_triplane(planes, points, projection="yz"))


def test_pyramid_levels_are_resampled_from_the_planes():
    planes = torch.randn(2, 3, 4, 32, 16)
    pyr = triplane_pyramid(planes, levels=3)
    assert [tuple(p.shape) for p in pyr] == [(2, 3, 4, 32, 16), (2, 3, 4, 16, 8), (2, 3, 4, 8, 4)]
    assert pyr[0] is planes
    expected = F.interpolate(planes.flatten(1, 2), scale_factor=0.25, mode="bilinear", antialias=True)
    torch.testing.assert_close(pyr[2], expected.view(2, 3, 4, 8, 4))


def test_make_field_builds_the_pyramid_once(monkeypatch):
    calls = []
    real = model.triplane_pyramid
    monkeypatch.setattr(model, "triplane_pyramid", lambda *a, **k: calls.append(1) or real(*a, **k))
    planes, decoder = _small_field()
    rays_o, rays_d = _canonical_rays(4)
    field = make_field(planes, decoder)
    render_rays(field, rays_o, rays_d, n_coarse=8, n_fine=8)  # two passes through the field
    assert len(calls) == 1
    # a prebuilt pyramid gives the same field
    pyramid = real(planes, 3)
    pts = torch.rand(1, 50, 3) * 2 - 1
    torch.testing.assert_close(make_field(pyramid, decoder)(pts, None)[0], field(pts, None)[0])


def test_decoder_semantics_and_keys():
    torch.manual_seed(0)
    dec = Decoder(32, hidden=64)
    assert list(dec.state_dict()) == ["net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"]
    assert dec.net[0].weight.std().item() == pytest.approx(1.0, abs=0.05)  # N(0, 1) storage
    assert dec.net[0].bias.abs().sum() == 0
    torch.nn.init.normal_(dec.net[2].bias)
    feats = torch.randn(2, 5, 32)
    rgb, density = dec(feats)
    h = F.softplus(feats @ (dec.net[0].weight / math.sqrt(32)).T + dec.net[0].bias)
    out = h @ (dec.net[2].weight / math.sqrt(64)).T + dec.net[2].bias
    torch.testing.assert_close(density, out[..., :1])
    torch.testing.assert_close(rgb, torch.sigmoid(out[..., 1:]) * 1.002 - 0.001)


# --- modes ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guided", [False, True])
def test_deterministic_mode_is_deterministic(guided, device):
    planes, decoder = _small_field(B=2, device=device)
    rays_o, rays_d = _canonical_rays(5, B=2, device=device)
    x = torch.full((2, 25, 1), 5.0, device=device)
    kw = dict(n_coarse=8, n_fine=8, surface_depth=x, depth_guided_prob=float(guided))
    field = make_field(planes, decoder)
    a = render_rays(field, rays_o, rays_d, perturb=False, **kw)
    torch.manual_seed(123)
    b = render_rays(field, rays_o, rays_d, perturb=False, **kw)
    assert a["depth_guided"] == b["depth_guided"] == guided
    for key in ("rgb", "depth", "opacity", "t"):
        assert torch.equal(a[key], b[key]), key
    c = render_rays(field, rays_o, rays_d, perturb=True, **kw)
    assert not torch.equal(a["t"], c["t"])  # the jitter is on by default


def test_depth_guided_samples_and_probability():
    planes, decoder = _small_field()
    rays_o, rays_d = _canonical_rays(3)
    x = torch.full((1, 9, 1), 5.2)
    field = make_field(planes, decoder)
    out = render_rays(field, rays_o, rays_d, n_coarse=8, n_fine=5, perturb=False, surface_depth=x,
                      depth_guided_prob=1.0)
    comb = torch.tensor([5.15, 5.175, 5.2, 5.225, 5.25])
    assert all(torch.isclose(out["t"][0, r], c).any() for r in range(9) for c in comb)
    torch.manual_seed(0)
    cheap = _constant_field(0.0, torch.zeros(3))
    hits = sum(render_rays(cheap, rays_o[:, :1], rays_d[:, :1], n_coarse=4, n_fine=2,
                           surface_depth=x[:, :1])["depth_guided"] for _ in range(200))
    assert 50 < hits < 110  # released probability 0.4
    assert not render_rays(field, rays_o, rays_d, n_coarse=4, n_fine=2, depth_guided_prob=1.0)["depth_guided"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("guided", [False, True])
def test_chunked_equals_unchunked(guided, device):
    planes, decoder = _small_field(B=2, device=device)
    rays_o, rays_d = _canonical_rays(6, B=2, device=device)
    rays_o, rays_d = rays_o.clone(), rays_d.clone()
    rays_o[:, 30] = torch.tensor([-5.0, 4.0, 0.0])  # a ray that misses: its limits come from all rays
    x = 4.5 + torch.rand(2, 36, 1, device=device)
    kw = dict(n_coarse=8, n_fine=8, perturb=False, surface_depth=x, depth_guided_prob=float(guided))
    field = make_field(planes, decoder)
    with torch.no_grad():
        full = render_rays(field, rays_o, rays_d, **kw)
        chunked = render_rays(field, rays_o, rays_d, chunk=7, **kw)
    for key in ("rgb", "depth", "opacity", "weights", "t", "t_mid"):
        assert chunked[key].shape == full[key].shape
        torch.testing.assert_close(chunked[key], full[key], rtol=1e-5, atol=1e-6)  # matmul blocking


def test_output_shapes_and_ranges():
    planes, decoder = _small_field(B=2)
    rays_o, rays_d = _canonical_rays(4, B=2)
    out = render_rays(make_field(planes, decoder), rays_o, rays_d, n_coarse=6, n_fine=5)
    assert out["rgb"].shape == (2, 16, 3) and out["depth"].shape == (2, 16, 1)
    assert out["opacity"].shape == (2, 16, 1)
    assert out["weights"].shape == out["t_mid"].shape == (2, 16, 10) and out["t"].shape == (2, 16, 11)
    assert (out["t"][..., 1:] >= out["t"][..., :-1]).all()
    assert out["rgb"].min() >= -1.002 and out["rgb"].max() <= 1.002
    assert (out["opacity"] >= 0).all() and (out["opacity"] <= 1).all()


def test_bad_inputs_raise():
    planes, decoder = _small_field()
    rays_o, rays_d = _canonical_rays(3)
    field = make_field(planes, decoder)
    with pytest.raises(ValueError, match="rays_o and rays_d"):
        render_rays(field, rays_o, rays_d[:, :4])
    with pytest.raises(ValueError, match="surface_depth"):
        render_rays(field, rays_o, rays_d, surface_depth=torch.ones(1, 4, 1))
    with pytest.raises(ValueError, match="s2"):
        render_rays(field, rays_o, rays_d, s2="half")
    with pytest.raises(ValueError, match="n_coarse"):
        render_rays(field, rays_o, rays_d, n_coarse=3, n_fine=4)
    with pytest.raises(ValueError, match="planes must be"):
        triplane_pyramid(torch.zeros(1, 4, 2, 8, 8))
    with pytest.raises(ValueError, match="projection"):
        make_field(planes, decoder, projection="xy")
    with pytest.raises(ValueError, match="levels"):
        make_field(triplane_pyramid(planes, 2), decoder, levels=3)
    with pytest.raises(ValueError, match="cam2world"):
        get_rays(torch.eye(4), 18.0, 8)
    with pytest.raises(ValueError, match="points must be"):
        field(torch.zeros(2, 5, 3), None)  # the planes hold one batch item


def test_corrected_plane_is_pixel_aligned_with_the_canonical_view():
    """With projection='yz' the canonical ray through pixel (row, col) of an S x S image meets the
    third plane at its pixel (row, col): f_trigen's image-aligned output needs no rotation."""
    S = 8
    planes = torch.zeros(1, 3, 1, S, S)
    planes[0, 2, 0] = torch.arange(S * S, dtype=torch.float32).view(S, S)
    rays_o, rays_d = get_rays(orbit_camera(math.pi / 2, math.pi / 2), 18.0, S)
    # where each ray crosses the plane x = 0, scaled so the outer pixel centres of the plane are hit
    points = rays_o + rays_d * (-rays_o[..., :1] / rays_d[..., :1])  # (1, S*S, 3)
    points[..., 1:] *= (1 - 1 / S) / points[..., 1:].abs().amax()
    values = sample_triplane(planes, points, levels=1, projection="yz")[0, :, 0] * 3  # undo the plane mean
    torch.testing.assert_close(values, torch.arange(S * S, dtype=torch.float32), rtol=0, atol=1e-4)
