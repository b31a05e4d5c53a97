"""Tests of prepare_depth.py with stand-in estimators (no network, no weights): the shards, resume,
bad photos, batching, the MiDaS input preparation, and a real 2-process torchrun (gloo) run."""
import os
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
import prepare_depth

HERE = Path(__file__).resolve().parent


# -----------------------------------------------------------------------------
# stand-in estimators and photos

class _StandIn:
    """Inverse depth = 1 + green channel (brighter green = nearer), at `scale` of the input size;
    records the shape of every batch it is given."""

    def __init__(self, scale=1):
        self.scale, self.shapes = scale, []

    def __call__(self, images):  # (B, 3, H, W) -> (B, h, w)
        self.shapes.append(tuple(images.shape))
        out = 1 + images[:, 1]
        if self.scale != 1:
            out = F.interpolate(out[:, None], scale_factor=self.scale, mode='bilinear', align_corners=False)[:, 0]
        return out


def stand_in(device):
    """The `--estimator test_prepare_depth:stand_in` factory of the command-line tests."""
    return _StandIn()


class _ConvStandIn(_StandIn):
    """A small fixed conv net behind MiDaS's interface, with an input_size (a fixed 32 x 48) so that
    photos of every size are prepared to one size and batched together."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Conv2d(3, 1, 3, padding=1)
        with torch.no_grad():
            self.net.weight.copy_(torch.linspace(-1, 1, 27).view(1, 3, 3, 3))
            self.net.bias.fill_(2.0)

    @staticmethod
    def input_size(height, width):
        return 32, 48

    @torch.no_grad()
    def __call__(self, images):
        self.shapes.append(tuple(images.shape))
        return self.net(prepare_depth.resize_bicubic(images, self.input_size(*images.shape[-2:])))[:, 0]


def _photo(path, size=(40, 30), seed=None):
    """A random RGB photo (W x H) at path; its seed is its name unless given."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(sum(map(ord, path.name)) if seed is None else seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


def _read(path):
    with Image.open(path) as image:
        image.load()
    return image


def _expected_png(image_path):
    green = np.asarray(_read(image_path).convert('RGB'))[..., 1].astype(np.float64) / 255
    inverse = 1 + green
    normalised = (inverse - inverse.min()) / (inverse.max() - inverse.min())
    return np.round((1 - normalised) * 65535)


def _run(src, dst, estimator, rank=0, world_size=1, **kwargs):
    todo, skipped = prepare_depth.plan(src, dst, rank, world_size)
    result = prepare_depth.make_depth(src, dst, estimator, todo, progress=False, **kwargs)
    return dict(result, skipped=skipped)


# -----------------------------------------------------------------------------
# shards, resume, bad photos

def test_shards_cover_every_image_exactly_once(tmp_path):
    items = [f"cls{i % 3}/img{i:03d}.jpg" for i in range(23)]
    for world_size in (1, 2, 3, 8, 30):
        shards = [prepare_depth.shard(items, rank, world_size) for rank in range(world_size)]
        assert sorted(sum(shards, [])) == sorted(items)  # every image once, none twice
        assert max(map(len, shards)) - min(map(len, shards)) <= 1  # balanced
    assert prepare_depth.shard(items, 1, 2) == items[1::2]  # image i goes to rank i % world_size
    for i in range(5):
        _photo(tmp_path / 'src' / f"c{i % 2}" / f"p{i}.jpg", size=(8, 8))
    plans = [prepare_depth.plan(tmp_path / 'src', tmp_path / 'dst', rank, 2) for rank in range(2)]
    assert sorted(plans[0][0] + plans[1][0]) == data.walk_images(tmp_path / 'src')[0]
    assert not set(plans[0][0]) & set(plans[1][0])


def test_writes_16bit_maps_and_resume_skips_finished_files(tmp_path):
    src, dst = tmp_path / 'photos', tmp_path / 'depth'
    a = _photo(src / 'cls_a' / 'one.jpg', size=(40, 30))
    b = _photo(src / 'cls_b' / 'deeper' / 'two.png', size=(24, 24))
    c = _photo(src / 'cls_b' / 'n02_5.JPEG', size=(30, 20))
    estimator = _StandIn()
    assert _run(src, dst, estimator) == dict(written=3, skipped=0, failed=[])
    for image in (a, b, c):
        png = _read(dst / image.relative_to(src).parent / f"{image.stem}_depth.png")
        assert png.mode == 'I;16' and png.size == _read(image).size
        values = np.asarray(png).astype(np.float64)
        assert np.abs(values - _expected_png(image)).max() <= 1
        assert values.min() == 0 and values.max() == 65535  # per-image min-max, 0 = nearest
    assert not [p for p in dst.rglob('*') if '.tmp' in p.name]  # no temporary files left

    finished = dst / 'cls_b' / 'n02_5_depth.png'
    finished.write_bytes(b'a finished map')  # resume must neither redo nor touch it
    os.utime(finished, (1_000_000, 1_000_000))
    (dst / 'cls_a' / 'one_depth.png').unlink()  # as if the run had stopped before it
    estimator.shapes.clear()
    assert _run(src, dst, estimator) == dict(written=1, skipped=2, failed=[])
    assert estimator.shapes == [(1, 3, 30, 40)]  # only the missing photo was estimated
    assert finished.read_bytes() == b'a finished map' and finished.stat().st_mtime == 1_000_000
    assert _run(src, dst, estimator) == dict(written=0, skipped=3, failed=[])

    finished.unlink()
    _run(src, dst, estimator)
    ds = data.ImageNetDepth(src, image_size=16, depth_root=dst, flip=False)
    assert len(ds) == 3 and all(4 <= ds[i]['depth'].min() and ds[i]['depth'].max() < 6 for i in range(3))


def test_in_place_resized_estimates_and_bad_photos(tmp_path):
    cols, rows = np.meshgrid(np.linspace(0, 255, 40), np.linspace(0, 120, 28))
    smooth = Image.fromarray(np.stack([rows, cols + rows * 0, 255 - cols], -1).astype(np.uint8))
    (tmp_path / 'cls').mkdir()
    smooth.save(tmp_path / 'cls' / 'p.png')
    (tmp_path / 'cls' / 'broken.jpg').write_bytes(b'garbage')
    nan = _photo(tmp_path / 'cls' / 'q.png', size=(12, 12))

    def estimator(images):  # half-resolution estimates; NaN for the photo q
        out = _StandIn(scale=0.5)(images)
        return out * float('nan') if images.shape[-1] == 12 else out
    result = _run(tmp_path, tmp_path, estimator)
    assert result['written'] == 1 and len(result['failed']) == 2
    assert 'broken.jpg' in result['failed'][0] and 'cannot read image' in result['failed'][0]
    assert 'cls/q.png' in result['failed'][1] and 'NaN' in result['failed'][1]
    assert not (tmp_path / 'cls' / 'broken_depth.png').exists() and not (tmp_path / 'cls' / 'q_depth.png').exists()
    png = np.asarray(_read(tmp_path / 'cls' / 'p_depth.png'))
    assert png.shape == (28, 40) and png.dtype == np.uint16
    assert np.abs(png - _expected_png(tmp_path / 'cls' / 'p.png')).mean() < 0.02 * 65535  # upsampled estimate
    assert nan.exists()
    (tmp_path / 'none').mkdir()
    with pytest.raises(data.DataError, match='no images'):
        prepare_depth.plan(tmp_path / 'none', tmp_path / 'out')


# -----------------------------------------------------------------------------
# batching

def test_batches_group_by_prepared_size_and_give_the_same_maps(tmp_path):
    sizes = [(40, 30), (30, 40), (40, 30), (40, 30), (30, 40), (40, 30), (17, 23)]
    for i, size in enumerate(sizes):
        _photo(tmp_path / 'src' / f"p{i}.png", size=size)

    one = _StandIn()  # no input_size: batched by the photos' own size
    _run(tmp_path / 'src', tmp_path / 'one', one, batch_size=1)
    many = _StandIn()
    _run(tmp_path / 'src', tmp_path / 'many', many, batch_size=3)
    assert len(one.shapes) == 7
    # groups by the (H, W) of the photos; a full group leaves at once, the rest at the end
    assert many.shapes == [(3, 3, 30, 40), (2, 3, 40, 30), (1, 3, 30, 40), (1, 3, 23, 17)]

    conv_one, conv_many = _ConvStandIn(), _ConvStandIn()  # prepared to one size: any photos batch together
    _run(tmp_path / 'src', tmp_path / 'conv_one', conv_one, batch_size=1)
    _run(tmp_path / 'src', tmp_path / 'conv_many', conv_many, batch_size=4, num_workers=0)
    assert conv_many.shapes == [(4, 3, 32, 48), (3, 3, 32, 48)]
    for i in range(7):
        for a, b in (('one', 'many'), ('conv_one', 'conv_many')):
            pa, pb = (np.asarray(_read(tmp_path / d / f"p{i}_depth.png")).astype(np.int64) for d in (a, b))
            assert np.abs(pa - pb).max() <= 1, (a, b, i)  # batched = one at a time, up to float rounding
    # sample.py's path (data.load_rgbd with an estimator) gives what prepare_depth.py stores
    photo = tmp_path / 'src' / 'p1.png'
    estimated = data.load_rgbd(photo, None, 16, estimator=_ConvStandIn())[1]
    stored = data.load_rgbd(photo, tmp_path / 'conv_many' / 'p1_depth.png', 16)[1]
    assert (estimated - stored).abs().max() <= 2 / 65536 * 2


def test_a_full_group_leaves_and_waiting_groups_are_bounded():
    items = [dict(rel=f"{i}", image=torch.zeros(3, 1, 1 + i % 4), size=(1, 1)) for i in range(20)]
    items.insert(5, dict(rel='bad', error='cannot read image bad'))
    batches = list(prepare_depth._batches(iter(items), batch_size=3, max_waiting=4))
    assert sorted(item['rel'] for batch in batches for item in batch) == sorted(item['rel'] for item in items)
    assert all(len(batch) <= 3 and len({b['image'].shape for b in batch if 'image' in b}) <= 1 for batch in batches)
    assert [len(b) for b in batches if 'error' in b[0]] == [1]


# -----------------------------------------------------------------------------
# MiDaS's input preparation (a local hub repo with a stand-in net) and its failures

HUBCONF = """
dependencies = ['torch']
import torch

class _Net(torch.nn.Module):  # answers with the channel mean of what it was given, at its size
    def forward(self, x):
        return x.mean(1)

def DPT_Large(pretrained=True, **kwargs):
    return _Net()

def MiDaS_small(pretrained=True, **kwargs):
    return _Net()
"""


def test_load_midas_from_a_local_hub_repo_prepares_input_like_midas(tmp_path):
    (tmp_path / 'hubconf.py').write_text(HUBCONF)
    images = torch.full((2, 3, 200, 300), 0.75)
    dpt = prepare_depth.load_midas('DPT_Large', 'cpu', repo=str(tmp_path))
    assert dpt(images).shape == (2, 256, 384)  # scale closest to 1 (384 / 300), sides multiples of 32
    assert dpt.input_size(200, 300) == (256, 384) and dpt.input_size(375, 500) == (384, 512)
    assert torch.allclose(dpt(images), torch.tensor(0.5))  # (0.75 - 0.5) / 0.5
    small = prepare_depth.load_midas('MiDaS_small', 'auto', repo=str(tmp_path))(images)
    assert small.shape == (2, 160, 256)  # fits inside 256 x 256, multiples of 32
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    assert torch.allclose(small, ((0.75 - mean) / std).mean(), atol=1e-5)


def test_load_midas_failures_are_one_line(monkeypatch):
    with pytest.raises(prepare_depth.EstimatorError, match="unknown depth model 'DPT_Huge'.*DPT_Large"):
        prepare_depth.load_midas('DPT_Huge')

    def offline(*args, **kwargs):
        raise urllib.error.URLError('[Errno -3] Temporary failure in name resolution')
    monkeypatch.setattr(torch.hub, 'load', offline)
    with pytest.raises(prepare_depth.EstimatorError) as info:
        prepare_depth.load_midas('DPT_Hybrid')
    message = str(info.value)
    assert '\n' not in message
    for part in ('DPT_Hybrid', 'intel-isl/MiDaS', torch.hub.get_dir(), 'checkpoints', '--repo'):
        assert part in message


# -----------------------------------------------------------------------------
# the command line, in one process and under torchrun

def _env():
    path = os.pathsep.join(p for p in [str(HERE), os.environ.get('PYTHONPATH', '')] if p)
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS='1')


def test_cli_summary_counts_a_corrupt_photo(tmp_path, capsys):
    _photo(tmp_path / 'src' / 'cls' / 'good.jpg')
    (tmp_path / 'src' / 'cls' / 'bad.jpg').write_bytes(b'not a photo')
    args = [str(tmp_path / 'src'), str(tmp_path / 'dst'), '--estimator', 'test_prepare_depth:stand_in',
            '--num_workers', '0', '--device', 'cpu']
    assert prepare_depth.main(args) == 0  # the run got through: the bad photo is reported and counted
    captured = capsys.readouterr()
    assert 'skipped: cannot read image' in captured.err and 'bad.jpg' in captured.err
    assert 'wrote 1 depth maps, skipped 0 already done, 1 failed' in captured.out
    assert (tmp_path / 'dst' / 'cls' / 'good_depth.png').exists()
    (tmp_path / 'src' / 'cls' / 'bad.jpg').unlink()
    assert prepare_depth.main(args) == 0
    assert 'wrote 0 depth maps, skipped 1 already done, 0 failed' in capsys.readouterr().out


def test_cli_errors_are_one_line(tmp_path):
    _photo(tmp_path / 'p.jpg')
    for args, needle in [([str(tmp_path / 'nope'), str(tmp_path)], str(tmp_path / 'nope')),
                         ([str(tmp_path), str(tmp_path), '--estimator', 'nomodule'], 'module:function'),
                         ([str(tmp_path), str(tmp_path), '--batch_size', '0'], '--batch_size')]:
        run = subprocess.run([sys.executable, str(HERE / 'prepare_depth.py'), *args], capture_output=True,
                             text=True, env=_env(), cwd=tmp_path, timeout=120)
        lines = run.stderr.strip().splitlines()
        assert run.returncode == 1 and len(lines) == 1, run.stderr
        assert lines[0].startswith('prepare_depth.py: error:') and needle in lines[0], run.stderr


def test_torchrun_two_processes_split_the_work(tmp_path):
    for i in range(7):
        _photo(tmp_path / 'src' / f"c{i % 3}" / f"p{i}.jpg", size=(12, 10))
    (tmp_path / 'src' / 'c0' / 'corrupt.jpg').write_bytes(b'garbage')
    command = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2',
               str(HERE / 'prepare_depth.py'), str(tmp_path / 'src'), str(tmp_path / 'dst'),
               '--estimator', 'test_prepare_depth:stand_in', '--num_workers', '0', '--device', 'cpu']
    run = subprocess.run(command, capture_output=True, text=True, env=_env(), cwd=HERE, timeout=180)
    assert run.returncode == 0, run.stderr  # the corrupt photo is reported and counted, not fatal
    assert 'wrote 7 depth maps, skipped 0 already done, 1 failed over 2 processes' in run.stdout, run.stderr
    assert run.stderr.count('skipped: cannot read image') == 1 and 'corrupt.jpg' in run.stderr
    for image in data.walk_images(tmp_path / 'src')[0]:
        if 'corrupt' not in image:
            assert np.abs(np.asarray(_read(tmp_path / 'dst' / data.depth_relpath(image))).astype(np.float64)
                          - _expected_png(tmp_path / 'src' / image)).max() <= 1
