"""
What every training script shares and the G3DR method does not: several processes (torchrun), batches as a
function of the step (so a resumed run continues exactly), every process's RNG state, the out folder and its
metrics log, and the plumbing of one optimiser step (gradient accumulation, the non-finite skip, checkpoints).
train.py (f_trigen), train_rgbd.py (f_rgbd) and train_sr.py (super-resolution) call these; each keeps its own
loop, which reads top to bottom.
"""
import contextlib
import functools
import json
import os
import random

import numpy as np
import torch

import checkpoint
from configurator import ConfigError
from outputs import atomic_write

# -----------------------------------------------------------------------------
# several processes (torchrun)

def setup_distributed(device):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is one process. Each process
    makes its own GPU the current one and touches no other. Returns (rank, world_size, device)."""
    if int(os.environ.get('WORLD_SIZE', 1)) > 1:
        local_rank = int(os.environ['LOCAL_RANK'])
        use_cuda = device.startswith('cuda')
        if use_cuda:
            device = f'cuda:{local_rank}'
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend='nccl' if use_cuda else 'gloo')
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
    if device.startswith('cuda'):
        torch.cuda.set_device(torch.device(device))
    return 0, 1, device


def _divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def _nearest(n, x):
    """The divisors of n nearest to x from below and from above, as 'a or b' (or the one there is)."""
    below, above = [d for d in _divisors(n) if d < x], [d for d in _divisors(n) if d > x]
    return ' or '.join(str(d) for d in (below[-1:] + above[:1]))


def split_batch(global_batch, world_size, max_batch, explicit=False):
    """(micro-batch per process, accumulation steps) so that every optimiser step sees exactly global_batch
    images: global_batch = world_size x micro-batch x accumulation. explicit=False (the user did not set
    --batch_size): the largest micro-batch <= max_batch (the recipe's, so memory does not grow) that divides
    this process's share; explicit=True: max_batch itself, which must divide the share. One-line ConfigErrors
    name the nearest workable choices."""
    if global_batch % world_size:
        raise ConfigError(f"--global_batch {global_batch} cannot be split over {world_size} processes; use "
                          f"{_nearest(global_batch, world_size)} processes, or a --global_batch that is a "
                          f"multiple of {world_size}")
    share = global_batch // world_size
    if explicit:
        if share % max_batch:
            raise ConfigError(f"--batch_size {max_batch} does not divide the {share} images per process of "
                              f"--global_batch {global_batch} over {world_size} process(es); use --batch_size "
                              f"{_nearest(share, max_batch)}, or leave it out to have it chosen")
        return max_batch, share // max_batch
    micro = max(d for d in _divisors(share) if d <= max(1, max_batch))
    return micro, share // micro


# -----------------------------------------------------------------------------
# data: a deterministic, resumable, distributed stream of batches

class StepBatchSampler:
    """Yields the dataset indices of this process's batch for (micro-)steps start_step, start_step + 1, ...
    Global sample g = (step * world_size + rank) * batch_size + i reads position g mod n of the
    permutation of epoch g // n. The batches are a function of the step alone, so a resumed run
    continues exactly where it stopped, and no two processes see the same sample in an epoch.
    With gradient accumulation the steps here are micro-steps: optimiser step s, micro-step k is
    s * accumulation + k, so a step's images are the same on any number of processes."""

    def __init__(self, n, batch_size, rank, world_size, seed, start_step, max_steps):
        self.n, self.batch_size, self.rank, self.world_size = n, batch_size, rank, world_size
        self.seed, self.start_step, self.max_steps = seed, start_step, max_steps
        self._perms = {}

    def _perm(self, epoch):
        if epoch not in self._perms:
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}  # keep memory flat
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def batch(self, step):
        first = (step * self.world_size + self.rank) * self.batch_size
        return [int(self._perm(g // self.n)[g % self.n]) for g in range(first, first + self.batch_size)]

    def __iter__(self):
        for step in range(self.start_step, self.max_steps):
            yield self.batch(step)

    def __len__(self):
        return max(0, self.max_steps - self.start_step)


def make_loader(dataset, batch_size, num_workers, seed, rank, world_size, start_step, accumulation, max_steps):
    """This process's micro-batches for optimiser steps start_step .. max_steps - 1 (StepBatchSampler)."""
    sampler = StepBatchSampler(len(dataset), batch_size, rank, world_size, seed,
                               start_step * accumulation, max_steps * accumulation)
    # The loader draws its workers' base seed from this generator, not from the global RNG, whose state a
    # resumed run has just restored from the checkpoint and must continue exactly.
    generator = torch.Generator().manual_seed(seed_from(seed, rank, start_step))
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                                       pin_memory=torch.cuda.is_available(), generator=generator)


# -----------------------------------------------------------------------------
# random number generators: seeded per process, saved and restored per process

def seed_from(*numbers):
    """A well-mixed 32-bit seed from non-negative integers, e.g. (seed, rank, step)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


def seed_all(seed):
    """torch (CPU and every GPU), numpy and Python's random from one seed."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state(device):
    """This process's RNG state as tensors and plain lists (safe to load): CPU, numpy, python, and
    its own GPU's when it runs on one."""
    _, key, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss = random.getstate()
    state = dict(torch=torch.get_rng_state(),
                 numpy=dict(key=torch.from_numpy(key.astype(np.int64)), pos=int(pos), has_gauss=int(has_gauss),
                            cached_gaussian=float(cached_gaussian)),
                 python=[version, list(internal), gauss])
    if str(device).startswith('cuda'):
        state['cuda'] = torch.cuda.get_rng_state(device)
    return state


def rng_states(device, world_size):
    """Every process's rng_state, indexed by rank (a collective: every process calls it)."""
    if world_size == 1:
        return [rng_state(device)]
    states = [None] * world_size
    torch.distributed.all_gather_object(states, rng_state(device))
    return states


def set_rng_state(states, rank, step, seed, device):
    """Restore this process's RNG state from a checkpoint's per-rank list. A rank the saved run did not
    have (resumed on more processes) seeds from (seed, rank, step) instead: deterministic, and distinct
    per rank. Checkpoints from before per-rank states hold one dict (numpy state as a tuple, the GPU
    states of every visible device): it is rank 0's."""
    states = [states] if isinstance(states, dict) else list(states or [])
    if rank >= len(states):
        seed_all(seed_from(seed, rank, step))
        return
    state = states[rank]
    torch.set_rng_state(state['torch'])
    n = state['numpy']
    np.random.set_state(n if isinstance(n, tuple) else
                        ('MT19937', n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['cached_gaussian']))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    cuda = state.get('cuda')
    if str(device).startswith('cuda') and cuda is not None:
        if isinstance(cuda, (list, tuple)):  # the older layout: one state per visible GPU
            index = torch.device(device).index or 0
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)


# -----------------------------------------------------------------------------
# the out folder: metrics.jsonl and checkpoints

def trim_metrics(path, last_step):
    """On resume, drop metric lines logged after the checkpoint we continue from."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [l for l in f if l.strip() and json.loads(l).get('step', 0) <= last_step]
    atomic_write(path, lambda f: f.write(''.join(lines).encode()))


def prepare_out_dir(out_dir, start_step):
    """Rank 0 at start-up: make out_dir, drop metric lines after start_step (trim_metrics) and remove what a
    run killed in the middle of a save left behind (atomic_write's ckpt.pt.tmp-PID)."""
    os.makedirs(out_dir, exist_ok=True)
    trim_metrics(os.path.join(out_dir, 'metrics.jsonl'), start_step)
    for name in os.listdir(out_dir):
        if name.startswith('ckpt.pt.tmp-'):
            os.remove(os.path.join(out_dir, name))


def log_metrics(out_dir, record):
    """Append one JSON line to out_dir/metrics.jsonl."""
    with open(os.path.join(out_dir, 'metrics.jsonl'), 'a') as f:
        f.write(json.dumps(record) + '\n')


def run_checkpoint(resuming, out_dir, kind, trust):
    """The checkpoint to continue from (--resume) or None; a new run refuses to overwrite one."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if resuming:
        if not os.path.exists(path):
            raise ConfigError(f"--resume: no checkpoint at {path}")
        return checkpoint.load_run(path, kind, trust=trust)
    if os.path.exists(path):
        raise ConfigError(f"{path} already exists: pass --resume to continue that run, or pick another --out_dir")
    return None


def continue_run(argv, cfg, kind, config, recipes, parse_config):
    """(config, checkpoint) of a training script's command line: (cfg, None) for a new run; with --resume, the
    run's own config with this command line's overrides on top, and its checkpoint of `kind`. Trust is never
    inherited; a key the saved run did not have takes its recipe's value, a key the script no longer has is
    dropped. parse_config(argv, base=...) is the script's own, with its checks."""
    ckpt = run_checkpoint(cfg['resume'], cfg['out_dir'], kind, cfg['trust_checkpoint'])
    if ckpt is None:
        return cfg, None
    saved = {k: v for k, v in ckpt['config'].items() if k in config and k != 'trust_checkpoint'}
    cfg = parse_config(argv, base={**config, **recipes[saved['dataset']], **saved})
    check_schedule(cfg['max_steps'], ckpt, cfg['out_dir'])
    return cfg, ckpt


def check_schedule(max_steps, ckpt, out_dir):
    """A resumed run may stop earlier than planned, not later: its one-cycle schedule has a fixed length."""
    if max_steps > ckpt['scheduler']['total_steps']:
        raise ConfigError(f"--max_steps {max_steps} is beyond the one-cycle schedule of the run in {out_dir} "
                          f"({ckpt['scheduler']['total_steps']} steps); start a new run to train longer")


def make_optimizer(model, lr, betas, weight_decay, max_steps, warmup_frac, div_factor, cycle_beta1):
    """Adam + one-cycle: warm up from lr / div_factor over warmup_frac of the steps, then cosine-anneal.
    With cycle_beta1 (as released), Adam's beta1 moves the other way, 0.95 -> 0.85 at the peak lr -> 0.95
    (torch's defaults, which the release keeps)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=max_steps,
                                                    pct_start=warmup_frac, div_factor=div_factor,
                                                    cycle_momentum=cycle_beta1, base_momentum=0.85,
                                                    max_momentum=0.95)
    return optimizer, scheduler


def restore(ckpt, model, optimizer, scheduler, rank, seed, device):
    """Load a resumed run's state into the objects and this process's RNGs; returns the step to start at."""
    if ckpt is None:
        return 0
    model.load_state_dict(ckpt['model'])
    optimizer.load_state_dict(ckpt['optimizer'])
    scheduler.load_state_dict(ckpt['scheduler'])
    set_rng_state(ckpt.get('rng'), rank, ckpt['step'], seed, device)
    return ckpt['step']


def save_run(path, kind, model, model_config, optimizer, scheduler, step, config, device, rank, world_size):
    """Called by every process: each contributes its own RNG state (a collective); rank 0 writes, atomically.
    Everything in the file is tensors and plain Python values, so the safe loader reads it."""
    rng = rng_states(device, world_size)
    if rank == 0:
        checkpoint.save(path, checkpoint.training_state(kind, model, model_config, step=step, config=config,
                                                        optimizer=optimizer, scheduler=scheduler, rng=rng))


# -----------------------------------------------------------------------------
# one optimiser step: accumulation and the non-finite skip

def describe(model, device, world_size, batch_size, accumulation, global_batch):
    """The start-up line's middle: parameters, device and how global_batch is split."""
    processes = f"{world_size} process{'es' if world_size > 1 else ''}"
    return (f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters | {device} | {processes} "
            f"x {batch_size} micro-batch x {accumulation} accumulation = {global_batch} images a step")


def autocast_for(device, dtype):
    """The context a training step's network runs in: torch.autocast to `dtype` (bf16 opt-in) or nothing.
    Returned as a callable so that every micro-batch enters a fresh context."""
    if dtype is None:
        return contextlib.nullcontext
    torch.backends.cuda.matmul.allow_tf32 = True
    return functools.partial(torch.autocast, device_type=torch.device(device).type, dtype=dtype)


def all_finite(loss, world_size):
    """True when this micro-batch's loss is finite on every process (a collective with several), so that
    all of them skip a bad step together."""
    finite = torch.isfinite(loss.detach()).float()
    if world_size > 1:
        torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
    return finite.item() == 1


def backward(net, loss, accumulation, last, world_size):
    """loss / accumulation backward, so that the step's gradient is the mean over all its images. DDP
    averages over the processes once, on the last micro-batch; the others run under no_sync."""
    with contextlib.nullcontext() if world_size == 1 or last else net.no_sync():
        (loss / accumulation).backward()


def apply_step(model, optimizer, grad_clip, ok):
    """Clip (grad_clip 0: no clipping) and step, unless the step already went bad or its gradient is not
    finite (gradients are synchronised here, so every process decides alike). Returns whether it stepped."""
    if ok:
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or float('inf'))
        ok = bool(torch.isfinite(grad_norm))
    if ok:
        optimizer.step()
    else:
        optimizer.zero_grad(set_to_none=True)
    return ok


def count_bad(ok, bad_in_row, policy, step, ckpt_path):
    """The number of non-finite steps in a row after this one; stops the run on policy 'stop' or after 20."""
    if ok:
        return 0
    bad_in_row += 1
    if policy == 'stop' or bad_in_row >= 20:
        raise FloatingPointError(f"non-finite loss or gradient at step {step} ({bad_in_row} in a row); "
                                 f"the last good checkpoint is {ckpt_path}")
    return bad_in_row
