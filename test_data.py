"""Tests of data.py: the ImageNet-with-depth loader and its input checks, the 16-bit depth format, the
single-input helpers sample.py uses, and `python data.py check`. (prepare_depth.py, which makes the
depth maps, is tested in test_prepare_depth.py; pictures and atomic writes in test_outputs.py.)"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import data
from data import DataError, ImageNetDepth

HERE = Path(__file__).resolve().parent
SAMPLES = HERE / "fixtures" / "imagenet_samples"  # 12 real ImageNet pairs shipped with the tests


# -----------------------------------------------------------------------------
# helpers

def _write_pair(folder, name, size=(40, 30), depth_size=None, depth=None, ext='.jpg', image=None):
    """A random RGB image NAME.ext and a 16-bit depth map NAME_depth.png (W x H sizes)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    w, h = size
    if image is None:
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    image.save(folder / f"{name}{ext}")
    if depth is None:
        dw, dh = depth_size or size
        depth = rng.integers(0, 65536, (dh, dw), dtype=np.uint16)
    Image.fromarray(depth).save(folder / f"{name}_depth.png")
    return folder / f"{name}{ext}"


def _read(path):
    """An image file, decoded and closed."""
    with Image.open(path) as image:
        image.load()
    return image


def raises_one_line(error, match, fn, *args, **kwargs):
    """fn raises `error` whose one-line message contains every string in `match`; returns the message."""
    with pytest.raises(error) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert '\n' not in message, message
    for part in match:
        assert str(part) in message, (part, message)
    return message


def _raises(match, fn, *args, **kwargs):
    """fn raises DataError whose one-line message contains every string in `match`."""
    return raises_one_line(DataError, match, fn, *args, **kwargs)


@pytest.fixture
def sample_tree(tmp_path):
    """The 12 real pairs as two class folders of symlinks: 'cls_a' (5 pairs) and 'cls_b' (7 pairs)."""
    root = tmp_path / 'real'
    names = sorted(p.stem for p in SAMPLES.glob('*.jpg'))
    assert len(names) == 12
    for i, name in enumerate(names):
        folder = root / ('cls_a' if i < 5 else 'cls_b')
        folder.mkdir(parents=True, exist_ok=True)
        for file in (f"{name}.jpg", f"{name}_depth.png"):
            (folder / file).symlink_to(SAMPLES / file)
    return root


# -----------------------------------------------------------------------------
# ImageNetDepth on the real samples

def test_real_samples_load(sample_tree):
    ds = ImageNetDepth(sample_tree, image_size=128, flip=False)
    assert len(ds) == 12 and ds.classes == ['cls_a', 'cls_b'] and ds.num_classes == 2
    labels = []
    for i in range(len(ds)):
        item = ds[i]
        assert item['image'].shape == (3, 128, 128) and item['image'].dtype == torch.float32
        assert item['depth'].shape == (1, 128, 128) and item['depth'].dtype == torch.float32
        assert 0 <= item['image'].min() and item['image'].max() <= 1
        assert 4 <= item['depth'].min() and item['depth'].max() < 6
        assert item['depth'].max() - item['depth'].min() > 1  # the full normalised range, not a flat map
        assert Path(item['path']).exists() and Path(item['path']).parent.name == ds.classes[item['label']]
        labels.append(item['label'])
    assert labels == [0] * 5 + [1] * 7


def test_real_samples_orientation(sample_tree):
    """At the native 256 x 256 the item is the files' pixels exactly; at 128 it is their downsampled
    version, not a flipped or transposed one."""
    name = sorted(p.stem for p in SAMPLES.glob('*.jpg'))[0]
    png = np.asarray(_read(SAMPLES / f"{name}_depth.png")).astype(np.float64)
    jpg = np.asarray(_read(SAMPLES / f"{name}.jpg").convert('RGB')).astype(np.float64)
    expected_depth = torch.from_numpy(png / 65536 * 2 + 4)
    native = ImageNetDepth(sample_tree, image_size=256, flip=False)[0]
    assert Path(native['path']).stem == name
    assert torch.allclose(native['depth'][0].double(), expected_depth, atol=1e-6)
    assert torch.allclose(native['image'].double(), torch.from_numpy(jpg).permute(2, 0, 1) / 255, atol=1e-6)

    small = ImageNetDepth(sample_tree, image_size=128, flip=False)[0]['depth'][0].double()
    reference = F.interpolate(expected_depth[None, None], size=(128, 128), mode='area')[0, 0]
    err = (small - reference).abs().mean()
    assert err < 0.02
    for wrong in (reference.flip(0), reference.flip(1), reference.T):
        assert (small - wrong).abs().mean() > 5 * err


def test_flip_flips_image_and_depth_together(sample_tree):
    plain = ImageNetDepth(sample_tree, image_size=64, flip=False)[3]
    flipping = ImageNetDepth(sample_tree, image_size=64, flip=True)
    torch.manual_seed(0)
    seen = set()
    for _ in range(12):
        item = flipping[3]
        if torch.equal(item['image'], plain['image']):
            assert torch.equal(item['depth'], plain['depth'])
            seen.add('plain')
        else:
            assert torch.equal(item['image'], plain['image'].flip(-1))
            assert torch.equal(item['depth'], plain['depth'].flip(-1))
            seen.add('flipped')
    assert seen == {'plain', 'flipped'}
    assert not torch.equal(plain['image'], plain['image'].flip(-1))


def test_hr_size_gives_the_same_crop_at_twice_the_size_flipped_alike(sample_tree):
    """hr_size (train.py --sr_ckpt): image_hr is the same square at hr_size, flipped with the image."""
    plain = ImageNetDepth(sample_tree, image_size=32, flip=False, hr_size=64)[5]
    big = ImageNetDepth(sample_tree, image_size=64, flip=False)[5]
    assert torch.equal(plain['image_hr'], big['image']) and plain['image'].shape == (3, 32, 32)
    assert 'image_hr' not in ImageNetDepth(sample_tree, image_size=32, flip=False)[5]
    flipping = ImageNetDepth(sample_tree, image_size=32, flip=True, hr_size=64)
    torch.manual_seed(0)
    kinds = set()
    for _ in range(10):
        item = flipping[5]
        flipped = not torch.equal(item['image'], plain['image'])
        assert torch.equal(item['image_hr'], plain['image_hr'].flip(-1) if flipped else plain['image_hr'])
        kinds.add(flipped)
    assert kinds == {True, False}


def test_separate_depth_root(tmp_path, sample_tree):
    images, depths = tmp_path / 'images', tmp_path / 'depths'
    for file in sample_tree.rglob('*'):
        if file.is_file():
            rel = file.relative_to(sample_tree)
            target = (depths if file.name.endswith('_depth.png') else images) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(file.resolve())
    together = ImageNetDepth(sample_tree, image_size=64, flip=False)
    apart = ImageNetDepth(images, image_size=64, depth_root=depths, flip=False)
    assert len(apart) == 12 and apart.classes == together.classes
    for i in (0, 11):
        assert torch.equal(apart[i]['image'], together[i]['image'])
        assert torch.equal(apart[i]['depth'], together[i]['depth'])
        assert apart[i]['label'] == together[i]['label']
    _raises(['depth folder', 'does not exist'], ImageNetDepth, images, depth_root=tmp_path / 'nope')
    _raises(['12 of 12', str(images)], ImageNetDepth, images)  # depth maps are elsewhere


# -----------------------------------------------------------------------------
# ImageNetDepth on made-up files: layouts, conversions, geometry

def test_flat_folder_is_one_class_and_jpeg_names_work(tmp_path):
    _write_pair(tmp_path, 'n01440764_10026', ext='.JPEG')
    _write_pair(tmp_path, 'b', ext='.png')
    ds = ImageNetDepth(tmp_path, image_size=16, flip=False)
    assert len(ds) == 2 and ds.num_classes == 1
    assert {Path(ds[i]['path']).name for i in range(2)} == {'n01440764_10026.JPEG', 'b.png'}
    assert all(ds[i]['label'] == 0 for i in range(2))


def test_class_folders_with_subfolders(tmp_path):
    _write_pair(tmp_path / 'zebra' / 'more', 'a')
    _write_pair(tmp_path / 'ant', 'b')
    ds = ImageNetDepth(tmp_path, image_size=8, flip=False)
    assert ds.classes == ['ant', 'zebra']
    assert {Path(ds[i]['path']).name: ds[i]['label'] for i in range(2)} == {'b.jpg': 0, 'a.jpg': 1}


def test_non_square_images_are_centre_cropped_with_their_depth(tmp_path):
    w, h = 60, 40
    pixels = np.zeros((h, w, 3), np.uint8)
    pixels[:, :10] = (255, 0, 0)
    pixels[:, 10:50] = (0, 255, 0)
    pixels[:, 50:] = (0, 0, 255)
    depth = np.tile(np.arange(w, dtype=np.uint16) * 1000, (h, 1))
    _write_pair(tmp_path / 'wide', 'x', size=(w, h), depth=depth, ext='.png', image=Image.fromarray(pixels))
    item = ImageNetDepth(tmp_path / 'wide', image_size=40, flip=False)[0]  # crop only, no resampling
    assert torch.equal(item['image'], torch.tensor([0.0, 1.0, 0.0])[:, None, None].expand(3, 40, 40))
    expected = torch.from_numpy(np.arange(10, 50) * 1000 / 65536 * 2 + 4).float()
    assert torch.allclose(item['depth'][0], expected.expand(40, 40), atol=1e-6)

    tall = _write_pair(tmp_path / 'tall', 'y', size=(h, w), depth=np.ascontiguousarray(depth.T), ext='.png',
                       image=Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 0, 2))))
    item = ImageNetDepth(tall.parent, image_size=20, flip=False)[0]  # crop + Lanczos resize
    assert (item['image'][1] > 0.9).all() and (item['image'][[0, 2]] < 0.1).all()
    column = item['depth'][0, :, 10]
    assert (column.diff() > 0).all()  # depth grows down the rows, as in the file
    assert 4 + 10000 / 32768 - 0.02 < column.min() and column.max() < 4 + 49000 / 32768 + 0.02


def test_grey_rgba_cmyk_palette_and_16bit_images_are_converted(tmp_path):
    grey = Image.fromarray(np.full((8, 8), 77, np.uint8))
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :4, 3] = 255  # left half opaque red, right half transparent
    cmyk = Image.new('CMYK', (8, 8), (255, 0, 0, 0))  # pure cyan
    palette = Image.fromarray(np.full((8, 8, 3), (10, 20, 30), np.uint8)).convert('P')
    sixteen = Image.fromarray(np.full((8, 8), 65535, np.uint16))
    _write_pair(tmp_path, 'grey', size=(8, 8), image=grey)
    _write_pair(tmp_path, 'rgba', size=(8, 8), image=Image.fromarray(rgba), ext='.png')
    _write_pair(tmp_path, 'cmyk', size=(8, 8), image=cmyk)
    _write_pair(tmp_path, 'palette', size=(8, 8), image=palette, ext='.png')
    _write_pair(tmp_path, 'sixteen', size=(8, 8), image=sixteen, ext='.png')
    ds = ImageNetDepth(tmp_path, image_size=8, flip=False)
    items = {Path(ds[i]['path']).stem: ds[i]['image'] for i in range(len(ds))}
    assert all(image.shape == (3, 8, 8) for image in items.values())
    g = items['grey']
    assert torch.equal(g[0], g[1]) and torch.equal(g[1], g[2]) and abs(g.mean() - 77 / 255) < 0.02
    assert torch.allclose(items['rgba'][:, :, :4], torch.tensor([200 / 255, 0, 0])[:, None, None].expand(3, 8, 4))
    assert torch.equal(items['rgba'][:, :, 4:], torch.ones(3, 8, 4))  # transparent -> white
    c = items['cmyk'].mean((1, 2))
    assert c[0] < 0.1 and c[1] > 0.9 and c[2] > 0.9
    assert torch.allclose(items['palette'].mean((1, 2)), torch.tensor([10, 20, 30]) / 255, atol=0.02)
    assert torch.equal(items['sixteen'], torch.ones(3, 8, 8))  # 16-bit white stays white, not clipped grey


def test_exif_orientation_applies_to_image_and_is_what_depth_must_match(tmp_path):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # displayed rotated by 90 degrees: 30 wide, 40 tall
    image.save(tmp_path / 'r.jpg', exif=exif)
    Image.fromarray(np.zeros((40, 30), np.uint16)).save(tmp_path / 'r_depth.png')
    assert ImageNetDepth(tmp_path, image_size=16, flip=False)[0]['image'].shape == (3, 16, 16)
    Image.fromarray(np.zeros((30, 40), np.uint16)).save(tmp_path / 'r_depth.png')
    _raises(['r_depth.png', '40x30', '30x40'], ImageNetDepth(tmp_path, image_size=16).__getitem__, 0)


# -----------------------------------------------------------------------------
# ImageNetDepth: every bad input gives its one-line error

def test_missing_and_empty_folders(tmp_path):
    _raises(['image folder', str(tmp_path / 'nope'), 'does not exist'], ImageNetDepth, tmp_path / 'nope')
    (tmp_path / 'file.txt').write_text('x')
    _raises([str(tmp_path / 'file.txt'), 'not a folder'], ImageNetDepth, tmp_path / 'file.txt')
    (tmp_path / 'empty' / 'cls').mkdir(parents=True)
    (tmp_path / 'empty' / 'cls' / 'notes.txt').write_text('x')
    _raises(['no images', str(tmp_path / 'empty')], ImageNetDepth, tmp_path / 'empty')


def test_images_without_depth(tmp_path):
    for name in ('a', 'b'):
        _write_pair(tmp_path / 'cls', name)
    for name in ('c', 'd', 'e', 'f'):
        Image.new('RGB', (40, 30)).save(tmp_path / 'cls' / f"{name}.jpg")
    _raises(['4 of 6', 'cls/c.jpg', 'cls/d.jpg', 'cls/e.jpg', 'skip_missing_depth', 'prepare_depth.py'],
            ImageNetDepth, tmp_path)
    with pytest.warns(UserWarning, match='skipping 4 of 6'):
        ds = ImageNetDepth(tmp_path, image_size=8, skip_missing_depth=True)
    assert sorted(Path(ds[i]['path']).name for i in range(len(ds))) == ['a.jpg', 'b.jpg']
    for name in ('a', 'b'):
        (tmp_path / 'cls' / f"{name}_depth.png").unlink()
    _raises(['none of the 6 images', str(tmp_path)], ImageNetDepth, tmp_path, skip_missing_depth=True)


def test_depth_of_wrong_size(tmp_path):
    _write_pair(tmp_path, 'a', size=(40, 30), depth_size=(20, 15))
    _raises(['a_depth.png', '20x15', 'a.jpg', '40x30'], ImageNetDepth(tmp_path, image_size=8).__getitem__, 0)


def test_8bit_and_colour_depth_maps(tmp_path):
    _write_pair(tmp_path, 'a', depth=np.zeros((30, 40), np.uint8))
    _raises(['a_depth.png', '8-bit', '16-bit'], ImageNetDepth(tmp_path, image_size=8).__getitem__, 0)
    Image.new('RGB', (40, 30)).save(tmp_path / 'a_depth.png')
    _raises(['a_depth.png', '8-bit'], ImageNetDepth(tmp_path, image_size=8).__getitem__, 0)


def test_unreadable_and_truncated_files(tmp_path):
    image = _write_pair(tmp_path, 'a', size=(64, 64))
    good = image.read_bytes()
    image.write_bytes(b'not an image at all')
    _raises(['cannot read image', str(image)], ImageNetDepth(tmp_path, image_size=8).__getitem__, 0)
    image.write_bytes(good[:len(good) // 2])
    _raises(['cannot read image', str(image), 'truncated'], ImageNetDepth(tmp_path, image_size=8).__getitem__, 0)
    image.write_bytes(good)
    depth = tmp_path / 'a_depth.png'
    depth.write_bytes(depth.read_bytes()[:200])
    _raises(['cannot read depth map', str(depth)], ImageNetDepth(tmp_path, image_size=8).__getitem__, 0)


def test_ambiguous_layouts(tmp_path):
    _write_pair(tmp_path / 'mixed', 'top')
    _write_pair(tmp_path / 'mixed' / 'cls', 'inner')
    _raises(['top level', 'top.jpg', 'cls/'], ImageNetDepth, tmp_path / 'mixed')
    _write_pair(tmp_path / 'twins', 'a', ext='.jpg')
    _write_pair(tmp_path / 'twins', 'a', ext='.png')
    _raises(['a.jpg', 'a.png', 'a_depth.png'], ImageNetDepth, tmp_path / 'twins')


# -----------------------------------------------------------------------------
# the 16-bit depth format

def test_encode_depth_edge_cases():
    assert (data.encode_depth(torch.full((4, 4), 3.0)) == 65535).all()  # no relief: one plane at the back
    assert data.encode_depth(torch.tensor([[0.0, 1.0]])).tolist() == [[65535, 0]]
    assert data.encode_depth(torch.tensor([[0.0, 1.0]])).dtype == np.uint16
    _raises(['NaN'], data.encode_depth, torch.tensor([[0.0, float('nan')]]))
    # an estimate at another size is resized (bicubic) to the photo's first
    small = torch.linspace(0, 1, 12).view(3, 4)
    big = data.encode_depth(small, size=(6, 8))
    assert big.shape == (6, 8) and big.min() == 0 and big.max() == 65535
    assert (np.diff(big.astype(np.int64), axis=1) <= 0).all()  # nearer to the right, as in the estimate
    assert np.array_equal(data.encode_depth(small, size=(3, 4)), data.encode_depth(small))


def test_16bit_encoding_round_trips_through_png(tmp_path):
    inverse = torch.rand(30, 40, generator=torch.Generator().manual_seed(0)) + 0.5
    depth16 = data.encode_depth(inverse)
    path = tmp_path / 'sub' / 'x_depth.png'
    data.save_depth_png(path, depth16)  # missing folders are made, no temporary file left
    assert sorted(p.name for p in path.parent.iterdir()) == ['x_depth.png'] and _read(path).mode == 'I;16'
    values = data.load_depth_png(path)
    assert values.dtype == np.float32 and np.array_equal(values, depth16.astype(np.float32))  # exact
    normalised = ((inverse - inverse.min()) / (inverse.max() - inverse.min())).double().numpy()
    assert np.abs(values / 65535 - (1 - normalised)).max() <= 0.5 / 65535 + 1e-12  # only rounding is lost
    assert values.flat[inverse.argmax()] == 0 and values.flat[inverse.argmin()] == 65535  # 0 = nearest
    with pytest.raises(AssertionError):
        data.save_depth_png(path, depth16.astype(np.uint8))  # a programmer error, not a user's


def test_walk_images_and_depth_relpath(tmp_path):
    _write_pair(tmp_path / 'b', 'two', ext='.JPEG')
    _write_pair(tmp_path / 'a' / 'deep', 'one', ext='.png')
    (tmp_path / '.hidden').mkdir()
    Image.new('RGB', (4, 4)).save(tmp_path / '.hidden' / 'x.jpg')
    (tmp_path / 'notes.txt').write_text('x')
    images, depths = data.walk_images(tmp_path)
    assert images == ['a/deep/one.png', 'b/two.JPEG']
    assert depths == {'a/deep/one_depth.png', 'b/two_depth.png'}
    assert [data.depth_relpath(rel) for rel in images] == ['a/deep/one_depth.png', 'b/two_depth.png']
    assert data.depth_relpath('x.jpg') == 'x_depth.png'
    _raises(['image folder', 'does not exist'], data.walk_images, tmp_path / 'nope')


# -----------------------------------------------------------------------------
# python data.py check

def test_cli_check(tmp_path, capsys):
    _write_pair(tmp_path / 'photos' / 'cls', 'x', size=(20, 20))
    assert data.main(['check', str(tmp_path / 'photos')]) == 0
    assert '1 pairs in 1 classes, 0 bad' in capsys.readouterr().out
    Image.fromarray(np.zeros((20, 20), np.uint8)).save(tmp_path / 'photos' / 'cls' / 'x_depth.png')
    assert data.main(['check', str(tmp_path / 'photos')]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith('data.py: error:') and 'x_depth.png' in err and '8-bit' in err


def test_cli_errors_are_one_line_with_exit_status_1(tmp_path):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in [str(HERE), os.environ.get('PYTHONPATH', '')] if p))
    for args, needle in [([], 'required'), (['check', str(tmp_path / 'nope')], str(tmp_path / 'nope')),
                         (['make_depth', 'a', 'b'], 'prepare_depth.py SRC DST')]:
        run = subprocess.run([sys.executable, str(HERE / 'data.py'), *args], capture_output=True, text=True,
                             env=env, cwd=tmp_path, timeout=120)
        assert run.returncode == 1, run.stderr
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith('data.py: error:') and needle in lines[0], run.stderr


# -----------------------------------------------------------------------------
# single inputs (used by sample.py)

class _StandIn:
    """Inverse depth = 1 + green channel (brighter green = nearer): (B, 3, H, W) -> (B, H, W)."""

    def __call__(self, images):
        return 1 + images[:, 1]


def test_list_match_and_load_rgbd(tmp_path):
    a = _write_pair(tmp_path / 'in', 'a', size=(40, 30))
    b = _write_pair(tmp_path / 'in' / 'sub', 'b', size=(30, 30), ext='.png')
    (tmp_path / 'in' / 'sub' / 'b_depth.png').rename(tmp_path / 'b_depth.png')
    assert data.list_images(tmp_path / 'in') == [str(a), str(b)]
    assert data.list_images(a) == [str(a)]
    _raises(['input', 'does not exist'], data.list_images, tmp_path / 'nope')
    assert data.match_depth([str(a), str(b)]) == [str(tmp_path / 'in' / 'a_depth.png'), None]
    assert data.match_depth([str(b)], str(tmp_path / 'b_depth.png')) == [str(tmp_path / 'b_depth.png')]
    assert data.match_depth([str(b)], str(tmp_path)) == [str(tmp_path / 'b_depth.png')]
    _raises(['no depth map', 'a_depth.png'], data.match_depth, [str(a)], str(tmp_path))
    _raises(['one depth map', '2 images'], data.match_depth, [str(a), str(b)], str(tmp_path / 'b_depth.png'))

    image, depth = data.load_rgbd(a, tmp_path / 'in' / 'a_depth.png', 16)
    with pytest.warns(UserWarning, match='skipping 1 of 2'):
        item = ImageNetDepth(tmp_path / 'in', image_size=16, flip=False, skip_missing_depth=True)[0]
    assert torch.equal(image, item['image']) and torch.equal(depth, item['depth'])
    _raises(['no depth map', 'b.png'], data.load_rgbd, b, None, 16)
    # estimated: the map a stored file of the same estimate would give
    image, depth = data.load_rgbd(b, None, 16, estimator=_StandIn())
    data.save_depth_png(tmp_path / 'made.png', data.encode_depth(_StandIn()(data.rgb_tensor(data.load_rgb(b))[None])[0]))
    assert torch.equal(depth, data.load_rgbd(b, tmp_path / 'made.png', 16)[1])
    assert depth.shape == (1, 16, 16) and 4 <= depth.min() and depth.max() < 6
