"""
The one-shot device check: what a new GPU must confirm before it trains G3DR, in one command.

    python bench.py gpu                               # on a CUDA machine: paper sizes, 7.5 min at most
    python bench.py gpu --json gpu_check.json --compile
    python bench.py gpu --device cpu --size tiny      # the same rows on the CPU, CUDA-only rows SKIP

Rows (README "GPU check" says how to read them):
  A*  correctness, float32 with TF32 off: the device against the authors' fixtures and against the CPU.
      Exit status 1 when one fails.
  B*  the triplane samplers and an inference view (informational).
  C*  full training steps of train.py in float32 and bf16 (informational); host waits per step.
  D*  capacity: the largest guided batch that fits; a one-process nccl DDP run of train.py (exit 1 on failure).
  F   the released 300k-step recipe's time projected from the measured steps.
Every row ends PASS, FAIL, WARN, INFO or SKIP; rows left when the deadline passes print SKIP (time).
"""
import argparse
import contextlib
import itertools
import json
import logging
import math
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from data import atomic_write

REPO = Path(__file__).resolve().parent
FIXTURES = REPO / "fixtures"
TINY_CLIP = "g3dr-check-tiny-clip"  # a small random open_clip ViT for CPU timing (see _perceptual)

# What a check runs at each size. paper: the released recipe's step (batch 8, 128 x 128 rays, 32 + 32 samples);
# tiny: seconds on a CPU.
SIZES = {
    "paper": dict(preset="paper", batch=8, render=128, n_coarse=32, n_fine=32, clip="ViT-B-16", iters=3,
                  view_batch=4),
    "tiny": dict(preset="tiny", batch=2, render=16, n_coarse=8, n_fine=8, clip=TINY_CLIP, iters=1, view_batch=2),
}
# train.py at tiny sizes, for the resume and DDP rows
TRAIN_TINY = ["--model_size", "tiny", "--image_size", "16", "--render_size", "8", "--n_coarse", "4", "--n_fine", "4",
              "--batch_size", "2", "--global_batch", "2", "--num_scenes", "8", "--sample_every", "1000",
              "--log_every", "1", "--w_vgg", "0", "--w_vgg_novel", "0", "--w_clip", "0", "--w_clip_novel", "0"]
RECIPE_STEPS, RECIPE_GPUS = 300_000, 6


class _Deadline(Exception):
    pass


class _Context:
    """What the rows share: the device, the sizes, the deadline and measured step times."""

    def __init__(self, args):
        self.args, self.device = args, torch.device(args.device)
        self.size = SIZES[args.size]
        self.cuda = self.device.type == "cuda"
        self.deadline = time.monotonic() + args.deadline
        self.step_ms = {}  # (dtype, kind) -> ms, for the projection
        self._model = self.perceptual = None

    def left(self):
        return self.deadline - time.monotonic()

    def tf32(self, on):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = on

    def model(self):
        """The size's G3DR with an Adam optimiser, built once (random weights)."""
        if self._model is None:
            from model import G3DR, MODEL_PRESETS
            torch.manual_seed(0)
            with torch.device(self.device):  # initialised in place: 147 M parameters need no CPU copy
                model = G3DR(MODEL_PRESETS[self.size["preset"]])
            self._model = model, torch.optim.Adam(model.parameters(), lr=1e-5)
        return self._model


# ---------------------------------------------------------------------------------------------
# helpers

def _rel(a, b):
    """max |a - b| / max |b| (the error of a tensor as a whole), on the CPU in float64."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def _rel_norm(a, b):
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    return ((a - b).norm() / b.norm().clamp(min=1e-30)).item()


def _autocast(device, dtype):
    if dtype == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _memory(ctx):
    if ctx.cuda:
        return (f"peak {torch.cuda.max_memory_allocated(ctx.device) / 2 ** 30:.2f} GiB allocated, "
                f"{torch.cuda.max_memory_reserved(ctx.device) / 2 ** 30:.2f} GiB reserved")
    return f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20:.2f} GiB (process)"


def _reset_memory(ctx):
    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)


def _median_ms(ctx, fn, iters=None):
    from bench import _time
    times = _time(fn, ctx.device, warmup=1, iters=iters or ctx.size["iters"])
    return sorted(times)[len(times) // 2] * 1e3


def _host_waits(fn):
    """Number of synchronising CUDA calls (the host waits for the device) while fn runs."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def _images(B, S, seed=0):
    """A batch as train.py's loaders give it: smooth random images in [0, 1], depth in [4, 6)."""
    g = torch.Generator().manual_seed(seed)
    image = F.interpolate(torch.rand(B, 3, 8, 8, generator=g), size=(S, S), mode="bilinear", align_corners=True)
    depth = 4 + 2 * F.interpolate(torch.rand(B, 1, 4, 4, generator=g), size=(S, S), mode="bilinear",
                                  align_corners=True).clamp(max=0.999)
    return {"image": image, "depth": depth}


def _python(args, ctx):
    """Run `python ARGS` in the repository (train.py, mostly), within the time left."""
    env = dict(os.environ, OMP_NUM_THREADS="1") if not ctx.cuda else None  # as this process, see run()
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=max(1.0, ctx.left()))
    if r.returncode != 0:
        lines = [l for l in r.stderr.strip().splitlines() if l.strip()] or ["(no message)"]
        raise RuntimeError(f"exit {r.returncode}: {lines[-1]}")
    return r


# ---------------------------------------------------------------------------------------------
# A: correctness (float32, TF32 off)

def check_fixture_render(ctx, guided):
    """The authors' renderer fixture on the device, both samplers: worst relative error."""
    from model import SAMPLERS, Decoder, make_field
    from render import render_rays
    fx = torch.load(FIXTURES / "official_render.pt", weights_only=True)
    dev, worst = ctx.device, 0.0
    B, _, S, _ = fx["surface_depth"].shape
    x = fx["surface_depth"].reshape(B, S * S, 1).to(dev)
    for sampler in SAMPLERS:
        decoder = Decoder(fx["planes"].shape[2])
        decoder.load_state_dict(fx["decoder"])
        decoder.to(dev)
        planes = fx["planes"].to(dev, copy=True).requires_grad_(guided)
        with torch.set_grad_enabled(guided):
            out = render_rays(make_field(planes, decoder, sampler=sampler), fx["rays_o"].to(dev), fx["rays_d"].to(dev),
                              fx["n_coarse"], fx["n_fine"], perturb=False, surface_depth=x if guided else None,
                              depth_guided_prob=1.0)
        ref = fx["guided" if guided else "plain"]
        errs = [_rel(out[k], ref[k]) for k in ("rgb", "depth", "opacity")]
        if guided:
            loss = out["rgb"].square().sum() + (out["depth"] - x).abs().sum() + out["opacity"].sum()
            loss.backward()
            errs += [_rel(loss, ref["loss"]), _rel(planes.grad, ref["grad_planes"])]
            errs += [_rel(p.grad, ref["grad_decoder"][n]) for n, p in decoder.named_parameters()]
        worst = max(worst, *errs)
    return f"{worst:.1e}", "PASS" if worst < 1e-4 else "FAIL"


def check_sampler(ctx):
    """Both samplers and projections on the device against grid_sample on the CPU, points outside too."""
    from model import SAMPLERS, sample_triplane
    g = torch.Generator().manual_seed(1)
    planes = torch.randn(2, 3, 8, 24, 40, generator=g)
    points = torch.rand(2, 4000, 3, generator=g) * 2.4 - 1.2  # ~40% outside the box
    points[0, 0] = float("nan")
    cot = torch.randn(2, 4000, 8, generator=g)
    worst, parts = 0.0, []

    def run(sampler, projection, dev):
        p = planes.to(dev).requires_grad_(True)
        out = sample_triplane(p, points.to(dev), projection=projection, sampler=sampler)
        return out, torch.autograd.grad(out, p, cot.to(dev))[0]

    for projection in ("official", "yz"):
        ref = run("grid_sample", projection, "cpu")
        for sampler in SAMPLERS:
            out = run(sampler, projection, ctx.device)
            err = max(_rel(out[0], ref[0]), _rel(out[1], ref[1]))
            worst = max(worst, err)
            parts.append(f"{sampler}/{projection} {err:.0e}")
    return f"{worst:.1e} ({', '.join(parts)})", "PASS" if worst < 1e-5 else "FAIL"


def check_tiny_checkpoint(ctx, bf16):
    """The authors' tiny f_trigen checkpoint on the device against their planes."""
    from model import G3DR
    model = G3DR.from_official(FIXTURES / "official_tiny_ckpt.pt").to(ctx.device)
    io = torch.load(FIXTURES / "official_tiny_io.pt", weights_only=True)
    rgbd = torch.cat([io["rgb"], io["depth"]], dim=1).to(ctx.device)
    with torch.no_grad(), _autocast(ctx.device, "bf16" if bf16 else "fp32")():
        planes = model.encode(rgbd)
    err = _rel_norm(planes.float(), io["planes"])
    return f"{err:.1e}", "PASS" if err < (0.03 if bf16 else 1e-4) else "FAIL"


def _tiny_step(device, dtype, guided, seed=0):
    """One deterministic tiny G3DR training step (encode, render with or without depth guidance and
    gradient rescaling, L1 rgb + depth + opacity losses): (loss, gradients)."""
    from losses import depth_loss, opacity_loss, recon_loss
    from model import G3DR, MODEL_PRESETS
    from render import CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera
    torch.manual_seed(seed)
    model = G3DR(MODEL_PRESETS["tiny"]).to(device)
    batch = _images(2, 32, seed)
    image, depth = (batch["image"] * 2 - 1).to(device), batch["depth"].to(device)
    R = 12
    rays_o, rays_d = get_rays(orbit_camera(CANONICAL_YAW, CANONICAL_PITCH).to(device).expand(2, 4, 4), FOV_DEGREES, R)
    image_r = F.interpolate(image, size=(R, R), mode="bilinear", align_corners=True)
    depth_r = F.interpolate(depth, size=(R, R), mode="bilinear", align_corners=True)
    with _autocast(torch.device(device), dtype)():
        out = model.render(model.encode(torch.cat([image, depth], 1)), rays_o, rays_d, n_coarse=8, n_fine=8,
                           perturb=False, surface_depth=depth_r.flatten(2).transpose(1, 2),
                           depth_guided_prob=float(guided))
    rgb = out["rgb"].float().transpose(1, 2).reshape(2, 3, R, R)
    pred_depth = out["depth"].float().transpose(1, 2).reshape(2, 1, R, R)
    loss = recon_loss(rgb, image_r) + 2 * depth_loss(pred_depth, depth_r) + opacity_loss(out["opacity"].float())
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), [g.detach().cpu() for g in grads]


def check_step_vs_cpu(ctx):
    worst_loss, worst_grad = 0.0, 0.0
    for guided in (True, False):
        loss_d, grads_d = _tiny_step(ctx.device, "fp32", guided)
        loss_c, grads_c = _tiny_step("cpu", "fp32", guided)
        worst_loss = max(worst_loss, _rel(loss_d, loss_c))
        worst_grad = max(worst_grad, max(_rel_norm(a, b) for a, b in zip(grads_d, grads_c)))
    ok = worst_loss < 1e-5 and worst_grad < 1e-4
    value = f"loss {worst_loss:.1e}, gradients {worst_grad:.1e} (guided and importance-sampled)"
    return value, "PASS" if ok else "FAIL"


def check_bf16_vs_fp32(ctx):
    loss32, grads32 = _tiny_step(ctx.device, "fp32", True)
    loss16, grads16 = _tiny_step(ctx.device, "bf16", True)
    a, b = torch.cat([g.flatten() for g in grads16]).double(), torch.cat([g.flatten() for g in grads32]).double()
    cosine = (a @ b / (a.norm() * b.norm())).item()
    err = _rel(loss16, loss32)
    return f"loss {err:.2%}, gradient cosine {cosine:.5f}", "PASS" if err < 0.03 and cosine > 0.99 else "FAIL"


def check_train_resume(ctx):
    """train.py stopped right after its step-3 checkpoint (of 5 steps), then `train.py --resume` for 2 more."""
    out = Path(tempfile.mkdtemp(prefix="g3dr-check-")) / "run"
    # as if the run were killed right after its step-3 checkpoint
    stop_after_3 = ("import sys, train\nsave = train.save_checkpoint\n"
                    "train.save_checkpoint = lambda path, state: (save(path, state), state['step'] == 3 and sys.exit(0))\n"
                    "train.main(sys.argv[1:])\n")
    _python(["-c", stop_after_3, *TRAIN_TINY, "--max_steps", "5", "--save_every", "3", "--device", ctx.args.device,
             "--out_dir", str(out)], ctx)
    first = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    _python(["train.py", "--resume", "--out_dir", str(out)], ctx)
    final = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps, losses_ok = [r["step"] for r in records], all(math.isfinite(r["loss"]) for r in records)
    ok = first == 3 and final == 5 and steps == [1, 2, 3, 4, 5] and losses_ok
    return f"saved at step {first}, resumed to {final}, logged steps {steps}, finite losses {losses_ok}", \
        "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------
# B: the samplers and an inference view at the size's work

def bench_sampler(ctx, sampler, backward):
    from model import sample_triplane
    s, B = ctx.size, ctx.size["batch"]
    C, H = (64, 128) if s["preset"] == "paper" else (8, 32)
    planes = torch.randn(B, 3, C, H, H, device=ctx.device, requires_grad=backward)
    n = s["render"] ** 2 * (s["n_coarse"] + s["n_fine"])
    points = torch.rand(B, n, 3, device=ctx.device) * 2 - 1
    _reset_memory(ctx)

    def run():
        with torch.set_grad_enabled(backward):
            out = sample_triplane(planes, points, sampler=sampler)
            if backward:
                out.backward(torch.ones_like(out))
    ms = _median_ms(ctx, run)
    return f"{ms:.1f} ms, {B * n / ms / 1e3:.2f} M samples/s ({B * n:,} points), {_memory(ctx)}", "INFO"


def bench_view(ctx):
    """render_view of a canonical S x S view (inference, default sampler and chunks)."""
    from render import CANONICAL_PITCH, CANONICAL_YAW
    model, _ = ctx.model()
    s = ctx.size
    with torch.no_grad():
        planes = model.encode(torch.rand(s["view_batch"], 4, *(2 * [model.config["image_size"]]), device=ctx.device))
    _reset_memory(ctx)

    def view():
        with torch.no_grad():
            model.render_view(planes, CANONICAL_YAW, CANONICAL_PITCH, s["render"], n_coarse=s["n_coarse"], n_fine=s["n_fine"])
    ms = _median_ms(ctx, view)
    waits = f", {_host_waits(view)} host waits" if ctx.cuda else ""
    return f"{ms:.1f} ms for {s['view_batch']} views of {s['render']}^2{waits}, {_memory(ctx)}", "INFO"


# ---------------------------------------------------------------------------------------------
# C: train.py's training step

def _perceptual(ctx):
    """VGG16 and CLIP with random weights, built directly: for timing only, never for training."""
    import losses
    if ctx.size["clip"] == TINY_CLIP:
        import open_clip
        cfg = dict(embed_dim=32, vision_cfg=dict(image_size=32, layers=2, width=64, patch_size=8, head_width=32),
                   text_cfg=dict(context_length=8, vocab_size=64, width=32, heads=1, layers=1))
        path = Path(tempfile.mkdtemp(prefix="g3dr-clip-")) / f"{TINY_CLIP}.json"
        path.write_text(json.dumps(cfg))
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
    recipe = ["--dataset", "imagenet", "--data_dir", "-"] if s["preset"] == "paper" else \
        ["--model_size", "tiny", "--image_size", "32", "--canonical_rays", "grid", "--novel_opacity", "true"]
    argv = recipe + [f"--batch_size={s['batch']}", f"--render_size={s['render']}", f"--n_coarse={s['n_coarse']}",
                     f"--n_fine={s['n_fine']}", "--max_steps=1000", f"--clip_model={s['clip']}",
                     f"--global_batch={s['batch']}"]
    if kind == "novel":  # P(novel) = 1 at the last step; VGG (2 levels) + CLIP + TV
        return train.parse_config(argv + ["--p_novel_max=1"]), 999
    return train.parse_config(argv + ["--p_novel_max=0", f"--depth_guided_prob={float(kind == 'guided')}"]), 0


def bench_step(ctx, dtype, kind, compile=False):
    import train
    model, optimizer = ctx.model()
    cfg, step = _step_setup(ctx, kind)
    ctx.perceptual = perceptual = ctx.perceptual or _perceptual(ctx)
    net, autocast = train._EncodeRender(model), _autocast(ctx.device, dtype)
    batch = _images(ctx.size["batch"], model.config["image_size"])
    if compile:
        model.encode = torch.compile(model.encode)
    _reset_memory(ctx)

    def full_step():
        loss, _, info = train.trigen_losses(net, batch, step, 0, cfg, perceptual, ctx.device, autocast)
        assert info["novel"] == (kind == "novel")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    try:
        t0 = time.perf_counter()
        if compile:  # the first call compiles
            full_step()
        first = time.perf_counter() - t0
        ms = _median_ms(ctx, full_step)
    finally:
        if compile:
            del model.encode  # back to the plain method
    ctx.step_ms[dtype, kind] = ms
    B = ctx.size["batch"]
    extra = f", first call {first:.0f} s (compilation)" if compile else ""
    return f"{ms:.0f} ms/step, {B / ms * 1e3:.2f} images/s, {_memory(ctx)}{extra}", "INFO"


def bench_trigen(ctx, dtype):
    """f_trigen alone, forward + backward, the size's batch."""
    model, optimizer = ctx.model()
    S = model.config["image_size"]
    rgbd = torch.rand(ctx.size["batch"], 4, S, S, device=ctx.device)
    _reset_memory(ctx)

    def encode():
        with _autocast(ctx.device, dtype)():
            planes = model.encode(rgbd)
        planes.float().square().mean().backward()
        optimizer.zero_grad(set_to_none=True)
    return f"{_median_ms(ctx, encode):.0f} ms, {_memory(ctx)}", "INFO"


def count_step_waits(ctx):
    import train
    model, optimizer = ctx.model()
    out = []
    for kind in ("guided", "importance"):
        cfg, step = _step_setup(ctx, kind)
        batch = _images(ctx.size["batch"], model.config["image_size"])

        def full_step():
            loss, _, _ = train.trigen_losses(train._EncodeRender(model), batch, step, 0, cfg, {}, ctx.device,
                                             _autocast(ctx.device, "bf16"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
        full_step()  # warm-up: first-call work is not a per-step wait
        out.append(f"{kind} {_host_waits(full_step)}")
    return ", ".join(out) + " (bf16 step: forward, backward; the loop's .item() calls not included)", "INFO"


# ---------------------------------------------------------------------------------------------
# D: capacity; F: projection

def largest_batch(ctx):
    """Guided bf16 steps of doubling batch until one fails or a third of the time left is spent."""
    import train
    model, optimizer = ctx.model()
    cfg, step = _step_setup(ctx, "guided")
    fits, failed, stop = None, "not reached", time.monotonic() + ctx.left() / 3
    for B in itertools.takewhile(lambda b: time.monotonic() < stop, (8, 16, 32, 48, 64, 96, 128, 192, 256)):
        batch = _images(B, model.config["image_size"])
        _reset_memory(ctx)
        try:
            loss, _, _ = train.trigen_losses(train._EncodeRender(model), batch, step, 0, dict(cfg, batch_size=B), {},
                                             ctx.device, _autocast(ctx.device, "bf16"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.cuda.synchronize(ctx.device)
            fits = f"{B} ({_memory(ctx)})"
        except (torch.OutOfMemoryError, RuntimeError) as e:
            failed = f"{B}: {str(e).splitlines()[0][:120]}"
            break
        finally:
            optimizer.zero_grad(set_to_none=True)
            loss = batch = None
    return f"fits {fits}; fails at {failed}", "INFO" if fits else "WARN"


def ddp_smoke(ctx):
    out = Path(tempfile.mkdtemp(prefix="g3dr-ddp-")) / "run"
    r = _python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *TRAIN_TINY,
                 "--max_steps", "2", "--save_every", "2", "--device", "cuda", "--out_dir", str(out)], ctx)
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    ok = step == 2 and "1 x cuda:0" in r.stdout
    return f"torchrun 1 process (nccl): exit 0, checkpoint at step {step}", "PASS" if ok else "FAIL"


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


# ---------------------------------------------------------------------------------------------
# the rows, run in this order: (id, check, expect, function, needs CUDA)

ROWS = [
    ("A1", "authors' renderer fixture, forward", "< 1e-4", lambda c: check_fixture_render(c, False), False),
    ("A2", "authors' renderer fixture, guided + backward", "< 1e-4", lambda c: check_fixture_render(c, True), False),
    ("A3", "samplers x projections on the device vs the CPU", "< 1e-5", check_sampler, False),
    ("A4", "authors' tiny checkpoint planes, fp32", "< 1e-4", lambda c: check_tiny_checkpoint(c, False), False),
    ("A5", "authors' tiny checkpoint planes, bf16 autocast", "< 3%", lambda c: check_tiny_checkpoint(c, True), False),
    ("A6", "tiny training step, device vs CPU", "loss < 1e-5, grads < 1e-4", check_step_vs_cpu, False),
    ("A7", "tiny training step, bf16 vs fp32", "loss < 3%, cosine > 0.99", check_bf16_vs_fp32, False),
    ("A8", "train.py 3 steps, then --resume 2 more", "steps 1-5, finite", check_train_resume, False),
    ("D2", "DDP smoke test (nccl, one process)", "runs", ddp_smoke, True),
    ("B1", "sampler table, forward", "info", lambda c: bench_sampler(c, "table", False), False),
    ("B2", "sampler table, forward + backward", "info", lambda c: bench_sampler(c, "table", True), False),
    ("B3", "sampler grid_sample, forward", "info", lambda c: bench_sampler(c, "grid_sample", False), False),
    ("B4", "sampler grid_sample, forward + backward", "info", lambda c: bench_sampler(c, "grid_sample", True), False),
    ("B5", "render_view inference", "info", bench_view, False),
    ("C1", "f_trigen forward + backward, fp32", "info", lambda c: bench_trigen(c, "fp32"), False),
    ("C2", "training step fp32, guided canonical", "info", lambda c: bench_step(c, "fp32", "guided"), False),
    ("C3", "training step fp32, importance canonical", "info", lambda c: bench_step(c, "fp32", "importance"), False),
    ("C4", "training step fp32, novel (random VGG + CLIP)", "info", lambda c: bench_step(c, "fp32", "novel"), False),
    ("C5", "f_trigen forward + backward, bf16", "info", lambda c: bench_trigen(c, "bf16"), False),
    ("C6", "training step bf16, guided canonical", "info", lambda c: bench_step(c, "bf16", "guided"), False),
    ("C7", "training step bf16, importance canonical", "info", lambda c: bench_step(c, "bf16", "importance"), False),
    ("C8", "training step bf16, novel (random VGG + CLIP)", "info", lambda c: bench_step(c, "bf16", "novel"), False),
    ("C9", "training step bf16 guided, --compile", "info", lambda c: bench_step(c, "bf16", "guided", True), False),
    ("C10", "host waits in one training step", "info", count_step_waits, True),
    ("D1", "largest guided bf16 batch that fits", "info", largest_batch, True),
    ("F", "the 300k-step recipe, projected", "info", projection, False),
]
EXIT_ROWS = {"D2"}  # besides every A row: a failure here means exit status 1


def add_args(p):
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--size", default="paper", choices=sorted(SIZES), help="paper: the released step; tiny: seconds")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    p.add_argument("--deadline", type=float, default=450.0, help="seconds; rows left then print SKIP (time)")
    p.add_argument("--compile", action="store_true", help="also time a step with torch.compile (row C9)")


def _alarm(signum, frame):
    raise _Deadline()


def run(args):
    """Run every row; print each as it ends and a table at the end; return the exit status."""
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"error: --device {args.device} but torch sees no CUDA device; the CPU run is "
              f"`python bench.py gpu --device cpu --size tiny`", file=sys.stderr)
        return 2
    ctx, threads = _Context(args), torch.get_num_threads()
    if ctx.cuda:
        torch.cuda.set_device(ctx.device)
    else:  # the CPU run is a dry run: one thread, which a loaded machine slows least (2 threads: up to 20x)
        torch.set_num_threads(1)
    previous_handler = signal.signal(signal.SIGALRM, _alarm)
    try:
        return _run_rows(ctx, args)
    finally:
        signal.signal(signal.SIGALRM, previous_handler)
        torch.set_num_threads(threads)


def _run_rows(ctx, args):
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu, 1 thread"
    print(f"G3DR device check: {name}, torch {torch.__version__}, size {args.size}, deadline {args.deadline:.0f} s",
          flush=True)
    rows, start = {}, time.monotonic()
    for row_id, check, expect, fn, cuda_only in ROWS:
        status, value = None, ""
        if cuda_only and not ctx.cuda:
            status, value = "SKIP", "needs CUDA"
        elif row_id == "C9" and not args.compile:
            status, value = "SKIP", "pass --compile"
        elif ctx.left() <= 0:
            status, value = "SKIP (time)", "deadline passed"
        else:
            ctx.tf32(False if row_id.startswith("A") else True)  # A: float32 references; else as train.py runs
            signal.setitimer(signal.ITIMER_REAL, max(ctx.left(), 0.01))
            try:
                value, status = fn(ctx)
            except _Deadline:
                status, value = "SKIP (time)", "stopped at the deadline"
            except subprocess.TimeoutExpired:
                status, value = "SKIP (time)", "stopped at the deadline"
            except Exception as e:  # a row that breaks is reported, and the others still run
                msg = (str(e).strip().splitlines() or [""])[0][:200]
                status, value = "FAIL", f"{type(e).__name__}: {msg}"
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        rows[row_id] = dict(check=check, value=value, expect=expect, status=status)
        print(f"[{time.monotonic() - start:6.1f} s] {row_id:<4} {status:<11} {check}: {value}", flush=True)
    _print_table(rows)
    if args.json:
        report = {"device": name, "torch": torch.__version__, "size": args.size, "rows": rows}
        atomic_write(args.json, lambda f: f.write(json.dumps(report, indent=1).encode()))
    failed = [i for i, r in rows.items() if r["status"] == "FAIL" and (i.startswith("A") or i in EXIT_ROWS)]
    if failed:
        print(f"FAILED: {', '.join(failed)}", flush=True)
    return 1 if failed else 0


def _print_table(rows):
    order = sorted(rows, key=lambda i: (i[0], int(i[1:] or 0)))
    w_check = max(len(rows[i]["check"]) for i in order)
    w_expect = max(len(rows[i]["expect"]) for i in order)
    print(f"\n{'id':<4} {'status':<11} {'check':<{w_check}}  {'expect':<{w_expect}}  value")
    print("-" * (w_check + w_expect + 40))
    for i in order:
        r = rows[i]
        print(f"{i:<4} {r['status']:<11} {r['check']:<{w_check}}  {r['expect']:<{w_expect}}  {r['value']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_args(parser)
    sys.exit(run(parser.parse_args()))
