"""Tests of evaluate.py and fidelity.py: the held-out metrics against hand computations, the warp baseline's
geometry, NFS and sample quality, mesh accuracy against the synthetic scenes' true surfaces, and the
FID / IS / KID plumbing through torch-fidelity with a small stand-in feature extractor (no Inception
weights needed), its offline error and its JSON."""
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint
import data
import diffusion
import evaluate
import fidelity
from model import G3DR, MODEL_PRESETS
from scenes import SyntheticScenes

REPO = Path(__file__).resolve().parent


def write_trigen(path, decoder_bias=None):
    """An untrained tiny f_trigen checkpoint in our format; decoder_bias makes the box dense (surfaces)."""
    torch.manual_seed(0)
    model = G3DR(dict(MODEL_PRESETS['tiny'], image_size=32))
    if decoder_bias is not None:
        with torch.no_grad():
            model.decoder.net[2].bias[0] = decoder_bias
    torch.save(checkpoint.training_state('trigen', model, model.config, step=0, config=dict(seed=7)), path)
    return path


def write_rgbd(path, num_classes=6):
    """An untrained f_rgbd checkpoint as train_rgbd.py writes it (plumbing only)."""
    torch.manual_seed(0)
    config = dict(num_classes=num_classes, size='small', image_size=32)
    torch.save(checkpoint.training_state('rgbd', diffusion.make_denoiser(**config), config), path)
    return path


@pytest.fixture(scope='module')
def ckpts(tmp_path_factory):
    """Checkpoints in folders of their own (the JSON files go beside them)."""
    folders = {name: tmp_path_factory.mktemp(name) for name in ('trigen', 'dense', 'rgbd')}
    return dict(trigen=write_trigen(folders['trigen'] / 'ckpt.pt'),
                dense=write_trigen(folders['dense'] / 'ckpt.pt', decoder_bias=3.0),
                rgbd=write_rgbd(folders['rgbd'] / 'ckpt.pt'))


# -----------------------------------------------------------------------------
# held-out reconstruction

def test_eval_writes_the_promised_metrics(ckpts):
    r = subprocess.run([sys.executable, str(REPO / 'evaluate.py'), '--ckpt', str(ckpts['trigen']), '--scenes', '2',
                        '--n_coarse', '8', '--n_fine', '8'], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    metrics = json.loads((ckpts['trigen'].parent / 'eval.json').read_text())
    for key in ('psnr_canonical', 'depth_mae_canonical', 'psnr_novel', 'depth_mae_novel', 'nfs', 'psnr_novel_static',
                'psnr_novel_warp', 'depth_mae_novel_static', 'psnr_canonical_mean', 'opacity_novel', 'opacity_yaw30'):
        assert isinstance(metrics[key], float) and metrics[key] == metrics[key], key
        assert key in r.stdout
    assert 1 <= metrics['nfs'] <= 64 and metrics['seed'] == 8  # the run's seed (7) + 1
    assert set(metrics['per_view']) == {'canonical', 'yaw-15', 'yaw+15', 'yaw-30', 'yaw+30', 'pitch-10', 'pitch+10'}
    for name, view in metrics['per_view'].items():
        assert {'psnr', 'depth_mae', 'psnr_static', 'psnr_warp', 'depth_mae_static', 'opacity'} <= set(view), name
        assert 0 <= view['opacity'] <= 1 + 1e-6, name
    # at the canonical view the input is the truth: leaving it (static) or warping it onto itself is exact
    assert metrics['per_view']['canonical']['psnr_static'] >= 90
    assert metrics['per_view']['canonical']['psnr_warp'] >= 60
    assert metrics['per_view']['canonical']['depth_mae_static'] == 0
    novel = [v for k, v in metrics['per_view'].items() if k != 'canonical']
    assert abs(metrics['psnr_novel_static'] - sum(v['psnr_static'] for v in novel) / 6) < 1e-9
    assert metrics['opacity_yaw30'] == min(metrics['per_view'][v]['opacity'] for v in ('yaw-30', 'yaw+30'))


def test_masked_psnr():
    a = torch.zeros(2, 3, 2, 2)
    b = torch.zeros(2, 3, 2, 2)
    b[0] = 0.1
    b[0, :, 1, 1] = 1.0                                          # outside image 0's mask: ignored
    b[1, 2, 0, 1] = 0.5                                          # one value of twelve off by 0.5
    mask = torch.ones(2, 1, 2, 2)
    mask[0, 0, 1, 1] = 0
    # image 0: MSE over its 3 pixels x 3 channels = 0.1^2 -> 20 dB; image 1: MSE = 0.25 / 12
    expected = [20.0, -10 * math.log10(0.25 / 12)]
    assert evaluate.psnr(a, b, mask).tolist() == pytest.approx(expected, abs=1e-4)
    assert evaluate.psnr(a, b, mask.bool()).tolist() == pytest.approx(expected, abs=1e-4)
    assert evaluate.psnr(a[1:], b[1:]).tolist() == pytest.approx(expected[1:], abs=1e-4)   # no mask: every pixel


def test_masked_depth_error():
    true = torch.tensor([[4.0, 5.0], [6.0, 0.0]]).view(1, 1, 2, 2)   # 0: the ray hit nothing
    pred = torch.tensor([[4.5, 5.0], [5.5, 5.0]]).view(1, 1, 2, 2)
    valid = true > 0
    assert evaluate.depth_mae(pred, true, valid) == pytest.approx((0.5 + 0 + 0.5) / 3)
    both = torch.cat([pred, pred + 1]), torch.cat([true, true]), torch.cat([valid, valid])
    # pooled over the batch's valid pixels: errors 0.5, 0, 0.5 and 1.5, 1, 0.5
    assert evaluate.depth_mae(*both) == pytest.approx((1 + 3) / 6)
    assert evaluate.depth_mae(pred, true, torch.zeros_like(valid)) == 0


def test_warp_into_the_input_camera_reproduces_the_input():
    scenes = SyntheticScenes(2, image_size=32, seed=3)
    image, depth = scenes.render_views([0, 1], math.pi / 2, math.pi / 2)
    warped, warped_depth, hit = evaluate.forward_warp(image, depth, math.pi / 2, math.pi / 2)
    assert hit.all()  # every pixel lands on itself
    torch.testing.assert_close(warped, image, atol=1e-5, rtol=0)
    torch.testing.assert_close(warped_depth, depth, atol=1e-4, rtol=0)


def test_warp_moves_a_fronto_parallel_plane_where_the_camera_geometry_says():
    from render import get_rays, orbit_camera
    S, fov, plane_x = 33, 18.0, 0.8
    # a plane x = 0.8 seen by the canonical camera (at (-5, 0, 0), looking along +x)
    rays_o, rays_d = get_rays(orbit_camera(math.pi / 2, math.pi / 2), fov, S)
    depth = ((plane_x + 5) / rays_d[..., 0]).view(1, 1, S, S)
    image = torch.zeros(1, 3, S, S)
    image[0, 0, :, 16] = 1  # a red vertical line through the image centre: the points (0.8, y, 0)
    yaw = math.pi / 2 + 0.3
    warped, warped_depth, hit = evaluate.forward_warp(image, depth, yaw, math.pi / 2)
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
    image = torch.zeros(1, 1, 5, 5)
    image[..., 0] = 2.0                        # a left column of 2s, the rest a hole
    valid = torch.zeros(1, 1, 5, 5, dtype=torch.bool)
    valid[..., 0] = True
    filled = evaluate.fill_holes(image, valid)
    torch.testing.assert_close(filled, torch.full_like(filled, 2.0))
    valid[...] = False
    assert evaluate.fill_holes(image, valid).abs().max() == 0  # nothing to spread: stays zero


# -----------------------------------------------------------------------------
# generated RGB-D: NFS and sample quality

def test_non_flatness_score():
    flat = torch.full((3, 1, 8, 8), 5.0)
    assert evaluate.non_flatness_score(flat) == pytest.approx(1.0)
    two = torch.full((1, 1, 8, 8), 4.2)
    two[..., 4:] = 5.7                                           # half / half -> exp(log 2) = 2
    assert evaluate.non_flatness_score(two) == pytest.approx(2.0)
    spread = (4.0 + (torch.arange(64 * 4) // 4 + 0.5) / 32).view(1, 1, 16, 16)   # 4 values per bin
    assert evaluate.non_flatness_score(spread) == pytest.approx(64.0)
    assert evaluate.non_flatness_score(torch.cat([flat[:1], two])) == pytest.approx(1.5)   # mean over maps
    assert evaluate.non_flatness_score(torch.full((1, 8, 8), 9.0)) == pytest.approx(1.0)   # clamped, 3-D ok
    with pytest.raises(ValueError, match='near=6.0, far=4.0'):
        evaluate.non_flatness_score(flat, near=6.0, far=4.0)


def test_non_flatness_score_against_a_hand_computation():
    """A 4 x 4 map whose 64-bin histogram over [4, 6) (bin width 1/32) is 8, 4, 2, 2 pixels: the bin
    edge 4 + 1/32 belongs to bin 1, 6.5 is clamped into the last bin."""
    depth = torch.tensor([5.0] * 8 + [4 + 1 / 32] * 4 + [6.5] * 2 + [4 + 1 / 64] * 2).view(1, 1, 4, 4)
    p = [8 / 16, 4 / 16, 2 / 16, 2 / 16]
    entropy = -sum(q * math.log(q) for q in p)                   # = 1.75 ln 2 nats
    assert entropy == pytest.approx(1.75 * math.log(2))
    assert evaluate.non_flatness_score(depth) == pytest.approx(math.exp(entropy), rel=1e-12)   # 2^1.75
    halves = torch.full((1, 1, 4, 4), 4.5)
    halves[..., 2:] = 5.5                                        # two bins of 8: exp(ln 2) = 2
    assert evaluate.non_flatness_score(torch.cat([depth, halves])) == pytest.approx((2 ** 1.75 + 2) / 2, rel=1e-12)


def _two_scenes(size=16):
    """Two RGB-D scenes in model space (2, 4, S, S): a red disc and a blue square in front of grey."""
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size), indexing='ij')
    masks = [(xx ** 2 + yy ** 2 < 0.5).float(), ((xx.abs() < 0.55) & (yy.abs() < 0.55)).float()]
    colours = [torch.tensor([0.9, 0.15, 0.1]), torch.tensor([0.1, 0.2, 0.9])]
    images = [m * c[:, None, None] + (1 - m) * 0.5 for m, c in zip(masks, colours)]
    depths = [(m * 4.6 + (1 - m) * 5.8)[None] for m in masks]
    return diffusion.rgbd_to_x(torch.stack(images), torch.stack(depths))


def test_sample_quality():
    ref = _two_scenes(16)
    rms = float(((ref[0] - ref[1]) ** 2).mean().sqrt())
    q = evaluate.sample_quality(ref, ref, torch.tensor([0, 1]), torch.tensor([0, 1]))
    assert q['nn_dist'] == pytest.approx(0.0, abs=1e-6) and q['class_acc'] == 1.0
    assert q['ref_loo_nn_dist'] == pytest.approx(rms, rel=1e-5) and q['ref_loo_class_acc'] == 0.0
    collapsed = ref[:1].expand(4, -1, -1, -1)                    # always class 0's scene
    q = evaluate.sample_quality(collapsed, ref, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1]))
    assert q['nn_dist'] == pytest.approx(0.0, abs=1e-6) and q['ref_nn_dist'] > 0.1 and q['class_acc'] == 0.5
    noisy = evaluate.sample_quality(ref + 0.3 * torch.randn_like(ref), ref)
    assert noisy['nn_dist'] > 0.01 and 'class_acc' not in noisy
    # leave-one-out yardstick on the held-out set itself: two copies of each scene -> distance 0
    q = evaluate.sample_quality(ref, torch.cat([ref, ref]), torch.tensor([0, 1]), torch.tensor([0, 1, 0, 1]))
    assert q['ref_loo_nn_dist'] == pytest.approx(0.0, abs=1e-6) and q['ref_loo_class_acc'] == 1.0
    with pytest.raises(ValueError, match='at least 2'):
        evaluate.sample_quality(ref, ref[:1])
    assert evaluate.quality_features(torch.zeros(2, 4, 64, 64)).shape == (2, 4 * 16 * 16)


def test_generative_eval_without_f_trigen(ckpts, tmp_path, capsys):
    evaluate.main(['--rgbd_ckpt', str(ckpts['rgbd']), '--ckpt', str(tmp_path / 'none.pt'), '--per_class', '1',
                   '--steps', '2', '--scenes', '4', '--device', 'cpu'])
    metrics, out = json.loads((ckpts['rgbd'].parent / 'eval.json').read_text()), capsys.readouterr().out
    for key in ('nfs_generated', 'nfs_heldout', 'nn_dist', 'ref_nn_dist', 'class_acc'):
        assert isinstance(metrics[key], float) and key in out, key
    assert metrics['samples'] == 6


# -----------------------------------------------------------------------------
# mesh accuracy

def _depth_map_mesh(scenes, index, S, shift=0.0):
    """The canonical ground-truth depth map as a mesh (two triangles per pixel quad, none across jumps)."""
    from render import get_rays, orbit_camera
    _, depth = scenes.render_view(index, math.pi / 2, math.pi / 2, S)
    rays_o, rays_d = get_rays(orbit_camera(math.pi / 2, math.pi / 2), 18.0, S)
    vertices = (rays_o[0] + depth.view(-1, 1) * rays_d[0]).numpy() + np.array([shift, 0, 0], np.float32)
    flat = depth.view(-1).numpy()
    ids = np.arange(S * S).reshape(S, S)
    quads = [ids[:-1, :-1], ids[:-1, 1:], ids[1:, 1:], ids[1:, :-1]]
    faces = np.concatenate([np.stack([quads[0], quads[1], quads[2]], -1).reshape(-1, 3),
                            np.stack([quads[0], quads[2], quads[3]], -1).reshape(-1, 3)])
    span = flat[faces].max(1) - flat[faces].min(1)
    return vertices, faces[(span < 0.05) & (flat[faces].min(1) > 0)]


def test_accuracy_of_the_true_surface_is_near_zero_and_of_a_shifted_one_is_not():
    scenes = SyntheticScenes(2, image_size=32, seed=1338)
    vertices, faces = _depth_map_mesh(scenes, 1, 96)
    completeness, precision = evaluate.mesh_accuracy(vertices, faces, scenes, 1, resolution=96)
    assert completeness < 0.01 and precision < 0.01
    vertices, faces = _depth_map_mesh(scenes, 1, 96, shift=0.1)
    completeness, precision = evaluate.mesh_accuracy(vertices, faces, scenes, 1, resolution=96)
    assert 0.04 < completeness < 0.11 and 0.04 < precision < 0.11


def test_mesh_eval_writes_mesh_eval_json(ckpts, capsys):
    evaluate.main(['--mesh', '--ckpt', str(ckpts['dense']), '--scenes', '1', '--mesh_res', '16', '--device', 'cpu'])
    metrics = json.loads((ckpts['dense'].parent / 'mesh_eval.json').read_text())
    assert metrics['scenes'] == 1 and metrics['mesh_res'] == 16 and metrics['level'] == 'depth'  # the default rule
    assert 0 <= metrics['completeness'] < 2 and 0 <= metrics['precision'] < 2 and len(metrics['per_scene']) == 1
    assert 'completeness' in capsys.readouterr().out
    evaluate.main(['--mesh', '--ckpt', str(ckpts['dense']), '--scenes', '1', '--mesh_res', '16', '--device', 'cpu',
                   '--mesh_level', 'auto'])
    assert json.loads((ckpts['dense'].parent / 'mesh_eval.json').read_text())['level'] == 'auto'


# -----------------------------------------------------------------------------
# FID / IS / KID through torch-fidelity, with a stand-in feature extractor

STANDIN = 'g3dr-test-standin'


def register_standin():
    """A feature extractor torch-fidelity can use in place of Inception: an image's mean colour in [0, 1]
    (for FID and KID) and 10 x that as the class logits (for IS), so every metric is computable by hand."""
    import torch_fidelity
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

    class StandIn(torch_fidelity.FeatureExtractorBase):
        def __init__(self, name, features_list, **kwargs):
            super().__init__(name, features_list)

        @staticmethod
        def get_provided_features_list():
            return 'rgb', 'logits'

        @staticmethod
        def get_default_feature_layer_for_metric(metric):
            return {'isc': 'logits', 'fid': 'rgb', 'kid': 'rgb', 'prc': 'rgb'}[metric]

        @staticmethod
        def can_be_compiled():
            return False

        def forward(self, x):  # uint8 (B, 3, H, W)
            rgb = x.double().mean((2, 3)) / 255
            features = dict(rgb=rgb.float(), logits=(10 * rgb).float())
            return tuple(features[name] for name in self.features_list)

    if STANDIN not in FEATURE_EXTRACTORS_REGISTRY:
        torch_fidelity.register_feature_extractor(STANDIN, StandIn)


def _colours(n, seed):
    return torch.randint(0, 256, (n, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _hand_metrics(gen, ref):
    """FID, IS (one split) and KID (all samples, cubic kernel) of mean-colour features, by hand."""
    from scipy.linalg import sqrtm
    f1, f2 = (c.float().div(255).double().numpy() for c in (gen, ref))   # the stand-in's float32 features
    mu1, mu2, s1, s2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    logits = torch.from_numpy(10 * f1)
    p, q = logits.softmax(1), logits.softmax(1).mean(0, keepdim=True)
    inception_score = float(((p * (p.log() - q.log())).sum(1)).mean().exp())
    kernel = lambda a, b: (a @ b.T / 3 + 1) ** 3
    m = len(f1)
    off = lambda k: (k.sum() - np.trace(k)) / (m * (m - 1))
    kid = off(kernel(f1, f1)) + off(kernel(f2, f2)) - 2 * kernel(f1, f2).mean()
    return fid, inception_score, kid


@pytest.fixture
def real_folder(tmp_path, monkeypatch):
    """Six constant-colour real images (non-square, so resize + crop happen) and a depth map that must be
    left out; TORCH_HOME points at an empty folder, so torch-fidelity's cache starts empty."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    folder = tmp_path / 'real' / 'n01'
    folder.mkdir(parents=True)
    colours = _colours(6, seed=2)
    for k, c in enumerate(colours.tolist()):
        Image.new('RGB', (12, 10), tuple(c)).save(folder / f'{k}.png')
    Image.new('I;16', (12, 10)).save(folder / f'0{data.DEPTH_SUFFIX}')
    return tmp_path / 'real', colours


def test_fid_is_kid_match_hand_computations_and_the_cache_is_reused(real_folder):
    register_standin()
    folder, ref_colours = real_folder
    gen_colours = _colours(6, seed=1)
    images = gen_colours[:, :, None, None].expand(-1, -1, 8, 8).contiguous()      # (6, 3, 8, 8) uint8
    reference, cache_name, n_ref = fidelity.reference_set(str(folder), 8)
    assert n_ref == 6 and cache_name.endswith('-6x8')                              # the depth map is left out
    root = fidelity.default_cache_root()
    scores = fidelity.score(images, reference, cache_name, root, STANDIN, is_splits=1, save_cpu_ram=True)
    fid, inception_score, kid = _hand_metrics(gen_colours, ref_colours)
    assert scores['fid'] == pytest.approx(fid, rel=1e-4, abs=1e-6)
    assert scores['is_mean'] == pytest.approx(inception_score, rel=1e-5) and scores['is_std'] == 0
    # KID: every subset holds all six of each (in another order), so its mean is the full-set MMD; torch-fidelity
    # sums float32 kernels, whose rounding differs with the order
    assert scores['kid_mean'] == pytest.approx(kid, rel=1e-4) and scores['kid_std'] < 1e-5
    assert root.startswith(os.environ['TORCH_HOME']) and any(Path(root).glob(f'{cache_name}-{STANDIN}-features-*.pt'))
    # the cached reference features alone give the same numbers
    again = fidelity.score(images, None, cache_name, root, STANDIN, is_splits=1, save_cpu_ram=True)
    assert again == pytest.approx(scores, rel=1e-9)
    with pytest.raises(FileNotFoundError, match=f"no cached reference features .*never-made-{STANDIN}-features"):
        fidelity.score(images, None, 'never-made', root, STANDIN, save_cpu_ram=True)
    with pytest.raises(ValueError, match='--real DIR'):
        fidelity.reference_set('', 8)


def test_missing_inception_weights_offline_is_one_line_naming_the_file_and_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'empty'))

    def refuse(*args, **kwargs):
        raise OSError('network disabled by the test')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    folder = tmp_path / 'empty' / 'hub' / 'checkpoints'
    for download in (True, False):
        with pytest.raises(FileNotFoundError) as e:
            fidelity.inception_weights(download=download)
        message = str(e.value)
        assert '\n' not in message and 'weights-inception-2015-12-05-6726825d.pth' in message, message
        assert str(folder) in message and '--inception_weights' in message, message
        assert ('download failed' in message) == download
    assert not any(folder.glob('*')) if folder.exists() else True                    # nothing half-downloaded
    with pytest.raises(FileNotFoundError, match='nope.pth'):
        fidelity.inception_weights(str(tmp_path / 'nope.pth'))
    torch.save({'w': torch.zeros(1)}, tmp_path / 'weights.pth')                       # a file the user passes
    assert fidelity.inception_weights(str(tmp_path / 'weights.pth')) == str(tmp_path / 'weights.pth')


def test_fid_command_writes_numbers_and_protocol(ckpts, real_folder, capsys):
    register_standin()
    folder, _ = real_folder
    evaluate.main(['--fid', '--rgbd_ckpt', str(ckpts['rgbd']), '--ckpt', str(ckpts['trigen']), '--real', str(folder),
                   '--samples', '6', '--batch_size', '4', '--steps', '2', '--n_coarse', '4', '--n_fine', '4',
                   '--resolution', '16', '--feature_extractor', STANDIN, '--is_splits', '2', '--device', 'cpu'])
    metrics = json.loads((ckpts['rgbd'].parent / 'fid.json').read_text())
    for view in ('canonical', 'novel'):
        for key in ('fid', 'is_mean', 'is_std', 'kid_mean', 'kid_std'):
            assert isinstance(metrics[f'{key}_{view}'], float), (key, view)
    assert 1 <= metrics['nfs_generated'] <= 64 and 1 <= metrics['nfs_rendered'] <= 64
    protocol = metrics['protocol']
    assert protocol['samples'] == 6 and protocol['classes'] == 6 and protocol['resolution'] == 16
    assert len(protocol['views']['novel']) == 6 and protocol['reference']['images'] == 6
    assert protocol['feature_extractor'] == STANDIN and protocol['weights'] is None
    assert protocol['is_splits'] == 2 and protocol['kid_subset_size'] == 6
    assert 'fid_canonical' in capsys.readouterr().out


def test_fid_through_super_resolution_scores_the_2x_renders(ckpts, real_folder, tmp_path):
    """--sr_ckpt: the generated renders go through the 2x network before scoring, at twice the resolution."""
    from sr import SR_PRESETS, SRNet
    register_standin()
    folder, _ = real_folder
    sr_path = tmp_path / 'sr.pt'
    checkpoint.save(sr_path, checkpoint.training_state('sr', SRNet(**SR_PRESETS['cpu']), SR_PRESETS['cpu']))
    evaluate.main(['--fid', '--rgbd_ckpt', str(ckpts['rgbd']), '--ckpt', str(ckpts['trigen']), '--real', str(folder),
                   '--samples', '4', '--batch_size', '4', '--steps', '2', '--n_coarse', '4', '--n_fine', '4',
                   '--resolution', '8', '--feature_extractor', STANDIN, '--is_splits', '1', '--device', 'cpu',
                   '--sr_ckpt', str(sr_path)])
    protocol = json.loads((ckpts['rgbd'].parent / 'fid.json').read_text())['protocol']
    assert protocol['resolution'] == 16 and protocol['super_resolution'] == str(sr_path)
    assert protocol['reference']['preprocessing'].startswith('shorter side resized to 16')


def test_unsafe_checkpoints_and_weights_files_are_refused(tmp_path):
    from test_checkpoint import write_malicious_checkpoint
    marker = tmp_path / 'created_by_payload'
    evil = write_malicious_checkpoint(tmp_path / 'evil.pt', marker)
    for call in (lambda: evaluate.main(['--ckpt', str(evil), '--device', 'cpu']),
                 lambda: evaluate.main(['--rgbd_ckpt', str(evil), '--device', 'cpu']),
                 lambda: fidelity.inception_weights(str(evil))):      # torch-fidelity would unpickle it fully
        with pytest.raises(checkpoint.UnsafeCheckpointError, match='evil.pt.*--trust_checkpoint'):
            call()
    assert not marker.exists()  # the payload never ran
