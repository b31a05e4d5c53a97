"""Tests of the 2x super-resolution stage: sr.py (the network, its checks, load_sr) and train_sr.py (pairs,
a real tiny run, its checkpoint, resume). Tiny images and crops, so the file runs in seconds."""
import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data
import scenes
import sr
import train_sr

REPO = Path(__file__).resolve().parent
PHOTOS = REPO / 'fixtures' / 'imagenet_samples'
# A run of seconds: 16 x 16 renders -> 32 x 32, 8 x 8 crops, 2 held-out scenes.
TINY = ['--low_size', '16', '--crop', '8', '--crops_per_image', '2', '--batch_size', '2', '--num_scenes', '32',
        '--eval_scenes', '2', '--log_every', '1', '--device', 'cpu']


def read_metrics(out_dir):
    with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def one_line_error(fn, *args, match=None):
    with pytest.raises(ValueError, match=match) as info:
        fn(*args)
    assert '\n' not in str(info.value), str(info.value)
    return str(info.value)


# -----------------------------------------------------------------------------
# the network

def test_presets_shapes_and_parameter_counts():
    net = sr.SRNet(**sr.SR_PRESETS['cpu']).eval()
    out = net(torch.rand(2, 3, 5, 7))                    # odd sizes double too
    assert out.shape == (2, 3, 10, 14) and 0 <= out.min() and out.max() <= 1
    assert sr.count_parameters(net) == 179_227            # the counts sr.py states
    with torch.device('meta'):                            # no memory, no compute
        big = sr.SRNet(**sr.SR_PRESETS['imagenet'])
        assert big(torch.empty(1, 3, 128, 128)).shape == (1, 3, 256, 256)  # training mode: no value check
    assert sr.count_parameters(big) == 4_094_603


def test_untrained_network_is_bicubic():
    # the zero-initialised last convolution: an untrained network returns exactly its bicubic skip
    for align_corners in (True, False):
        net = sr.SRNet(**dict(sr.SR_PRESETS['cpu'], align_corners=align_corners)).eval()
        x = torch.rand(1, 3, 9, 9)
        assert torch.equal(net(x), net.bicubic(x).clamp(0, 1))
        # which is bicubic upsampling on the network's grid (sampled at the exact positions: float rounding)
        bicubic = F.interpolate(x, scale_factor=2, mode='bicubic', align_corners=align_corners)
        assert (net.bicubic(x) - bicubic).abs().max() < 1e-5


def test_output_positions_follow_each_grid_convention():
    # corner-inclusive grids (renders): output pixel j sits at j (S - 1) / (2S - 1); the corners coincide
    rows = sr.output_positions(8, 4, torch.tensor([0]), True)
    assert torch.allclose(rows[0], torch.arange(8) * 3 / 7)
    # a crop keeps the positions of its image: the same pixels, shifted by the crop's origin
    whole = sr.output_positions(16, 8, torch.tensor([0]), True)[0]
    crop = sr.output_positions(6, 8, torch.tensor([3]), True)[0]
    assert torch.allclose(crop, whole[6:12] - 3)
    # edge-aligned grids (PIL-resized photos): output pixels 2i and 2i + 1 straddle input pixel i
    assert torch.allclose(sr.output_positions(4, 2, torch.tensor([1]), False)[0],
                          torch.tensor([-0.25, 0.25, 0.75, 1.25]))


def test_a_crop_is_upsampled_as_its_region_of_the_whole_image():
    # with its origin, a trained network gives a crop the output it gives that region of the whole image,
    # away from the crop's border (where the convolutions see the crop's zero padding)
    torch.manual_seed(0)
    net = sr.SRNet(channels=8, groups=1, blocks=1, reduction=4, align_corners=True)
    torch.nn.init.normal_(net.tail.weight, std=0.1)                      # not bicubic any more
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        whole = net(x)
        crop = net(x[..., 4:28, 2:26], torch.tensor([[4, 2]]), (32, 32))
        shifted = net(x[..., 4:28, 2:26])                                # the crop taken as a whole image
    inner = (slice(None), slice(None), slice(20, 28), slice(20, 28))
    region = whole[..., 8:56, 4:52]
    assert (crop[inner] - region[inner]).abs().max() < 1e-4
    assert (shifted[inner] - region[inner]).abs().max() > 1e-2


def test_bad_inputs_get_one_line_errors():
    net = sr.SRNet(**sr.SR_PRESETS['cpu']).eval()
    one_line_error(net, torch.rand(1, 4, 8, 8), match=r'\(B, 3, H, W\)')          # RGBA
    one_line_error(net, torch.rand(1, 1, 8, 8), match=r'\(B, 3, H, W\)')          # grey
    one_line_error(net, torch.rand(3, 8, 8), match=r'x\[None\]')                   # one image without a batch
    one_line_error(net, torch.randint(0, 255, (1, 3, 8, 8), dtype=torch.uint8), match='uint8')
    one_line_error(net, torch.rand(1, 3, 8, 8) * 2 - 1 - 0.5, match=r'\[-1, 1\]')  # the released range
    one_line_error(net, torch.rand(1, 3, 8, 8) * 255, match=r'\[0, 1\]')
    one_line_error(net, torch.full((1, 3, 8, 8), float('nan')), match='NaN')
    one_line_error(net, torch.rand(1, 3, 0, 8), match='empty')
    one_line_error(net, [[0.5]], match='tensor')
    assert net(torch.rand(1, 3, 1, 1) * 1.1).shape == (1, 3, 2, 2)  # a little overshoot is fine (clamped)


def test_a_tiny_run_lowers_the_loss():
    torch.manual_seed(0)
    world = scenes.SyntheticScenes(4, image_size=16, seed=3)
    low, high = train_sr.render_pairs(world, [0, 1, 2, 3], math.pi / 2 + 0.2, math.pi / 2, 16)
    net = sr.SRNet(**sr.SR_PRESETS['cpu'])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(60):
        loss = F.mse_loss(net(low), high)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert max(losses[-5:]) < 0.7 * losses[0], losses


# -----------------------------------------------------------------------------
# training pairs, schedule, measurement

def test_pairs_are_the_same_view_at_two_resolutions():
    world = scenes.SyntheticScenes(3, image_size=8, seed=5)
    cfg = dict(train_sr.config, num_scenes=3)
    indices, yaw, pitch = train_sr.draw_views(7, 0, 3, cfg)
    low, high = train_sr.render_pairs(world, indices, yaw, pitch, 8)
    assert low.shape == (3, 3, 8, 8) and high.shape == (3, 3, 16, 16)
    # corner-inclusive ray grids: the 2x render's corner pixels are the low render's (align_corners=True)
    assert torch.allclose(high[..., ::15, ::15], low[..., ::7, ::7], atol=1e-5)
    again = train_sr.draw_views(7, 0, 3, cfg)
    assert again[0] == indices and torch.equal(again[1], yaw)               # a function of (seed, step, rank)
    other = train_sr.draw_views(7, 1, 3, cfg)
    assert not torch.equal(other[1], yaw)                                   # ranks draw differently


def test_crops_cover_the_same_region():
    low = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    high = low.repeat_interleave(2, -1).repeat_interleave(2, -2)           # (2, 3, 12, 12): pixel i -> 2i, 2i+1
    lows, highs, origins = train_sr.random_crops(low, high, 4, 3, torch.Generator().manual_seed(0))
    assert lows.shape == (6, 3, 4, 4) and highs.shape == (6, 3, 8, 8) and origins.shape == (6, 2)
    assert torch.equal(highs, lows.repeat_interleave(2, -1).repeat_interleave(2, -2))
    for k, (top, left) in enumerate(origins.tolist()):                      # where each crop came from
        assert torch.equal(lows[k], low[k // 3, :, top:top + 4, left:left + 4])


def test_photo_pairs_use_the_data_pipelines_resize():
    photos = train_sr.PhotoPairs(PHOTOS, 16)
    assert len(photos) == 12                               # depth maps are not images
    item = photos[0]
    assert item['low'].shape == (3, 16, 16) and item['high'].shape == (3, 32, 32)
    image = data.load_rgb(PHOTOS / photos.files[0])
    # a non-square photo: the centred square, as data.crop_and_resize takes it for f_trigen's images
    wide = image.resize((40, 30))
    expected, _ = data.crop_and_resize(wide, np.zeros((30, 40), np.float32), 16)
    assert torch.allclose(train_sr.square_resize(wide, 16), expected)


def test_evaluate_sr_untrained_gains_nothing():
    world = scenes.SyntheticScenes(2, image_size=8, seed=1)
    low, high = train_sr.render_pairs(world, [0, 1], math.pi / 2, math.pi / 2, 8)
    result = sr.evaluate_sr(sr.SRNet(**sr.SR_PRESETS['cpu']), low, high)
    assert result['gain_db'] == 0 and result['psnr_sr'] == result['psnr_bicubic'] > 10
    assert sr.psnr(high, high).tolist() == pytest.approx([100, 100])


def test_config_errors():
    for argv, match in [(['--loss', 'l3'], 'loss'), (['--crop', '65'], 'crop'), (['--preset', 'huge'], 'preset'),
                        (['--dataset', 'imagenet'], 'data_dir'), (['--max_steps', '0'], 'max_steps'),
                        (['--bogus', '1'], 'bogus')]:
        one_line_error(train_sr.parse_config, argv, match=match)
    cfg = train_sr.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])
    assert (cfg['preset'], cfg['low_size'], cfg['loss']) == ('imagenet', 128, 'l1')


# -----------------------------------------------------------------------------
# real runs: outputs, checkpoint round trip, resume

def test_run_writes_a_checkpoint_that_load_sr_reads(tmp_path):
    out = tmp_path / 'run'
    model = train_sr.main(TINY + ['--max_steps', '6', '--sample_every', '3', '--out_dir', str(out)])
    assert {'ckpt.pt', 'metrics.jsonl', 'samples_0000003.png', 'samples_0000006.png'} <= set(os.listdir(out))
    metrics = read_metrics(out)
    assert [m['step'] for m in metrics] == list(range(1, 7)) and 'psnr_sr' in metrics[-1]
    ckpt = checkpoint.load(out / 'ckpt.pt')                 # the safe loader reads it
    assert ckpt['kind'] == 'sr' and ckpt['model_config'] == sr.SR_PRESETS['cpu'] and ckpt['step'] == 6
    net = sr.load_sr(out / 'ckpt.pt')
    assert not net.training
    x = torch.rand(1, 3, 16, 16)
    assert torch.equal(net(x), model.eval()(x))
    with pytest.raises(ValueError, match='already exists'):  # a second run does not overwrite it
        train_sr.main(TINY + ['--max_steps', '6', '--out_dir', str(out)])
    report = train_sr.main(TINY + ['--eval', '--out_dir', str(out)])
    assert report['true_images']['n'] == 4 and (out / 'eval.png').exists() and (out / 'eval.json').exists()


def test_load_sr_refuses_other_checkpoints(tmp_path):
    checkpoint.save(tmp_path / 'trigen.pt', dict(kind='trigen', model_config={}, model={}))
    one_line_error(sr.load_sr, tmp_path / 'trigen.pt', match="'trigen'")
    checkpoint.save(tmp_path / 'old.pt', dict(model_config={}, model={}))      # before 'kind': f_trigen's
    one_line_error(sr.load_sr, tmp_path / 'old.pt', match="'trigen'")
    checkpoint.save(tmp_path / 'bad.pt', dict(kind='sr', model_config=dict(channels=8, wings=2), model={}))
    one_line_error(sr.load_sr, tmp_path / 'bad.pt', match='model_config')
    torch.save(dict(kind='sr', model_config={}, model={}, hook=os.getcwd), tmp_path / 'unsafe.pt')
    one_line_error(sr.load_sr, tmp_path / 'unsafe.pt', match='trust')        # the safe loader refuses code
    with pytest.raises(FileNotFoundError, match='not found'):
        sr.load_sr(tmp_path / 'missing.pt')


def test_resume_continues_exactly(tmp_path, monkeypatch):
    saved = {}
    real_save = checkpoint.save

    def keep(path, state):  # keep a copy of the step-2 checkpoint, which the step-4 one overwrites
        real_save(path, state)
        saved.setdefault(state['step'], Path(shutil.copy(path, tmp_path / f"step{state['step']}.pt")))
    monkeypatch.setattr(checkpoint, 'save', keep)
    args = TINY + ['--max_steps', '4', '--save_every', '2', '--sample_every', '100']
    full = train_sr.main(args + ['--out_dir', str(tmp_path / 'full')])
    (tmp_path / 'half').mkdir()
    shutil.copy(saved[2], tmp_path / 'half' / 'ckpt.pt')
    shutil.copy(tmp_path / 'full' / 'metrics.jsonl', tmp_path / 'half' / 'metrics.jsonl')
    resumed = train_sr.main(args + ['--out_dir', str(tmp_path / 'half'), '--resume'])
    for a, b in zip(full.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)
    losses = [(m['step'], m['loss']) for m in read_metrics(tmp_path / 'half')]
    assert losses == [(m['step'], m['loss']) for m in read_metrics(tmp_path / 'full')]  # steps 3, 4 logged again
    with pytest.raises(ValueError, match='beyond the one-cycle schedule'):
        train_sr.main(args + ['--out_dir', str(tmp_path / 'half'), '--resume', '--max_steps', '8'])


def test_imagenet_run(tmp_path):
    out = tmp_path / 'photos'
    train_sr.main(['--dataset', 'imagenet', '--data_dir', str(PHOTOS), '--eval_dir', str(PHOTOS), '--preset', 'cpu',
                   '--low_size', '16', '--crop', '8', '--batch_size', '2', '--max_steps', '2', '--sample_every', '2',
                   '--eval_scenes', '1', '--num_workers', '0', '--device', 'cpu', '--out_dir', str(out)])
    assert read_metrics(out)[-1]['step'] == 2 and (out / 'samples_0000002.png').exists()
    assert sr.load_sr(out / 'ckpt.pt').config['align_corners'] is False  # photos' pixel grid, whatever the preset


def test_eval_on_a_g3dr_s_renders(tmp_path):
    from model import G3DR, MODEL_PRESETS
    torch.manual_seed(0)
    g3dr = G3DR(dict(MODEL_PRESETS['tiny'], image_size=16))
    checkpoint.save(tmp_path / 'g3dr.pt', checkpoint.training_state('trigen', g3dr, g3dr.config,
                                                                     config=dict(n_coarse=4, n_fine=4)))
    net = sr.SRNet(**sr.SR_PRESETS['cpu'])
    checkpoint.save(tmp_path / 'sr.pt', checkpoint.training_state('sr', net, net.config))   # model-only
    report = train_sr.main(TINY + ['--eval', '--sr_ckpt', str(tmp_path / 'sr.pt'), '--out_dir', str(tmp_path),
                                   '--trigen_ckpt', str(tmp_path / 'g3dr.pt')])
    renders = report['g3dr_renders']
    assert renders['n'] == 4 and renders['gain_db'] == 0 and math.isfinite(renders['psnr_native_2x'])
    assert set(renders['canonical']) == {'psnr_sr', 'psnr_bicubic', 'gain_db'}
    assert (tmp_path / 'eval_g3dr.png').exists()
    with pytest.raises(ValueError, match='takes 16'):
        train_sr.main(TINY + ['--eval', '--sr_ckpt', str(tmp_path / 'sr.pt'), '--out_dir', str(tmp_path),
                              '--trigen_ckpt', str(tmp_path / 'g3dr.pt'), '--low_size', '8', '--crop', '4'])


def test_hard_crops_are_the_candidates_bicubic_misses_most():
    low, high = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 32, 32)
    lows, highs, _ = train_sr.random_crops(low, high, 6, 3, torch.Generator().manual_seed(0), candidates=4)
    assert lows.shape == (6, 3, 6, 6) and highs.shape == (6, 3, 12, 12)
    # the same 12 candidate corners, scored by brute force: the kept crops are the 3 with the most bicubic error
    miss = (F.interpolate(low, scale_factor=2, mode='bicubic', align_corners=True) - high).square()
    corners = torch.randint(11, (2, 12, 2), generator=torch.Generator().manual_seed(0)).tolist()
    for b in range(2):
        energy = torch.stack([miss[b, :, 2 * t:2 * t + 12, 2 * u:2 * u + 12].sum() for t, u in corners[b]])
        expected = [corners[b][i] for i in energy.topk(3).indices.tolist()]
        assert torch.equal(highs[3 * b:3 * b + 3], torch.stack([high[b, :, 2 * t:2 * t + 12, 2 * u:2 * u + 12]
                                                                for t, u in expected]))
        assert torch.equal(lows[3 * b:3 * b + 3], torch.stack([low[b, :, t:t + 6, u:u + 6] for t, u in expected]))
