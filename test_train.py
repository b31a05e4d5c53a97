"""Tests of train.py: config overrides, the recipe's schedules, the resumable sampler, and real runs
(loss goes down, resume after SIGKILL, two-process gloo keeps ranks identical)."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train

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
    cfg = train.parse_config(['--max_steps', '12', '--lr=0.5', '--resume', '--out_dir=x', '--compile', 'false'])
    assert cfg['max_steps'] == 12 and isinstance(cfg['max_steps'], int)
    assert cfg['lr'] == 0.5 and cfg['resume'] is True and cfg['out_dir'] == 'x' and cfg['compile'] is False
    # keys left at None come from the dataset's recipe
    assert cfg['batch_size'] == train.RECIPES['synthetic']['batch_size']
    assert train.config['max_steps'] is None  # the global dict itself is untouched


def test_imagenet_selects_released_recipe():
    cfg = train.parse_config(['--dataset', 'imagenet', '--data_dir', '/data/imagenet'])
    assert (cfg['model_size'], cfg['image_size'], cfg['batch_size'], cfg['lr']) == ('paper', 128, 8, 5e-5)
    assert (cfg['max_steps'], cfg['n_coarse'], cfg['n_fine']) == (300_000, 32, 32)
    assert (cfg['beta1'], cfg['beta2'], cfg['warmup_frac'], cfg['div_factor']) == (0.9, 0.99, 0.02, 25.0)
    assert (cfg['w_rgb'], cfg['w_depth'], cfg['w_vgg'], cfg['w_clip']) == (1.0, 2.0, 1.0, 0.175)
    assert (cfg['w_clip_novel'], cfg['w_tv_novel'], cfg['w_vgg_novel']) == (0.35, 0.1, 2.0)


@pytest.mark.parametrize('argv, message', [
    (['--not_a_key', '1'], 'unknown config key --not_a_key'),
    (['--max_steps', 'ten'], '--max_steps expects an integer'),
    (['--lr', 'fast'], '--lr expects a number'),
    (['--resume', 'maybe'], '--resume expects true/false'),
    (['--dataset', 'mnist'], '--dataset must be one of'),
    (['--dataset', 'imagenet'], '--dataset imagenet needs --data_dir'),
    (['--max_steps'], '--max_steps needs a value'),
    (['--batch_size', '0'], '--batch_size must be positive'),
    (['oops'], "unexpected argument 'oops'"),
])
def test_config_errors(argv, message):
    with pytest.raises(train.ConfigError, match=message.replace('(', r'\(')):
        train.parse_config(argv)


def test_cli_error_is_one_line_and_exit_1():
    r = run_train(['--max_steps', 'ten'])
    assert r.returncode == 1
    assert r.stderr.strip().count('\n') == 0 and 'expects an integer' in r.stderr


def test_help_lists_every_key():
    r = run_train(['--help'])
    assert r.returncode == 0
    for key in train.config:
        assert f'--{key}' in r.stdout


# -----------------------------------------------------------------------------
# the recipe's schedules (G3DR.md section 5)

def test_novel_probability_and_camera_curriculum():
    cfg = train.parse_config(['--max_steps', '300'])
    assert train.p_novel(0, cfg) == 0 and train.p_novel(30, cfg) == pytest.approx(0.2)
    assert train.p_novel(60, cfg) == 0.4 and train.p_novel(299, cfg) == 0.4
    g = torch.Generator().manual_seed(0)
    yaw0, pitch0 = train.novel_camera(0, 4000, cfg, g)          # d = 24: yaw within +-7.5 degrees
    yaw1, pitch1 = train.novel_camera(100, 4000, cfg, g)        # d = 6 after the first third: +-30 degrees
    assert (yaw0 - math.pi / 2).abs().max() <= math.pi / 24 and (yaw0 - math.pi / 2).abs().max() > 0.95 * math.pi / 24
    assert (yaw1 - math.pi / 2).abs().max() <= math.pi / 6 and (yaw1 - math.pi / 2).abs().max() > 0.95 * math.pi / 6
    assert (pitch1 - math.pi / 2).abs().max() <= math.pi / 18


def test_loss_weight_schedule():
    cfg = train.parse_config(['--max_steps', '100'])
    early, late = train.loss_weights(10, cfg), train.loss_weights(60, cfg)
    assert early['vgg'] == 0 and early['clip'] == 0 and early['opacity'] == pytest.approx(0.2)
    assert late['vgg'] == 1.0 and late['clip'] == 0.175 and late['opacity'] == 1.0


# -----------------------------------------------------------------------------
# the resumable, distributed sampler

def test_sampler_resumes_exactly_and_splits_ranks():
    full = list(train.StepBatchSampler(10, 3, 0, 1, seed=5, start_step=0, max_steps=8))
    resumed = list(train.StepBatchSampler(10, 3, 0, 1, seed=5, start_step=5, max_steps=8))
    assert resumed == full[5:]
    # one epoch: every index once
    assert sorted(sum(full[:3], []) + full[3][:1]) == list(range(10))
    # two ranks: disjoint within an epoch, and together the single-process stream
    r0 = list(train.StepBatchSampler(12, 3, 0, 2, seed=5, start_step=0, max_steps=2))
    r1 = list(train.StepBatchSampler(12, 3, 1, 2, seed=5, start_step=0, max_steps=2))
    single = list(train.StepBatchSampler(12, 6, 0, 1, seed=5, start_step=0, max_steps=2))
    assert [a + b for a, b in zip(r0, r1)] == single
    assert sorted(sum(r0 + r1, [])) == list(range(12))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / 'ckpt.pt'
    train.save_checkpoint(str(path), {'step': 1})

    def broken_save(obj, f):
        f.write(b'half a checkpoint')
        raise KeyboardInterrupt  # killed mid-write
    monkeypatch.setattr(torch, 'save', broken_save)
    with pytest.raises(KeyboardInterrupt):
        train.save_checkpoint(str(path), {'step': 2})
    monkeypatch.undo()
    assert torch.load(path)['step'] == 1  # the previous checkpoint is intact
    assert os.listdir(tmp_path) == ['ckpt.pt']  # and no temporary file is left behind
