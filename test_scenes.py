"""Tests of scenes.py: the synthetic scenes pinned to values recorded before they moved out of data.py,
and checked against independent ray casting (numpy, float64)."""
import math

import numpy as np
import pytest
import torch

from render import get_rays, orbit_camera
from scenes import SHAPES, SyntheticScenes, raycast
from test_data import raises_one_line


def _raises(match, fn, *args, **kwargs):
    """fn raises ValueError whose one-line message contains every string in `match`."""
    return raises_one_line(ValueError, match, fn, *args, **kwargs)


# -----------------------------------------------------------------------------
# the scenes never change: values recorded from SyntheticScenes(seed=0) at 32 x 32

def _stats(image, depth):
    """Sums and position-weighted sums of an item (a shifted, flipped or recoloured render changes them)."""
    w = torch.arange(1, 32 * 32 + 1, dtype=torch.float64).view(32, 32) / 1024
    image, depth = image.double(), depth.double()
    return [image.sum().item(), (image * w).sum().item(), depth.sum().item(), (depth * w).sum().item()]


# index: (label, _stats, image[:, 16, 16], depth[16, 16], image[:, 5, 27], depth[5, 27])
PINNED = {
    0: (5, [1392.005776, 612.991657, 5332.77077, 2532.90164], [0.270015, 0.407105, 0.715564], 4.794712,
        [0.636375, 0.594026, 0.561048], 5.61418),
    1: (3, [897.836051, 425.459129, 5772.412853, 2879.102542], [0.341034, 0.115577, 0.371324], 4.918975,
        [0.320034, 0.208322, 0.362934], 5.716019),
    2: (5, [1170.649706, 586.117818, 5655.828676, 2824.170107], [0.357682, 0.393154, 0.419051], 5.590999,
        [0.363581, 0.395776, 0.426745], 5.661192),
}


@pytest.mark.parametrize('index', sorted(PINNED))
def test_scenes_are_pinned(index):
    label, stats, centre, centre_depth, corner, corner_depth = PINNED[index]
    item = SyntheticScenes(8, image_size=32, seed=0)[index]
    assert item['label'] == label and item['path'] == f"synthetic/seed0/{index}"
    assert _stats(item['image'], item['depth']) == pytest.approx(stats, abs=1e-3)
    assert item['image'][:, 16, 16].tolist() == pytest.approx(centre, abs=2e-6)
    assert item['depth'][0, 16, 16].item() == pytest.approx(centre_depth, abs=2e-6)
    assert item['image'][:, 5, 27].tolist() == pytest.approx(corner, abs=2e-6)
    assert item['depth'][0, 5, 27].item() == pytest.approx(corner_depth, abs=2e-6)


def test_novel_view_is_pinned():
    image, depth = SyntheticScenes(8, image_size=32, seed=0).render_view(1, math.pi / 2 + 0.3, math.pi / 2 - 0.1)
    assert _stats(image, depth) == pytest.approx([799.585561, 372.178838, 5149.953742, 2536.906123], abs=1e-3)
    assert (depth == 0).sum().item() == 109  # rays past the wall's edge


# -----------------------------------------------------------------------------
# an independent camera and ray-sphere / inside tests (numpy, float64)

def _camera_rays(yaw, pitch, S, radius=5.0, fov=18.0):
    """Rays (S*S, 3) of an orbit camera written from README §2, without render.py."""
    origin = radius * np.array([math.sin(pitch) * math.sin(-yaw), math.cos(pitch), math.sin(pitch) * math.cos(yaw)])
    forward = -origin / np.linalg.norm(origin)
    left = np.cross([0.0, 1.0, 0.0], forward)
    left /= np.linalg.norm(left)
    up = np.cross(forward, left)
    rotation = np.stack([-left, up / np.linalg.norm(up), -forward], axis=1)
    cols, rows = np.meshgrid(np.linspace(-1, 1, S), np.linspace(1, -1, S))
    dirs = np.stack([cols, rows, np.full_like(cols, -1 / math.tan(math.radians(fov) / 2))], -1).reshape(-1, 3)
    dirs = dirs @ rotation.T
    return np.broadcast_to(origin, dirs.shape), dirs / np.linalg.norm(dirs, axis=-1, keepdims=True)


def _ray_sphere(o, d, centre, radius):
    """Nearest intersection distance (inf on a miss) and the discriminant, from the textbook quadratic."""
    oc = o - centre
    b = (oc * d).sum(-1)
    disc = b * b - ((oc * oc).sum(-1) - radius ** 2)
    t = np.where(disc >= 0, -b - np.sqrt(np.maximum(disc, 0)), np.inf)
    return t, disc


def _inside(solid, p):
    """Whether world points p (N, 3) are inside the solid, from the solids' defining inequalities."""
    q = (p - solid['centre']) @ solid['rotation']  # local coordinates
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    a, b = solid['size'][0], solid['size'][1]
    rho = np.sqrt(x * x + z * z)
    shape = solid['shape']
    if shape == 'sphere':
        return x * x + y * y + z * z <= a * a
    if shape == 'box':
        return (np.abs(q) <= solid['size']).all(-1)
    if shape == 'cylinder':
        return (rho <= a) & (np.abs(y) <= b)
    if shape == 'cone':
        return (y >= -b) & (y <= b) & (rho <= a * (b - y) / (2 * b))
    if shape == 'capsule':
        return x * x + (y - np.clip(y, -b, b)) ** 2 + z * z <= a * a
    return (rho - a) ** 2 + y * y <= b * b  # torus


def _find(ds, want, count=1):
    """Indices of the first scenes satisfying want(scene)."""
    found = [i for i in range(len(ds)) if want(ds.scene(i))][:count]
    assert len(found) == count, 'no such scene in the dataset'
    return found


def _canonical_raycast(scenes, S):
    rays_o, rays_d = get_rays(orbit_camera(math.pi / 2, math.pi / 2), 18.0, S)
    B = len(scenes)
    return raycast(scenes, rays_o.float().expand(B, -1, -1), rays_d.float().expand(B, -1, -1))


def test_synthetic_items():
    ds = SyntheticScenes(64, image_size=32, seed=3)
    assert len(ds) == 64 and ds.num_classes == len(ds.class_names) == 6
    items = ds.__getitems__(list(range(16)))
    for i, item in enumerate(items):
        assert item['image'].shape == (3, 32, 32) and item['depth'].shape == (1, 32, 32)
        assert 0 <= item['image'].min() and item['image'].max() <= 1
        assert 4 <= item['depth'].min() and item['depth'].max() < 6  # every canonical ray hits in [4, 6)
        assert item['label'] == ds.scene(i)['label'] and 0 <= item['label'] < 6
        assert item['path'] == 'synthetic/seed3/%d' % i
        assert item['image'].std() > 0.02  # not blank
    assert len({item['label'] for item in items}) >= 4
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch['image'].shape == (4, 3, 32, 32) and batch['label'].tolist() == [it['label'] for it in items[:4]]
    with pytest.raises(IndexError):
        ds[64]
    _raises(['num_scenes', '0'], SyntheticScenes, 0)
    _raises(['image_size', '1'], SyntheticScenes, 4, 1)
    _raises(['seed', '-1'], SyntheticScenes, 4, 8, -1)


def test_synthetic_is_deterministic_per_seed_and_index():
    a, b = SyntheticScenes(10, 24, seed=5), SyntheticScenes(10, 24, seed=5)
    assert torch.equal(a[7]['image'], b[7]['image']) and torch.equal(a[7]['depth'], b[7]['depth'])
    assert torch.equal(a[7]['image'], a[7]['image'])
    assert not torch.equal(a[7]['image'], a[6]['image'])
    assert not torch.equal(a[7]['image'], SyntheticScenes(10, 24, seed=6)[7]['image'])
    assert torch.equal(a[-3]['image'], a[7]['image'])


def test_synthetic_scenes_cover_all_shapes_and_fit_the_canonical_view():
    ds = SyntheticScenes(300, 32)
    scenes = [ds.scene(i) for i in range(120)]
    assert {s['label'] for s in scenes} == set(range(6))
    _, depth, solid = _canonical_raycast(scenes, 32)
    rng = np.random.default_rng(0)
    for scene, visible in zip(scenes, solid):
        main = scene['solids'][scene['main']]
        assert main['shape'] == SHAPES[scene['label']]
        assert (visible == scene['main']).float().mean() > 0.02  # the main object is in view
        wall_x = scene['solids'][0]['centre'][0] - scene['solids'][0]['size'][0]
        plinth = scene['solids'][1] if scene['main'] == 2 else None
        for s in scene['solids'][scene['main']:]:
            # points inside the object, by rejection from a cube that holds its bounding sphere
            p = s['centre'] + rng.uniform(-1, 1, (20000, 3)) * s['size'].sum()
            p = p[_inside(s, p)]
            assert len(p) > 100
            assert (np.abs(p) <= 1).all() and (p[:, 0] <= wall_x).all(), s['shape']  # in the box, before the wall
            if plinth is not None:  # standing on the plinth: touching its top, not sunk into it
                top = plinth['centre'][1] + plinth['size'][1]
                assert top - 1e-9 <= p[:, 1].min() < top + 0.03, s['shape']


def test_synthetic_sphere_depth_is_exact():
    """A scene reduced to its back wall and main sphere, against the textbook ray-sphere and ray-plane
    distances from an independent camera, at every pixel."""
    S = 48
    ds = SyntheticScenes(500, S)
    (index,) = _find(ds, lambda s: s['label'] == 0)
    scene = ds.scene(index)
    wall, sphere = scene['solids'][0], scene['solids'][scene['main']]
    reduced = dict(scene, solids=[wall, sphere])
    _, depth, solid = _canonical_raycast([reduced], S)
    o, d = _camera_rays(math.pi / 2, math.pi / 2, S)
    t_sphere, disc = _ray_sphere(o, d, sphere['centre'], sphere['size'][0])
    wall_x = wall['centre'][0] - wall['size'][0]
    t_wall = (wall_x - o[:, 0]) / d[:, 0]
    expected = np.where(np.isfinite(t_sphere), t_sphere, t_wall)
    robust = np.abs(disc) > 1e-4  # leave out silhouette pixels, where float32 rays may differ
    assert robust.mean() > 0.95 and (disc > 1e-4).sum() > 50
    assert np.abs(depth[0].numpy() - expected)[robust].max() < 1e-4
    assert ((solid[0].numpy() == 1) == np.isfinite(t_sphere))[robust].all()


@pytest.mark.parametrize('yaw, pitch', [(math.pi / 2, math.pi / 2), (math.pi / 2 + 0.35, math.pi / 2 - 0.1)])
def test_synthetic_sphere_scene_from_canonical_and_novel_views(yaw, pitch):
    """The full scene of a lone sphere, through the dataset and render_view: its pixels carry the
    analytic sphere depth."""
    S = 40
    ds = SyntheticScenes(500, S)
    (index,) = _find(ds, lambda s: s['label'] == 0 and len(s['solids']) == s['main'] + 1)
    sphere = ds.scene(index)['solids'][-1]
    image, depth = ds.render_view(index, yaw, pitch, S)
    o, d = _camera_rays(yaw, pitch, S)
    t_sphere, disc = _ray_sphere(o, d, sphere['centre'], sphere['size'][0])
    on_sphere = disc > 1e-4
    assert on_sphere.sum() > 50
    assert np.abs(depth.flatten().numpy() - t_sphere)[on_sphere].max() < 1e-4


def test_synthetic_hits_are_first_entries_into_the_solids():
    """For every shape: just before each hit point the ray is outside every solid of the scene, and
    just after it, inside the solid hit (bar grazing rays at silhouettes)."""
    S = 40
    ds = SyntheticScenes(400, S)
    indices = [_find(ds, lambda s, c=c: s['label'] == c)[0] for c in range(6)]
    scenes = [ds.scene(i) for i in indices]
    _, depth, solid = _canonical_raycast(scenes, S)
    o, d = _camera_rays(math.pi / 2, math.pi / 2, S)
    for scene, t, visible in zip(scenes, depth.double().numpy(), solid.numpy()):
        before, after = o + (t - 2e-3)[:, None] * d, o + (t + 2e-3)[:, None] * d
        for k, s in enumerate(scene['solids']):
            assert not _inside(s, before).any(), s['shape']
            mine = visible == k
            if mine.sum() > 20:
                assert _inside(s, after[mine]).mean() > 0.97, s['shape']


def test_render_view_at_canonical_camera_equals_dataset_item():
    ds = SyntheticScenes(50, 32, seed=1)
    batch = ds.__getitems__([4, 9, 31])
    for index, item in zip([4, 9, 31], batch):
        image, depth = ds.render_view(index, math.pi / 2, math.pi / 2, 32)
        single = ds[index]
        assert torch.equal(image, single['image']) and torch.equal(depth, single['depth'])
        assert torch.allclose(image, item['image'], atol=1e-6) and torch.allclose(depth, item['depth'], atol=1e-6)
    yaws = torch.tensor([math.pi / 2, math.pi / 2 + 0.3])
    images, depths = ds.render_views([4, 4], yaws, torch.full((2,), math.pi / 2), 32)
    assert torch.allclose(images[0], ds[4]['image'], atol=1e-6)
    assert torch.allclose(images[1], ds.render_view(4, math.pi / 2 + 0.3, math.pi / 2, 32)[0], atol=1e-6)
    assert not torch.allclose(images[0], images[1])


def test_novel_view_misses_are_empty():
    ds = SyntheticScenes(10, 32)
    image, depth = ds.render_view(0, math.pi / 2 + 1.0, math.pi / 2, 32)  # far enough to see past the wall
    empty = depth[0] == 0
    assert empty.any() and (~empty).any()
    assert (image[:, empty] == 0).all()
    assert (depth[0][~empty] > 3).all()


def test_a_batch_is_one_raycast_pass_that_leaves_the_thread_setting_alone(monkeypatch):
    """__getitems__ renders a DataLoader batch in one vectorised raycast call (the speed of training on
    synthetic data rests on it), the items equal those rendered one at a time, and raycast's switch to
    one thread is undone afterwards."""
    ds = SyntheticScenes(100, 24, seed=2)
    singles = [ds[i] for i in range(8)]
    calls = []
    monkeypatch.setattr('scenes.raycast', lambda s, o, d: calls.append(len(s)) or raycast(s, o, d))
    threads = torch.get_num_threads()
    batch = ds.__getitems__(list(range(8)))
    assert calls == [8]
    assert torch.get_num_threads() == threads
    for one, item in zip(singles, batch):
        assert torch.equal(one['image'], item['image']) and torch.equal(one['depth'], item['depth'])
