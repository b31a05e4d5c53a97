"""Tests of train_rgbd.py, f_rgbd's training (the former `python train.py --stage rgbd`): its recipe and command
line, a real run (checkpoint of kind 'rgbd', sample grid), exact resume from its own checkpoint and from one that
`train.py --stage rgbd` wrote (commit 6e0eacb), the non-finite skip, and each training script refusing the
other's checkpoint. The plumbing the two scripts share (resume.py) is tested in test_train.py."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import checkpoint
import diffusion
import resume
import train
import train_rgbd
from checkpoint import UnsafeCheckpointError
from configurator import ConfigError

REPO = Path(__file__).resolve().parent
# 16 x 16 images, 4 steps of 16 images in 4 micro-batches of 4
ARGS = ['--image_size', '16', '--batch_size', '4', '--num_scenes', '32', '--max_steps', '4', '--save_every', '2',
        '--sample_every', '1000', '--log_every', '1', '--device', 'cpu']


def run_script(args):
    return subprocess.run([sys.executable, 'train_rgbd.py', *args], cwd=REPO, capture_output=True, text=True,
                          timeout=600)


def read_metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def _same_weights(a, b):
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), k


# -----------------------------------------------------------------------------
# recipe and command line

def test_recipe_comes_first_and_overrides_win():
    cfg = train_rgbd.parse_config([])
    assert cfg == train_rgbd.config
    assert (cfg['image_size'], cfg['batch_size'], cfg['global_batch'], cfg['size']) == (32, 16, 16, 'small')
    assert train_rgbd.parse_config(['--image_size', '64'])['image_size'] == 64
    imagenet = train_rgbd.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])
    assert (imagenet['image_size'], imagenet['size'], imagenet['global_batch'], imagenet['batch_size']) == \
        (128, 'paper', 48, 8)
    assert (imagenet['lr'], imagenet['cycle_beta1'], imagenet['grad_clip']) == (1e-4, True, 0.0)
    # f_trigen and f_rgbd write to different folders, f_rgbd where sample.py looks for it
    assert train.parse_config([])['out_dir'] == 'out'
    assert cfg['out_dir'] == 'out-rgbd'
    assert train_rgbd.parse_config(['--out_dir', 'mine'])['out_dir'] == 'mine'
    assert f"args.rgbd_ckpt or '{cfg['out_dir']}/ckpt.pt'" in (REPO / 'sample.py').read_text()  # sample.py's default


@pytest.mark.parametrize('argv, facts', [
    (['--not_a_key', '1'], ['--not_a_key']),
    (['--stage', 'rgbd'], ['--stage']),
    (['--dataset', 'mnist'], ['--dataset', "'mnist'"]),
    (['--dataset', 'imagenet'], ['imagenet', '--data_dir']),
    (['--dtype', 'fp8'], ['--dtype', "'fp8'"]),
    (['--max_steps', '0'], ['--max_steps', '0']),
    (['--batch_size', 'x'], ['--batch_size', "'x'"]),
])
def test_config_errors(argv, facts):
    with pytest.raises(ConfigError) as info:
        train_rgbd.parse_config(argv)
    message = str(info.value)
    assert '\n' not in message
    for fact in facts:
        assert fact in message, (fact, message)


def test_help_and_cli_errors():
    def shown(stdout):
        return dict(line[2:].split()[:2] for line in stdout.splitlines() if line.startswith('--'))
    r = run_script(['--help'])
    assert r.returncode == 0 and set(shown(r.stdout)) == set(train_rgbd.config)
    assert shown(r.stdout)['out_dir'] == "'out-rgbd'"
    r = run_script(['--dataset', 'imagenet', '--help'])   # the values of the chosen dataset, no --data_dir needed
    assert r.returncode == 0, r.stderr
    assert (shown(r.stdout)['image_size'], shown(r.stdout)['size']) == ('128', "'paper'")
    r = run_script(['--max_steps', 'ten'])
    assert r.returncode == 1 and r.stderr.strip().count('\n') == 0 and 'expects an integer' in r.stderr


def test_an_explicit_batch_size_that_cannot_make_global_batch_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r'--batch_size 5 does not divide the 16 images.*use --batch_size 4 or 8'):
        train_rgbd.main([*ARGS, '--batch_size', '5', '--out_dir', str(tmp_path / 'run')])
    assert not (tmp_path / 'run').exists()


# -----------------------------------------------------------------------------
# real runs

def _older_layout(state, path, numpy_tuple=False):
    """`state` (ours) as train.py --stage rgbd wrote it at 6e0eacb: no 'kind', the make_denoiser arguments as
    'denoiser_config', the whole train.py config (stage='rgbd', the denoiser size as 'rgbd_size'). numpy_tuple:
    and, as before per-rank RNG states, one RNG state with numpy's as a tuple (which only a trusted load reads)."""
    rng = state['rng']
    if numpy_tuple:
        s = rng[0]
        np.random.seed(0)  # any numpy state object: the real values go in below
        numpy_state = ('MT19937', s['numpy']['key'].numpy().astype(np.uint32), s['numpy']['pos'],
                       s['numpy']['has_gauss'], s['numpy']['cached_gaussian'])
        rng = dict(torch=s['torch'], numpy=numpy_state, python=tuple(s['python']))
    config = {k: v for k, v in state['config'].items() if k != 'size'}
    config = dict(train.config, **config, stage='rgbd', rgbd_size=state['config']['size'])
    torch.save(dict(stage='rgbd', model=state['model'], optimizer=state['optimizer'], scheduler=state['scheduler'],
                    step=state['step'], config=config, denoiser_config=state['model_config'], rng=rng), path)


def test_checkpoint_is_safe_and_resumes_exactly_also_from_the_older_format(tmp_path, monkeypatch, capsys):
    """An f_rgbd run interrupted after its step-2 save, then resumed, ends with the weights of the
    uninterrupted run (the diffusion noise comes from the restored RNG state): from our checkpoint as it is,
    from one in the layout of train.py --stage rgbd (6e0eacb; a real one of that commit resumes the same), and,
    with trust, from one with the numpy RNG state of before per-rank states."""
    full = train_rgbd.main([*ARGS, '--out_dir', str(tmp_path / 'full')])
    assert '| 1 process x 4 micro-batch x 4 accumulation = 16 images a step |' in capsys.readouterr().out
    saved = checkpoint.load_run(tmp_path / 'full' / 'ckpt.pt', 'rgbd')   # the safe loader reads it
    assert saved['kind'] == 'rgbd' and saved['step'] == 4 and len(saved['rng']) == 1
    assert saved['model_config'] == dict(num_classes=6, size='small', image_size=16)
    assert checkpoint.load_denoiser(tmp_path / 'full' / 'ckpt.pt').num_classes == 6
    assert (tmp_path / 'full' / 'samples_0000004.png').exists()   # rgbd_grid at the last step
    records = read_metrics(tmp_path / 'full')
    assert [m['step'] for m in records] == [1, 2, 3, 4] and all(len(m['views']) == 4 for m in records)
    assert all(m['loss'] == pytest.approx(sum(v['loss'] for v in m['views']) / 4) for m in records)

    monkeypatch.setattr(train_rgbd, 'rgbd_grid', lambda *a, **k: None)  # the pictures are tested above
    real_save = resume.save_run

    def save_then_die(path, kind, model, model_config, optimizer, scheduler, step, *args):
        real_save(path, kind, model, model_config, optimizer, scheduler, step, *args)
        if step == 2:
            raise KeyboardInterrupt
    monkeypatch.setattr(resume, 'save_run', save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_rgbd.main([*ARGS, '--out_dir', str(tmp_path / 'ours')])
    monkeypatch.setattr(resume, 'save_run', real_save)
    at_2 = torch.load(tmp_path / 'ours' / 'ckpt.pt', weights_only=True)
    for name, numpy_tuple in (('older', False), ('oldest', True)):
        shutil.copytree(tmp_path / 'ours', tmp_path / name)
        _older_layout(at_2, tmp_path / name / 'ckpt.pt', numpy_tuple)

    resumed = [train_rgbd.main(['--resume', '--out_dir', str(tmp_path / 'ours')]),
               train_rgbd.main(['--resume', '--out_dir', str(tmp_path / 'older')])]   # 6e0eacb's files are safe
    with pytest.raises(UnsafeCheckpointError, match=r'oldest/ckpt.pt: refused.*--trust_checkpoint'):
        train_rgbd.main(['--resume', '--out_dir', str(tmp_path / 'oldest')])
    resumed.append(train_rgbd.main(['--resume', '--out_dir', str(tmp_path / 'oldest'), '--trust_checkpoint']))
    for name in ('older', 'oldest'):
        rewritten = checkpoint.load_run(tmp_path / name / 'ckpt.pt', 'rgbd')  # rewritten safe, in our format
        assert rewritten['step'] == 4 and rewritten['config']['size'] == 'small'
        assert rewritten['config'] == dict(saved['config'], out_dir=str(tmp_path / name), resume=True,
                                           trust_checkpoint=name == 'oldest')
    for model in resumed:
        _same_weights(full, model)
    assert [m['step'] for m in read_metrics(tmp_path / 'ours')] == [1, 2, 3, 4]


@pytest.mark.parametrize('policy', ['skip', 'stop'])
def test_nonfinite_loss_never_reaches_the_weights(tmp_path, monkeypatch, policy):
    monkeypatch.setattr(train_rgbd, 'rgbd_grid', lambda *a, **k: None)
    real_losses, calls = train_rgbd.rgbd_losses, []

    def poisoned(*args):
        calls.append(1)
        loss = real_losses(*args)
        return loss * float('nan') if len(calls) == 2 else loss   # step 1's (only) micro-batch
    monkeypatch.setattr(train_rgbd, 'rgbd_losses', poisoned)
    argv = [*ARGS, '--global_batch', '4', '--max_steps', '3', '--out_dir', str(tmp_path / 'run'), '--nonfinite', policy]
    if policy == 'stop':
        with pytest.raises(FloatingPointError, match=r'non-finite.* step 1\b'):
            train_rgbd.main(argv)
        assert not (tmp_path / 'run' / 'ckpt.pt').exists()
        return
    model = train_rgbd.main(argv)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    saved = checkpoint.load_run(tmp_path / 'run' / 'ckpt.pt', 'rgbd')
    assert saved['step'] == 3 and all(torch.isfinite(v).all() for v in saved['model'].values())
    assert [len(m['views']) for m in read_metrics(tmp_path / 'run')] == [1, 0, 1]


def test_each_script_refuses_the_other_ones_checkpoint(tmp_path):
    from model import G3DR, MODEL_PRESETS

    def run_state(kind, model, model_config):
        optimizer, scheduler = resume.make_optimizer(model, 1e-3, (0.9, 0.99), 0.0, 10, 0.3, 25.0, False)
        return checkpoint.training_state(kind, model, model_config, step=2, config=dict(dataset='synthetic'),
                                         optimizer=optimizer, scheduler=scheduler, rng=[resume.rng_state('cpu')])
    g3dr = G3DR(**MODEL_PRESETS['tiny'])
    denoiser_config = dict(num_classes=3, size='small', image_size=8)
    for name, state in (('trigen', run_state('trigen', g3dr, g3dr.config)),
                        ('rgbd', run_state('rgbd', diffusion.make_denoiser(**denoiser_config), denoiser_config))):
        (tmp_path / name).mkdir()
        checkpoint.save(tmp_path / name / 'ckpt.pt', state)
    with pytest.raises(ValueError, match=r"trigen/ckpt.pt: a 'trigen' checkpoint .*not a 'rgbd' one"):
        train_rgbd.main(['--resume', '--out_dir', str(tmp_path / 'trigen')])
    with pytest.raises(ValueError, match=r"rgbd/ckpt.pt: a 'rgbd' checkpoint .*not a 'trigen' one"):
        train.main(['--resume', '--out_dir', str(tmp_path / 'rgbd')])
    # and a new run does not overwrite a run's checkpoint
    with pytest.raises(ConfigError, match='already exists: pass --resume'):
        train_rgbd.main([*ARGS, '--out_dir', str(tmp_path / 'rgbd')])
