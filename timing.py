"""
Time and memory of work on a device, and the speed rows of the device check (gpu_check.py runs them):

  B*  the triplane samplers and an inference view.
  C*  full training steps of train.py (train.trigen_losses on the G3DR itself) in float32 and bf16, host waits.
  D1  the largest guided batch that fits.  F  the released 300k-step recipe's time, projected.

A row is a function of the check's context `ctx` (gpu_check._Context: device, size, model(), step_ms, ...)
that returns (value, status). bench.py times its benchmarks with time_calls too.
"""
import contextlib
import json
import logging
import resource
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

TINY_CLIP = "g3dr-check-tiny-clip"  # a small random open_clip ViT for CPU timing (see _perceptual)
TINY_CLIP_CONFIG = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                        text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=1, layers=1))
RECIPE_STEPS, RECIPE_GPUS = 300_000, 6


# ---------------------------------------------------------------------------------------------
# measuring

def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, device, warmup, iters):
    """Run fn warmup + iters times; the seconds of each timed call, the device synchronised around it."""
    times = []
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def peak_memory(device):
    """Peak memory since reset_peak_memory, as text: CUDA: torch's allocation; CPU: the process's RSS."""
    if torch.device(device).type == "cuda":
        return (f"peak {torch.cuda.max_memory_allocated(device) / 2 ** 30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(device) / 2 ** 30:.2f} GiB reserved")
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process)"


def reset_peak_memory(device):
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def host_waits(fn):
    """Number of synchronising CUDA calls (the host waits for the device) while fn runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def autocast(device, dtype):
    """The autocast context factory of a step in 'fp32' (none) or 'bf16', as train.py's."""
    if dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(torch.device(device).type, dtype=torch.bfloat16)


def images(B, S, seed=0, device="cpu"):
    """A batch as train.py's loaders give it: smooth random images in [0, 1], depth in [4, 6)."""
    g = torch.Generator().manual_seed(seed)
    image = F.interpolate(torch.rand(B, 3, 8, 8, generator=g), size=(S, S), mode="bilinear", align_corners=True)
    depth = 4 + 2 * F.interpolate(torch.rand(B, 1, 4, 4, generator=g), size=(S, S), mode="bilinear",
                                  align_corners=True).clamp(max=0.999)
    return {"image": image.to(device), "depth": depth.to(device)}


def _median_ms(ctx, fn):
    times = time_calls(fn, ctx.device, warmup=1, iters=ctx.size["iters"])
    return sorted(times)[len(times) // 2] * 1e3


# ---------------------------------------------------------------------------------------------
# B: the samplers and an inference view at the size's work

def bench_sampler(ctx, sampler, backward):
    from model import sample_triplane
    s, B = ctx.size, ctx.size["batch"]
    C, H = (64, 128) if s["preset"] == "paper" else (8, 32)
    planes = torch.randn(B, 3, C, H, H, device=ctx.device, requires_grad=backward)
    n = s["render"] ** 2 * (s["n_coarse"] + s["n_fine"])
    points = torch.rand(B, n, 3, device=ctx.device) * 2 - 1
    reset_peak_memory(ctx.device)

    def run():
        with torch.set_grad_enabled(backward):
            out = sample_triplane(planes, points, sampler=sampler)
            if backward:
                out.backward(torch.ones_like(out))
    ms = _median_ms(ctx, run)
    return f"{ms:.1f} ms, {B * n / ms / 1e3:.2f} M samples/s ({B * n:,} points), {peak_memory(ctx.device)}", "INFO"


def bench_view(ctx):
    """render_view of a canonical view (inference, default sampler and chunks)."""
    from render import CANONICAL_PITCH, CANONICAL_YAW
    model, _ = ctx.model()
    s = ctx.size
    batch = images(s["view_batch"], model.config["image_size"], device=ctx.device)
    with torch.no_grad():
        planes = model.encode(batch["image"], batch["depth"])
    reset_peak_memory(ctx.device)

    def view():
        with torch.no_grad():
            model.render_view(planes, CANONICAL_YAW, CANONICAL_PITCH, s["render"], n_coarse=s["n_coarse"],
                              n_fine=s["n_fine"])
    ms = _median_ms(ctx, view)
    waits = f", {host_waits(view)} host waits" if ctx.cuda else ""
    return f"{ms:.1f} ms for {s['view_batch']} views of {s['render']}^2{waits}, {peak_memory(ctx.device)}", "INFO"


# ---------------------------------------------------------------------------------------------
# C: train.py's training step

def _perceptual(ctx):
    """VGG16 and CLIP with random weights, built directly: for timing only, never for training."""
    import losses
    if ctx.size["clip"] == TINY_CLIP:  # registered with open_clip as a model config file
        import open_clip
        path = Path(tempfile.mkdtemp(prefix="g3dr-clip-")) / f"{TINY_CLIP}.json"
        path.write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(path)
    logging.disable(logging.WARNING)  # open_clip's "no pretrained weights loaded": that is the point here
    try:
        return {"vgg": losses.VGGPerceptual(pretrained=False).to(ctx.device),
                "clip": losses.CLIPEmbeddingLoss(ctx.size["clip"], pretrained=None).to(ctx.device)}
    finally:
        logging.disable(logging.NOTSET)


def _step_setup(ctx, kind):
    """train.py's config and step index for one kind of step: 'guided' / 'importance' canonical, 'novel'."""
    import train
    s = ctx.size
    # tiny: the synthetic recipe with the released novel-view terms (it has none of its own), so C4/C8 cost them
    recipe = ["--dataset", "imagenet", "--data_dir", "-"] if s["preset"] == "paper" else \
        ["--model_size", "tiny", "--image_size", "32", "--canonical_rays", "grid", "--novel_opacity", "true",
         "--w_vgg_novel", "2", "--w_clip_novel", "0.35"]
    argv = recipe + [f"--batch_size={s['batch']}", f"--render_size={s['render']}", f"--n_coarse={s['n_coarse']}",
                     f"--n_fine={s['n_fine']}", "--max_steps=1000", f"--clip_model={s['clip']}",
                     f"--global_batch={s['batch']}"]
    if kind == "novel":  # P(novel) = 1 at the last step; VGG (2 levels) + CLIP + TV
        return train.parse_config(argv + ["--p_novel_max=1"]), 999
    return train.parse_config(argv + ["--p_novel_max=0", f"--depth_guided_prob={float(kind == 'guided')}"]), 0


def _train_step(ctx, model, optimizer, batch, step, cfg, perceptual, dtype, adam=True):
    """One micro-batch of train.py (train.trigen_losses on the G3DR itself), its backward and Adam's step."""
    import train
    loss, _, info = train.trigen_losses(model, batch, step, 0, cfg, perceptual, ctx.device, autocast(ctx.device, dtype))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if adam:
        optimizer.step()
    return info


def bench_step(ctx, dtype, kind, compile=False):
    model, optimizer = ctx.model()
    cfg, step = _step_setup(ctx, kind)
    ctx.perceptual = perceptual = ctx.perceptual or _perceptual(ctx)
    batch = images(ctx.size["batch"], model.config["image_size"])
    if compile:
        model.encode = torch.compile(model.encode)
    reset_peak_memory(ctx.device)

    def full_step():
        info = _train_step(ctx, model, optimizer, batch, step, cfg, perceptual, dtype)
        assert info["novel"] == (kind == "novel")

    try:
        first = time_calls(full_step, ctx.device, 0, 1)[0] if compile else 0  # the first call compiles
        ctx.step_ms[dtype, kind] = ms = _median_ms(ctx, full_step)
    finally:
        if compile:
            del model.encode  # back to the plain method
    extra = f", first call {first:.0f} s (compilation)" if compile else ""
    return f"{ms:.0f} ms/step, {ctx.size['batch'] / ms * 1e3:.2f} images/s, {peak_memory(ctx.device)}{extra}", "INFO"


def bench_trigen(ctx, dtype):
    """f_trigen alone, forward + backward, the size's batch."""
    model, optimizer = ctx.model()
    batch = images(ctx.size["batch"], model.config["image_size"], device=ctx.device)
    reset_peak_memory(ctx.device)

    def encode():
        with autocast(ctx.device, dtype)():
            planes = model.encode(batch["image"], batch["depth"])
        planes.float().square().mean().backward()
        optimizer.zero_grad(set_to_none=True)
    return f"{_median_ms(ctx, encode):.0f} ms, {peak_memory(ctx.device)}", "INFO"


def count_step_waits(ctx):
    model, optimizer = ctx.model()
    out = []
    for kind in ("guided", "importance"):
        cfg, step = _step_setup(ctx, kind)
        batch = images(ctx.size["batch"], model.config["image_size"])

        def full_step():
            _train_step(ctx, model, optimizer, batch, step, cfg, {}, "bf16", adam=False)
        full_step()  # warm-up: first-call work is not a per-step wait
        out.append(f"{kind} {host_waits(full_step)}")
    return ", ".join(out) + " (bf16 step: forward, backward; the loop's .item() calls not included)", "INFO"


# ---------------------------------------------------------------------------------------------
# D1: capacity; F: projection

def largest_batch(ctx):
    """Guided bf16 steps of doubling batch until one fails or a third of the time left is spent."""
    model, optimizer = ctx.model()
    cfg, step = _step_setup(ctx, "guided")
    fits, failed, stop = None, "not reached", time.monotonic() + ctx.left() / 3
    for B in (8, 16, 32, 48, 64, 96, 128, 192, 256):
        if time.monotonic() > stop:
            break
        reset_peak_memory(ctx.device)
        try:
            batch = images(B, model.config["image_size"])
            _train_step(ctx, model, optimizer, batch, step, dict(cfg, batch_size=B), {}, "bf16", adam=False)
            sync(ctx.device)
            fits = f"{B} ({peak_memory(ctx.device)})"
        except (torch.OutOfMemoryError, RuntimeError) as e:
            failed = f"{B}: {str(e).splitlines()[0][:120]}"
            break
        finally:
            optimizer.zero_grad(set_to_none=True)
    return f"fits {fits}; fails at {failed}", "INFO" if fits else "WARN"


def projection(ctx):
    """300k steps, P(novel) averaging 0.36 over the schedule, 40% of canonical steps depth-guided,
    VGG + CLIP on canonical steps in the second half (costed as novel minus importance)."""
    dtype = "bf16" if ctx.cuda else "fp32"  # train.py's default on each device
    t = {k: ctx.step_ms.get((dtype, k)) for k in ("guided", "importance", "novel")}
    if None in t.values():
        return f"needs the {dtype} C rows", "SKIP"
    canonical = 0.4 * t["guided"] + 0.6 * t["importance"]
    ms = 0.36 * t["novel"] + 0.64 * canonical + 0.30 * (t["novel"] - t["importance"])
    days = RECIPE_STEPS * ms / 1e3 / 86400
    return (f"{ms:.0f} ms/step ({dtype}) -> {RECIPE_GPUS} GPUs: {days:.2f} days (+ gradient all-reduce); "
            f"1 GPU: {RECIPE_GPUS * days:.1f} days for the same images"), "INFO"
