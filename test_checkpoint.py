"""Tests for checkpoint.py: the safe loader and its one-line errors, atomic saving, our one format (and the
layout of 6e0eacb's files, which still load), resuming by kind, f_rgbd's loader, and the authors' format
(sizes inferred, a strict key check)."""
import os

import numpy as np
import pytest
import torch

import checkpoint
from checkpoint import (UnsafeCheckpointError, from_official, load, load_denoiser, load_g3dr, load_run,
                        official_state_dict, plain_state, save, strip_prefixes, training_state)
from model import G3DR, MODEL_PRESETS

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")
TINY = dict(dim=16, dim_mults=(1, 2), image_size=32, plane_channels=8, pos_channels=256)  # the fixture's size
SMALL = dict(dim=16, dim_mults=(1, 2), image_size=16, plane_channels=8, pos_channels=8)


def _raises(error, facts, fn, *args, **kwargs):
    """fn(*args) raises `error` with a one-line message naming every one of `facts`."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for fact in facts:
        assert fact in msg, (fact, msg)
    return msg


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        assert torch.equal(sb[k], v), k


def _save_official(model, path, transform=lambda sd: sd):
    """Write `model` in the authors' checkpoint format ({'step', 'model'}, keys prefixed 'module.')."""
    sd = {"module." + k: v for k, v in official_state_dict(model).items()}
    torch.save({"step": 0, "model": transform(sd)}, path)
    return path


def _run_state(model):
    """A training run's checkpoint of `model`, as train.py writes it."""
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=10)
    return training_state("trigen", model, model.config, step=3, config=dict(seed=1, max_steps=10),
                          optimizer=optimizer, scheduler=scheduler, rng=[dict(torch=torch.get_rng_state())])


# --- our format ------------------------------------------------------------------------------------

def test_training_state_round_trips_through_the_safe_loader(tmp_path):
    torch.manual_seed(0)
    model = G3DR(SMALL, projection="yz")
    state = _run_state(model)
    assert set(state) == {"kind", "model_config", "model", "step", "config", "optimizer", "scheduler", "rng"}
    assert state["kind"] == "trigen" and state["model_config"] == model.config
    path = tmp_path / "run" / "ckpt.pt"
    path.parent.mkdir()
    save(path, state)
    assert os.listdir(path.parent) == ["ckpt.pt"]  # no temporary file left behind
    run = load_run(path, "trigen")  # the safe loader reads it: nothing but tensors and plain values
    assert run["step"] == 3 and run["config"] == dict(seed=1, max_steps=10)
    assert run["scheduler"]["total_steps"] == 10
    for source in (path, state, load(path)):  # a path, or the dict already loaded
        loaded, cfg = load_g3dr(source)
        assert loaded.config == model.config and cfg == dict(seed=1, max_steps=10)
        _same_weights(loaded, model)
    # a model-only checkpoint: kind, model_config, model
    only = training_state("trigen", model, model.config)
    assert set(only) == {"kind", "model_config", "model"}
    assert load_g3dr(only)[1] == {}
    save(tmp_path / "only.pt", only)
    _raises(ValueError, ["only.pt", "model-only", "step"], load_run, tmp_path / "only.pt", "trigen")


def test_training_state_strips_the_ddp_and_compile_prefixes():
    model = G3DR(SMALL)
    wrapped = torch.nn.ModuleDict({"module": model})  # keys 'module.unet...', as DistributedDataParallel's
    state = training_state("trigen", wrapped, model.config)
    assert state["model"].keys() == model.state_dict().keys()
    assert strip_prefixes({"module._orig_mod.a": 1, "b": 2}) == {"a": 1, "b": 2}


def test_plain_state_drops_what_the_safe_loader_refuses(tmp_path):
    value = dict(a=1, f=len, nested=dict(t=torch.ones(2), g=[1, print]), keep=[1.5, "x", None, (2, 3)])
    plain = plain_state(value)
    assert set(plain) == {"a", "nested", "keep"} and set(plain["nested"]) == {"t"}
    assert plain["keep"] == [1.5, "x", None, (2, 3)]
    save(tmp_path / "s.pt", plain)
    assert load(tmp_path / "s.pt")["a"] == 1


def test_checkpoints_of_6e0eacb_still_load(tmp_path):
    """Before the 'kind' entry: train.py wrote stage='trigen' + model_config, or stage='rgbd' +
    denoiser_config (the make_denoiser arguments)."""
    import diffusion
    torch.manual_seed(0)
    model = G3DR(SMALL)
    new = _run_state(model)
    old = dict(stage="trigen", model=new["model"], optimizer=new["optimizer"], scheduler=new["scheduler"],
               step=3, config=dict(new["config"], stage="trigen"), rng=new["rng"], model_config=model.config)
    save(tmp_path / "trigen.pt", old)
    loaded, cfg = load_g3dr(tmp_path / "trigen.pt")
    _same_weights(loaded, model)
    run = load_run(tmp_path / "trigen.pt", "trigen")
    assert run["kind"] == "trigen" and "stage" not in run and run["step"] == 3
    _raises(ValueError, ["trigen.pt", "'trigen'", "not a 'rgbd'"], load_run, tmp_path / "trigen.pt", "rgbd")

    net = diffusion.make_denoiser(3, size="small", image_size=8)
    old_rgbd = dict(stage="rgbd", model=net.state_dict(), optimizer={}, scheduler={}, step=1, config={}, rng=[],
                    denoiser_config=dict(num_classes=3, size="small", image_size=8))
    save(tmp_path / "rgbd.pt", old_rgbd)
    run = load_run(tmp_path / "rgbd.pt", "rgbd")
    assert run["kind"] == "rgbd" and run["model_config"] == old_rgbd["denoiser_config"]
    _raises(ValueError, ["rgbd.pt", "'rgbd'", "train_rgbd.py", "not a 'trigen'"], load_run, tmp_path / "rgbd.pt",
            "trigen")
    _raises(ValueError, ["rgbd.pt", "'rgbd'"], load_g3dr, tmp_path / "rgbd.pt")
    loaded = load_denoiser(tmp_path / "rgbd.pt")
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5.0, 500.0]), torch.tensor([0, 3])
    assert not loaded.training and torch.equal(loaded(x, t, y), net.eval()(x, t, y))


def test_load_denoiser(tmp_path):
    import diffusion
    torch.manual_seed(0)
    net = diffusion.make_denoiser(3, size="small", image_size=8)
    config = dict(num_classes=3, size="small", image_size=8)
    ddp_keys = {"module." + k: v for k, v in net.state_dict().items()}
    save(tmp_path / "ckpt.pt", training_state("rgbd", ddp_keys, config, step=1))
    loaded = load_denoiser(tmp_path / "ckpt.pt")
    assert not loaded.training and loaded.image_size == 8
    _same_weights(loaded, net)
    save(tmp_path / "trigen.pt", training_state("trigen", G3DR(SMALL), G3DR(SMALL).config))
    _raises(ValueError, ["trigen.pt", "'trigen'", "not a 'rgbd'"], load_denoiser, tmp_path / "trigen.pt")
    save(tmp_path / "bad.pt", training_state("rgbd", net, dict(config, size="huge")))
    _raises(ValueError, ["bad.pt", "model_config", "huge"], load_denoiser, tmp_path / "bad.pt")
    _raises(FileNotFoundError, ["nothing.pt"], load_denoiser, tmp_path / "nothing.pt")


def test_bad_model_config_and_mis_shaped_weights():
    model = G3DR(SMALL, projection="yz")
    bad = training_state("trigen", model, dict(model.config, dim=24))
    _raises(ValueError, ["mis-shaped", "unet.init_conv.weight (16, 12, 7, 7) vs (24, 12, 7, 7)"], load_g3dr, bad)
    bad = training_state("trigen", model, dict(model.config, depth=3))
    _raises(ValueError, ["model_config", "['depth']"], load_g3dr, bad)


# --- the safe loader -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_official(tmp_path_factory):
    torch.manual_seed(0)
    model = G3DR(**TINY)
    return model, _save_official(model, tmp_path_factory.mktemp("ckpt") / "tiny.pt")


def test_bad_file_errors_name_the_file(tmp_path, tiny_official):
    missing = tmp_path / "nope.pt"
    for fn in (load, load_g3dr, from_official):
        _raises(FileNotFoundError, [str(missing)], fn, missing)
    text = tmp_path / "notes.pt"
    text.write_text("not a checkpoint\n")
    for fn in (load_g3dr, from_official, load_denoiser):
        _raises(ValueError, [str(text), "PyTorch"], fn, text)
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    _raises(ValueError, [str(tensor), "official"], from_official, tensor)
    _raises(ValueError, [str(tensor), "'model_config'"], load_g3dr, tensor)
    _raises(ValueError, [str(tensor), "'kind'"], load_run, tensor, "trigen")
    # the authors' format given to our loader: the file, and how to load it instead
    _raises(ValueError, [str(tiny_official[1]), "authors' format", "official=True"], load_g3dr, tiny_official[1])


def test_old_numpy_rng_state_needs_trust(tmp_path):
    # checkpoints written before the safe format held numpy RNG state, which the safe loader refuses:
    # they load when trusted
    model = G3DR(SMALL)
    older = tmp_path / "older.pt"
    torch.save({**training_state("trigen", model, model.config), "step": 3, "rng": np.random.get_state()}, older)
    with pytest.raises(UnsafeCheckpointError, match=r"older.pt: refused.*numpy.*--trust_checkpoint"):
        load_g3dr(older)
    _same_weights(load_g3dr(older, trust=True)[0], model)


def write_malicious_checkpoint(path, marker):
    """A .pt file that, when fully unpickled, creates the file `marker` and writes 'payload ran' to
    stderr (the way a hostile checkpoint would run code), wrapped as a plausible checkpoint."""
    class CreatesFile:
        def __reduce__(self):
            return open, (str(marker), "w")

    class Announces:
        def __reduce__(self):
            return os.write, (2, b"payload ran\n")
    torch.save({"kind": "trigen", "model_config": dict(MODEL_PRESETS["tiny"]), "model": {"w": CreatesFile()},
                "note": Announces(), "step": 0}, path)
    return path


def test_malicious_checkpoint_is_refused_unless_trusted(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "created_by_payload"
    evil = write_malicious_checkpoint(tmp_path / "evil.pt", marker)
    loaders = [load, load_g3dr, from_official, load_denoiser, lambda p: load_run(p, "trigen")]
    for fn in loaders:
        _raises(UnsafeCheckpointError, ["evil.pt", "--trust_checkpoint", "io.open"], fn, evil)
    assert not marker.exists()  # the payload never ran
    assert capsys.readouterr().err == ""

    # trusted: the warning comes first, then the full unpickling (which runs the payload)
    real_load, order = torch.load, []

    def recording_load(*args, **kwargs):
        if not kwargs.get("weights_only", True):
            order.append("warning" in capsys.readouterr().err)
        return real_load(*args, **kwargs)
    monkeypatch.setattr(checkpoint.torch, "load", recording_load)
    ckpt = load(evil, trust=True)
    ckpt["model"]["w"].close()
    assert order == [True] and marker.exists()


def test_trust_does_not_warn_for_safe_files(tmp_path, capsys):
    model = G3DR(**MODEL_PRESETS["tiny"])
    save(tmp_path / "ours.pt", training_state("trigen", model, model.config))
    load_g3dr(tmp_path / "ours.pt", trust=True)
    load_g3dr(os.path.join(FIXTURES, "official_tiny_ckpt.pt"), official=True, trust=True)
    assert capsys.readouterr().err == ""


# --- the authors' format ---------------------------------------------------------------------------------

def test_from_official_infers_sizes_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = G3DR(dim=16, dim_mults=(1, 2, 3), image_size=16, plane_channels=4, pos_channels=8, decoder_hidden=24)
    path = _save_official(model, tmp_path / "official.pt")
    loaded, cfg = load_g3dr(path, official=True, levels=2, projection="yz")  # what a checkpoint lacks
    assert cfg == {} and loaded.config == {**model.config, "levels": 2, "projection": "yz"}
    _same_weights(loaded, model)


def test_wrong_sizes_list_the_mis_shaped_keys(tiny_official):
    msg = _raises(ValueError, ["tiny.pt", "3 mis-shaped", "final_conv.weight (24, 32, 1, 1) vs (12, 32, 1, 1)",
                               "decoder.net.0.weight (64, 8) vs (64, 4)"],
                  from_official, tiny_official[1], plane_channels=4)  # the checkpoint has 8
    assert "missing" not in msg


def test_missing_and_unexpected_keys_are_listed(tmp_path, tiny_official):
    def damage(sd):
        sd = dict(sd)
        del sd["module.mid_attn.fn.norm.g"], sd["module.ups.1.2.fn.fn.to_qkv.weight"]
        sd["module.extra.weight"] = torch.zeros(1)
        return sd
    path = _save_official(tiny_official[0], tmp_path / "damaged.pt", damage)
    _raises(ValueError, ["damaged.pt", "2 missing: mid_attn.fn.norm.g, ups.1.2.fn.fn.to_qkv.weight",
                         "1 unexpected: extra.weight"], from_official, path)
