"""
Benchmarks. One subcommand per benchmark, each printing one table:

    python bench.py render                       # forward+backward of render_rays with the triplane field
    python bench.py render --device cuda --batch 8 --iters 20

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

from model import Decoder, make_field
from render import get_rays, orbit_camera, render_rays


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--iters", type=int, default=5, help="timed iterations (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)


def bench_render(args):
    """Forward + backward of one canonical-view training render: triplane field (pyramid built once
    per render), render_rays with surface_depth (gradient rescaling on) and a training-like loss."""
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    B, S = args.batch, args.rays_res
    planes = torch.randn(B, 3, args.channels, args.plane_res, args.plane_res, device=device, requires_grad=True)
    decoder = Decoder(args.channels).to(device)
    cam2world = orbit_camera(math.pi / 2, math.pi / 2).to(device).expand(B, 4, 4)  # the canonical camera
    rays_o, rays_d = get_rays(cam2world, 18.0, S)  # (B, S*S, 3)
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

    times = []
    for i in range(args.warmup + args.iters):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
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


BENCHMARKS = {
    "render": (add_render_args, bench_render),
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
