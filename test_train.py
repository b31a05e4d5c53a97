"""Tests of train.py: config overrides, the recipe's schedules, the resumable sampler, and real runs
(loss goes down, resume after SIGKILL, two-process gloo keeps ranks identical)."""
import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import random
import shutil
import torch

import resume
import train
from model import UnsafeCheckpointError
from test_model import write_malicious_checkpoint

REPO = Path(__file__).resolve().parent
# A tiny model and tiny renders so a real run takes seconds on a 2-core CPU.
TINY = ['--model_size', 'tiny', '--image_size', '32', '--render_size', '16', '--n_coarse', '8', '--n_fine', '8',
        '--batch_size', '4', '--num_scenes', '64', '--sample_every', '1000', '--log_every', '1']


def run_train(args, **kwargs):
    return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, **kwargs)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


# -----------------------------------------------------------------------------
# config

def test_overrides_both_forms_and_types():
    before = dict(train.config)
    cfg = train.parse_config(['--max_steps', '12', '--lr=0.5', '--resume', '--out_dir=x', '--compile', 'false'])
    assert cfg['max_steps'] == 12 and isinstance(cfg['max_steps'], int)
    assert cfg['lr'] == 0.5 and cfg['resume'] is True and cfg['out_dir'] == 'x' and cfg['compile'] is False
    assert cfg['batch_size'] == train.config['batch_size']  # keys not given: the config's own values
    assert train.config == before  # the global dict itself is untouched


def test_config_declares_values():
    # the config dict is the synthetic recipe, every value declared (no None placeholders)
    assert all(v is not None for v in train.config.values())
    assert train.parse_config([]) == dict(train.config)


def test_imagenet_selects_released_recipe():
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', '/data/imagenet'])
    assert (cfg['model_size'], cfg['image_size'], cfg['batch_size'], cfg['lr']) == ('paper', 128, 8, 5e-5)
    assert (cfg['max_steps'], cfg['n_coarse'], cfg['n_fine']) == (300_000, 32, 32)
    assert (cfg['beta2'], cfg['warmup_frac'], cfg['div_factor']) == (0.99, 0.02, 25.0)
    assert (cfg['w_rgb'], cfg['w_depth'], cfg['w_vgg'], cfg['w_clip']) == (1.0, 2.0, 1.0, 0.175)
    assert (cfg['w_clip_novel'], cfg['w_tv_novel'], cfg['w_vgg_novel']) == (0.35, 0.1, 2.0)
    # the release's optimisation: no clipping, beta1 cycling with the lr, fp32, 48 images a step, LPIPS weights
    assert (cfg['grad_clip'], cfg['cycle_beta1'], cfg['dtype'], cfg['global_batch']) == (0, True, 'float32', 48)
    assert cfg['lpips_weights'] == 'lpips'
    # command-line keys win over the recipe
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x', '--global_batch', '16', '--lr', '1e-4'])
    assert (cfg['global_batch'], cfg['lr'], cfg['batch_size']) == (16, 1e-4, 8)


def test_rgbd_stage_recipe_comes_first_and_overrides_win():
    cfg = train.parse_config(['--stage', 'rgbd'])
    assert (cfg['image_size'], cfg['batch_size'], cfg['global_batch']) == (32, 16, 16)
    assert train.parse_config(['--stage', 'rgbd', '--image_size', '64'])['image_size'] == 64
    assert train.parse_config(['--stage', 'rgbd', '--dataset', 'imagenet', '--data_dir', 'x'])['image_size'] == 128
    # the two stages write to different folders, the second where sample.py looks for it
    assert train.parse_config([])['out_dir'] == 'out'
    assert train.parse_config(['--stage', 'rgbd'])['out_dir'] == 'out-rgbd'
    assert train.parse_config(['--stage', 'rgbd', '--out_dir', 'mine'])['out_dir'] == 'mine'
    rgbd_ckpt = train.parse_config(['--stage', 'rgbd'])['out_dir'] + '/ckpt.pt'
    assert f"args.rgbd_ckpt or '{rgbd_ckpt}'" in (REPO / 'sample.py').read_text()  # sample.py's default


def test_accumulation_steps():
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])
    assert train.accumulation_steps(cfg, world_size=1) == 6      # one GPU: 8 x 6 = 48
    assert train.accumulation_steps(cfg, world_size=6) == 1      # the paper's 6 GPUs
    assert train.accumulation_steps(cfg, world_size=2) == 3
    with pytest.raises(train.ConfigError, match='--global_batch 48.*--batch_size 8.*5 process'):
        train.accumulation_steps(cfg, world_size=5)


@pytest.mark.parametrize('argv, facts', [
    (['--not_a_key', '1'], ['--not_a_key']),
    (['--max_steps', 'ten'], ['--max_steps', "'ten'"]),
    (['--lr', 'fast'], ['--lr', "'fast'"]),
    (['--resume', 'maybe'], ['--resume', "'maybe'"]),
    (['--dataset', 'mnist'], ['--dataset', "'mnist'"]),
    (['--dataset', 'imagenet'], ['imagenet', '--data_dir']),
    (['--max_steps'], ['--max_steps']),
    (['--batch_size', '0'], ['--batch_size', '0']),
    (['oops'], ["'oops'"]),
    (['--dtype', 'float16'], ['--dtype', 'float16']),
    (['--dtype', 'fp8'], ['--dtype', "'fp8'"]),
    (['--global_batch', '0'], ['--global_batch', '0']),
])
def test_config_errors(argv, facts):
    """A ConfigError on one line that names the key and the bad value."""
    with pytest.raises(train.ConfigError) as info:
        train.parse_config(argv)
    message = str(info.value)
    assert '\n' not in message
    for fact in facts:
        assert fact in message, (fact, message)


def test_cli_error_is_one_line_and_exit_1():
    r = run_train(['--max_steps', 'ten'])
    assert r.returncode == 1
    assert r.stderr.strip().count('\n') == 0 and 'expects an integer' in r.stderr


def test_help_lists_every_key_with_its_value():
    r = run_train(['--help'])
    assert r.returncode == 0
    for key in train.config:
        assert f'--{key}' in r.stdout

    def shown(stdout):
        return dict(line[2:].split()[:2] for line in stdout.splitlines() if line.startswith('--'))
    values = shown(r.stdout)
    assert values['lr'] == repr(train.config['lr']) and values['global_batch'] == repr(train.config['global_batch'])
    r = run_train(['--dataset', 'imagenet', '--help'])   # the values of the chosen dataset, no --data_dir needed
    assert r.returncode == 0
    values = shown(r.stdout)
    assert (values['lr'], values['global_batch'], values['grad_clip'], values['max_steps']) == \
        ('5e-05', '48', '0.0', '300000')
    assert shown(run_train(['--stage', 'rgbd', '--help']).stdout)['out_dir'] == "'out-rgbd'"


# -----------------------------------------------------------------------------
# the recipe's schedules (README §5)

def test_novel_probability_and_camera_curriculum():
    assert train.p_novel(299, train.parse_config(['--max_steps', '300'])) == 0.1  # the synthetic recipe's cap
    cfg = train.parse_config(['--max_steps', '300', '--p_novel_max', '0.4'])      # the released one
    assert train.p_novel(0, cfg) == 0 and train.p_novel(30, cfg) == pytest.approx(0.2)
    assert train.p_novel(60, cfg) == 0.4 and train.p_novel(299, cfg) == 0.4
    g = torch.Generator().manual_seed(0)
    yaw0, pitch0 = train.novel_camera(0, 4000, cfg, g)          # d = 24: yaw within +-7.5 degrees
    yaw1, pitch1 = train.novel_camera(100, 4000, cfg, g)        # d = 6 after the first third: +-30 degrees
    assert (yaw0 - math.pi / 2).abs().max() <= math.pi / 24 and (yaw0 - math.pi / 2).abs().max() > 0.95 * math.pi / 24
    assert (yaw1 - math.pi / 2).abs().max() <= math.pi / 6 and (yaw1 - math.pi / 2).abs().max() > 0.95 * math.pi / 6
    assert (pitch1 - math.pi / 2).abs().max() <= math.pi / 18


def test_terms_and_weights_per_step():
    # the released recipe (README §5) at given steps of a 300k-step run
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])
    T = cfg['max_steps']
    canonical = {step: train.term_weights(step, False, cfg) for step in (0, T // 10, T // 2 - 1, T // 2, T - 1)}
    novel = {step: train.term_weights(step, True, cfg) for step in (0, T // 10, T // 2, T - 1)}
    assert canonical[0] == dict(rgb=1.0, depth=2.0, vgg=0.0, clip=0.0, opacity=0.0)
    assert canonical[T // 10] == dict(rgb=1.0, depth=2.0, vgg=0.0, clip=0.0, opacity=pytest.approx(0.2))
    assert canonical[T // 2 - 1]['vgg'] == 0 and canonical[T // 2 - 1]['clip'] == 0   # first half: no perceptual
    assert canonical[T // 2] == dict(rgb=1.0, depth=2.0, vgg=1.0, clip=0.175, opacity=1.0)
    assert canonical[T - 1] == canonical[T // 2]
    assert novel[0] == dict(clip=0.35, vgg=2.0, tv=0.1, opacity=0.0)          # perceptual from the start
    assert novel[T // 10] == dict(clip=0.35, vgg=2.0, tv=0.1, opacity=pytest.approx(0.2))
    assert novel[T // 2] == novel[T - 1] == dict(clip=0.35, vgg=2.0, tv=0.1, opacity=1.0)


class _Constant(torch.nn.Module):
    """A stand-in perceptual loss whose value is 1 (so a term's value is its weight); records its calls."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, pred, target, **kwargs):
        self.calls.append(kwargs)
        return pred.sum() * 0 + 1


@pytest.mark.parametrize('novel', [False, True])
def test_losses_rescaling_and_depth_guided_samples_per_view(novel):
    """trigen_losses on a canonical and a novel step of the second half: the terms, their weights, the VGG
    levels, and gradient rescaling + depth-guided samples on canonical steps only."""
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x', '--max_steps', '100', '--render_size', '4',
                              '--p_novel_max', '1' if novel else '0'])
    seen = []

    def net(rgbd, rays_o, rays_d, opts):
        seen.append(opts)
        B, R = rays_o.shape[:2]
        x = torch.full((B, R, 1), 0.5, requires_grad=True)
        return dict(rgb=x.expand(B, R, 3), depth=x * 0 + 5, opacity=x)
    perceptual = dict(vgg=_Constant(), clip=_Constant())
    batch = dict(image=torch.rand(2, 3, 8, 8), depth=torch.rand(2, 1, 8, 8) * 2 + 4)
    loss, terms, info = train.trigen_losses(net, batch, 60, 0, cfg, perceptual, 'cpu', contextlib.nullcontext)
    assert info['novel'] is novel
    expected = train.term_weights(60, novel, cfg)
    assert info['weights'] == expected
    assert set(terms) == ({'clip', 'vgg', 'tv', 'opacity'} if novel else {'rgb', 'depth', 'vgg', 'clip', 'opacity'})
    assert terms['vgg'].item() == pytest.approx(expected['vgg']) and terms['clip'].item() == pytest.approx(expected['clip'])
    assert perceptual['vgg'].calls == [dict(levels=(3, 4) if novel else (0, 1, 2, 3, 4))]
    assert loss.item() == pytest.approx(sum(t.item() for t in terms.values()))
    rescaling = {'surface_depth', 'depth_guided_prob', 's1', 's2', 'c_min', 'c_max'}
    if novel:
        assert not rescaling & set(seen[0])
    else:
        assert rescaling <= set(seen[0]) and seen[0]['c_min'] == 0.05 and seen[0]['depth_guided_prob'] == 0.4
        assert seen[0]['surface_depth'].shape == (2, 16, 1)  # (B, R*R, 1): the ground-truth depth per ray
    # early in training the canonical step has no perceptual terms, and a missing backbone drops its term
    _, terms, _ = train.trigen_losses(net, batch, 10, 0, cfg, dict(vgg=_Constant()), 'cpu', contextlib.nullcontext)
    assert set(terms) == ({'vgg', 'tv', 'opacity'} if novel else {'rgb', 'depth', 'opacity'})


def test_views_drawn_per_micro_batch_and_reproducible():
    cfg = train.parse_config(['--max_steps', '300', '--p_novel_max', '0.4'])
    draws = [[train.draw_view(step, chunk, 3, cfg) for chunk in range(6)] for step in range(100, 300)]
    again = train.draw_view(150, 4, 3, cfg)
    assert again[0] == draws[50][4][0] and torch.equal(again[1], draws[50][4][1])  # a function of (step, chunk)
    coins = torch.tensor([[d[0] for d in row] for row in draws], dtype=torch.float)  # (200 steps, 6 chunks)
    assert 0.3 < coins.mean() < 0.5                              # P(novel) = 0.4 here
    assert ((coins.sum(1) > 0) & (coins.sum(1) < 6)).float().mean() > 0.8   # steps mix both kinds
    novel_yaws = torch.stack([d[1] for row in draws for d in row if d[0]])
    assert novel_yaws.unique().numel() == novel_yaws.numel()     # every micro-batch its own poses
    canonical = [d for row in draws for d in row if not d[0]]
    assert all((d[1] == math.pi / 2).all() and (d[2] == math.pi / 2).all() for d in canonical)


# -----------------------------------------------------------------------------
# the resumable, distributed sampler

def test_sampler_resumes_exactly_and_splits_ranks():
    full = list(resume.StepBatchSampler(10, 3, 0, 1, seed=5, start_step=0, max_steps=8))
    resumed = list(resume.StepBatchSampler(10, 3, 0, 1, seed=5, start_step=5, max_steps=8))
    assert resumed == full[5:]
    # one epoch: every index once
    assert sorted(sum(full[:3], []) + full[3][:1]) == list(range(10))
    # two ranks: disjoint within an epoch, and together the single-process stream
    r0 = list(resume.StepBatchSampler(12, 3, 0, 2, seed=5, start_step=0, max_steps=2))
    r1 = list(resume.StepBatchSampler(12, 3, 1, 2, seed=5, start_step=0, max_steps=2))
    single = list(resume.StepBatchSampler(12, 6, 0, 1, seed=5, start_step=0, max_steps=2))
    assert [a + b for a, b in zip(r0, r1)] == single
    assert sorted(sum(r0 + r1, [])) == list(range(12))
    # gradient accumulation: one process's 3 micro-batches of step s hold the images of 3 processes at step s,
    # in the order draw_view numbers them (chunk = micro * world_size + rank)
    one = resume.StepBatchSampler(50, 2, 0, 1, seed=5, start_step=0, max_steps=4 * 3)
    three = [resume.StepBatchSampler(50, 2, r, 3, seed=5, start_step=0, max_steps=4) for r in range(3)]
    for s in range(4):
        assert [one.batch(s * 3 + k) for k in range(3)] == [three[r].batch(s) for r in range(3)]


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    resume.save_checkpoint(str(path), {'step': 1})

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(KeyboardInterrupt):
        resume.save_checkpoint(str(path), {'step': 2})
    monkeypatch.undo()
    assert torch.load(path)['step'] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ['ckpt.pt']  # and no temporary file is left behind


def _draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_is_per_rank_and_round_trips_through_the_safe_loader(tmp_path):
    states = []
    for rank in range(2):
        torch.manual_seed(10 + rank), np.random.seed(10 + rank), random.seed(10 + rank)
        np.random.randn()  # leaves a cached gaussian in numpy's state
        states.append(resume.rng_state('cpu'))
    expected = _draw()   # what rank 1 draws next
    resume.save_checkpoint(str(tmp_path / 'ckpt.pt'), {'rng': states})
    saved = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['rng']
    resume.set_rng_state(saved, rank=1, step=5, seed=3, device='cpu')
    assert _draw() == expected
    resume.set_rng_state(saved, rank=0, step=5, seed=3, device='cpu')
    assert _draw() != expected
    # a rank the saved run did not have: seeded from (seed, rank, step), distinct per rank
    draws = {}
    for rank, step in ((2, 5), (2, 5), (3, 5), (2, 6)):
        resume.set_rng_state(saved, rank=rank, step=step, seed=3, device='cpu')
        draws.setdefault((rank, step), []).append(_draw())
    assert draws[(2, 5)][0] == draws[(2, 5)][1]
    assert len({str(d[0]) for d in draws.values()}) == 3
    # a checkpoint written before per-rank states: one dict with numpy and python state as tuples
    torch.manual_seed(1), np.random.seed(1), random.seed(1)
    older = dict(torch=torch.get_rng_state(), numpy=np.random.get_state(), python=random.getstate())
    expected = _draw()
    resume.set_rng_state(older, rank=0, step=5, seed=3, device='cpu')
    assert _draw() == expected


def test_scheduler_state_keeps_only_what_the_safe_loader_reads(tmp_path):
    def make():
        opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10, pct_start=0.2,
                                                   cycle_momentum=False)
    sched = make()
    for _ in range(3):
        sched.optimizer.step(), sched.step()
    state = sched.state_dict()
    state['anneal_func'] = sched.state_dict  # what some PyTorch versions store: a bound method
    resume.save_checkpoint(str(tmp_path / 'ckpt.pt'), {'scheduler': resume.plain_state(state)})
    plain = torch.load(tmp_path / 'ckpt.pt', weights_only=True)['scheduler']
    assert 'anneal_func' not in plain and plain['total_steps'] == 10
    resumed = make()
    resumed.load_state_dict(plain)
    for _ in range(5):
        sched.optimizer.step(), sched.step(), resumed.optimizer.step(), resumed.step()
        assert resumed.get_last_lr() == sched.get_last_lr()


def test_init_from_a_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / 'created_by_payload'
    evil = write_malicious_checkpoint(tmp_path / 'evil.pt', marker)
    r = run_train([*TINY, '--out_dir', str(tmp_path / 'run'), '--max_steps', '2', '--init_from', str(evil)])
    err = r.stderr.strip()
    assert r.returncode == 1 and err.count('\n') == 0 and err.startswith('error: '), err
    assert str(evil) in err and '--trust_checkpoint' in err
    assert not marker.exists()
    # trusted: the warning comes before the payload runs
    r = run_train([*TINY, '--out_dir', str(tmp_path / 'run'), '--max_steps', '2', '--init_from', str(evil),
                   '--trust_checkpoint'])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[0].startswith('warning: ') and str(evil) in lines[0], r.stderr
    assert lines[1] == 'payload ran' and marker.exists()


# -----------------------------------------------------------------------------
# real runs (tiny model, synthetic scenes)

def test_training_lowers_the_loss(tmp_path):
    out = tmp_path / 'run'
    # canonical steps only, so every logged loss is the same reconstruction objective
    r = run_train([*TINY, '--out_dir', str(out), '--max_steps', '40', '--save_every', '40',
                   '--p_novel_max', '0', '--lr', '3e-3'])
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [m['loss'] for m in read_metrics(out)]
    assert len(losses) == 40 and all(math.isfinite(l) for l in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    ckpt = torch.load(out / 'ckpt.pt', weights_only=True)
    assert ckpt['step'] == 40 and ckpt['model_config']['image_size'] == 32
    assert (out / 'samples_0000040.png').exists()
    # a second run into the same folder would clobber the first: refused
    r = run_train([*TINY, '--out_dir', str(out), '--max_steps', '40'])
    assert r.returncode == 1 and 'already exists' in r.stderr and r.stderr.strip().count('\n') == 0


def test_resume_after_sigkill(tmp_path):
    out = tmp_path / 'run'
    args = [*TINY, '--out_dir', str(out), '--max_steps', '400', '--save_every', '3']
    proc = subprocess.Popen([sys.executable, 'train.py', *args], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    ckpt_path = out / 'ckpt.pt'
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if ckpt_path.exists() and torch.load(ckpt_path, weights_only=True)['step'] >= 9:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(0.3)  # let it get somewhere in the middle of a step or a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ckpt_path, weights_only=True)   # loads: never half-written
    killed_at = saved['step']
    assert killed_at >= 9 and killed_at % 3 == 0
    r = run_train(['--resume', '--out_dir', str(out), '--max_steps', str(killed_at + 6)])
    assert r.returncode == 0, r.stderr[-2000:]
    final = torch.load(ckpt_path, weights_only=True)
    assert final['step'] == killed_at + 6
    steps = [m['step'] for m in read_metrics(out)]
    assert steps == list(range(1, killed_at + 7))  # no gap, no duplicate after the resume
    assert [p for p in os.listdir(out) if '.tmp' in p] == []


def test_two_process_gloo_keeps_ranks_identical(tmp_path):
    script = tmp_path / 'ddp_check.py'
    script.write_text(
        "import sys, json, torch, torch.distributed as dist\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import train\n"
        "build = train.build_model\n"
        "def capture(cfg):\n"
        "    global initial\n"
        "    model, net = build(cfg)\n"
        "    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])\n"
        "    return model, net\n"
        "train.build_model = capture\n"
        "model = train.main(sys.argv[1:])\n"
        "flat = torch.cat([p.detach().flatten() for p in model.parameters()])\n"
        "gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]\n"
        "dist.all_gather(gathered, flat)\n"
        "if dist.get_rank() == 0:\n"
        "    json.dump({'max_diff': (gathered[0] - gathered[1]).abs().max().item(),\n"
        "               'moved': (flat - initial).abs().max().item()}, open('run.json', 'w'))\n"
        "dist.destroy_process_group()\n")
    out = tmp_path / 'run'
    r = subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
                        str(script), *TINY, '--max_steps', '4', '--save_every', '4', '--device', 'cpu',
                        '--batch_size', '2', '--global_batch', '8',  # 2 processes x 2 micro-batches of 2
                        '--out_dir', str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / 'run.json').read_text())
    assert result['max_diff'] == 0.0      # identical weights on both ranks
    assert result['moved'] > 0            # ... and they did train
    saved = torch.load(out / 'ckpt.pt', weights_only=True)
    assert saved['step'] == 4
    # each process saved its own RNG state (seeded seed + rank at start, so they differ)
    assert len(saved['rng']) == 2 and not torch.equal(saved['rng'][0]['torch'], saved['rng'][1]['torch'])


@pytest.mark.parametrize('policy', ['skip', 'stop'])
def test_nonfinite_loss_never_reaches_the_weights(tmp_path, monkeypatch, policy):
    real_losses = train.trigen_losses

    def poisoned(net, batch, step, *args):
        loss, terms, novel = real_losses(net, batch, step, *args)
        return (loss * float('nan') if step == 1 else loss), terms, novel
    monkeypatch.setattr(train, 'trigen_losses', poisoned)
    argv = [*TINY, '--out_dir', str(tmp_path / 'run'), '--max_steps', '3', '--nonfinite', policy]
    if policy == 'stop':
        with pytest.raises(FloatingPointError, match=r'non-finite.* step 1\b'):
            train.main(argv)
        assert not (tmp_path / 'run' / 'ckpt.pt').exists()
        return
    model = train.main(argv)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert saved['step'] == 3 and all(torch.isfinite(v).all() for v in saved['model'].values())


def test_rgbd_checkpoint_is_safe_and_resumes_exactly_also_from_the_older_format(tmp_path, monkeypatch):
    """An f_rgbd run interrupted after its step-2 save, then resumed, ends with the weights of the
    uninterrupted run (the diffusion noise comes from the restored RNG state): from our checkpoint
    as it is, and from one in the layout written before (numpy RNG state pickled), with trust."""
    import diffusion
    monkeypatch.setattr(diffusion, 'rgbd_grid', lambda *a, **k: None)  # the pictures are not what is tested here
    args = ['--stage', 'rgbd', '--image_size', '16', '--batch_size', '4', '--num_scenes', '32', '--max_steps', '4',
            '--save_every', '2', '--sample_every', '1000', '--log_every', '1']
    full = train.main([*args, '--out_dir', str(tmp_path / 'full')])
    saved = torch.load(tmp_path / 'full' / 'ckpt.pt', weights_only=True)
    assert saved['step'] == 4 and len(saved['rng']) == 1
    assert diffusion.load_denoiser(tmp_path / 'full' / 'ckpt.pt').num_classes == saved['denoiser_config']['num_classes']

    real_save = train.save_checkpoint

    def save_then_die(path, state):
        real_save(path, state)
        if state['step'] == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(train, 'save_checkpoint', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train.main([*args, '--out_dir', str(tmp_path / 'ours')])
    monkeypatch.setattr(train, 'save_checkpoint', real_save)
    shutil.copytree(tmp_path / 'ours', tmp_path / 'older')
    older = torch.load(tmp_path / 'older' / 'ckpt.pt', weights_only=True)
    s = older['rng'][0]
    np.random.seed(0)  # any numpy state object: the real values go in below
    numpy_state = ('MT19937', s['numpy']['key'].numpy().astype(np.uint32), s['numpy']['pos'],
                   s['numpy']['has_gauss'], s['numpy']['cached_gaussian'])
    older['rng'] = dict(torch=s['torch'], numpy=numpy_state, python=tuple(s['python']))
    torch.save(older, tmp_path / 'older' / 'ckpt.pt')

    resumed = train.main(['--resume', '--out_dir', str(tmp_path / 'ours')])
    with pytest.raises(UnsafeCheckpointError, match=r'older/ckpt.pt: refused.*--trust_checkpoint'):
        train.main(['--resume', '--out_dir', str(tmp_path / 'older')])
    resumed_older = train.main(['--resume', '--out_dir', str(tmp_path / 'older'), '--trust_checkpoint'])
    assert torch.load(tmp_path / 'older' / 'ckpt.pt', weights_only=True)['step'] == 4  # rewritten safe
    for model in (resumed, resumed_older):
        for (k, a), b in zip(full.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), k


# -----------------------------------------------------------------------------
# canonical steps on random full-resolution pixels

def test_random_canonical_rays_carry_their_own_pixels():
    import scenes as scenes_module
    scenes = scenes_module.SyntheticScenes(2, image_size=24, seed=5)
    batch = scenes.__getitems__([0, 1])
    batch = torch.utils.data.default_collate(batch) if isinstance(batch, list) else batch
    image, depth = batch['image'], batch['depth']
    gen = torch.Generator().manual_seed(0)
    rays_o, rays_d, rgb, d = train._random_canonical_rays(image, depth, 50, gen)
    assert rays_o.shape == rays_d.shape == rgb.shape == (2, 50, 3) and d.shape == (2, 50, 1)
    # casting the true scenes along the chosen rays gives back exactly the pixels that came with them
    true_rgb, true_depth, _ = scenes_module.raycast([scenes.scene(0), scenes.scene(1)], rays_o, rays_d)
    torch.testing.assert_close(rgb, true_rgb, atol=1e-5, rtol=0)
    torch.testing.assert_close(d[..., 0], true_depth, atol=1e-4, rtol=0)
    # each item draws its own pixels, without repeats
    assert len(set(map(tuple, rays_d[0].tolist()))) == 50
    assert not torch.equal(rays_d[0], rays_d[1])


def test_random_canonical_rays_only_where_no_image_term_needs_the_grid():
    cfg = train.parse_config(['--max_steps', '10'])
    assert cfg['canonical_rays'] == 'random' and cfg['novel_opacity'] is False
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])
    assert cfg['canonical_rays'] == 'grid' and cfg['novel_opacity'] is True
