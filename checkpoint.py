"""
Every checkpoint the project reads or writes: safe loading (`--trust_checkpoint`), atomic saving, the one
format of our files, and the authors' format of the released f_trigen.

Our format, for every kind of model (f_trigen 'trigen', f_rgbd 'rgbd', and 'sr' reserved):

    dict(kind=..., model_config=dict, model=state_dict,                  # enough to rebuild the model
         step=int, config=dict, optimizer=..., scheduler=..., rng=list)  # a training run's, optional

built by training_state(). model_config is G3DR's sizes for 'trigen' and diffusion.make_denoiser's
arguments for 'rgbd'. Everything in it is tensors and plain Python values, so the safe loader reads it.
"""
import pickle
import re
import sys
from pathlib import Path

import torch

from model import G3DR
from outputs import atomic_write

KINDS = {'trigen': 'f_trigen, train.py', 'rgbd': 'f_rgbd, train_rgbd.py', 'sr': 'super-resolution'}


class UnsafeCheckpointError(ValueError):
    """The safe loader (torch.load weights_only=True) refused a checkpoint: loading it fully would
    run code stored in the file."""


# -----------------------------------------------------------------------------
# reading and writing a file

def _first_line(e):
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def load(path, trust=False):
    """torch.load a checkpoint onto the CPU, turning every failure into a one-line error.

    Safe by default: only tensors and plain Python values are unpickled (weights_only=True), so a
    file cannot run code. A file that needs more is refused with UnsafeCheckpointError, unless
    trust=True (--trust_checkpoint), which loads it fully after a one-line warning."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not str(e).startswith("Weights only load failed"):
            raise ValueError(f"{path}: not a PyTorch checkpoint ({str(e).splitlines()[0]})") from None
        # torch's explanation is a paragraph; the line after "WeightsUnpickler error:" says what was refused
        detail = str(e).partition("WeightsUnpickler error:")[2]
        why = next((l.strip() for l in detail.splitlines() if l.strip()), "unknown content")
        refused = re.search(r"GLOBAL (\S+) was not an allowed global", why)  # a function or class to import
    except Exception as e:
        raise ValueError(f"{path}: not a PyTorch checkpoint ({_first_line(e)})") from None
    if not trust:
        what = (f"refused: it needs {refused[1]}, which the safe loader does not allow" if refused else
                f"not a PyTorch checkpoint, or one the safe loader cannot read ({why.split(' Please', 1)[0]})")
        raise UnsafeCheckpointError(f"{path}: {what}; loading it fully runs code stored in the file: only if you "
                                    f"trust its source, pass --trust_checkpoint (trust=True in Python)")
    print(f"warning: {path}: --trust_checkpoint: loading it fully, which runs any code stored in the file",
          file=sys.stderr, flush=True)
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"{path}: not a PyTorch checkpoint ({_first_line(e)})") from None


def save(path, state):
    """torch.save through a temporary PATH.tmp-PID renamed into place, so a run killed at any moment
    leaves the last good checkpoint intact."""
    atomic_write(path, lambda f: torch.save(state, f))


def strip_prefixes(state_dict):
    """Keys without the 'module.' of DistributedDataParallel (and of the authors' files) and the
    '_orig_mod.' of torch.compile."""
    return {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state_dict.items()}


# -----------------------------------------------------------------------------
# our format

_DROP = object()


def plain_state(value):
    """`value` with every entry the safe loader (torch.load weights_only=True) would refuse left out:
    some PyTorch versions put functions in scheduler state dicts (OneCycleLR's anneal_func), which the
    scheduler rebuilds from its constructor arguments anyway."""
    if isinstance(value, dict):
        items = {k: plain_state(v) for k, v in value.items()}
        return {k: v for k, v in items.items() if v is not _DROP}
    if isinstance(value, (list, tuple)):
        items = [plain_state(v) for v in value]
        return _DROP if _DROP in items else type(value)(items)
    return value if value is None or isinstance(value, (bool, int, float, str, torch.Tensor)) else _DROP


def _state_dict(x):
    return x.state_dict() if hasattr(x, "state_dict") else x


def training_state(kind, model, model_config, step=None, config=None, optimizer=None, scheduler=None, rng=None):
    """The checkpoint dict of our format. model, optimizer, scheduler: the objects or their state
    dicts; the training entries left as None are left out (a model-only checkpoint)."""
    assert kind in KINDS, kind
    state = dict(kind=kind, model_config=dict(model_config), model=strip_prefixes(_state_dict(model)))
    if step is not None:
        state["step"] = int(step)
    if config is not None:
        state["config"] = dict(config)
    if optimizer is not None:
        state["optimizer"] = _state_dict(optimizer)
    if scheduler is not None:
        state["scheduler"] = plain_state(_state_dict(scheduler))
    if rng is not None:
        state["rng"] = rng
    return state


def _ours(ckpt, source, kind):
    """ckpt in our format (as of now) and of `kind`, else a one-line ValueError.

    Checkpoints written before the 'kind' entry (commit 6e0eacb) still load: f_rgbd ones held their
    make_denoiser arguments as 'denoiser_config' (and stage='rgbd'); every other one is f_trigen's."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        found = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{source}: not a checkpoint of ours, expected a dict with 'kind', 'model_config' and "
                         f"'model' (found {found})")
    if "kind" not in ckpt:  # the older layout
        ckpt = dict(ckpt, kind="rgbd" if "denoiser_config" in ckpt else "trigen")
        if "denoiser_config" in ckpt:
            ckpt["model_config"] = ckpt.pop("denoiser_config")
            if isinstance(ckpt.get("config"), dict) and "rgbd_size" in ckpt["config"]:
                # train.py --stage rgbd's key for what train_rgbd.py calls `size`
                ckpt["config"] = dict(ckpt["config"], size=ckpt["config"]["rgbd_size"])
        ckpt.pop("stage", None)
    if ckpt["kind"] != kind:
        raise ValueError(f"{source}: a {ckpt['kind']!r} checkpoint ({KINDS.get(ckpt['kind'], '?')}), "
                         f"not a {kind!r} one ({KINDS[kind]})")
    if not isinstance(ckpt.get("model_config"), dict):
        raise ValueError(f"{source}: a {kind!r} checkpoint without its 'model_config' dict")
    return ckpt


def load_run(path, kind, trust=False):
    """A training run's checkpoint of `kind` to resume from: our format with model_config, model, step,
    config, optimizer, scheduler and rng. trust: see load."""
    ckpt = _ours(load(path, trust=trust), path, kind)
    missing = [k for k in ("step", "config", "optimizer", "scheduler") if k not in ckpt]
    if missing:
        raise ValueError(f"{path}: a model-only checkpoint (no {', '.join(missing)}): a run cannot resume from it")
    return ckpt


# -----------------------------------------------------------------------------
# models from checkpoints

def _load_strict(model, state_dict, own, source, to_ours=lambda k: k):
    """Load `state_dict` whose keys/shapes must equal `own`'s exactly, else one error listing all."""
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    misshaped = [f"{k} {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}"
                 for k in own if k in state_dict and state_dict[k].shape != own[k].shape]
    found = [("missing", missing), ("unexpected", unexpected), ("mis-shaped (checkpoint vs model)", misshaped)]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:6])}" + (f", ... (+{len(keys) - 6} more)" * (len(keys) > 6))
                for what, keys in found if keys]
    if problems:
        raise ValueError(f"{source}: checkpoint does not fit {type(model).__name__}({model.config}): "
                         + "; ".join(problems))
    model.load_state_dict({to_ours(k): v for k, v in state_dict.items()})


def load_g3dr(path_or_dict, official=False, trust=False, **overrides):
    """(G3DR on the CPU, the training config saved with it or {}) from our 'trigen' checkpoint (a path,
    or the dict already loaded) or, official=True, from the authors' file. overrides: G3DR sizes for
    the authors' format, which lacks some (levels, projection). trust: see load."""
    if official:
        return from_official(path_or_dict, trust=trust, **overrides), {}
    assert not overrides, "overrides are for the authors' format; ours stores every size"
    if isinstance(path_or_dict, dict):
        ckpt, source = path_or_dict, "checkpoint dict"
    else:
        ckpt, source = load(path_or_dict, trust=trust), path_or_dict
    if isinstance(ckpt, dict) and "model_config" not in ckpt and isinstance(ckpt.get("model"), dict) \
            and any(str(k).startswith("module.") for k in ckpt["model"]):
        raise ValueError(f"{source}: not a G3DR checkpoint of ours; this looks like the authors' format: "
                         f"load it with official=True (sample.py --official, train.py --init_official)")
    ckpt = _ours(ckpt, source, "trigen")
    try:
        model = G3DR(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{source}: bad model_config {ckpt['model_config']}: {e}") from None
    _load_strict(model, strip_prefixes(ckpt["model"]), model.state_dict(), source)
    return model, ckpt.get("config", {})


def load_denoiser(path, device="cpu", trust=False):
    """f_rgbd (diffusion.make_denoiser(**model_config)) from a 'rgbd' checkpoint, in eval mode on
    `device`. trust: see load."""
    import diffusion  # here: only f_rgbd's users need it
    ckpt = _ours(load(path, trust=trust), path, "rgbd")
    try:
        net = diffusion.make_denoiser(**ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"{path}: bad model_config {ckpt['model_config']}: {e}") from None
    net.load_state_dict(strip_prefixes(ckpt["model"]))
    return net.to(device).eval()


# -----------------------------------------------------------------------------
# the authors' format: {'step', 'model', ...}, f_trigen's keys without our 'unet.' and prefixed 'module.'

def official_state_dict(model):
    """G3DR's state dict under the authors' key names (their file adds the 'module.' prefix)."""
    return {(k if k.startswith("decoder.") else k.removeprefix("unet.")): v for k, v in model.state_dict().items()}


def _infer_official_config(sd, source):
    """Sizes of an authors' f_trigen state dict ('module.' already stripped); absent keys are left
    out, so the strict load that follows reports them."""
    sizes = {}
    if "init_conv.weight" in sd:
        sizes["dim"] = sd["init_conv.weight"].shape[0]
    if "pos_embed" in sd:
        sizes["pos_channels"], sizes["image_size"] = sd["pos_embed"].shape[1], sd["pos_embed"].shape[-1]
    n_stages = 0
    while f"downs.{n_stages}.0.block1.proj.weight" in sd:
        n_stages += 1
    if "dim" in sizes and n_stages and "mid_block1.block1.proj.weight" in sd:
        # dim_in of every down stage, then the middle width = dim x mults
        widths = [sd[f"downs.{i}.0.block1.proj.weight"].shape[0] for i in range(1, n_stages)]
        widths.append(sd["mid_block1.block1.proj.weight"].shape[0])
        if any(w % sizes["dim"] for w in widths):
            raise ValueError(f"{source}: stage widths {widths} are not multiples of the base width {sizes['dim']}")
        sizes["dim_mults"] = tuple(w // sizes["dim"] for w in widths)
    if "final_conv.weight" in sd:
        out = sd["final_conv.weight"].shape[0]
        if out % 3:
            raise ValueError(f"{source}: final_conv has {out} output channels, not 3 x plane channels")
        sizes["plane_channels"] = out // 3
    if "decoder.net.0.weight" in sd:
        sizes["decoder_hidden"] = sd["decoder.net.0.weight"].shape[0]
    return sizes


def from_official(path, trust=False, **overrides):
    """G3DR from the authors' checkpoint. Sizes come from the file; overrides set the rest (levels,
    projection) or force a size. trust: see load (their plain state dicts need none)."""
    ckpt = load(path, trust=trust)
    sd = ckpt.get("model") if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(torch.is_tensor(v) for v in sd.values()):
        found = sorted(map(str, ckpt))[:6] if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path}: not an official G3DR checkpoint (expected a dict whose 'model' is a "
                         f"state dict; found {found})")
    sd = strip_prefixes(sd)
    model = G3DR(**{**_infer_official_config(sd, path), **overrides})
    _load_strict(model, sd, official_state_dict(model), path,
                 to_ours=lambda k: k if k.startswith("decoder.") else "unet." + k)
    return model
