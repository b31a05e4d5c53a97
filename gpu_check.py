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
The correctness rows (A, D2) and the runner are here, the speed rows (B, C, D1, F) in timing.py. Public APIs
only: G3DR's forward (encode + render), train.trigen_losses, and train.py run as a user runs it.
"""
import argparse
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import timing
from timing import bench_sampler, bench_step, bench_trigen, bench_view, count_step_waits, largest_batch, projection

REPO = Path(__file__).resolve().parent
FIXTURES = REPO / "fixtures"

# What a check runs at each size. paper: the released recipe's step (batch 8, 128 x 128 rays, 32 + 32 samples);
# tiny: seconds on a CPU. render: rays per side of a training view.
SIZES = {
    "paper": dict(preset="paper", batch=8, render=128, n_coarse=32, n_fine=32, clip="ViT-B-16", iters=3,
                  view_batch=4),
    "tiny": dict(preset="tiny", batch=2, render=16, n_coarse=8, n_fine=8, clip=timing.TINY_CLIP, iters=1, view_batch=2),
}
# train.py at tiny sizes, for the resume and DDP rows
TRAIN_TINY = ["--model_size", "tiny", "--image_size", "16", "--render_size", "8", "--n_coarse", "4", "--n_fine", "4",
              "--batch_size", "2", "--global_batch", "2", "--num_scenes", "8", "--sample_every", "1000",
              "--log_every", "1", "--w_vgg", "0", "--w_vgg_novel", "0", "--w_clip", "0", "--w_clip_novel", "0"]


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

def _rel(a, b, norm=False):
    """max |a - b| / max |b| (norm=True: |a - b| / |b|), the error of a tensor as a whole, in float64."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    size = (lambda x: x.norm()) if norm else (lambda x: x.abs().max())
    return (size(a - b) / size(b).clamp(min=1e-30)).item()


def _python(args, ctx, check=True):
    """Run `python ARGS` in the repository (train.py, mostly), within the time left."""
    env = dict(os.environ, OMP_NUM_THREADS="1") if not ctx.cuda else None  # as this process, see run()
    r = subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, env=env,
                       timeout=max(1.0, ctx.left()))
    if check and r.returncode != 0:
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
    surface = fx["surface_depth"].flatten(2).transpose(1, 2).to(dev)  # (B, 1, S, S) -> (B, R, 1)
    for sampler in SAMPLERS:
        decoder = Decoder(fx["planes"].shape[2])
        decoder.load_state_dict(fx["decoder"])
        decoder, planes = decoder.to(dev), fx["planes"].to(dev, copy=True).requires_grad_(guided)
        with torch.set_grad_enabled(guided):
            out = render_rays(make_field(planes, decoder, sampler=sampler), fx["rays_o"].to(dev), fx["rays_d"].to(dev),
                              fx["n_coarse"], fx["n_fine"], perturb=False, surface_depth=surface if guided else None,
                              depth_guided_prob=1.0)
        ref = fx["guided" if guided else "plain"]
        errs = [_rel(out[k], ref[k]) for k in ("rgb", "depth", "opacity")]
        if guided:
            loss = out["rgb"].square().sum() + (out["depth"] - surface).abs().sum() + out["opacity"].sum()
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
    from checkpoint import from_official
    model = from_official(FIXTURES / "official_tiny_ckpt.pt").to(ctx.device)
    io = torch.load(FIXTURES / "official_tiny_io.pt", weights_only=True)
    image = ((io["rgb"] + 1) / 2).to(ctx.device)  # the authors fed [-1, 1]; G3DR takes [0, 1]
    with torch.no_grad(), timing.autocast(ctx.device, "bf16" if bf16 else "fp32")():
        planes = model.encode(image, io["depth"].to(ctx.device))
    err = _rel(planes.float(), io["planes"], norm=True)
    return f"{err:.1e}", "PASS" if err < (0.03 if bf16 else 1e-4) else "FAIL"


def _tiny_step(device, dtype, guided, seed=0):
    """One deterministic tiny G3DR training step (encode, render with or without depth guidance and
    gradient rescaling, L1 rgb + depth + opacity losses): (loss, gradients)."""
    from losses import depth_loss, opacity_loss, recon_loss
    from model import G3DR, MODEL_PRESETS
    from render import CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera
    torch.manual_seed(seed)
    model = G3DR(MODEL_PRESETS["tiny"]).to(device)
    batch = timing.images(2, 32, seed, device)
    side = 12  # rays per side
    rays_o, rays_d = get_rays(orbit_camera(CANONICAL_YAW, CANONICAL_PITCH).to(device).expand(2, 4, 4), FOV_DEGREES,
                              side)  # (2, R, 3)
    image_r, depth_r = (F.interpolate(batch[k], size=(side, side), mode="bilinear", align_corners=True)
                        for k in ("image", "depth"))
    with timing.autocast(torch.device(device), dtype)():
        out = model(batch["image"], batch["depth"], rays_o, rays_d, n_coarse=8, n_fine=8, perturb=False,
                    surface_depth=depth_r.flatten(2).transpose(1, 2), depth_guided_prob=float(guided))
    rgb = out["rgb"].transpose(1, 2).reshape(2, 3, side, side)  # (B, R, 3) -> (B, 3, side, side)
    pred_depth = out["depth"].transpose(1, 2).reshape(2, 1, side, side)
    loss = recon_loss(rgb, image_r) + 2 * depth_loss(pred_depth, depth_r) + opacity_loss(out["opacity"])
    grads = torch.autograd.grad(loss, list(model.parameters()))
    return loss.detach(), [g.detach().cpu() for g in grads]


def check_step_vs_cpu(ctx):
    worst_loss, worst_grad = 0.0, 0.0
    for guided in (True, False):
        loss_d, grads_d = _tiny_step(ctx.device, "fp32", guided)
        loss_c, grads_c = _tiny_step("cpu", "fp32", guided)
        worst_loss = max(worst_loss, _rel(loss_d, loss_c))
        worst_grad = max(worst_grad, max(_rel(a, b, norm=True) for a, b in zip(grads_d, grads_c)))
    return f"loss {worst_loss:.1e}, gradients {worst_grad:.1e} (guided and importance-sampled)", \
        "PASS" if worst_loss < 1e-5 and worst_grad < 1e-4 else "FAIL"


def check_bf16_vs_fp32(ctx):
    loss32, grads32 = _tiny_step(ctx.device, "fp32", True)
    loss16, grads16 = _tiny_step(ctx.device, "bf16", True)
    a, b = torch.cat([g.flatten() for g in grads16]).double(), torch.cat([g.flatten() for g in grads32]).double()
    cosine = (a @ b / (a.norm() * b.norm())).item()
    err = _rel(loss16, loss32)
    return f"loss {err:.2%}, gradient cosine {cosine:.5f}", "PASS" if err < 0.03 and cosine > 0.99 else "FAIL"


def check_train_resume(ctx):
    """train.py dies during step 4, after its step-3 checkpoint; `train.py --resume` then runs steps 4 and 5."""
    out = Path(tempfile.mkdtemp(prefix="g3dr-check-")) / "run"
    # step 4's sample grid cannot be written (a directory holds its name), so the run fails there, as a run
    # killed between two checkpoints would: step 4 is logged but not saved
    blocker = out / "samples_0000004.png"
    blocker.mkdir(parents=True)
    died = _python(["train.py", *TRAIN_TINY, "--max_steps", "5", "--save_every", "3", "--sample_every", "4",
                    "--device", ctx.args.device, "--out_dir", str(out)], ctx, check=False)
    first = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    blocker.rmdir()
    _python(["train.py", "--resume", "--out_dir", str(out)], ctx)
    final = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    records = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps, losses_ok = [r["step"] for r in records], all(math.isfinite(r["loss"]) for r in records)
    ok = died.returncode != 0 and first == 3 and final == 5 and steps == [1, 2, 3, 4, 5] and losses_ok
    return f"died at step 4 (exit {died.returncode}) with the step-{first} checkpoint, resumed to {final}, " \
           f"logged steps {steps}, finite losses {losses_ok}", "PASS" if ok else "FAIL"


# ---------------------------------------------------------------------------------------------
# D2: DDP (the speed rows B, C, D1 and F are timing.py's)

def ddp_smoke(ctx):
    out = Path(tempfile.mkdtemp(prefix="g3dr-ddp-")) / "run"
    r = _python(["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "train.py", *TRAIN_TINY,
                 "--max_steps", "2", "--save_every", "2", "--device", "cuda", "--out_dir", str(out)], ctx)
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    ok = step == 2 and "cuda:0" in r.stdout  # the start-up line names the process's own GPU, LOCAL_RANK 0
    return f"torchrun 1 process (nccl): exit 0, checkpoint at step {step}", "PASS" if ok else "FAIL"


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
    ("A8", "train.py dies at step 4, --resume to 5", "steps 1-5, finite", check_train_resume, False),
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


def _run_row(ctx, fn, tf32):
    """(value, status) of one row, within the time left; a row that breaks is reported, not raised."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    signal.setitimer(signal.ITIMER_REAL, max(ctx.left(), 0.01))
    try:
        return fn(ctx)
    except (_Deadline, subprocess.TimeoutExpired):
        return "stopped at the deadline", "SKIP (time)"
    except Exception as e:
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}", "FAIL"
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


def _run_rows(ctx, args):
    from outputs import write_json
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu, 1 thread"
    print(f"G3DR device check: {name}, torch {torch.__version__}, size {args.size}, deadline {args.deadline:.0f} s",
          flush=True)
    rows, start = {}, time.monotonic()
    for row_id, check, expect, fn, cuda_only in ROWS:
        if cuda_only and not ctx.cuda:
            value, status = "needs CUDA", "SKIP"
        elif row_id == "C9" and not args.compile:
            value, status = "pass --compile", "SKIP"
        elif ctx.left() <= 0:
            value, status = "deadline passed", "SKIP (time)"
        else:  # A: float32 references; the others as train.py runs (TF32 on)
            value, status = _run_row(ctx, fn, tf32=not row_id.startswith("A"))
        rows[row_id] = dict(check=check, value=value, expect=expect, status=status)
        print(f"[{time.monotonic() - start:6.1f} s] {row_id:<4} {status:<11} {check}: {value}", flush=True)
    _print_table(rows)
    if args.json:
        write_json({"device": name, "torch": torch.__version__, "size": args.size, "rows": rows}, args.json)
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
