"""Tests of mesh.py: marching cubes on fields with known surfaces (closed, right radius, right place,
outward faces), the automatic iso-level, vertex colours, PLY round trips, the fast triplane grid against
its readable twin, the rasteriser, and sample.py --mesh / --points (the accuracy metrics: test_evaluate.py)."""
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import mesh
import checkpoint
from model import G3DR, MODEL_PRESETS

REPO = Path(__file__).resolve().parent


def sphere_field(radius=0.5, steepness=40.0, fog=None):
    """Raw density 1 + steepness (radius - |p|): sigma = softplus(steepness (radius - |p|)) > sigma(0) inside.
    Colour = (p + 1) / 2. fog: a constant density added everywhere (what the iso-level must leave out)."""
    def field(points, dirs=None):
        raw = 1 + steepness * (radius - points.norm(dim=-1, keepdim=True))
        if fog is not None:
            sigma = mesh.sigma_from_raw(raw) + fog
            raw = 1 + sigma + torch.log(-torch.expm1(-sigma))  # sigma + fog as a raw density (mesh.raw_from_sigma)
        return (points + 1) / 2, raw
    return field


def half_space_field(x0=0.5):
    """Solid wherever x > x0: a back wall that the box cuts off on five sides."""
    def field(points, dirs=None):
        return torch.full_like(points, 0.5), 1 + 50 * (points[..., :1] - x0)
    return field


def edges_are_closed(faces):
    """Closed and consistently oriented: every directed edge occurs once and its reverse once."""
    directed = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
    keys = directed[:, 0].astype(np.int64) * (faces.max() + 1) + directed[:, 1]
    reverse = directed[:, 1].astype(np.int64) * (faces.max() + 1) + directed[:, 0]
    return len(np.unique(keys)) == len(keys) and np.isin(reverse, keys).all()


def signed_volume(vertices, faces):
    a, b, c = (vertices[faces[:, k]].astype(np.float64) for k in range(3))
    return np.einsum('ij,ij->i', a, np.cross(b, c)).sum() / 6


# -----------------------------------------------------------------------------
# marching cubes and the iso-level

def test_sphere_gives_a_closed_outward_mesh_of_the_right_radius():
    res = 48
    level = float(mesh.sigma_from_raw(torch.tensor(1.0)))  # raw 1: the surface |p| = 0.5
    m = mesh.extract_mesh(sphere_field(0.5), res, level, progress=False)
    v, f = m['vertices'], m['faces']
    assert m['level_rule'] == 'given' and m['level'] == level
    assert edges_are_closed(f)
    assert len(v) - 3 * len(f) // 2 + len(f) == 2  # Euler characteristic of a sphere: V - E + F
    r = np.linalg.norm(v, axis=1)
    voxel = 2 / (res - 1)
    assert abs(r.mean() - 0.5) < 0.05 * voxel and np.abs(r - 0.5).max() < 0.25 * voxel
    assert abs(signed_volume(v, f) / (4 / 3 * math.pi * 0.5 ** 3) - 1) < 0.02  # > 0: faces point outward


def test_off_centre_sphere_lands_where_it_is():
    centre = torch.tensor([0.3, -0.2, 0.1])
    inner = sphere_field(0.3)
    m = mesh.extract_mesh(lambda p, d=None: inner(p - centre), 40, float(mesh.sigma_from_raw(torch.tensor(1.0))),
                          progress=False)
    assert np.allclose(m['vertices'].mean(0), centre.numpy(), atol=0.01)


def test_solid_cut_by_the_box_is_capped_and_closed():
    m = mesh.extract_mesh(half_space_field(0.5), 32, float(mesh.sigma_from_raw(torch.tensor(1.0))), progress=False)
    v = m['vertices']
    assert edges_are_closed(m['faces'])
    assert np.allclose(v.min(0), [0.5, -1, -1], atol=0.01) and np.allclose(v.max(0), [1, 1, 1], atol=0.01)
    assert abs(signed_volume(v, m['faces']) - 0.5 * 2 * 2) < 0.02


def test_automatic_level_finds_the_surface_and_leaves_fog_out():
    field = sphere_field(0.5, steepness=2000.0, fog=0.05)
    level, rays = mesh.auto_level(field, 32)
    assert 0.05 < level and rays > 100  # above the fog, from the rays that see the sphere
    m = mesh.extract_mesh(field, 40, progress=False, level_resolution=32)
    assert m['level_rule'] == 'auto' and m['level'] == pytest.approx(level)
    r = np.linalg.norm(m['vertices'], axis=1)
    assert edges_are_closed(m['faces']) and abs(np.median(r) - 0.5) < 0.03  # the sphere, not the fog-filled box


def test_depth_rule_puts_the_surface_where_the_canonical_render_stops():
    field = sphere_field(0.5, steepness=2000.0, fog=0.05)  # the fog stays out here too: rays see through it
    res = 40
    m = mesh.extract_mesh(field, res, 'depth', progress=False)
    assert m['level_rule'] == 'depth' and edges_are_closed(m['faces'])
    v = m['vertices']
    front = v[(v[:, 0] < -0.3) & (np.abs(v[:, 1:]).max(1) < 0.2)]   # the cap facing the camera at (-5, 0, 0)
    assert len(front) > 20 and np.abs(np.linalg.norm(front, axis=1) - 0.5).max() < 1.5 * 2 / (res - 1)
    # behind what the view shows the mesh is solid: nothing is exported beyond the sphere's silhouette
    # except the extrusion of that silhouette along the rays
    assert v[:, 0].min() > -0.55 and np.abs(v[:, 1:]).max() < 0.62


def test_depth_rule_leaves_out_what_the_camera_never_sees():
    res = 32
    # a back wall x > 0.5: the density iso-surface fills the box to its edges, the rendered depth only the
    # part inside the canonical camera's frustum (half-width tan(9 deg) (x + 5) = 0.87 at x = 0.5)
    iso = mesh.extract_mesh(half_space_field(0.5), res, float(mesh.sigma_from_raw(torch.tensor(1.0))), progress=False)
    wall = lambda p, d=None: (torch.full_like(p, 0.5), 1 + 2000 * (p[..., :1] - 0.5))  # hard: rays stop at x = 0.5
    fused = mesh.extract_mesh(wall, res, 'depth', progress=False)
    half_width = math.tan(math.radians(mesh.FOV_DEGREES / 2)) * (fused['vertices'][:, 0] + 5)
    assert np.abs(iso['vertices'][:, 2]).max() > 0.99
    assert (np.abs(fused['vertices'][:, 1:]).max(1) <= half_width + 2 / (res - 1)).all()
    assert abs(fused['vertices'][:, 0].min() - 0.5) < 2 / (res - 1)  # the wall's face where the render stops


def test_depth_rule_needs_an_opaque_view():
    with pytest.raises(ValueError, match='--mesh_level'):
        mesh.extract_mesh(lambda p, d=None: (torch.zeros_like(p), torch.full_like(p[..., :1], -20.0)), 16, 'depth',
                          progress=False)
    assert mesh.check_options('64', 'depth') == (64, 'depth') and mesh.check_options(64, 'auto') == (64, None)


def test_vertex_colours_are_the_colour_field_at_the_vertices():
    m = mesh.extract_mesh(sphere_field(0.5), 24, float(mesh.sigma_from_raw(torch.tensor(1.0))), progress=False)
    expected = np.round((m['vertices'] + 1) / 2 * 255)
    assert m['colors'].dtype == np.uint8 and np.abs(m['colors'] - expected).max() <= 1
    assert m['colors'].std(0).min() > 10  # they vary over the sphere


def test_level_outside_the_field_is_an_error_naming_it():
    with pytest.raises(ValueError, match='123'):
        mesh.extract_mesh(sphere_field(0.5), 16, 123.0, progress=False)


def test_transparent_field_has_no_automatic_level():
    with pytest.raises(ValueError, match='--mesh_level'):
        mesh.auto_level(lambda p, d=None: (torch.zeros_like(p), torch.full_like(p[..., :1], -20.0)), 16)


@pytest.mark.parametrize('projection', ['yz', 'official'])
def test_fast_triplane_grid_equals_the_field_queried_point_by_point(projection):
    torch.manual_seed(0)
    model = G3DR(dict(MODEL_PRESETS['tiny'], projection=projection)).eval()
    planes = torch.randn(1, 3, model.config['plane_channels'], 16, 16)
    slow = mesh.density_grid(mesh.scene_field(model, planes), 20, progress=False)
    fast = mesh.triplane_density_grid(model, planes, 20, progress=False)
    assert slow.std() > 0.05
    np.testing.assert_allclose(fast, slow, atol=1e-5, rtol=0)


def test_canonical_points_lie_on_the_surface_the_camera_sees():
    field = sphere_field(0.5, steepness=2000.0)
    points, colors = mesh.canonical_points(field, 32, n_coarse=64, n_fine=64)
    assert len(points) > 100 and points.dtype == np.float32 and colors.shape == points.shape
    assert np.abs(np.linalg.norm(points, axis=1) - 0.5).max() < 0.03
    assert (points[:, 0] < 0.05).all()  # the near half of the sphere, facing the camera at (-5, 0, 0)
    assert np.abs(colors - np.round((points + 1) / 2 * 255)).max() <= 8


# -----------------------------------------------------------------------------
# PLY files

def test_mesh_and_point_cloud_round_trip_through_ply(tmp_path):
    m = mesh.extract_mesh(sphere_field(0.5), 20, float(mesh.sigma_from_raw(torch.tensor(1.0))), progress=False)
    path = tmp_path / 'out' / 'sphere.ply'
    mesh.save_ply(path, m['vertices'], m['colors'], m['faces'])
    vertices, colors, faces = mesh.load_ply(path)
    np.testing.assert_array_equal(vertices, m['vertices'])
    np.testing.assert_array_equal(colors, m['colors'])
    np.testing.assert_array_equal(faces, m['faces'])
    assert b'(-5,0,0)' in path.read_bytes()[:400]  # the coordinate convention is in the header
    mesh.save_ply(tmp_path / 'points.ply', m['vertices'], m['colors'])
    vertices, colors, faces = mesh.load_ply(tmp_path / 'points.ply')
    assert faces is None and np.array_equal(vertices, m['vertices']) and np.array_equal(colors, m['colors'])
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['sphere.ply']  # no temporary left behind


def test_reading_a_missing_or_broken_ply_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match='nothing.ply'):
        mesh.load_ply(tmp_path / 'nothing.ply')
    (tmp_path / 'broken.ply').write_bytes(b'not a ply')
    with pytest.raises(ValueError, match='broken.ply'):
        mesh.load_ply(tmp_path / 'broken.ply')


# -----------------------------------------------------------------------------
# the rasteriser

def test_rasterised_sphere_has_the_silhouette_and_depth_of_the_sphere():
    m = mesh.extract_mesh(sphere_field(0.5), 40, float(mesh.sigma_from_raw(torch.tensor(1.0))), progress=False)
    S = 64
    depth, face_id, _ = mesh.rasterize(torch.from_numpy(m['vertices']), torch.from_numpy(m['faces']).long(),
                                       math.pi / 2, math.pi / 2, S)
    # true: rays of get_rays hitting a sphere of radius 0.5 at distance 5
    from render import get_rays, orbit_camera
    _, rays_d = get_rays(orbit_camera(math.pi / 2, math.pi / 2), 18.0, S)
    cos = rays_d[0, :, 0].view(S, S)                 # cosine to +x, the axis the camera looks along
    sin2 = 1 - cos ** 2
    hit = 25 * sin2 < 0.25 - 1e-3
    along_ray = 5 * cos - (0.25 - 25 * sin2).clamp_min(0).sqrt()
    assert ((face_id >= 0) == hit).float().mean() > 0.98
    inner = hit & (25 * sin2 < 0.2)
    assert (depth[inner] - along_ray[inner] * cos[inner]).abs().max() < 0.01  # depth along the viewing axis


# -----------------------------------------------------------------------------
# sample.py --mesh / --points

def run(*args):
    return subprocess.run([sys.executable, str(REPO / 'sample.py'), *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def dense_ckpt(tmp_path_factory):
    """An untrained tiny model whose decoder bias makes the box dense enough to hold surfaces."""
    torch.manual_seed(0)
    model = G3DR(dict(MODEL_PRESETS['tiny'], image_size=32))
    with torch.no_grad():
        model.decoder.net[2].bias[0] = 3.0
    path = tmp_path_factory.mktemp('ckpt') / 'ckpt.pt'
    torch.save(checkpoint.training_state('trigen', model, model.config, step=0, config=dict(seed=7)), path)
    return path


def test_sample_writes_coloured_meshes_and_point_clouds_of_heldout_scenes(dense_ckpt, tmp_path):
    r = run('--ckpt', dense_ckpt, '--mesh', '--points', '--mesh_res', 24, '--num_scenes', 2, '--out_dir', tmp_path,
            '--n_coarse', 16, '--n_fine', 16)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'the surfaces of the rendered canonical depth' in r.stdout  # the default rule, named
    for k in range(2):
        vertices, colors, faces = mesh.load_ply(tmp_path / f'scene_{k}.ply')
        assert faces is not None and len(faces) > 0 and colors is not None and len(colors) == len(vertices)
        assert (np.abs(vertices) <= 1).all()
        points, colors, faces = mesh.load_ply(tmp_path / f'scene_{k}_points.ply')
        assert faces is None and len(points) > 0 and colors is not None
    assert not list(tmp_path.glob('*.png')) and not list(tmp_path.glob('*.gif'))


def test_sample_meshes_an_input_photo_at_a_given_level(dense_ckpt, tmp_path):
    photo = REPO / 'fixtures' / 'imagenet_samples' / '1551.jpg'
    r = run('--ckpt', dense_ckpt, '--mesh', '--input', photo, '--mesh_res', 16, '--mesh_level', 1.2,
            '--out_dir', tmp_path, '--n_coarse', 8, '--n_fine', 8)
    assert r.returncode == 0, r.stderr[-2000:]
    assert 'given' in r.stdout
    assert len(mesh.load_ply(tmp_path / '1551.ply')[2]) > 0


@pytest.mark.parametrize('option, value', [('--mesh_res', '0'), ('--mesh_res', 'big'), ('--mesh_res', '5000'),
                                           ('--mesh_level', '-1'), ('--mesh_level', 'nan'), ('--mesh_level', 'x')])
def test_bad_mesh_options_are_one_line_errors_naming_the_value(option, value, tmp_path):
    r = run('--ckpt', tmp_path / 'never_read.pt', '--mesh', option, value)
    assert r.returncode == 1, r.stderr[-2000:]
    err = r.stderr.strip()
    assert err.count('\n') == 0 and err.startswith('error: ') and option in err and repr(value) in err, err
