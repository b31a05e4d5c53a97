"""Tests for f_trigen (unet.UNet) and the G3DR module: the authors' tiny checkpoint reproduced, the exact
paper architecture, the [0, 1] image range of its API, bad input, and an end-to-end encode + render with
gradients. Checkpoint files (ours, the authors', unsafe ones) are test_checkpoint.py's."""
import collections
import math
import warnings
from pathlib import Path

import pytest
import torch

from checkpoint import from_official, official_state_dict
from model import G3DR, MODEL_PRESETS, UNet, align_yz_plane, sample_triplane
from render import CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # made with the authors' code: fixtures/README.md

TINY = dict(dim=16, dim_mults=(1, 2), image_size=32, plane_channels=8, pos_channels=256)  # the fixture's size


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tiny_io():
    """The fixture's input image in [0, 1] (the authors fed their network [-1, 1]), depth and planes."""
    io = torch.load(FIXTURES / "official_tiny_io.pt", weights_only=True)
    return (io["rgb"] + 1) / 2, io["depth"], io["planes"]  # (2, 3, 32, 32), (2, 1, 32, 32), (2, 3, 8, 32, 32)


def _rgbd(B, S, seed=None):
    """A random image (B, 3, S, S) in [0, 1] and depth (B, 1, S, S) in [4, 6)."""
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.rand(B, 3, S, S, generator=g), 4 + 2 * torch.rand(B, 1, S, S, generator=g)


# --- the authors' tiny checkpoint -----------------------------------------------------------------

def test_official_tiny_checkpoint_reproduces_the_authors_planes():
    model = from_official(FIXTURES / "official_tiny_ckpt.pt")
    assert {k: model.config[k] for k in TINY} == TINY  # every size inferred from the checkpoint
    image, depth, planes_ref = _tiny_io()
    with torch.no_grad():
        planes = model.encode(image, depth)
    assert planes.shape == planes_ref.shape
    assert _rel_err(planes, planes_ref) < 1e-5  # ~7e-7: float rounding (the [0, 1] round trip included)


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_autocast_keeps_the_full_precision_eps(device):
    # Under autocast the weights and the normalisation statistics stay float32, so the eps rule
    # must give 1e-5 as in the float32 run that trained the weights. Keying eps on the activation
    # dtype (1e-3 for bf16 inputs) moves these planes by ~13 %; bf16 rounding alone by ~1 %.
    model = from_official(FIXTURES / "official_tiny_ckpt.pt").to(device)
    image, depth, planes_ref = _tiny_io()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        planes = model.encode(image.to(device), depth.to(device))
    assert _rel_err(planes.cpu(), planes_ref) < 0.03


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_autocast_encode_render_and_backward(device):
    torch.manual_seed(0)
    model = G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8).to(device)
    image, depth = (x.to(device) for x in _rgbd(2, 16))
    opts = dict(n_coarse=8, n_fine=8, perturb=False)
    with torch.no_grad():
        ref = model.render_view(model.encode(image, depth), math.pi / 2, math.pi / 2, 8, **opts)[0]
    with torch.autocast(device, dtype=torch.bfloat16):
        images, depth = model.render_view(model.encode(image, depth), math.pi / 2, math.pi / 2, 8, **opts)
    assert _rel_err(images, ref) < 0.03
    (images.mean() + depth.mean()).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_paper_size_has_the_released_parameter_count():
    with torch.device("meta"):  # 147M parameters: shapes only, no memory, no init time
        model = G3DR(MODEL_PRESETS["paper"])
    assert sum(p.numel() for p in model.parameters()) == 147_406_212


def test_paper_size_has_the_released_keys_and_shapes():
    with torch.device("meta"):
        model = G3DR(**MODEL_PRESETS["paper"])
    expected = {}
    for line in (FIXTURES / "official_trigen_keys.txt").read_text().splitlines():
        key, shape = line.split("\t")
        expected[key] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    ours = {k: tuple(v.shape) for k, v in official_state_dict(model).items()}
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}


# --- the UNet as f_rgbd denoiser, and input checks ----------------------------------------------

def test_unet_denoiser_options():
    torch.manual_seed(0)
    base = UNet(dim=16, dim_mults=(1, 2), in_channels=4, out_channels=4, pos_channels=0)
    cond = UNet(dim=16, dim_mults=(1, 2), in_channels=4, out_channels=4, pos_channels=0, num_classes=3)
    # the class embedding (3 classes + the null class) is the only addition
    assert set(cond.state_dict()) - set(base.state_dict()) == {"class_emb.weight"}
    assert cond.class_emb.weight.shape == (4, 64) and cond.null_class == 3
    x = torch.randn(2, 4, 24, 24)  # no positional embedding: any even size
    with torch.no_grad():
        y = cond(x, torch.tensor([10.0, 500.0]), torch.tensor([0, 2]))
        assert y.shape == (2, 4, 24, 24)
        assert not torch.allclose(y, cond(x, torch.tensor([10.0, 900.0]), torch.tensor([0, 2])))
        assert not torch.allclose(y, cond(x, torch.tensor([10.0, 500.0]), torch.tensor([1, 2])))
        assert torch.equal(cond(x, 7.0), cond(x, torch.full((2,), 7.0), torch.tensor([3, 3])))  # None = null
        assert torch.equal(base(x), base(x, torch.ones(2)))  # f_trigen's time is the constant t = 1
    with pytest.raises(ValueError, match="num_classes=0"):
        base(x, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="divisible by 2"):
        base(torch.randn(1, 4, 15, 15))


def test_encode_rejects_bad_input():
    model = G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8)
    with pytest.raises(ValueError, match=r"image must be \(B, 3, H, W\) in \[0, 1\], got \(1, 4, 16, 16\)"):
        model.encode(torch.zeros(1, 4, 16, 16), torch.zeros(1, 1, 16, 16))
    with pytest.raises(ValueError, match=r"depth must be \(B, 1, H, W\) = \(1, 1, 16, 16\).*got \(1, 1, 8, 8\)"):
        model.encode(torch.zeros(1, 3, 16, 16), torch.zeros(1, 1, 8, 8))
    with pytest.raises(ValueError) as info:
        model.encode(torch.zeros(1, 3, 32, 32), torch.zeros(1, 1, 32, 32))
    assert "32x32" in str(info.value) and "16x16" in str(info.value)
    with pytest.raises(ValueError, match="projection"):
        G3DR(projection="xy")
    with pytest.raises(ValueError, match="aligned_plane needs projection='yz'"):
        G3DR(projection="official", aligned_plane=True)


# --- the aligned y-z plane ---------------------------------------------------------------------------

def test_aligned_yz_plane_puts_each_pixel_where_its_canonical_ray_crosses_the_box_centre():
    """An image-aligned plane whose features are the pixels' own image coordinates, aligned and sampled where
    each canonical ray crosses x = 0, gives every pixel back its own coordinates; unaligned it does not."""
    S = 32
    a = torch.linspace(-1, 1, S)  # corner-inclusive image coordinates
    coords = torch.stack(torch.meshgrid(a, a, indexing="xy"), 0)[None]  # (1, 2, S, S): (column, row)
    cam = orbit_camera(torch.tensor([CANONICAL_YAW]), torch.tensor([CANONICAL_PITCH]))
    rays_o, rays_d = get_rays(cam, FOV_DEGREES, S)  # (1, S*S, 3)
    points = rays_o - rays_o[..., :1] / rays_d[..., :1] * rays_d  # (1, S*S, 3) on x = 0
    want = coords.flatten(2).transpose(1, 2)  # (1, S*S, 2)
    inner = (want.abs() < 0.9).all(-1)  # the outermost texels repeat the border, so bilinear is not exact there
    for aligned, close in ((True, True), (False, False)):
        planes = torch.zeros(1, 3, 2, S, S)
        planes[:, 2] = align_yz_plane(coords) if aligned else coords
        got = 3 * sample_triplane(planes, points, levels=1, projection="yz")  # the mean over 3 planes, 2 are 0
        assert torch.allclose(got[inner], want[inner], atol=1e-5) == close
    # G3DR.encode aligns the third plane only, and only when asked
    torch.manual_seed(0)
    model = G3DR(MODEL_PRESETS["tiny"], projection="yz")
    image, depth = _rgbd(1, 32, seed=0)
    plain = model.encode(image, depth)
    model.config["aligned_plane"] = True
    aligned = model.encode(image, depth)
    assert torch.equal(aligned[:, :2], plain[:, :2])
    assert torch.allclose(aligned[:, 2], align_yz_plane(plain[:, 2]))
    assert MODEL_PRESETS["paper"]["aligned_plane"] is False  # a config saved before the key loads as before


# --- end to end ----------------------------------------------------------------------------------

def test_small_encode_render_view_reaches_every_parameter():
    torch.manual_seed(0)
    model = G3DR(MODEL_PRESETS["small"])
    S = model.config["image_size"]
    planes = model.encode(*_rgbd(2, S))
    assert planes.shape == (2, 3, model.config["plane_channels"], S, S)
    # canonical view with depth-guided samples + gradient rescaling, 16 x 16 in chunks of 100 rays
    R = 16
    surface = 4.5 + torch.rand(2, 1, R, R)
    images, depth, opacity = model.render_view(planes, math.pi / 2, math.pi / 2, R, chunk=100, n_coarse=8, n_fine=8,
                                               surface_depth=surface, depth_guided_prob=1.0, with_opacity=True)
    assert images.shape == (2, 3, R, R) and depth.shape == (2, 1, R, R) and opacity.shape == (2, 1, R, R)
    assert images.min() >= -1e-6 and images.max() <= 1 + 1e-6  # render_view's pictures are in [0, 1]
    (images.square().mean() + depth.mean() + opacity.mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert no_grad == []


def test_render_view_is_render_on_the_pixel_grid_in_any_chunks():
    torch.manual_seed(0)
    model = G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8)
    S, opts = 12, dict(n_coarse=8, n_fine=8, perturb=False)  # deterministic mode
    with torch.no_grad():
        planes = torch.randn(2, 3, 8, 16, 16)
        yaw = torch.tensor([math.pi / 2, math.pi / 3])  # one camera per scene
        a = model.render_view(planes, yaw, math.pi / 2, S, chunk=2 * S * S, **opts)
        b = model.render_view(planes, yaw, math.pi / 2, S, chunk=37, **opts)
        # pixel (row, col) of the view is ray row * S + col of get_rays, rendered alone
        rays_o, rays_d = get_rays(orbit_camera(yaw, math.pi / 2), 18.0, S)
        for row, col in [(2, 9), (10, 1)]:
            ray = [row * S + col]
            out = model.render(planes, rays_o[:, ray], rays_d[:, ray], **opts)
            torch.testing.assert_close(a[0][:, :, row, col], out["rgb"][:, 0], rtol=1e-5, atol=1e-6)  # both [0, 1]
            torch.testing.assert_close(a[1][:, :, row, col], out["depth"][:, 0], rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[0][0], a[0][1])  # the two cameras differ


def test_render_returns_rgb_in_0_1_and_forward_is_encode_then_float32_render():
    from model import make_field
    from render import render_rays
    torch.manual_seed(0)
    model = G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8)
    image, depth = _rgbd(2, 16, seed=1)
    rays_o, rays_d = get_rays(orbit_camera(math.pi / 2, math.pi / 2).expand(2, 4, 4), 18.0, 6)  # (2, 36, 3)
    opts = dict(n_coarse=8, n_fine=8, perturb=False)
    with torch.no_grad():
        planes = model.encode(image, depth)
        out = model.render(planes, rays_o, rays_d, **opts)
        raw = render_rays(make_field(planes, model.decoder), rays_o, rays_d, **opts)  # render.py: [-1, 1]
        assert torch.equal(out["rgb"], (raw["rgb"] + 1) / 2) and torch.equal(out["depth"], raw["depth"])
        assert out["rgb"].min() >= -1e-3 and out["rgb"].max() <= 1 + 1e-3  # f_dec's widened sigmoid
        for k, v in model(image, depth, rays_o, rays_d, **opts).items():
            assert torch.equal(v, out[k]) if torch.is_tensor(v) else v == out[k], k
        # under bf16 autocast only f_trigen runs in bf16: the render of its (bf16) planes is float32
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(image, depth, rays_o, rays_d, **opts)
            planes16 = model.encode(image, depth)
        assert planes16.dtype == torch.bfloat16 and mixed["rgb"].dtype == torch.float32
        ref = model.render(planes16.float(), rays_o, rays_d, **opts)
        for k in ("rgb", "depth", "opacity"):
            torch.testing.assert_close(mixed[k], ref[k], rtol=0, atol=0)


def test_model_sampler_option():
    torch.manual_seed(0)
    model = G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8)
    assert model.sampler == "auto"
    planes = torch.randn(2, 3, 8, 16, 16, requires_grad=True)
    opts = dict(n_coarse=8, n_fine=8, perturb=False)
    views, grads = {}, {}
    for sampler in ("table", "grid_sample"):
        model.sampler = sampler
        views[sampler] = model.render_view(planes, math.pi / 2 + 0.3, math.pi / 2, 6, **opts)
        (grads[sampler],) = torch.autograd.grad(views[sampler][0].square().sum() + views[sampler][1].sum(), planes)
    for a, b in zip(views["table"], views["grid_sample"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads["table"], grads["grid_sample"], rtol=1e-5, atol=1e-5)
    # a per-call choice overrides the model's; an unknown name fails when the model is built
    ray = get_rays(orbit_camera(math.pi / 2, math.pi / 2).expand(2, 4, 4), 18.0, 2)
    with pytest.raises(ValueError, match="'nearest'"):
        model.render(planes, *ray, sampler="nearest", **opts)
    with pytest.raises(ValueError, match="'nearest'"):
        G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8, sampler="nearest")


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs CUDA"))])
@pytest.mark.parametrize("sampler", ["table", "grid_sample"])
def test_render_view_waits_for_the_host_once_per_view_not_per_chunk(device, sampler, monkeypatch):
    """Host reads (Tensor.item / __bool__ / tolist, torch.tensor copies) and, on CUDA, synchronising
    calls (torch.cuda.set_sync_debug_mode) happen per view: rendering in 9 chunks costs no more."""
    counts = collections.Counter()
    for name in ("item", "__bool__", "tolist"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _f=original, _n=name, **k:
                            counts.update([_n]) or _f(self, *a, **k))
    real_tensor = torch.tensor
    monkeypatch.setattr(torch, "tensor", lambda *a, **k: counts.update(["torch.tensor"]) or real_tensor(*a, **k))
    model = G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8, sampler=sampler).to(device)
    planes = torch.randn(2, 3, 8, 16, 16, device=device)
    surface = torch.full((2, 1, 12, 12), 5.0, device=device)

    def waits(chunk):
        counts.clear()
        with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("warn")
            try:
                model.render_view(planes, math.pi / 2, math.pi / 2, 12, chunk=chunk, n_coarse=8, n_fine=8,
                                  surface_depth=surface, depth_guided_prob=0.5)
            finally:
                if device == "cuda":
                    torch.cuda.set_sync_debug_mode(0)
        return dict(counts, syncs=sum("synchroniz" in str(w.message) for w in caught))

    one, nine = waits(2 * 144), waits(2 * 16)
    assert one == nine
    assert one.get("torch.tensor", 0) <= 3  # the table's constants, once per view
