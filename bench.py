"""
Benchmarks. One subcommand per benchmark, each printing one table:

    python bench.py render                       # forward+backward of render_rays with the triplane field
    python bench.py render --device cuda --batch 8 --iters 20
    python bench.py train                        # one full training step, small model, synthetic recipe
    python bench.py train --size paper           # the released recipe's step (f_trigen 147M, 128 x 128)
    python bench.py gpu                          # the one-shot device check of a new GPU (gpu_check.py)
    python bench.py gpu --device cpu --size tiny # the same rows on the CPU, in seconds
    python bench.py ablate                       # the paper's ablations trained and scored on the synthetic scenes

Timings on a shared machine are noisy: the table shows the load average next to the numbers.
To add a benchmark, write add_X_args(parser) and bench_X(args) and register them in BENCHMARKS.
"""
import argparse
import math
import os
import resource
import statistics
import sys
import time

import torch

from configurator import resolve_device
from model import Decoder, make_field
from outputs import atomic_write, write_json
from render import CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera, render_rays
from timing import time_calls


def _peak_memory(device):
    """(label, MiB): CUDA: torch's peak allocation; CPU: the process's peak resident set size."""
    if device.type == "cuda":
        return "peak CUDA alloc", torch.cuda.max_memory_allocated(device) / 2 ** 20
    return "peak RSS (process)", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10  # KiB on Linux


def _print_table(title, rows):
    """rows: list of (name, value) pairs, printed as one two-column table."""
    width = max(len(name) for name, _ in rows)
    print(f"\n{title}")
    print("-" * (width + 16))
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    print("-" * (width + 16))


# --- render ----------------------------------------------------------------------------------

def add_render_args(p):
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--plane_res", type=int, default=128, help="triplane resolution H = W")
    p.add_argument("--channels", type=int, default=64, help="triplane channels C")
    p.add_argument("--rays_res", type=int, default=64, help="render an S x S image (S*S rays)")
    p.add_argument("--n_coarse", type=int, default=32)
    p.add_argument("--n_fine", type=int, default=32)
    p.add_argument("--depth_guided_prob", type=float, default=1.0,
                   help="1: depth-guided fine samples (default, fixed work per step); 0: importance sampling")
    p.add_argument("--device", default="auto", help="auto (the GPU if any), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def bench_render(args):
    """Forward + backward of one canonical-view training render: triplane field (pyramid built once
    per render), render_rays with surface_depth (gradient rescaling on) and a training-like loss."""
    device = torch.device(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    B, S = args.batch, args.rays_res
    planes = torch.randn(B, 3, args.channels, args.plane_res, args.plane_res, device=device, requires_grad=True)
    decoder = Decoder(args.channels).to(device)
    cam2world = orbit_camera(CANONICAL_YAW, CANONICAL_PITCH).to(device).expand(B, 4, 4)  # the canonical camera
    rays_o, rays_d = get_rays(cam2world, FOV_DEGREES, S)  # (B, S*S, 3)
    surface = 4.5 + torch.rand(B, S * S, 1, device=device)  # a depth map inside the box
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 10
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step():
        field = make_field(planes, decoder)
        out = render_rays(field, rays_o, rays_d, n_coarse=args.n_coarse, n_fine=args.n_fine, perturb=True,
                          surface_depth=surface, depth_guided_prob=args.depth_guided_prob)
        loss = out["rgb"].abs().mean() + 2 * (out["depth"] - surface).abs().mean() + (1 - out["opacity"]).mean()
        loss.backward()
        planes.grad = None
        decoder.zero_grad(set_to_none=True)

    times = time_calls(step, device, args.warmup, args.iters)
    med = statistics.median(times)
    n_samples = B * S * S * (args.n_coarse + args.n_fine)
    mem_label, mem = _peak_memory(device)
    if device.type == "cpu":
        mem_text = f"{mem:.0f} MiB ({mem - rss_start:+.0f} MiB during the runs)"
    else:
        mem_text = f"{mem:.0f} MiB"
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    _print_table("render_rays forward+backward (triplane field, depth-guided training render)", [
        ("config", f"batch {B}, planes {args.channels}x{args.plane_res}^2, rays {S}x{S}, "
                   f"samples {args.n_coarse}+{args.n_fine}, depth_guided_prob {args.depth_guided_prob}"),
        ("device", device_name),
        ("median ms", f"{med * 1e3:.1f}  (min {min(times) * 1e3:.1f}, max {max(times) * 1e3:.1f}, "
                      f"{len(times)} iters)"),
        ("million samples/s", f"{n_samples / med / 1e6:.2f}"),
        (mem_label, mem_text),
        ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ])


# --- train -----------------------------------------------------------------------------------

def add_train_args(p):
    p.add_argument("--size", default="small", choices=["tiny", "small", "paper"], help="model.MODEL_PRESETS key")
    p.add_argument("--image_size", type=int, default=None, help="default: the preset's (64 small, 128 paper)")
    p.add_argument("--batch", type=int, default=None, help="default: the recipe's (synthetic 4, imagenet 8)")
    p.add_argument("--render_size", type=int, default=None, help="default: the recipe's (32 small, 128 paper)")
    p.add_argument("--n_coarse", type=int, default=None)
    p.add_argument("--n_fine", type=int, default=None)
    p.add_argument("--projection", default=None, choices=["official", "yz"])
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"], help="default: the recipe's (float32)")
    p.add_argument("--device", default="auto", help="auto (the GPU if any), cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)


def bench_train(args):
    """One full canonical training step of train.py (encode, depth-guided render, with gradient rescaling
    where the recipe has it, L1 rgb + depth + opacity losses, backward, Adam): the synthetic recipe for the small
    size, the released ImageNet recipe for the paper size. VGG/CLIP terms are left out (their
    pretrained weights are not always at hand); their cost is that of the frozen backbones."""
    import train
    from scenes import SyntheticScenes
    from model import G3DR, MODEL_PRESETS
    device = torch.device(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = ["--dataset", "imagenet", "--data_dir", "-"] if args.size == "paper" else []
    overrides = {k: getattr(args, k) for k in ("image_size", "render_size", "n_coarse", "n_fine", "projection", "dtype")
                 if getattr(args, k) is not None}
    if args.batch is not None:
        overrides["batch_size"] = args.batch
    argv = recipe + [f"--{k}={v}" for k, v in overrides.items()]
    cfg = train.parse_config(argv + ["--p_novel_max=0", "--w_vgg=0", "--w_vgg_novel=0", "--w_clip=0",
                                     "--w_clip_novel=0", "--max_steps=1000"])
    image_size = args.image_size or MODEL_PRESETS[args.size]["image_size"]
    cfg["image_size"] = image_size
    torch.manual_seed(0)
    model = G3DR(dict(MODEL_PRESETS[args.size], image_size=image_size, projection=cfg["projection"],
                       aligned_plane=cfg["aligned_plane"])).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-5)
    scenes = SyntheticScenes(cfg["batch_size"], image_size=image_size, seed=0)
    batch = torch.utils.data.default_collate([scenes[i] for i in range(len(scenes))])
    from contextlib import nullcontext
    amp_dtype = train.DTYPES[cfg["dtype"]]  # as train.py: autocast only with --dtype bfloat16
    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype is not None else nullcontext
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    image, depth = batch["image"].to(device), batch["depth"].to(device)  # (B, 3, S, S) in [0, 1], (B, 1, S, S)

    def encode_only():
        with autocast():
            planes = model.encode(image, depth)
        planes.float().square().mean().backward()
        optimizer.zero_grad(set_to_none=True)

    def full_step():
        loss, _, _ = train.trigen_losses(model, batch, 1000, 0, cfg, {}, device, autocast)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    t_encode, t_step = (statistics.median(time_calls(fn, device, args.warmup, args.iters))
                        for fn in (encode_only, full_step))
    B, side = cfg["batch_size"], cfg["render_size"]  # rays per side of the rendered view
    mem_label, mem = _peak_memory(device)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"cpu, {torch.get_num_threads()} threads"
    _print_table("train.py step, forward+backward+Adam (canonical view)", [
        ("config", f"{args.size} ({sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params), batch {B}, "
                   f"image {image_size}, render {side}x{side}, samples {cfg['n_coarse']}+{cfg['n_fine']}, "
                   f"projection {cfg['projection']}"),
        ("device", device_name + (", bf16 autocast" if amp_dtype is not None else ", float32")),
        ("median ms / step", f"{t_step * 1e3:.1f}"),
        ("  of which f_trigen fwd+bwd", f"{t_encode * 1e3:.1f}"),
        ("images/s", f"{B / t_step:.2f}"),
        ("million samples/s", f"{B * side ** 2 * (cfg['n_coarse'] + cfg['n_fine']) / t_step / 1e6:.2f}"),
        (mem_label, f"{mem:.0f} MiB"),
        ("load average", " ".join(f"{x:.2f}" for x in os.getloadavg())),
    ])


# --- gpu ---------------------------------------------------------------------------------------

def add_gpu_args(p):
    import gpu_check
    gpu_check.add_args(p)


def bench_gpu(args):
    """The one-shot device check: correctness, speed, capacity and the recipe's projected time."""
    import gpu_check
    sys.exit(gpu_check.run(args))


# --- ablate ----------------------------------------------------------------------------------

# The paper's claims, tested on the synthetic scenes' ground truth: each variant is the paper's recipe (the
# synthetic recipe of train.py with the paper's mechanisms and opacity schedule: PAPER) with one switch changed.
# The synthetic default itself has gradient rescaling off, a shorter opacity ramp, the aligned y-z plane and
# twice the learning rate (train.py says why); PAPER pins what the ablation tables in assets/ were trained with.
PAPER = ["--gradient_rescaling", "true", "--opacity_ramp", "0.5", "--aligned_plane", "false", "--lr", "1e-3"]
ABLATIONS = {
    "full recipe": PAPER,
    "no gradient rescaling (Sec. 3.2)": PAPER + ["--gradient_rescaling", "false"],
    "no depth-guided samples (Sec. 3.2)": PAPER + ["--depth_guided_prob", "0"],
    "no depth loss": PAPER + ["--w_depth", "0"],
    "single-resolution sampling, 1 level (Sec. 3.3)": PAPER + ["--levels", "1"],
    "'official' projection (no y-z plane)": PAPER + ["--projection", "official"],
    "no novel steps": PAPER + ["--p_novel_max", "0"],
}
ABLATION_COLUMNS = ["psnr_canonical", "psnr_novel", "depth_mae_novel", "opacity_yaw30", "nfs", "psnr_canonical_mean",
                    "psnr_novel_static", "psnr_novel_warp", "depth_mae_novel_static"]
# the variants the picture shows (first seed's runs), beside the truth: what each mechanism does to novel views
PICTURE_VARIANTS = [0, 1, 3, 4]
PICTURE_VIEW = (math.pi / 6, 0.0)  # (yaw, pitch) offset of the pictured view: 30 degrees to the side


def add_ablate_args(p):
    p.add_argument("--steps", type=int, default=300, help="training steps per run (the schedules scale with it)")
    p.add_argument("--seeds", type=int, nargs="+", default=[1337, 1], help="one run per seed and variant")
    p.add_argument("--eval_scenes", type=int, default=8, help="held-out scenes per run (seed + 1, as evaluate.py)")
    p.add_argument("--variants", nargs="+", default=None, help="a subset of the variants, by number (0 = full)")
    p.add_argument("--out_dir", default="out-ablate", help="runs, ablate.json and ablate.md go here; finished "
                   "runs (with an eval.json) are reused, so an interrupted table continues where it stopped")
    p.add_argument("--extra", default="", help="more train.py overrides for every run, e.g. '--n_coarse 8'")
    p.add_argument("--eval_extra", default="", help="more evaluate.py options, e.g. '--n_coarse 32 --n_fine 32'")


def _run_script(argv, log_path):
    import subprocess
    with open(log_path, "w") as log:
        r = subprocess.run([sys.executable] + argv, stdout=log, stderr=subprocess.STDOUT,
                           cwd=os.path.dirname(os.path.abspath(__file__)))
    if r.returncode != 0:
        raise SystemExit(f"error: {' '.join(argv[:2])} failed, see {log_path}")


def _write_text(path, text):
    atomic_write(path, lambda f: f.write(text.encode()))


@torch.no_grad()
def ablation_picture(ckpts, path, scenes=4, n_samples=64):
    """One row per checkpoint, after a row of truth: RGB and depth of held-out scenes (evaluate.py's, of the
    default seed) seen from PICTURE_VIEW, each encoded from its canonical RGB-D. ckpts: paths in row order."""
    from outputs import colorize_depth, save_grid
    from sample import HELDOUT_SEED, load_model
    from scenes import SyntheticScenes
    yaw, pitch = CANONICAL_YAW + PICTURE_VIEW[0], CANONICAL_PITCH + PICTURE_VIEW[1]
    models = [load_model(ckpt, False, "cpu")[0] for ckpt in ckpts]
    held_out = SyntheticScenes(scenes, image_size=models[0].config["image_size"], seed=HELDOUT_SEED)
    items = [held_out[i] for i in range(scenes)]
    image, depth = torch.stack([x["image"] for x in items]), torch.stack([x["depth"] for x in items])  # canonical
    rows = [held_out.render_views(list(range(scenes)), yaw, pitch)]  # the truth: (n, 3, S, S), (n, 1, S, S)
    for model in models:
        rows.append(model.render_view(model.encode(image, depth), yaw, pitch, held_out.image_size,
                                      n_coarse=n_samples, n_fine=n_samples))
    cells = [torch.stack([rgb, colorize_depth(depth)], 1).flatten(0, 1) for rgb, depth in rows]  # (2 scenes, 3, S, S)
    save_grid(torch.cat(cells), path, nrow=2 * scenes)


def _run_dir(name, seed, args):
    """The folder of one variant's run with one seed."""
    return os.path.join(args.out_dir, f"v{list(ABLATIONS).index(name)}_seed{seed}")


def _ablation_run(name, seed, args):
    """Train and score one variant (skipped when its eval.json exists); returns its eval.json as a dict."""
    import json
    run_dir = _run_dir(name, seed, args)
    eval_path = os.path.join(run_dir, "eval.json")
    if not os.path.exists(eval_path):
        if os.path.exists(os.path.join(run_dir, "ckpt.pt")):  # an unfinished run: start it again
            os.remove(os.path.join(run_dir, "ckpt.pt"))
        os.makedirs(run_dir, exist_ok=True)
        _run_script(["train.py", "--max_steps", str(args.steps), "--seed", str(seed), "--out_dir", run_dir,
                     "--sample_every", str(args.steps), "--save_every", str(args.steps)]
                    + ABLATIONS[name] + args.extra.split(), os.path.join(run_dir, "train.log"))
        _run_script(["evaluate.py", "--ckpt", os.path.join(run_dir, "ckpt.pt"), "--scenes", str(args.eval_scenes)]
                    + args.eval_extra.split(), os.path.join(run_dir, "eval.log"))
    with open(eval_path) as f:
        return json.load(f)


def _ablation_markdown(table, args, wall_s):
    header = ["variant", "PSNR canonical", "PSNR novel", "depth err. novel", "opacity ±30° (min)", "NFS",
              "mean-colour image (canon.)", "static (novel)", "warp (novel)", "static depth err."]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, row in table.items():
        cells = [f"{row[k]['mean']:.2f} ± {row[k]['half_range']:.2f}" if "psnr" in k or k == "nfs"
                 else f"{row[k]['mean']:.3f} ± {row[k]['half_range']:.3f}" for k in ABLATION_COLUMNS]
        lines.append("| " + " | ".join([name] + cells) + " |")
    note = (f"\n{args.steps} steps per run, seeds {' '.join(map(str, args.seeds))} (held-out scenes: seed + 1, "
            f"{args.eval_scenes} per run); mean ± half the range over the seeds. Baseline columns score the "
            f"input itself on the same pixels. Wall time {wall_s} s.\n")
    return "\n".join(lines) + "\n" + note


def bench_ablate(args):
    """Train every variant of ABLATIONS for the same steps on the same scenes (one run per seed),
    score each with `evaluate.py` (its eval.json beside the checkpoint) and write a markdown table, a
    JSON file and a picture (ablation_picture of PICTURE_VARIANTS)."""
    from tqdm import tqdm
    names = list(ABLATIONS)
    if args.variants:
        names = [names[int(i)] for i in args.variants]
    os.makedirs(args.out_dir, exist_ok=True)
    runs = [(name, seed) for name in names for seed in args.seeds]
    results = {name: [] for name in names}
    t_start = time.time()
    for name, seed in tqdm(runs, desc="ablate"):
        results[name].append(_ablation_run(name, seed, args))
    table = {}
    for name, evals in results.items():
        row = {}
        for key in ABLATION_COLUMNS:
            values = [r[key] for r in evals]
            row[key] = dict(mean=statistics.mean(values), half_range=(max(values) - min(values)) / 2, runs=values)
        row["per_view_psnr"] = {view: statistics.mean(r["per_view"][view]["psnr"] for r in evals)
                                for view in evals[0]["per_view"]}
        table[name] = row
    pictured = [n for n in (list(ABLATIONS)[i] for i in PICTURE_VARIANTS) if n in names]
    ablation_picture([os.path.join(_run_dir(n, args.seeds[0], args), "ckpt.pt") for n in pictured],
                     os.path.join(args.out_dir, "ablate.png"))
    meta = dict(steps=args.steps, seeds=args.seeds, eval_scenes=args.eval_scenes, extra=args.extra,
                overrides={n: ABLATIONS[n] for n in names}, wall_s=round(time.time() - t_start),
                load_average=os.getloadavg(), picture=dict(file="ablate.png", rows=["truth"] + pictured,
                                                           view_offset_degrees=[30, 0], seed=args.seeds[0]))
    write_json(dict(meta=meta, table=table), os.path.join(args.out_dir, "ablate.json"))
    text = _ablation_markdown(table, args, meta["wall_s"])
    _write_text(os.path.join(args.out_dir, "ablate.md"), text)
    print(text)


BENCHMARKS = {
    "render": (add_render_args, bench_render),
    "train": (add_train_args, bench_train),
    "gpu": (add_gpu_args, bench_gpu),
    "ablate": (add_ablate_args, bench_ablate),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="benchmark", required=True)
    for name, (add_args, run) in BENCHMARKS.items():
        p = sub.add_parser(name, help=run.__doc__.splitlines()[0])
        add_args(p)
        p.set_defaults(run=run)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main(sys.argv[1:])
