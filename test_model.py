"""Tests for f_trigen (unet.UNet) and the G3DR module: the authors' checkpoint format, the exact
paper architecture, our checkpoints, bad input, and an end-to-end encode + render with gradients."""
import collections
import math
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import model as model_module
from model import G3DR, MODEL_PRESETS, UNet, UnsafeCheckpointError, load_checkpoint
from render import get_rays, orbit_camera

FIXTURES = Path(__file__).resolve().parent / "fixtures"  # made with the authors' code: fixtures/README.md

TINY = dict(dim=16, dim_mults=(1, 2), image_size=32, plane_channels=8, pos_channels=256)  # the fixture's size


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _tiny_io():
    io = torch.load(FIXTURES / "official_tiny_io.pt", weights_only=True)
    return torch.cat([io["rgb"], io["depth"]], dim=1), io["planes"]  # (2, 4, 32, 32), (2, 3, 8, 32, 32)


def _save_official(model, path, transform=lambda sd: sd):
    """Write `model` in the authors' checkpoint format ({'step', 'model'}, keys prefixed 'module.')."""
    sd = {"module." + k: v for k, v in model.official_state_dict().items()}
    torch.save({"step": 0, "model": transform(sd)}, path)
    return path


# --- the authors' checkpoint -------------------------------------------------------------------

def test_official_tiny_checkpoint_reproduces_the_authors_planes():
    model = G3DR.from_official(FIXTURES / "official_tiny_ckpt.pt")
    assert {k: model.config[k] for k in TINY} == TINY  # every size inferred from the checkpoint
    rgbd, planes_ref = _tiny_io()
    with torch.no_grad():
        planes = model.encode(rgbd)
    assert planes.shape == planes_ref.shape
    assert _rel_err(planes, planes_ref) < 1e-5


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_autocast_keeps_the_full_precision_eps(device):
    # Under autocast the weights and the normalisation statistics stay float32, so the eps rule
    # must give 1e-5 as in the float32 run that trained the weights. Keying eps on the activation
    # dtype (1e-3 for bf16 inputs) moves these planes by ~13 %; bf16 rounding alone by ~1 %.
    model = G3DR.from_official(FIXTURES / "official_tiny_ckpt.pt").to(device)
    rgbd, planes_ref = _tiny_io()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        planes = model.encode(rgbd.to(device))
    assert _rel_err(planes.cpu(), planes_ref) < 0.03


@pytest.mark.parametrize("device", ["cpu"] + (["cuda"] if torch.cuda.is_available() else []))
def test_bf16_autocast_encode_render_and_backward(device):
    torch.manual_seed(0)
    model = G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8).to(device)
    rgbd = torch.cat([torch.rand(2, 3, 16, 16) * 2 - 1, 4 + 2 * torch.rand(2, 1, 16, 16)], dim=1).to(device)
    opts = dict(n_coarse=8, n_fine=8, perturb=False)
    with torch.no_grad():
        ref = model.render_view(model.encode(rgbd), math.pi / 2, math.pi / 2, 8, **opts)[0]
    with torch.autocast(device, dtype=torch.bfloat16):
        images, depth = model.render_view(model.encode(rgbd), math.pi / 2, math.pi / 2, 8, **opts)
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
    ours = {k: tuple(v.shape) for k, v in model.official_state_dict().items()}
    assert sorted(set(ours) ^ set(expected)) == []
    assert {k: s for k, s in ours.items() if expected[k] != s} == {}


def test_from_official_infers_sizes_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = G3DR(dim=16, dim_mults=(1, 2, 3), image_size=16, plane_channels=4, pos_channels=8, decoder_hidden=24)
    path = _save_official(model, tmp_path / "official.pt")
    loaded = G3DR.from_official(path, levels=2, projection="yz")  # overrides for what a checkpoint lacks
    assert loaded.config == {**model.config, "levels": 2, "projection": "yz"}
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# --- bad checkpoints ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    torch.manual_seed(0)
    model = G3DR(**TINY)
    return model, _save_official(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def _raises(error, facts, fn, *args):
    """fn(*args) raises `error` whose message names every one of `facts` (the file, key or value at fault)."""
    with pytest.raises(error) as info:
        fn(*args)
    for fact in facts:
        assert fact in str(info.value), (fact, str(info.value))


def test_bad_file_errors_name_the_file(tmp_path, tiny_official):
    missing = tmp_path / "nope.pt"
    _raises(FileNotFoundError, [str(missing)], G3DR.from_official, missing)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    for load in (G3DR.from_official, G3DR.from_checkpoint):
        _raises(ValueError, [str(text), "PyTorch"], load, text)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    _raises(ValueError, [str(tensor), "official"], G3DR.from_official, tensor)
    # the authors' format given to our loader: the file, and the loader to use instead
    _raises(ValueError, [str(tiny_official[1]), "G3DR.from_official"], G3DR.from_checkpoint, tiny_official[1])


def test_wrong_sizes_list_the_mis_shaped_keys(tiny_official):
    with pytest.raises(ValueError) as err:
        G3DR.from_official(tiny_official[1], plane_channels=4)  # the checkpoint has 8
    msg = str(err.value)
    assert "\n" not in msg and "tiny.pt" in msg
    assert "3 mis-shaped" in msg and "final_conv.weight (24, 32, 1, 1) vs (12, 32, 1, 1)" in msg
    assert "decoder.net.0.weight (64, 8) vs (64, 4)" in msg and "missing" not in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_official):
    def damage(sd):
        sd = dict(sd)
        del sd["module.mid_attn.fn.norm.g"], sd["module.ups.1.2.fn.fn.to_qkv.weight"]
        sd["module.extra.weight"] = torch.zeros(1)
        return sd
    path = _save_official(tiny_official[0], tmp_path / "damaged.pt", damage)
    with pytest.raises(ValueError) as err:
        G3DR.from_official(path)
    msg = str(err.value)
    assert "damaged.pt" in msg and "2 missing: mid_attn.fn.norm.g, ups.1.2.fn.fn.to_qkv.weight" in msg
    assert "1 unexpected: extra.weight" in msg


# --- our checkpoints ---------------------------------------------------------------------------

def test_our_checkpoint_rebuilds_the_model(tmp_path):
    torch.manual_seed(0)
    model = G3DR(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8, projection="yz")
    path = tmp_path / "ours.pt"
    torch.save({**model.checkpoint(), "step": 3}, path)
    # checkpoints written before the safe format held numpy RNG state, which the safe loader refuses:
    # they load when trusted
    older = tmp_path / "older.pt"
    torch.save({**model.checkpoint(), "step": 3, "rng": np.random.get_state()}, older)
    with pytest.raises(UnsafeCheckpointError, match=r"older.pt: refused.*numpy.*--trust_checkpoint"):
        G3DR.from_checkpoint(older)
    for source, trust in ((path, False), (older, True), (model.checkpoint(), False)):
        loaded = G3DR.from_checkpoint(source, trust=trust)
        assert loaded.config == model.config
        for k, v in model.state_dict().items():
            assert torch.equal(loaded.state_dict()[k], v), k
    bad = model.checkpoint()
    bad["model_config"] = {**bad["model_config"], "dim": 24}
    _raises(ValueError, ["mis-shaped", "unet.init_conv.weight (16, 12, 7, 7) vs (24, 12, 7, 7)"], G3DR.from_checkpoint, bad)
    bad["model_config"] = {**model.config, "depth": 3}
    _raises(ValueError, ["model_config", "['depth']"], G3DR.from_checkpoint, bad)


def write_malicious_checkpoint(path, marker):
    """A .pt file that, when fully unpickled, creates the file `marker` and writes 'payload ran' to
    stderr (the way a hostile checkpoint would run code), wrapped as a plausible checkpoint."""
    class CreatesFile:
        def __reduce__(self):
            return open, (str(marker), "w")

    class Announces:
        def __reduce__(self):
            return os.write, (2, b"payload ran\n")
    torch.save({"model_config": dict(MODEL_PRESETS["tiny"]), "model": {"w": CreatesFile()},
                "note": Announces(), "step": 0}, path)
    return path


def test_malicious_checkpoint_is_refused_unless_trusted(tmp_path, monkeypatch, capsys):
    import diffusion
    marker = tmp_path / "created_by_payload"
    evil = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    loaders = [load_checkpoint, G3DR.from_checkpoint, G3DR.from_official, diffusion.load_denoiser]
    for load in loaders:
        with pytest.raises(UnsafeCheckpointError) as err:
            load(evil)
        msg = str(err.value)
        assert "\n" not in msg and "evil.pt" in msg and "--trust_checkpoint" in msg and "io.open" in msg
    assert not marker.exists()  # the payload never ran
    assert capsys.readouterr().err == ""

    # trusted: the warning comes first, then the full unpickling (which runs the payload)
    real_load, order = torch.load, []

    def recording_load(*args, **kwargs):
        if not kwargs.get("weights_only", True):
            order.append("warning" in capsys.readouterr().err)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(model_module.torch, "load", recording_load)
    ckpt = load_checkpoint(evil, trust=True)
    ckpt["model"]["w"].close()
    assert order == [True] and marker.exists()


def test_trust_does_not_warn_for_safe_files(tmp_path, capsys):
    model = G3DR(**MODEL_PRESETS["tiny"])
    torch.save(model.checkpoint(), tmp_path / "ours.pt")
    G3DR.from_checkpoint(tmp_path / "ours.pt", trust=True)
    G3DR.from_official(FIXTURES / "official_tiny_ckpt.pt", trust=True)
    assert capsys.readouterr().err == ""


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
    with pytest.raises(ValueError, match=r"\(B, 4, H, W\), got \(1, 3, 16, 16\)"):
        model.encode(torch.zeros(1, 3, 16, 16))
    _raises(ValueError, ["32x32", "16x16"], model.encode, torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match="projection"):
        G3DR(projection="xy")


# --- end to end ----------------------------------------------------------------------------------

def test_small_encode_render_view_reaches_every_parameter():
    torch.manual_seed(0)
    model = G3DR(MODEL_PRESETS["small"])
    S = model.config["image_size"]
    rgbd = torch.cat([torch.rand(2, 3, S, S) * 2 - 1, 4 + 2 * torch.rand(2, 1, S, S)], dim=1)
    planes = model.encode(rgbd)
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
            torch.testing.assert_close(a[0][:, :, row, col], (out["rgb"][:, 0] + 1) / 2, rtol=1e-5, atol=1e-6)  # [0, 1]
            torch.testing.assert_close(a[1][:, :, row, col], out["depth"][:, 0], rtol=1e-5, atol=1e-6)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(a[0][0], a[0][1])  # the two cameras differ


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
