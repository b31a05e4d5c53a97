"""Tests of sample.py (pictures, orbits and class-conditional generation from our checkpoints and the authors'
format) and of the one-line errors both command-line programs (train.py, sample.py) give on bad input.
The metrics are test_evaluate.py's."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import checkpoint
from model import G3DR, MODEL_PRESETS
from test_checkpoint import write_malicious_checkpoint

REPO = Path(__file__).resolve().parent
SAMPLES = REPO / 'fixtures' / 'imagenet_samples'
TINY_CKPT = REPO / 'fixtures' / 'official_tiny_ckpt.pt'
FAST = ['--frames', '3', '--n_coarse', '8', '--n_fine', '8']


def run(script, *args, cwd=REPO):
    return subprocess.run([sys.executable, str(REPO / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


# Runs a script with every network connection refused inside it, so that what it does when pretrained
# weights are missing is the same on a machine with network and one without.
OFFLINE = """
import os, runpy, socket, sys
def refuse(*args, **kwargs):
    raise OSError('network disabled by the test')
socket.socket.connect = socket.create_connection = refuse
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_offline(script, *args, cwd=REPO):
    return subprocess.run([sys.executable, '-c', OFFLINE, str(REPO / script), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def assert_one_line_error(r, *fragments):
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip()
    assert err.count('\n') == 0 and err.startswith('error: '), err[-2000:]
    for fragment in fragments:
        assert fragment in err, err


@pytest.fixture(scope='module')
def small_ckpt(tmp_path_factory):
    """A fresh, untrained checkpoint in our format (what train.py writes, less the optimiser)."""
    torch.manual_seed(0)
    model = G3DR(dict(MODEL_PRESETS['tiny'], image_size=32))
    path = tmp_path_factory.mktemp('ckpt') / 'ckpt.pt'
    torch.save(checkpoint.training_state('trigen', model, model.config, step=0, config=dict(seed=7)), path)
    return path


def gif_frames(path):
    with Image.open(path) as im:
        return im.n_frames, im.size


def test_default_run_writes_canonical_png_and_orbit_gifs(small_ckpt):
    r = run('sample.py', '--ckpt', small_ckpt, '--num_scenes', 2, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    out = small_ckpt.parent / 'samples'
    assert (out / 'scene_canonical.png').exists()
    for b in range(2):
        frames, (w, h) = gif_frames(out / f'scene_{b}_orbit.gif')
        assert frames == 3 and (w, h) == (64, 32)  # RGB beside depth, at the model's image size


def test_sr_checkpoint_adds_2x_pictures_and_orbits(small_ckpt, tmp_path):
    """--sr_ckpt: beside the native pictures, the 2x canonical grid and orbit GIFs, made by the SR network."""
    from sr import SR_PRESETS, SRNet
    torch.manual_seed(0)
    net = SRNet(**SR_PRESETS['cpu'])
    sr_path = tmp_path / 'sr.pt'
    checkpoint.save(sr_path, checkpoint.training_state('sr', net, SR_PRESETS['cpu']))
    out = tmp_path / 'pictures'
    r = run('sample.py', '--ckpt', small_ckpt, '--num_scenes', 2, '--sr_ckpt', sr_path, '--out_dir', out, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    with Image.open(out / 'scene_canonical.png') as native, Image.open(out / 'scene_canonical_sr2x.png') as big:
        assert big.size[0] > 1.9 * native.size[0] and big.size[1] > 1.9 * native.size[1]
    for b in range(2):
        assert gif_frames(out / f'scene_{b}_orbit.gif') == (3, (64, 32))
        assert gif_frames(out / f'scene_{b}_orbit_sr2x.gif') == (3, (128, 64))  # RGB 2x beside depth 2x
    r = run('sample.py', '--ckpt', small_ckpt, '--sr_ckpt', small_ckpt, '--out_dir', out, *FAST)
    assert_one_line_error(r, str(small_ckpt))  # an f_trigen checkpoint is not an SR one


def test_official_checkpoint_on_real_photos(tmp_path):
    photos = tmp_path / 'photos'
    photos.mkdir()
    for name in ('1551', '601'):
        shutil.copy(SAMPLES / f'{name}.jpg', photos)
        shutil.copy(SAMPLES / f'{name}_depth.png', photos)
    r = run('sample.py', '--official', '--ckpt', TINY_CKPT, '--input', photos, '--out_dir', tmp_path / 'out', *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ('1551', '601'):
        assert (tmp_path / 'out' / f'{name}_canonical.png').exists()
        assert gif_frames(tmp_path / 'out' / f'{name}_orbit.gif')[0] == 3


# -----------------------------------------------------------------------------
# bad input: one line on stderr, exit status 1

NO_PERCEPTUAL = ['--w_vgg', '0', '--w_vgg_novel', '0', '--w_clip', '0', '--w_clip_novel', '0']


def test_imagenet_without_pretrained_weights_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty-cache'))  # and, offline, nothing to download
    folder = tmp_path / 'data' / 'n01'
    folder.mkdir(parents=True)
    Image.new('RGB', (40, 40)).save(folder / 'a.jpg')
    Image.new('I;16', (40, 40)).save(folder / 'a_depth.png')
    r = run_offline('train.py', '--dataset', 'imagenet', '--data_dir', tmp_path / 'data', '--out_dir', tmp_path / 'o',
                    '--device', 'cpu', '--w_clip', '0', '--w_clip_novel', '0')
    assert_one_line_error(r, 'VGG16', 'w_vgg=0')


def test_missing_data_folder(tmp_path):
    r = run('train.py', '--dataset', 'imagenet', '--data_dir', tmp_path / 'nowhere', '--out_dir', tmp_path / 'o',
            '--device', 'cpu')
    assert_one_line_error(r, 'nowhere')


def test_missing_depth(tmp_path):
    folder = tmp_path / 'data' / 'n01'
    folder.mkdir(parents=True)
    Image.new('RGB', (40, 40), (200, 10, 10)).save(folder / 'a.jpg')
    r = run('train.py', '--dataset', 'imagenet', '--data_dir', tmp_path / 'data', '--out_dir', tmp_path / 'o',
            '--device', 'cpu')
    assert_one_line_error(r, 'a.jpg')
    r = run('sample.py', '--ckpt', TINY_CKPT, '--official', '--input', folder / 'a.jpg', '--depth', folder / 'a_depth.png')
    assert_one_line_error(r, 'a_depth.png')


def test_corrupt_image(tmp_path, small_ckpt):
    folder = tmp_path / 'data' / 'n01'
    folder.mkdir(parents=True)
    (folder / 'a.jpg').write_bytes(b'\xff\xd8\xff\xe0 definitely not a jpeg')
    shutil.copy(SAMPLES / '1551_depth.png', folder / 'a_depth.png')
    r = run('train.py', '--dataset', 'imagenet', '--data_dir', tmp_path / 'data', '--out_dir', tmp_path / 'o',
            '--model_size', 'tiny', '--image_size', 32, '--render_size', 8, '--num_workers', 1, '--batch_size', 1,
            '--global_batch', 1, '--device', 'cpu', *NO_PERCEPTUAL)
    assert_one_line_error(r, 'a.jpg')
    r = run('sample.py', '--ckpt', small_ckpt, '--input', folder / 'a.jpg', *FAST)
    assert_one_line_error(r, 'a.jpg')


def test_not_a_checkpoint(tmp_path):
    bogus = tmp_path / 'ckpt.pt'
    bogus.write_text('this is not a checkpoint')
    r = run('sample.py', '--ckpt', bogus)
    assert_one_line_error(r, str(bogus))
    r = run('sample.py', '--ckpt', bogus, '--official')
    assert_one_line_error(r, str(bogus))
    r = run('sample.py', '--ckpt', tmp_path / 'missing.pt')
    assert_one_line_error(r, 'missing.pt')


def test_malicious_checkpoint_is_refused_and_runs_only_when_trusted(tmp_path, rgbd_ckpt):
    marker = tmp_path / 'created_by_payload'
    evil = write_malicious_checkpoint(tmp_path / 'evil.pt', marker)
    for args in (['--ckpt', evil], ['--ckpt', evil, '--official'],
                 ['--class_id', 0, '--num', 1, '--steps', 1, '--rgbd_ckpt', evil, '--out_dir', tmp_path / 'out']):
        r = run('sample.py', *args)
        assert_one_line_error(r, str(evil), '--trust_checkpoint')
        assert not marker.exists()  # the payload never ran
    # f_trigen after generating with f_rgbd (the sampler's progress bars come first)
    r = run('sample.py', '--class_id', 0, '--num', 1, '--steps', 1, '--rgbd_ckpt', rgbd_ckpt, '--ckpt', evil,
            '--out_dir', tmp_path / 'out')
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and last.startswith('error: ') and str(evil) in last and '--trust_checkpoint' in last
    assert not marker.exists()
    # trusted: a one-line warning, then the file is unpickled (the payload runs), then its weights are
    # rejected as not fitting the model
    r = run('sample.py', '--ckpt', evil, '--trust_checkpoint')
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 1 and len(lines) == 3, r.stderr
    assert lines[0].startswith('warning: ') and str(evil) in lines[0] and 'runs any code' in lines[0]
    assert lines[1] == 'payload ran' and marker.exists()
    assert lines[2].startswith('error: ') and 'does not fit' in lines[2]


# -----------------------------------------------------------------------------
# f_rgbd: class-conditional generation

@pytest.fixture(scope='module')
def rgbd_ckpt(tmp_path_factory):
    """A fresh f_rgbd checkpoint as train_rgbd.py writes it (untrained: plumbing only)."""
    import diffusion
    torch.manual_seed(0)
    config = dict(num_classes=6, size='small', image_size=32)
    path = tmp_path_factory.mktemp('rgbd') / 'ckpt.pt'
    torch.save(checkpoint.training_state('rgbd', diffusion.make_denoiser(**config), config), path)
    return path


def test_generation_is_seeded_and_works_without_f_trigen(rgbd_ckpt, tmp_path):
    args = ['--class_id', 1, '--num', 2, '--steps', 3, '--rgbd_ckpt', rgbd_ckpt, '--ckpt', tmp_path / 'none.pt']
    pictures = []
    for run_dir in ('a', 'b', 'c'):
        seed = ['--seed', 5 if run_dir != 'c' else 6]
        r = run('sample.py', *args, *seed, '--out_dir', tmp_path / run_dir)
        assert r.returncode == 0, r.stderr[-2000:]
        assert 'RGB-D samples only' in r.stdout
        pictures.append((tmp_path / run_dir / 'class1_rgbd.png').read_bytes())
    assert pictures[0] == pictures[1] and pictures[0] != pictures[2]  # same seed, same samples


def test_generation_lifts_samples_to_3d(rgbd_ckpt, small_ckpt, tmp_path):
    r = run('sample.py', '--class_id', 0, '--num', 2, '--steps', 2, '--rgbd_ckpt', rgbd_ckpt, '--ckpt', small_ckpt,
            '--out_dir', tmp_path, *FAST)
    assert r.returncode == 0, r.stderr[-2000:]
    assert (tmp_path / 'class0_rgbd.png').exists()
    for b in range(2):
        assert gif_frames(tmp_path / f'class0_{b}_orbit.gif')[0] == 3
