"""Tests of sample.py (pictures and --eval from our checkpoints and the authors' format) and of the
one-line errors both command-line programs give on bad input."""
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from model import G3DR, MODEL_PRESETS
from scenes import SyntheticScenes
from test_model import write_malicious_checkpoint

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
    torch.save(dict(model_config=model.config, model=model.state_dict(), config=dict(seed=7), step=0), path)
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


def test_eval_writes_the_promised_metrics(small_ckpt):
    r = run('sample.py', '--eval', '--ckpt', small_ckpt, '--eval_scenes', 2, '--n_coarse', 8, '--n_fine', 8)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((small_ckpt.parent / 'eval.json').read_text())
    for key in ('psnr_canonical', 'depth_mae_canonical', 'psnr_novel', 'depth_mae_novel', 'nfs', 'psnr_novel_static',
                'psnr_novel_warp', 'depth_mae_novel_static', 'psnr_canonical_mean'):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key], key
        assert key in r.stdout
    assert 1 <= metrics['nfs'] <= 64
    assert set(metrics['per_view']) == {'canonical', 'yaw-15', 'yaw+15', 'yaw-30', 'yaw+30', 'pitch-10', 'pitch+10'}
    for name, view in metrics['per_view'].items():
        assert {'psnr', 'depth_mae', 'psnr_static', 'psnr_warp', 'depth_mae_static'} <= set(view), name
    # at the canonical view the input is the truth: leaving it (static) or warping it onto itself is exact
    assert metrics['per_view']['canonical']['psnr_static'] >= 90
    assert metrics['per_view']['canonical']['psnr_warp'] >= 60
    assert metrics['per_view']['canonical']['depth_mae_static'] == 0
    novel = [v for k, v in metrics['per_view'].items() if k != 'canonical']
    assert abs(metrics['psnr_novel_static'] - sum(v['psnr_static'] for v in novel) / 6) < 1e-9


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
# the metrics of --eval (README's numbers), against hand computations

def test_masked_psnr():
    import sample
    a = torch.zeros(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    b[0] = 0.1
    b[0, :, 1, 1] = 1.0                                          # outside image 0's mask: ignored
    b[1, 2, 0, 1] = 0.5                                          # one value of twelve off by 0.5
    mask = torch.ones(2, 1, 2, 2)
    mask[0, 0, 1, 1] = 0
    # image 0: MSE over its 3 pixels x 3 channels = 0.1^2 -> 20 dB; image 1: MSE = 0.25 / 12
    expected = [20.0, -10 * math.log10(0.25 / 12)]
    assert sample.psnr(a, b, mask).tolist() == pytest.approx(expected, abs=1e-4)
    assert sample.psnr(a, b, mask.bool()).tolist() == pytest.approx(expected, abs=1e-4)
    assert sample.psnr(a[1:], b[1:]).tolist() == pytest.approx(expected[1:], abs=1e-4)   # no mask: every pixel


def test_masked_depth_error():
    import sample
    true = torch.tensor([[4.0, 5.0], [6.0, 0.0]]).view(1, 1, 2, 2)   # 0: the ray hit nothing
    pred = torch.tensor([[4.5, 5.0], [5.5, 5.0]]).view(1, 1, 2, 2)
    valid = true > 0
    assert sample.depth_mae(pred, true, valid) == pytest.approx((0.5 + 0 + 0.5) / 3)
    both = torch.cat([pred, pred + 1]), torch.cat([true, true]), torch.cat([valid, valid])
    # pooled over the batch's valid pixels: errors 0.5, 0, 0.5 and 1.5, 1, 0.5
    assert sample.depth_mae(*both) == pytest.approx((1 + 3) / 6)
    assert sample.depth_mae(pred, true, torch.zeros_like(valid)) == 0


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
    """A fresh f_rgbd checkpoint as train.py --stage rgbd writes it (untrained: plumbing only)."""
    import diffusion
    torch.manual_seed(0)
    config = dict(num_classes=6, size='small', image_size=32)
    path = tmp_path_factory.mktemp('rgbd') / 'ckpt.pt'
    torch.save(dict(denoiser_config=config, model=diffusion.make_denoiser(**config).state_dict(), stage='rgbd'), path)
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


def test_generative_eval(rgbd_ckpt, tmp_path):
    r = run('sample.py', '--eval', '--rgbd_ckpt', rgbd_ckpt, '--ckpt', tmp_path / 'none.pt', '--per_class', 1,
            '--steps', 2, '--eval_scenes', 4)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((rgbd_ckpt.parent / 'eval.json').read_text())
    for key in ('nfs_generated', 'nfs_heldout', 'nn_dist', 'ref_nn_dist', 'class_acc'):
        assert isinstance(metrics[key], float), key
    assert metrics['samples'] == 6


# --- the warp baseline of --eval ---------------------------------------------------------------

def test_warp_into_the_input_camera_reproduces_the_input():
    import sample
    scenes = SyntheticScenes(2, image_size=32, seed=3)
    image, depth = scenes.render_views([0, 1], math.pi / 2, math.pi / 2)
    warped, warped_depth, hit = sample.forward_warp(image, depth, math.pi / 2, math.pi / 2)
    assert hit.all()  # every pixel lands on itself
    torch.testing.assert_close(warped, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(warped_depth, depth, atol=1e-4, rtol=0)


def test_warp_moves_a_fronto_parallel_plane_where_the_camera_geometry_says():
    import math
    import sample
    from render import get_rays, orbit_camera
    S, fov, plane_x = 33, 18.0, 0.8
    # a plane x = 0.8 seen by the canonical camera (at (-5, 0, 0), looking along +x)
    rays_o, rays_d = get_rays(orbit_camera(math.pi / 2, math.pi / 2), fov, S)
    depth = ((plane_x + 5) / rays_d[..., 0]).view(1, 1, S, S)
    image = torch.zeros(1, 3, S, S)
    image[0, 0, :, 16] = 1  # a red vertical line through the image centre: the points (0.8, y, 0)
    yaw = math.pi / 2 + 0.3
    warped, warped_depth, hit = sample.forward_warp(image, depth, yaw, math.pi / 2)
    # where the new camera sees the point (0.8, 0, 0)
    cam2world = orbit_camera(yaw, math.pi / 2)[0]
    p = cam2world[:3, :3].T @ (torch.tensor([plane_x, 0.0, 0.0]) - cam2world[:3, 3])
    col = round(float((p[0] / -p[2] / math.tan(math.radians(fov) / 2) + 1) / 2 * (S - 1)))
    assert abs(col - 16) >= 3  # the camera moved enough for the line to move
    assert warped[0, 0, 12:21, col].min() > 0.99        # the line is there ...
    assert warped[0, 0, 12:21, 16].max() < 0.01         # ... and no longer at the centre
    # depth along the new ray is the distance from the new camera
    assert abs(float(warped_depth[0, 0, 16, col]) - float(p.norm())) < 0.05
    assert hit.float().mean() > 0.8  # a plane seen slightly turned: few holes


def test_fill_holes_spreads_valid_neighbours_inwards():
    import sample
    image = torch.zeros(1, 1, 5, 5)
    image[..., 0] = 2.0                        # a left column of 2s, the rest a hole
    valid = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    valid[..., 0] = True
    filled = sample.fill_holes(image, valid)
    torch.testing.assert_close(filled, torch.full_like(filled, 2.0))
    valid[...] = False
    assert sample.fill_holes(image, valid).abs().max() == 0  # nothing to spread: stays zero
