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


def test_rgbd_stage_recipe_comes_first_and_overrides_win():
    cfg = train.parse_config(['--stage', 'rgbd'])
    assert (cfg['image_size'], cfg['batch_size']) == (32, 16)
    assert train.parse_config(['--stage', 'rgbd', '--image_size', '64'])['image_size'] == 64
    assert train.parse_config(['--stage', 'rgbd', '--dataset', 'imagenet', '--data_dir', 'x'])['image_size'] == 128


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
# the recipe's schedules (README §5)

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
    ckpt = torch.load(out / 'ckpt.pt', weights_only=False)
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
        if ckpt_path.exists() and torch.load(ckpt_path, weights_only=False)['step'] >= 9:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.stderr.read()[-2000:]
    time.sleep(0.3)  # let it get somewhere in the middle of a step or a save
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    saved = torch.load(ckpt_path, weights_only=False)   # loads: never half-written
    killed_at = saved['step']
    assert killed_at >= 9 and killed_at % 3 == 0
    r = run_train(['--resume', '--out_dir', str(out), '--max_steps', str(killed_at + 6)])
    assert r.returncode == 0, r.stderr[-2000:]
    final = torch.load(ckpt_path, weights_only=False)
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
                        '--out_dir', str(out)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((tmp_path / 'run.json').read_text())
    assert result['max_diff'] == 0.0      # identical weights on both ranks
    assert result['moved'] > 0            # ... and they did train
    assert torch.load(out / 'ckpt.pt', weights_only=False)['step'] == 4


@pytest.mark.parametrize('policy', ['skip', 'stop'])
def test_nonfinite_loss_never_reaches_the_weights(tmp_path, monkeypatch, policy):
    real_losses = train.trigen_losses

    def poisoned(net, batch, step, *args):
        loss, terms, novel = real_losses(net, batch, step, *args)
        return (loss * float('nan') if step == 1 else loss), terms, novel
    monkeypatch.setattr(train, 'trigen_losses', poisoned)
    argv = [*TINY, '--out_dir', str(tmp_path / 'run'), '--max_steps', '3', '--nonfinite', policy]
    if policy == 'stop':
        with pytest.raises(FloatingPointError, match='non-finite loss or gradient at step 1'):
            train.main(argv)
        assert not (tmp_path / 'run' / 'ckpt.pt').exists()
        return
    model = train.main(argv)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = torch.load(tmp_path / 'run' / 'ckpt.pt', weights_only=False)
    assert saved['step'] == 3 and all(torch.isfinite(v).all() for v in saved['model'].values())


# -----------------------------------------------------------------------------
# canonical steps on random full-resolution pixels

def test_random_canonical_rays_carry_their_own_pixels():
    import data
    scenes = data.SyntheticScenes(2, image_size=24, seed=5)
    batch = scenes.__getitems__([0, 1])
    batch = torch.utils.data.default_collate(batch) if isinstance(batch, list) else batch
    image, depth = batch['image'], batch['depth']
    gen = torch.Generator().manual_seed(0)
    rays_o, rays_d, rgb, d = train._random_canonical_rays(image, depth, 50, gen)
    assert rays_o.shape == rays_d.shape == rgb.shape == (2, 50, 3) and d.shape == (2, 50, 1)
    # casting the true scenes along the chosen rays gives back exactly the pixels that came with them
    true_rgb, true_depth, _ = data.raycast([scenes.scene(0), scenes.scene(1)], rays_o, rays_d)
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
