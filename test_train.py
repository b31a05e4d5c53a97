"""Tests of train.py (f_trigen) and of the plumbing it shares with train_rgbd.py (resume.py): config overrides, the
recipe's schedules, how global_batch splits over processes (issue 21), the resumable sampler, RNG state and
checkpoints, and real runs (loss goes down, resume after SIGKILL, the non-finite skip, two-process gloo runs that
match one process with accumulation and resume across a change of process count). f_rgbd: test_train_rgbd.py."""
import contextlib
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import resume
import train
from configurator import ConfigError
from test_checkpoint import write_malicious_checkpoint

REPO = Path(__file__).resolve().parent
# A tiny model and tiny renders that still learn in 40 steps on a 2-core CPU ...
TINY = ['--model_size', 'tiny', '--image_size', '32', '--render_size', '16', '--n_coarse', '8', '--n_fine', '8',
        '--num_scenes', '64', '--sample_every', '1000', '--log_every', '1']
# ... and smaller still, for runs that only test the plumbing (no batch flags: the recipe's own split)
FAST = ['--model_size', 'tiny', '--image_size', '16', '--render_size', '8', '--n_coarse', '4', '--n_fine', '4',
        '--num_scenes', '8', '--sample_every', '1000', '--log_every', '1', '--device', 'cpu']


def run_train(args, **kwargs):
    return subprocess.run([sys.executable, 'train.py', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600, **kwargs)


def torchrun(script, args, cwd, nproc=2):
    """`torchrun --standalone --nproc_per_node=NPROC script args` (gloo on the CPU; one thread per process)."""
    return subprocess.run([sys.executable, '-m', 'torch.distributed.run', '--standalone', f'--nproc_per_node={nproc}',
                           str(script), *args], cwd=cwd, capture_output=True, text=True, timeout=600)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


@contextlib.contextmanager
def one_thread():
    """What torchrun gives each of several processes (OMP_NUM_THREADS=1), so that an in-process run computes
    the same floats as a process of a torchrun one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
    assert train.parse_config([])['out_dir'] == 'out'  # f_rgbd's run goes to out-rgbd (test_train_rgbd.py)


def _peak_lr_step(cfg):
    """The step at which train.py's one-cycle schedule reaches its peak lr."""
    optimizer, scheduler = resume.make_optimizer(torch.nn.Linear(1, 1), cfg['lr'], (0.9, 0.99), 0.0,
                                                 cfg['max_steps'], train.warmup_fraction(cfg), cfg['div_factor'], False)
    lrs = []
    for _ in range(cfg['max_steps']):
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()  # no gradients: changes nothing, but keeps the order torch expects
        scheduler.step()
    return max(range(len(lrs)), key=lrs.__getitem__)


def test_warmup_lasts_at_least_warmup_min_steps():
    # the default and the ImageNet recipe warm up over their fraction of the run; a 60-step run over 30 steps,
    # a smoke test of under 60 steps over its fraction again
    assert train.warmup_fraction(train.parse_config([])) == 0.1
    assert _peak_lr_step(train.parse_config(['--max_steps', '400'])) == 39  # 10% of 400 steps
    assert _peak_lr_step(train.parse_config(['--max_steps', '60'])) == 29   # 30 steps, not 6
    assert _peak_lr_step(train.parse_config(['--max_steps', '20'])) == 1    # shorter than 2 x 30: 10%
    assert train.warmup_fraction(train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])) == 0.02


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


def test_synthetic_recipe_has_no_perceptual_terms_and_loads_only_weighted_backbones(monkeypatch):
    """Issue 18 item 3: the synthetic recipe trains alike on every machine (no VGG/CLIP); a nonzero weight
    asks losses.load_perceptual for exactly its backbone (which fails with one line when it cannot be had)."""
    cfg = train.parse_config([])
    assert (cfg['w_vgg'], cfg['w_clip'], cfg['w_vgg_novel'], cfg['w_clip_novel']) == (0, 0, 0, 0)
    asked = []

    def fake_load(names, device, **kwargs):
        asked.append((list(names), kwargs))
        return {name: name for name in names}
    monkeypatch.setattr(train, 'load_perceptual', fake_load)
    assert train.frozen_networks(cfg, 'cpu') == ({}, None)  # no backbone, no SR network
    assert train.frozen_networks(train.parse_config(['--w_vgg_novel', '2']), 'cpu')[0] == {'vgg': 'vgg'}
    assert train.frozen_networks(train.parse_config(['--w_clip', '0.1']), 'cpu')[0] == {'clip': 'clip'}
    imagenet = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])
    assert set(train.frozen_networks(imagenet, 'cpu')[0]) == {'vgg', 'clip'}
    assert asked[-1][1] == dict(lpips_weights='lpips', clip_model='ViT-B-16', clip_pretrained='openai')


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
    (['--stage', 'rgbd'], ['--stage']),  # gone: f_rgbd trains with train_rgbd.py
])
def test_config_errors(argv, facts):
    """A ConfigError on one line that names the key and the bad value."""
    with pytest.raises(ConfigError) as info:
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


# -----------------------------------------------------------------------------
# global_batch over any number of processes (issue 21)

SPLITS = {  # (micro-batch, accumulation) per process count; missing: the count does not divide global_batch
    'synthetic': {1: (4, 1), 2: (2, 1), 4: (1, 1)},                                   # global 4, batch 4
    'imagenet': {1: (8, 6), 2: (8, 3), 3: (8, 2), 4: (6, 2), 6: (8, 1), 8: (6, 1)},  # global 48, batch 8
}
# the divisors of global_batch just below and just above the process count (only below past global_batch)
NEAREST = {('synthetic', 3): '2 or 4', ('synthetic', 5): '4', ('synthetic', 6): '4',
           ('synthetic', 7): '4', ('synthetic', 8): '4', ('imagenet', 5): '4 or 6', ('imagenet', 7): '6 or 8'}


def _recipe(name):
    return train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'] if name == 'imagenet' else [])


@pytest.mark.parametrize('recipe', ['synthetic', 'imagenet'])
def test_global_batch_splits_over_1_to_8_processes(recipe):
    """With no --batch_size, every process count that divides global_batch gets a micro-batch at or under the
    recipe's and an accumulation count with processes x micro-batch x accumulation = global_batch; the others
    get one line naming the nearest process counts that work."""
    cfg = _recipe(recipe)
    for world_size in range(1, 9):
        if world_size in SPLITS[recipe]:
            micro, accumulation = train.batch_split(cfg, [], world_size)
            assert (micro, accumulation) == SPLITS[recipe][world_size], world_size
            assert world_size * micro * accumulation == cfg['global_batch'] and micro <= cfg['batch_size']
            continue
        with pytest.raises(ConfigError) as info:
            train.batch_split(cfg, [], world_size)
        message = str(info.value)
        assert '\n' not in message
        assert f"--global_batch {cfg['global_batch']} cannot be split over {world_size} processes" in message
        assert f"use {NEAREST[recipe, world_size]} processes" in message, message


def test_an_explicit_batch_size_is_kept_or_refused_naming_the_nearest_ones():
    imagenet = _recipe('imagenet')
    for flag in (['--batch_size', '4'], ['--batch_size=4'], ['--batch-size', '4'], ['--batch-size=4']):
        cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x', *flag])
        assert train.batch_split(cfg, flag, 4) == (4, 3), flag  # as given: 4 x 4 x 3
    for flag in (['--batch_size', '5'], ['--batch_size=5']):
        cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x', *flag])
        with pytest.raises(ConfigError) as info:
            train.batch_split(cfg, flag, 1)
        message = str(info.value)
        assert '\n' not in message and '--batch_size 5 does not divide the 48 images per process' in message
        assert 'use --batch_size 4 or 6' in message and 'leave it out' in message, message
    # the failure (the synthetic default on two processes) now needs the flag to happen at all
    assert train.batch_split(train.parse_config([]), [], 2) == (2, 1)
    with pytest.raises(ConfigError, match=r'--batch_size 4 does not divide the 2 images.*use --batch_size 2,'):
        train.batch_split(train.parse_config([]), ['--batch_size', '4'], 2)
    assert resume.split_batch(imagenet['global_batch'], 4, 12) == (12, 1)  # 4 x 12 x 1 where memory allows


@pytest.mark.parametrize('world_size, line', [
    (4, '4 processes x 6 micro-batch x 2 accumulation = 48 images a step'),
    (8, '8 processes x 6 micro-batch x 1 accumulation = 48 images a step'),
])
def test_start_up_line_of_the_imagenet_recipe_on_4_and_8_processes(world_size, line):
    """What rank 0 prints at start-up (resume.describe, in train.main's first line), built without GPUs."""
    cfg = _recipe('imagenet')
    micro, accumulation = train.batch_split(cfg, [], world_size)
    described = resume.describe(torch.nn.Linear(1000, 1000), 'cuda:0', world_size, micro, accumulation,
                                cfg['global_batch'])
    assert described == f"1.00M parameters | cuda:0 | {line}"


def test_every_process_count_sees_the_images_and_views_of_one_process_with_that_micro_batch():
    """The images of micro_index k of a step (resume.StepBatchSampler) are the same for world_size processes
    as for one process accumulating with the same micro-batch, and the view of micro_index k is a function of
    (seed, step, k) (draw_view): so a 4-GPU run of the ImageNet recipe (6 x 2) is a 1-GPU run with
    --batch_size 6 (6 x 8), and 8 GPUs (6 x 1) too."""
    cfg = _recipe('imagenet')
    n, steps = 1000, 3
    for world_size, (micro, accumulation) in SPLITS['imagenet'].items():
        one_accumulation = resume.split_batch(48, 1, micro, explicit=True)[1]
        one = resume.StepBatchSampler(n, micro, 0, 1, cfg['seed'], 0, steps * one_accumulation)
        ranks = [resume.StepBatchSampler(n, micro, r, world_size, cfg['seed'], 0, steps * accumulation)
                 for r in range(world_size)]
        for step in range(steps):
            for r in range(world_size):
                for k in range(accumulation):
                    micro_index = k * world_size + r   # train.main's numbering
                    assert ranks[r].batch(step * accumulation + k) == one.batch(step * one_accumulation + micro_index)
    a, b = train.draw_view(7, 5, 6, cfg), train.draw_view(7, 5, 6, cfg)
    assert a[0] == b[0] and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2])


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
    # the released recipe (README §5) at given steps of a 300k-step run; a VGG/CLIP term of weight 0 is left out
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])
    T = cfg['max_steps']
    canonical = {step: train.term_weights(step, False, cfg) for step in (0, T // 10, T // 2 - 1, T // 2, T - 1)}
    novel = {step: train.term_weights(step, True, cfg) for step in (0, T // 10, T // 2, T - 1)}
    assert canonical[0] == dict(rgb=1.0, depth=2.0, opacity=0.0)
    assert canonical[T // 10] == dict(rgb=1.0, depth=2.0, opacity=pytest.approx(0.2))
    assert set(canonical[T // 2 - 1]) == {"rgb", "depth", "opacity"}   # first half: no perceptual terms
    assert canonical[T // 2] == dict(rgb=1.0, depth=2.0, vgg=1.0, clip=0.175, opacity=1.0)
    assert canonical[T - 1] == canonical[T // 2]
    assert novel[0] == dict(clip=0.35, vgg=2.0, tv=0.1, opacity=0.0)          # perceptual from the start
    assert novel[T // 10] == dict(clip=0.35, vgg=2.0, tv=0.1, opacity=pytest.approx(0.2))
    assert novel[T // 2] == novel[T - 1] == dict(clip=0.35, vgg=2.0, tv=0.1, opacity=1.0)
    # the synthetic recipe: no perceptual terms at all, no opacity term on novel views, and the opacity
    # term at full weight after a tenth of the run instead of half
    cfg = train.parse_config(['--max_steps', '300'])
    assert train.term_weights(299, False, cfg) == dict(rgb=1.0, depth=2.0, opacity=1.0)
    assert train.term_weights(15, False, cfg)['opacity'] == pytest.approx(0.5)
    assert train.term_weights(30, False, cfg)['opacity'] == 1.0
    assert train.term_weights(299, True, cfg) == dict(tv=0.1)


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

    def net(image, depth, rays_o, rays_d, **opts):  # G3DR's forward: images in [0, 1], rgb out in [0, 1]
        assert image.shape == (2, 3, 8, 8) and depth.shape == (2, 1, 8, 8)
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
        assert seen[0]['surface_depth'].shape == (2, 16, 1)  # (B, R, 1): the ground-truth depth per ray
    # early in training the canonical step has no perceptual terms; a term of weight 0 is not computed, so its
    # backbone need not be there
    cfg['w_clip_novel'] = 0.0
    _, terms, _ = train.trigen_losses(net, batch, 10, 0, cfg, dict(vgg=_Constant()), 'cpu', contextlib.nullcontext)
    assert set(terms) == ({'vgg', 'tv', 'opacity'} if novel else {'rgb', 'depth', 'opacity'})


class _Recorder(torch.nn.Module):
    """A stand-in perceptual loss that records the images it compares."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, pred, target, **kwargs):
        self.seen.append((pred.detach(), target))
        return (pred - target).abs().mean()


@pytest.mark.parametrize('novel', [False, True])
def test_sr_in_training_feeds_the_perceptual_terms_at_twice_the_size(novel):
    """--sr_ckpt: VGG and CLIP compare SR(render) (B, 3, 2 side, 2 side) with the photo at 2x (image_hr);
    the pixel terms stay at the render size, and a missing SR leaves the perceptual inputs as they were."""
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x', '--max_steps', '100', '--render_size', '8',
                              '--p_novel_max', '1' if novel else '0', '--sr_ckpt', 'unused-here'])

    def net(image, depth, rays_o, rays_d, **opts):
        B, R = rays_o.shape[:2]
        return dict(rgb=torch.rand(B, R, 3, requires_grad=True), depth=torch.full((B, R, 1), 5.0),
                    opacity=torch.ones(B, R, 1))
    batch = dict(image=torch.rand(2, 3, 8, 8), depth=torch.rand(2, 1, 8, 8) * 2 + 4, image_hr=torch.rand(2, 3, 16, 16))
    calls = []

    def sr(x):  # a stand-in 2x network: nearest-neighbour upsampling, recorded
        calls.append(tuple(x.shape))
        return torch.nn.functional.interpolate(x, scale_factor=2, mode='nearest')
    perceptual = dict(vgg=_Recorder(), clip=_Recorder())
    _, terms, _ = train.trigen_losses(net, batch, 60, 0, cfg, perceptual, 'cpu', contextlib.nullcontext, sr)
    assert calls == [(2, 3, 8, 8)]
    for name in ('vgg', 'clip'):
        pred, target = perceptual[name].seen[0]
        assert pred.shape == target.shape == (2, 3, 16, 16)
        assert torch.equal(target, batch['image_hr'])  # the 2x photo itself (image_size 8 -> 16 = 2 render_size)
    if not novel:
        assert terms['rgb'].shape == ()  # the pixel term, at 8 x 8, still computed
    perceptual = dict(vgg=_Recorder(), clip=_Recorder())
    train.trigen_losses(net, batch, 60, 0, cfg, perceptual, 'cpu', contextlib.nullcontext)
    assert perceptual['vgg'].seen[0][0].shape == (2, 3, 8, 8)
    with pytest.raises(train.ConfigError, match='--sr_ckpt'):
        train.parse_config(['--sr_ckpt', 'x'])  # the synthetic recipe has no perceptual terms to feed


def test_views_drawn_per_micro_batch_and_reproducible():
    cfg = train.parse_config(['--max_steps', '300', '--p_novel_max', '0.4'])
    draws = [[train.draw_view(step, micro_index, 3, cfg) for micro_index in range(6)] for step in range(100, 300)]
    again = train.draw_view(150, 4, 3, cfg)
    assert again[0] == draws[50][4][0] and torch.equal(again[1], draws[50][4][1])  # a function of (step, micro_index)
    coins = torch.tensor([[d[0] for d in row] for row in draws], dtype=torch.float)  # (200 steps, 6 micro-batches)
    assert 0.3 < coins.mean() < 0.5                              # P(novel) = 0.4 here
    assert ((coins.sum(1) > 0) & (coins.sum(1) < 6)).float().mean() > 0.8   # steps mix both kinds
    novel_yaws = torch.stack([d[1] for row in draws for d in row if d[0]])
    assert novel_yaws.unique().numel() == novel_yaws.numel()     # every micro-batch its own poses
    canonical = [d for row in draws for d in row if not d[0]]
    assert all((d[1] == math.pi / 2).all() and (d[2] == math.pi / 2).all() for d in canonical)


# -----------------------------------------------------------------------------
# the resumable, distributed sampler; RNG state and checkpoints (resume.py)

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
    # in the order draw_view numbers them (micro_index = micro * world_size + rank)
    one = resume.StepBatchSampler(50, 2, 0, 1, seed=5, start_step=0, max_steps=4 * 3)
    three = [resume.StepBatchSampler(50, 2, r, 3, seed=5, start_step=0, max_steps=4) for r in range(3)]
    for s in range(4):
        assert [one.batch(s * 3 + k) for k in range(3)] == [three[r].batch(s) for r in range(3)]
    # make_loader: optimiser steps of `accumulation` micro-batches, resumable at any step
    data = list(range(20))
    loader = [b.tolist() for b in resume.make_loader(data, 2, 0, 5, 0, 1, 0, 3, 4)]
    later = [b.tolist() for b in resume.make_loader(data, 2, 0, 5, 0, 1, 2, 3, 4)]
    assert len(loader) == 12 and later == loader[6:]


def _optimizer(model):
    return resume.make_optimizer(model, 1e-3, (0.9, 0.99), 0.0, 10, 0.2, 25.0, cycle_beta1=True)


def test_save_run_is_atomic_and_prepare_out_dir_cleans_up(tmp_path, monkeypatch):
    """A save killed mid-write leaves the previous checkpoint intact; a run killed by SIGKILL in the middle of
    one leaves ckpt.pt.tmp-PID, which the next start removes, with the metric lines after its step."""
    model = torch.nn.Linear(2, 2)
    optimizer, scheduler = _optimizer(model)
    path = tmp_path / 'ckpt.pt'
    resume.save_run(path, 'trigen', model, {}, optimizer, scheduler, 1, {}, 'cpu', 0, 1)

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(KeyboardInterrupt):
        resume.save_run(path, 'trigen', model, {}, optimizer, scheduler, 2, {}, 'cpu', 0, 1)
    monkeypatch.undo()
    assert checkpoint.load_run(path, 'trigen')['step'] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ['ckpt.pt']  # and no temporary file is left behind
    (tmp_path / 'ckpt.pt.tmp-12345').write_bytes(b'what a SIGKILL left')
    for step in (1, 2, 3):
        resume.log_metrics(tmp_path, dict(step=step))
    resume.prepare_out_dir(tmp_path, 2)
    assert sorted(os.listdir(tmp_path)) == ['ckpt.pt', 'metrics.jsonl']
    assert [m['step'] for m in read_metrics(tmp_path)] == [1, 2]


def _draw():
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_rng_state_is_per_rank_and_round_trips_through_the_safe_loader(tmp_path):
    states = []
    for rank in range(2):
        torch.manual_seed(10 + rank), np.random.seed(10 + rank), random.seed(10 + rank)
        np.random.randn()  # leaves a cached gaussian in numpy's state
        states.append(resume.rng_state('cpu'))
    expected = _draw()   # what rank 1 draws next
    checkpoint.save(tmp_path / 'ckpt.pt', {'rng': states})
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


def test_optimizer_and_scheduler_resume_exactly_through_the_safe_loader(tmp_path):
    """make_optimizer's Adam + one-cycle (beta1 cycling) saved by save_run at step 3, read back by the safe
    loader and restored: the lr and beta1 continue exactly. The scheduler keeps only what the safe loader
    reads (some PyTorch versions put a bound method in its state: dropped, the scheduler rebuilds it)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer, scheduler = _optimizer(model)
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
        optimizer.step(), scheduler.step()
    real_state_dict = scheduler.state_dict
    scheduler.state_dict = lambda: dict(real_state_dict(), anneal_func=real_state_dict)
    resume.save_run(tmp_path / 'ckpt.pt', 'trigen', model, {}, optimizer, scheduler, 3, dict(seed=1), 'cpu', 0, 1)
    run = checkpoint.load_run(tmp_path / 'ckpt.pt', 'trigen')  # weights_only: nothing but plain values
    assert 'anneal_func' not in run['scheduler'] and run['scheduler']['total_steps'] == 10
    model2 = torch.nn.Linear(3, 1)
    optimizer2, scheduler2 = _optimizer(model2)
    assert resume.restore(run, model2, optimizer2, scheduler2, 0, 1, 'cpu') == 3
    for _ in range(5):
        x = torch.randn(4, 3)
        for m, o, s in ((model, optimizer, scheduler), (model2, optimizer2, scheduler2)):
            o.zero_grad()
            m(x).sum().backward()
            o.step(), s.step()
        assert scheduler2.get_last_lr() == scheduler.get_last_lr()
        assert optimizer2.param_groups[0]['betas'] == optimizer.param_groups[0]['betas']
        assert torch.equal(model2.weight, model.weight)


def test_init_from_a_malicious_checkpoint_is_refused(tmp_path):
    marker = tmp_path / 'created_by_payload'
    evil = write_malicious_checkpoint(tmp_path / 'evil.pt', marker)
    r = run_train([*FAST, '--out_dir', str(tmp_path / 'run'), '--max_steps', '2', '--init_from', str(evil)])
    err = r.stderr.strip()
    assert r.returncode == 1 and err.count('\n') == 0 and err.startswith('error: '), err
    assert str(evil) in err and '--trust_checkpoint' in err
    assert not marker.exists()
    # trusted: the warning comes before the payload runs
    r = run_train([*FAST, '--out_dir', str(tmp_path / 'run'), '--max_steps', '2', '--init_from', str(evil),
                   '--trust_checkpoint'])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and lines[0].startswith('warning: ') and str(evil) in lines[0], r.stderr
    assert lines[1] == 'payload ran' and marker.exists()


# -----------------------------------------------------------------------------
# real runs (tiny model, synthetic scenes)

def test_training_lowers_the_loss(tmp_path):
    out = tmp_path / 'run'
    # canonical steps only, so every logged loss is the same reconstruction objective
    r = run_train([*TINY, '--out_dir', str(out), '--max_steps', '60', '--save_every', '60',
                   '--p_novel_max', '0', '--lr', '3e-3'])
    assert r.returncode == 0, r.stderr[-2000:]
    assert '1 process x 4 micro-batch x 1 accumulation = 4 images a step' in r.stdout
    losses = [m['loss'] for m in read_metrics(out)]
    assert len(losses) == 60 and all(math.isfinite(l) for l in losses)
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.7 * first, (first, last)
    ckpt = checkpoint.load_run(out / 'ckpt.pt', 'trigen')
    assert ckpt['kind'] == 'trigen' and ckpt['step'] == 60 and ckpt['model_config']['image_size'] == 32
    assert checkpoint.load_g3dr(out / 'ckpt.pt')[0].config == ckpt['model_config']
    assert (out / 'samples_0000060.png').exists()
    # a second run into the same folder would clobber the first: refused
    r = run_train([*TINY, '--out_dir', str(out), '--max_steps', '40'])
    assert r.returncode == 1 and 'already exists' in r.stderr and r.stderr.strip().count('\n') == 0


def test_resume_after_sigkill(tmp_path):
    out = tmp_path / 'run'
    args = [*FAST, '--out_dir', str(out), '--max_steps', '2000', '--save_every', '3']
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


def test_a_run_saved_before_aligned_plane_resumes_with_its_own_plane(tmp_path):
    # a run of the image-aligned plane, saved as a checkpoint from before the key existed (neither its config nor
    # its model_config has it): resumed under today's default (aligned), it must keep training what it trained
    out = tmp_path / 'run'
    r = run_train([*FAST, '--out_dir', str(out), '--max_steps', '2', '--aligned_plane', 'false'])
    assert r.returncode == 0, r.stderr[-2000:]
    old = torch.load(out / 'ckpt.pt', weights_only=True)
    del old['config']['aligned_plane'], old['model_config']['aligned_plane']
    torch.save(old, out / 'ckpt.pt')
    argv = ['--resume', '--out_dir', str(out)]
    cfg, ckpt = resume.continue_run(argv, train.parse_config(argv), 'trigen', train.config, train.RECIPES,
                                    train.parse_config)
    assert cfg['aligned_plane'] is True  # the recipe's value for a key the saved run did not have ...
    model = train.build_model(cfg, ckpt)
    assert model.config['aligned_plane'] is False  # ... but the model is the saved one
    model.load_state_dict(ckpt['model'])


@pytest.mark.parametrize('policy', ['skip', 'stop'])
def test_nonfinite_loss_never_reaches_the_weights(tmp_path, monkeypatch, policy):
    real_losses = train.trigen_losses

    def poisoned(net, batch, step, *args):
        loss, terms, info = real_losses(net, batch, step, *args)
        return (loss * float('nan') if step == 1 else loss), terms, info
    monkeypatch.setattr(train, 'trigen_losses', poisoned)
    argv = [*FAST, '--out_dir', str(tmp_path / 'run'), '--max_steps', '3', '--nonfinite', policy]
    if policy == 'stop':
        with pytest.raises(FloatingPointError, match=r'non-finite.* step 1\b'):
            train.main(argv)
        assert not (tmp_path / 'run' / 'ckpt.pt').exists()
        return
    model = train.main(argv)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=True)
    assert saved['step'] == 3 and all(torch.isfinite(v).all() for v in saved['model'].values())
    assert [len(m['views']) for m in read_metrics(tmp_path / 'run')] == [1, 0, 1]  # step 2's skipped micro-batch


# -----------------------------------------------------------------------------
# several processes (gloo on the CPU): the synthetic default on two processes with no batch flags matches one
# process accumulating the same micro-batches; a run resumes on another number of processes

# train.main on every rank, then the largest difference between the ranks' weights (DDP keeps them equal)
RANKS_AGREE = """
import json, sys, torch, torch.distributed as dist
sys.path.insert(0, {repo!r})
import train
model = train.main(sys.argv[1:])
flat = torch.cat([p.detach().flatten() for p in model.parameters()])
gathered = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(gathered, flat)
if dist.get_rank() == 0:
    json.dump(dict(max_diff=(gathered[0] - gathered[1]).abs().max().item()), open('ranks.json', 'w'))
dist.destroy_process_group()
"""


def test_two_processes_with_no_batch_flags_match_one_process_with_accumulation(tmp_path):
    """Issue 21: `torchrun --nproc_per_node=2 train.py --device cpu --max_steps 4` on the synthetic default
    (global 4, batch 4) runs as 2 processes x 2 micro-batch x 1 accumulation, and its first micro-batch
    (rank 0, micro_index 0: the same images, view draw and rank-0 seeded render jitter) has the loss of one
    process with --batch_size 2 (1 x 2 x 2): exactly, to the float (tolerance 0; one thread in both)."""
    r = torchrun('train.py', [*FAST, '--max_steps', '4', '--out_dir', str(tmp_path / 'two')], cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '| 2 processes x 2 micro-batch x 1 accumulation = 4 images a step |' in r.stdout, r.stdout
    two = read_metrics(tmp_path / 'two')
    assert [m['step'] for m in two] == [1, 2, 3, 4] and all(len(m['views']) == 1 for m in two)  # rank 0's
    saved = checkpoint.load_run(tmp_path / 'two' / 'ckpt.pt', 'trigen')
    assert saved['step'] == 4 and saved['config']['batch_size'] == 4  # the recipe's, the cap of the split
    # each process saved its own RNG state (seeded seed + rank at start, so they differ)
    assert len(saved['rng']) == 2 and not torch.equal(saved['rng'][0]['torch'], saved['rng'][1]['torch'])
    with one_thread():
        train.main([*FAST, '--max_steps', '1', '--batch_size', '2', '--out_dir', str(tmp_path / 'one')])
    one = read_metrics(tmp_path / 'one')
    assert len(one[0]['views']) == 2  # accumulation 2
    assert two[0]['views'][0] == one[0]['views'][0], (two[0]['views'][0], one[0]['views'][0])


def test_resume_on_two_processes_of_a_one_process_run(tmp_path, monkeypatch):
    """A one-process run (--batch_size 1: 1 x 1 x 4) interrupted after its step-2 save continues on two
    processes with no batch flags (its saved batch_size caps the split: 2 x 1 x 2, DDP under no_sync
    while accumulating). Rank 0 continues the saved RNG state, so its first micro-batch of step 3 has the loss
    of the uninterrupted run; rank 1, which the saved run did not have, is seeded from (seed, rank, step); the
    ranks' weights stay identical."""
    argv = [*FAST, '--batch_size', '1', '--max_steps', '4', '--save_every', '2']
    with one_thread():
        train.main([*argv, '--out_dir', str(tmp_path / 'full')])
        real_save = resume.save_run

        def save_then_die(path, kind, model, model_config, optimizer, scheduler, step, *args):
            real_save(path, kind, model, model_config, optimizer, scheduler, step, *args)
            if step == 2:
                raise KeyboardInterrupt
        monkeypatch.setattr(resume, 'save_run', save_then_die)
        with pytest.raises(KeyboardInterrupt):
            train.main([*argv, '--out_dir', str(tmp_path / 'part')])
        monkeypatch.undo()
    at_2 = checkpoint.load_run(tmp_path / 'part' / 'ckpt.pt', 'trigen')
    assert at_2['step'] == 2 and len(at_2['rng']) == 1
    script = tmp_path / 'ranks_agree.py'
    script.write_text(RANKS_AGREE.format(repo=str(REPO)))
    r = torchrun(script, ['--resume', '--out_dir', str(tmp_path / 'part')], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '| 2 processes x 1 micro-batch x 2 accumulation = 4 images a step | steps 2->4 |' in r.stdout, r.stdout
    assert json.loads((tmp_path / 'ranks.json').read_text())['max_diff'] == 0.0  # identical weights on both ranks
    final = checkpoint.load_run(tmp_path / 'part' / 'ckpt.pt', 'trigen')
    assert final['step'] == 4 and len(final['rng']) == 2
    assert any(not torch.equal(final['model'][k], v) for k, v in at_2['model'].items())  # and they did train
    part, full = read_metrics(tmp_path / 'part'), read_metrics(tmp_path / 'full')
    assert [m['step'] for m in part] == [1, 2, 3, 4]
    assert part[:2] == [dict(m, sec_per_step=p['sec_per_step']) for m, p in zip(full[:2], part[:2])]
    assert [len(m['views']) for m in part] == [4, 4, 2, 2]
    assert part[2]['views'][0] == full[2]['views'][0], (part[2]['views'][0], full[2]['views'][0])
