"""
What makes a training run resumable and distributed: the batches as a function of the step alone, checkpoints
written atomically with every process's RNG state in a form the safe loader reads, and the torchrun set-up.
train.py uses these; the G3DR method itself is not here.
"""
import json
import os
import random

import numpy as np
import torch

from data import atomic_write

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


def make_loader(dataset, cfg, rank, world_size, start_step, accumulation):
    sampler = StepBatchSampler(len(dataset), cfg['batch_size'], rank, world_size, cfg['seed'],
                               start_step * accumulation, cfg['max_steps'] * accumulation)
    # The loader draws its workers' base seed from this generator, not from the global RNG, whose state a
    # resumed run has just restored from the checkpoint and must continue exactly.
    generator = torch.Generator().manual_seed(seed_from(cfg['seed'], rank, start_step))
    return torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=cfg['num_workers'],
                                       pin_memory=torch.cuda.is_available(), generator=generator)


# -----------------------------------------------------------------------------
# checkpoints: written atomically, so a run killed at any moment leaves the last good one intact

def save_checkpoint(path, state):
    atomic_write(path, lambda f: torch.save(state, f))  # a temporary PATH.tmp-PID, renamed into place


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


def seed_from(*numbers):
    """A well-mixed 32-bit seed from non-negative integers, e.g. (seed, rank, step)."""
    return int(np.random.SeedSequence(list(numbers)).generate_state(1)[0])


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
        s = seed_from(seed, rank, step)
        torch.manual_seed(s)  # CPU and every GPU
        np.random.seed(s)
        random.seed(s)
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


# -----------------------------------------------------------------------------
# several processes (torchrun)

def setup_distributed(device):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; plain `python train.py` is one process. Each process
    makes its own GPU the current one and touches no other."""
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
