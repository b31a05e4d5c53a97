"""
Meshes and point clouds from a reconstruction, in the scene's own coordinates (render.py: the box
[-1, 1]^3, the canonical camera at (-5, 0, 0) looking along +x, +y up).

    field = scene_field(model, model.encode(image, depth))      # one scene's triplane field
    mesh = extract_mesh(field, resolution=256, level='depth')   # the surfaces the canonical render shows
    save_ply('scene.ply', mesh['vertices'], mesh['colors'], mesh['faces'])
    points, colors = canonical_points(field, 64)                # the canonical view as 3D points

A mesh is marching cubes (PyMCubes) over a grid over the box, queried a slab at a time so memory stays
bounded at any resolution; vertex colours are the colour field at the vertices. What the grid holds is the
rule that decides what is exported:
  'depth' (the default)  the signed distance to the surfaces of the rendered canonical depth (fused_grid):
                         the mesh is what the reconstruction shows from the input camera, solid behind it,
                         and nothing where that camera never looks;
  None ('auto') / sigma  the field's density, at the automatic iso-level (auto_level) or at a given one:
                         the whole field, also where nothing constrains it.
The volume outside the box counts as empty, so every mesh is closed: what the box cuts is capped at its
faces. `python mesh.py view scene_0.ply scene_0.png` draws a PLY with the small rasteriser below.
sample.py --mesh / --points writes these files; evaluate.py --mesh scores them against the synthetic
scenes' true surfaces (with `rasterize` and `project` below).
"""
import math
import os
import sys

import mcubes                          # marching cubes (C++), numpy in, numpy out
import numpy as np
import torch
import torch.nn.functional as F
from plyfile import PlyData, PlyElement
from tqdm import tqdm

from configurator import run_script
from model import make_field, sample_triplane, triplane_pyramid
from outputs import atomic_write, save_grid
from render import CAMERA_RADIUS, CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera, render_rays

MESH_RES = 256            # grid points per side of the box
QUERY_POINTS = 1 << 18    # points per field query: bounds the memory of the grid pass
BOX_SIZE = 2.0            # the scene box [-1, 1]^3 (render.py's box_size)
MAX_MESH_RES = 1024       # 1024^3 float32 densities are 4 GiB; beyond that, memory runs out
PLY_COMMENT = "G3DR reconstruction: scene box [-1,1]^3, canonical camera at (-5,0,0) looking along +x, +y up"


def check_options(resolution, level):
    """--mesh_res and --mesh_level as given on the command line (strings or numbers) -> (int, 'depth'
    (fused rendered depth, the default), None (the automatic iso-level) or a float density); a ValueError
    naming the value otherwise."""
    try:
        res = int(str(resolution))
    except ValueError:
        res = None
    if res is None or not 8 <= res <= MAX_MESH_RES:
        raise ValueError(f"--mesh_res must be an integer from 8 to {MAX_MESH_RES}, got {resolution!r}")
    if str(level) == 'depth':
        return res, 'depth'
    if level is None or str(level) == 'auto':
        return res, None
    try:
        value = float(str(level))
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"--mesh_level must be 'depth', 'auto' or a positive density, got {level!r}")
    return res, value


# -----------------------------------------------------------------------------
# The field of one scene and its density

def _field_sizes(model):
    """(levels, projection) of a G3DR: the two sizes of its triplane field, from the model's own sizes."""
    return model.config['levels'], model.config['projection']  # G3DR's sizes (MODEL_PRESETS), no training config


def scene_field(model, planes):
    """planes (1, 3, C, H, W) of G3DR.encode -> field(points (1, M, 3)) -> (rgb (1, M, 3), raw density (1, M, 1))."""
    assert planes.shape[0] == 1, "one scene at a time"
    levels, projection = _field_sizes(model)
    return make_field(planes.float(), model.decoder, levels, BOX_SIZE, projection)


def sigma_from_raw(raw):
    return F.softplus(raw - 1)  # sigma = softplus(raw - 1), as render.composite


def raw_from_sigma(sigma):
    """The inverse of sigma_from_raw, stable for small and large sigma > 0."""
    return 1 + sigma + math.log(-math.expm1(-sigma))


def _query(field, points, batch=QUERY_POINTS):
    """points (N, 3) -> rgb (N, 3), raw density (N,), `batch` points at a time."""
    rgb, raw = [], []
    for i in range(0, len(points), batch):
        c, d = field(points[None, i:i + batch])
        rgb.append(c[0])
        raw.append(d[0, :, 0])
    return torch.cat(rgb), torch.cat(raw)


# -----------------------------------------------------------------------------
# The iso-level

@torch.no_grad()
def _render_canonical(field, resolution, n_coarse, n_fine, device, yaw=CANONICAL_YAW, pitch=CANONICAL_PITCH):
    """A deterministic render of the field from (yaw, pitch), the canonical camera by default: rays_o, rays_d
    (S*S, 3) and render_rays' outputs (batch 1)."""
    rays_o, rays_d = get_rays(orbit_camera(yaw, pitch).to(device), FOV_DEGREES, resolution)  # (1, S*S, 3)
    out = render_rays(field, rays_o, rays_d, n_coarse=n_coarse, n_fine=n_fine, perturb=False, chunk=4096)
    return rays_o[0], rays_d[0], out


@torch.no_grad()
def auto_level(field, resolution=64, n_coarse=64, n_fine=64, device='cpu'):
    """The iso-level rule. Render the canonical view (deterministic samples). On every ray that becomes
    more than half opaque, find t_half, where its transmittance falls to 1/2 (the median of where the ray
    stops), and the field's density sigma there. Candidate levels are the 5%, 10%, .., 95% quantiles of
    these densities; the level is the candidate whose first crossings along the rays (the first interval
    whose density reaches it) lie nearest t_half, in median absolute distance over the rays. One level
    for the whole scene, so it must suit sharp surfaces (a wall) and soft ones (a young object) at once;
    the faint density in front of surfaces, which renders see through, stays below it.
    Returns (level, number of rays used)."""
    rays_o, rays_d, out = _render_canonical(field, resolution, n_coarse, n_fine, device)
    w, t = out['weights'][0], out['t'][0]                   # (R, n) interval weights, (R, n + 1) their edges
    acc = w.cumsum(-1)                                      # opacity at the end of each interval
    opaque = acc[:, -1] > 0.5
    if not opaque.any():
        raise ValueError("the canonical view is nowhere more than half opaque, so no iso-level can be chosen: "
                         "pass --mesh_level")
    w, t, acc, rays_o, rays_d = w[opaque], t[opaque], acc[opaque], rays_o[opaque], rays_d[opaque]
    trans = (1 - (acc - w)).clamp_min(1e-10)                # transmittance entering each interval
    alpha = (w / trans).clamp(max=1 - 1e-6)
    delta = (t[:, 1:] - t[:, :-1]).clamp_min(1e-6)
    sigma = -torch.log1p(-alpha) / delta                    # (R, n) each interval's density
    i = (acc < 0.5).sum(-1, keepdim=True)                   # (R, 1) the interval where T crosses 1/2
    # inside an interval sigma is constant, T(s) = T_i exp(-sigma s): T = 1/2 at this fraction of it
    frac = (torch.log(2 * trans.gather(1, i)) / -torch.log1p(-alpha.gather(1, i))).clamp(0, 1)
    t_half = t.gather(1, i) + frac * (t.gather(1, i + 1) - t.gather(1, i))  # (R, 1)
    _, raw = _query(field, rays_o + t_half * rays_d)
    candidates = torch.quantile(sigma_from_raw(raw), torch.linspace(0.05, 0.95, 19))  # (L,)
    reached = sigma[None] >= candidates[:, None, None]      # (L, R, n)
    first = reached.float().argmax(-1)                      # (L, R) first interval at or above the level
    t_mid = (t[:, 1:] + t[:, :-1]) / 2
    t_cross = torch.where(reached.any(-1), t_mid.gather(1, first.t()).t(), torch.full_like(t_half[:, 0], 1e3))
    error = (t_cross - t_half[:, 0]).abs().median(-1).values  # (L,)
    return float(candidates[error.argmin()]), int(opaque.sum())


# -----------------------------------------------------------------------------
# The default rule: the surfaces the renders show (fused rendered depth)

FUSION_VIEWS = ((0.0, 0.0),)   # (yaw, pitch) offsets from the canonical camera of the fused depth maps
FUSION_TRUNCATION = 0.1        # scene units: how far behind a rendered surface a view still speaks for a point


@torch.no_grad()
def fused_grid(field, resolution=MESH_RES, views=FUSION_VIEWS, truncation=FUSION_TRUNCATION, n_coarse=64,
               n_fine=64, device='cpu', progress=True):
    """Truncated signed distance to the rendered surfaces of `views`, fused, at the grid points of
    density_grid: (resolution,) * 3 float32 numpy, > 0 behind the surfaces (inside), < 0 in front of them.

    Each view is rendered at resolution x resolution; its depth d at a pixel is where its ray stops (the
    expected distance; no surface where the ray is at most half opaque). A grid point at distance r from
    the camera of a view whose frustum holds it, at a pixel with depth d, gets clamp((r - d) / truncation,
    -1, 1) from that view if r < d + truncation (in front of the surface, or just behind it); the value is
    the mean over those views (TSDF fusion, as KinectFusion). A point that views hold but that lies more
    than `truncation` behind all their surfaces is inside (1); a point no view holds is empty (-1): the
    mesh is what the renders show, and the field where no view looks stays out."""
    depths = []
    for dyaw, dpitch in views:
        yaw, pitch = CANONICAL_YAW + dyaw, CANONICAL_PITCH + dpitch
        rays_o, _, out = _render_canonical(field, resolution, n_coarse, n_fine, device, yaw, pitch)
        depth = torch.where(out['opacity'][0, :, 0] > 0.5, out['depth'][0, :, 0], math.inf)  # (S*S,)
        depths.append((yaw, pitch, rays_o[0], depth.view(resolution, resolution)))  # rays_o[0]: the camera
    grid = np.empty((resolution,) * 3, dtype=np.float32)
    for i, points in _grid_points(resolution, device, f"fused depth {resolution}^3", progress):
        total, count = torch.zeros(len(points), device=device), torch.zeros(len(points), device=device)
        held = torch.zeros(len(points), dtype=torch.bool, device=device)
        for yaw, pitch, origin, depth in depths:
            pixel, _ = project(points, yaw, pitch, resolution)          # (N, 2) col, row
            pixel = pixel.round().long()
            inside = ((pixel >= 0) & (pixel < resolution)).all(-1)       # in the view's frustum
            col, row = pixel.clamp(0, resolution - 1).unbind(-1)
            behind = (points - origin).norm(dim=-1) - depth[row, col]     # r - d
            speaks = inside & (behind < truncation)
            total += torch.where(speaks, (behind / truncation).clamp(-1, 1), 0.0)
            count += speaks
            held |= inside
        value = torch.where(count > 0, total / count.clamp_min(1), torch.where(held, 1.0, -1.0))
        grid[i:i + len(points) // resolution ** 2] = value.view(-1, resolution, resolution).cpu().numpy()
    return grid


# -----------------------------------------------------------------------------
# Marching cubes

def _grid_axis(resolution, device='cpu'):
    return torch.linspace(-BOX_SIZE / 2, BOX_SIZE / 2, resolution, device=device)


def _grid_points(resolution, device, desc, progress):
    """The grid points (x_i, y_j, z_k) = linspace(-1, 1, resolution) of each axis, a few x-slabs at a time
    (memory stays bounded): yields (i, points (n res^2, 3)) for slabs i .. i + n - 1, in [i, j, k] order."""
    axis = _grid_axis(resolution, device)
    yz = torch.stack(torch.meshgrid(axis, axis, indexing='ij'), -1).view(-1, 2)  # (res^2, 2)
    slabs = max(1, QUERY_POINTS // len(yz))
    for i in tqdm(range(0, resolution, slabs), desc=desc, leave=False, disable=not progress):
        x = axis[i:i + slabs]
        yield i, torch.cat([x.repeat_interleave(len(yz))[:, None], yz.repeat(len(x), 1)], 1)  # (n res^2, 3)


@torch.no_grad()
def density_grid(field, resolution=MESH_RES, device='cpu', progress=True):
    """Raw density at the grid points (x_i, y_j, z_k) = linspace(-1, 1, resolution) of each axis ->
    (resolution,) * 3 float32 numpy array indexed [i, j, k]."""
    grid = np.empty((resolution,) * 3, dtype=np.float32)
    for i, points in _grid_points(resolution, device, f"density {resolution}^3", progress):
        _, raw = field(points[None])
        grid[i:i + len(points) // resolution ** 2] = raw.view(-1, resolution, resolution).cpu().numpy()
    return grid


@torch.no_grad()
def triplane_density_grid(model, planes, resolution=MESH_RES, progress=True):
    """density_grid of scene_field(model, planes), fast: the same numbers (to float rounding), 5-10x sooner.

    A triplane feature is a sum of terms that each depend on two coordinates, f(x, y, z) = A(x, y) +
    B(x, z) + C(y, z), and for any such sum, with 0 any fixed grid index,
        f(i, j, k) = f(i, j, 0) + [f(i, 0, k) - f(i, 0, 0)] + [f(0, j, k) - f(0, j, 0) - f(0, 0, k) + f(0, 0, 0)],
    so three res^2 tables of features give all res^3 of them. f_dec's first layer is linear and can be
    applied to the tables, so what is left per grid point is two additions (in place: the memory traffic is
    the cost), a softplus and a 64 -> 4 layer."""
    first, rest = model.decoder.net[0], model.decoder.net[1:]  # f_dec = FC, softplus, FC (model.Decoder)
    levels, projection = _field_sizes(model)
    pyramid = triplane_pyramid(planes.float(), levels)
    axis = _grid_axis(resolution, planes.device)
    a, b = (g.reshape(-1) for g in torch.meshgrid(axis, axis, indexing='ij'))  # (res^2,) each, row-major
    edge = torch.full_like(a, axis[0].item())

    def features(x, y, z):  # (res^2,) coordinates -> (res, res, C) features
        return sample_triplane(pyramid, torch.stack([x, y, z], -1)[None], levels, BOX_SIZE, projection)[0] \
            .view(resolution, resolution, -1)

    f_xy, f_xz, f_yz = features(a, b, edge), features(a, edge, b), features(edge, a, b)  # [i, j], [i, k], [j, k]
    zero = first(torch.zeros_like(f_xy[:1, 0]))                 # the layer's bias: first(u) - first(0) is linear
    h_xy = first(f_xy.flatten(0, 1)).view(resolution, resolution, -1)
    h_xz = (first((f_xz - f_xz[:, :1]).flatten(0, 1)) - zero).view(resolution, resolution, -1)
    c_yz = f_yz - f_xy[0][:, None] - f_xz[0][None] + f_xy[0, 0]  # f(0, j, k) - f(0, j, 0) - f(0, 0, k) + f(0, 0, 0)
    h_yz = (first(c_yz.flatten(0, 1)) - zero).view(resolution, resolution, -1)
    grid = np.empty((resolution,) * 3, dtype=np.float32)
    slabs = max(1, QUERY_POINTS // resolution ** 2)
    buffer = h_xy.new_empty(min(slabs, resolution), resolution, resolution, h_xy.shape[-1])
    for i in tqdm(range(0, resolution, slabs), desc=f"density {resolution}^3", leave=False, disable=not progress):
        n = min(slabs, resolution - i)
        h = torch.add(h_xy[i:i + n, :, None], h_xz[i:i + n, None], out=buffer[:n]).add_(h_yz)  # (n, res, res, hidden)
        grid[i:i + n] = rest(h.view(-1, h.shape[-1]))[:, 0].view(n, resolution, resolution).cpu().numpy()  # raw density
    return grid


def _marching_cubes(grid, level_raw):
    """Iso-surface of grid (res, res, res) at level_raw -> vertices (V, 3) in the box, faces (F, 3),
    counter-clockwise seen from outside (towards lower density). The grid is framed by a layer far
    below the level, so the surface closes at the box faces."""
    res = grid.shape[0]
    framed = np.pad(grid.astype(np.float64), 1, constant_values=level_raw - 1e4)
    vertices, faces = mcubes.marching_cubes(framed, level_raw)
    vertices = (vertices - 1) * (BOX_SIZE / (res - 1)) - BOX_SIZE / 2  # grid index -> scene coordinates
    return vertices.clip(-BOX_SIZE / 2, BOX_SIZE / 2).astype(np.float32), faces.astype(np.int32)


@torch.no_grad()
def extract_mesh(field, resolution=MESH_RES, level=None, grid=None, device='cpu', progress=True,
                 level_resolution=64):
    """field of scene_field (or any field(points (1, M, 3)) -> (rgb, raw density)) -> dict with
    vertices (V, 3) float32 in scene coordinates, faces (F, 3) int32, colors (V, 3) uint8 (the colour
    field at the vertices), level and level_rule. level 'depth': the surfaces of the rendered depth
    (fused_grid; level_rule 'depth', level 0, the zero crossing); None: the density iso-surface at
    auto_level's level ('auto'); a float: at that density sigma ('given').
    grid: the field's density_grid at this resolution when it is already known (triplane_density_grid)."""
    if level == 'depth':
        fused = fused_grid(field, resolution, device=device, progress=progress)
        if not fused.max() > 0:
            raise ValueError("no surface to mesh: the rendered view is nowhere more than half opaque; "
                             "pass --mesh_level auto or a density")
        vertices, faces = _marching_cubes(fused, 0.0)
        return dict(vertices=vertices, faces=faces, colors=_vertex_colors(field, vertices, device), level=0.0,
                    level_rule='depth')
    rule = 'given'
    if level is None:
        level, _ = auto_level(field, level_resolution, device=device)
        rule = 'auto'
    if grid is None:
        grid = density_grid(field, resolution, device, progress)
    assert grid.shape == (resolution,) * 3, grid.shape
    level_raw = raw_from_sigma(level)
    if not grid.min() < level_raw < grid.max():
        lo, hi = (float(sigma_from_raw(torch.tensor(float(v)))) for v in (grid.min(), grid.max()))
        raise ValueError(f"no surface at density level {level:.4g}: the field's density lies in "
                         f"[{lo:.4g}, {hi:.4g}]; pass a --mesh_level inside it")
    vertices, faces = _marching_cubes(grid, level_raw)
    return dict(vertices=vertices, faces=faces, colors=_vertex_colors(field, vertices, device), level=level,
                level_rule=rule)


def _vertex_colors(field, vertices, device):
    """The colour field at the vertices (V, 3) -> (V, 3) uint8."""
    rgb, _ = _query(field, torch.from_numpy(vertices).to(device))
    return (rgb.clamp(0, 1) * 255).round().byte().cpu().numpy()


@torch.no_grad()
def mesh_of(model, planes, resolution=MESH_RES, level='depth', device='cpu', progress=True):
    """extract_mesh of one encoded scene (planes (1, 3, C, H, W)), with the fast density grid
    (triplane_density_grid) where the rule needs densities."""
    grid = None if level == 'depth' else triplane_density_grid(model, planes, resolution, progress)
    return extract_mesh(scene_field(model, planes), resolution, level, grid, device, progress)


@torch.no_grad()
def canonical_points(field, resolution, n_coarse=64, n_fine=64, device='cpu'):
    """The canonical view as a point cloud: a point at the rendered depth of every pixel whose ray is
    more than half opaque, coloured by the render (un-premultiplied by the opacity). Returns points
    (N, 3) float32 and colours (N, 3) uint8, numpy, row by row from the top-left pixel."""
    rays_o, rays_d, out = _render_canonical(field, resolution, n_coarse, n_fine, device)
    opacity = out['opacity'][0]                                     # (R, 1)
    keep = opacity[:, 0] > 0.5
    points = rays_o + out['depth'][0] * rays_d                      # (R, 3)
    rgb = ((out['rgb'][0] + 1) / 2 / opacity.clamp_min(1e-6)).clamp(0, 1)
    return points[keep].cpu().numpy().astype(np.float32), (rgb[keep] * 255).round().byte().cpu().numpy()


# -----------------------------------------------------------------------------
# PLY files (binary; MeshLab, Blender, Open3D and trimesh read them with their colours)

def save_ply(path, vertices, colors, faces=None, comments=(PLY_COMMENT,)):
    """vertices (V, 3), colors (V, 3) uint8, faces (F, 3) or None (a point cloud) -> binary PLY at path,
    written to a temporary file beside it and renamed into place."""
    vertices, colors = np.asarray(vertices), np.asarray(colors)
    assert vertices.ndim == 2 and vertices.shape[1] == 3 and colors.shape == vertices.shape
    vertex = np.empty(len(vertices), dtype=[('x', 'f4'), ('y', 'f4'), ('z', 'f4'),
                                            ('red', 'u1'), ('green', 'u1'), ('blue', 'u1')])
    for k, name in enumerate('xyz'):
        vertex[name] = vertices[:, k]
    for k, name in enumerate(('red', 'green', 'blue')):
        vertex[name] = colors[:, k]
    elements = [PlyElement.describe(vertex, 'vertex')]
    if faces is not None:
        face = np.empty(len(faces), dtype=[('vertex_indices', 'i4', (3,))])
        face['vertex_indices'] = faces
        elements.append(PlyElement.describe(face, 'face'))
    atomic_write(path, PlyData(elements, text=False, comments=list(comments)).write)


def load_ply(path):
    """-> vertices (V, 3) float32, colors (V, 3) uint8 or None, faces (F, 3) int64 or None."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no PLY file at {path}")
    try:
        ply = PlyData.read(path)
        v = ply['vertex']
    except Exception as e:
        raise ValueError(f"{path}: not a readable PLY file ({e})") from None
    vertices = np.stack([v['x'], v['y'], v['z']], 1).astype(np.float32)
    names = v.data.dtype.names
    colors = np.stack([v['red'], v['green'], v['blue']], 1).astype(np.uint8) if 'red' in names else None
    faces = None
    if 'face' in ply and ply['face'].count:
        faces = np.stack(ply['face']['vertex_indices']).astype(np.int64)
    return vertices, colors, faces


# -----------------------------------------------------------------------------
# A small z-buffer rasteriser: mesh pictures and which vertices a camera sees

def project(vertices, yaw, pitch, resolution, radius=CAMERA_RADIUS, fov=FOV_DEGREES):
    """vertices (V, 3) -> pixel (col, row) (V, 2) in the pixel grid of get_rays and depth along the
    camera's viewing axis (V,)."""
    cam2world = orbit_camera(yaw, pitch, radius)[0]
    cam = (vertices - cam2world[:3, 3]) @ cam2world[:3, :3]  # world -> camera: R^T (p - origin)
    z = -cam[:, 2]                                           # the camera looks along its -z
    f = 1 / math.tan(math.radians(fov) / 2)
    x, y = f * cam[:, 0] / z, f * cam[:, 1] / z              # on get_rays' image plane, [-1, 1] at the corners
    return torch.stack([(x + 1) / 2 * (resolution - 1), (1 - y) / 2 * (resolution - 1)], -1), z


def rasterize(vertices, faces, yaw, pitch, resolution, radius=CAMERA_RADIUS, fov=FOV_DEGREES, max_candidates=1 << 22):
    """Which triangle covers each pixel centre, nearest first. vertices (V, 3), faces (F, 3) tensors.
    Returns depth (S, S) (inf where empty), face index (S, S) (-1 where empty) and the perspective-
    correct barycentric weights (S, S, 3). Every triangle is tested at the pixels of its bounding box,
    triangles grouped by box size so the work stays about proportional to the covered pixels."""
    S = resolution
    pix, z = project(vertices, yaw, pitch, S, radius, fov)
    tri, tz = pix[faces], z[faces]                                          # (F, 3, 2), (F, 3)
    lo, hi = tri.amin(1).ceil(), tri.amax(1).floor().clamp(max=S - 1)
    lo = lo.clamp(min=0)
    size = (hi - lo + 1).amax(1)                                            # (F,) box side in pixels
    ok = (size >= 1) & (tz > 0).all(1) & (lo <= hi).all(1)
    keys, depths, ids, bary = [], [], [], []
    window = 1
    while ok.any():
        group = (ok & (size <= window)).nonzero()[:, 0]
        ok &= size > window
        off = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing='xy'), -1).view(-1, 2)
        for part in group.split(max(1, max_candidates // window ** 2)):
            p = lo[part, None] + off                                        # (n, w^2, 2) candidate pixels
            a, b, c = (tri[part, None, k] for k in range(3))                # (n, 1, 2) each
            area = (b[..., 0] - a[..., 0]) * (c[..., 1] - a[..., 1]) - (b[..., 1] - a[..., 1]) * (c[..., 0] - a[..., 0])
            def edge(u, v):  # twice the signed area of (u, v, p)
                return (v[..., 0] - u[..., 0]) * (p[..., 1] - u[..., 1]) - (v[..., 1] - u[..., 1]) * (p[..., 0] - u[..., 0])
            lam = torch.stack([edge(b, c), edge(c, a), edge(a, b)], -1) / area[..., None]  # (n, w^2, 3)
            inside = (lam >= -1e-6).all(-1) & (p < S).all(-1) & (area.abs() > 1e-12)
            inside &= (p[..., 0] <= hi[part, None, 0]) & (p[..., 1] <= hi[part, None, 1])
            lam = lam / tz[part, None]                                      # perspective-correct: weights / z
            depth = 1 / lam.sum(-1)
            n, m = inside.nonzero(as_tuple=True)
            keys.append((p[n, m, 1] * S + p[n, m, 0]).long())
            depths.append(depth[n, m])
            ids.append(part[n])
            bary.append(lam[n, m] * depth[n, m, None])
        window *= 2
    zbuf = torch.full((S * S,), math.inf)
    face_id = torch.full((S * S,), -1, dtype=torch.long)
    weights = torch.zeros(S * S, 3)
    if keys:
        keys, depths, ids, bary = (torch.cat(v) for v in (keys, depths, ids, bary))
        zbuf.scatter_reduce_(0, keys, depths, 'amin')
        front = depths == zbuf[keys]                                        # ties: any of them
        face_id[keys[front]] = ids[front]
        weights[keys[front]] = bary[front]
    return zbuf.view(S, S), face_id.view(S, S), weights.view(S, S, 3)


def render_mesh(vertices, faces, colors, yaw, pitch, resolution, shade=True, background=1.0):
    """A picture of a mesh from an orbit camera: image (3, S, S) in [0, 1], vertex colours interpolated,
    times a Lambert term with a light over the camera's left shoulder (shade=True); colors=None draws
    it grey. Inputs numpy or tensors."""
    vertices, faces = torch.as_tensor(np.asarray(vertices), dtype=torch.float32), torch.as_tensor(np.asarray(faces)).long()
    depth, face_id, w = rasterize(vertices, faces, yaw, pitch, resolution)
    hit = face_id >= 0
    if colors is None:
        vc = torch.full((len(vertices), 3), 0.8)
    else:
        vc = torch.as_tensor(np.asarray(colors)).float() / 255
    fid = face_id.clamp(min=0)
    image = (vc[faces[fid]] * w[..., None]).sum(-2)                         # (S, S, 3)
    if shade:
        a, b, c = (vertices[faces[:, k]] for k in range(3))
        normal = F.normalize(torch.linalg.cross(b - a, c - a, dim=-1), dim=-1)   # outward (counter-clockwise)
        cam2world = orbit_camera(yaw, pitch)[0, :3, :3]
        light = F.normalize(cam2world @ torch.tensor([-0.5, 0.6, 1.0]), dim=0)   # up-left of the camera
        lambert = (normal[fid] @ light).abs()                               # two-sided
        image = image * (0.45 + 0.55 * lambert[..., None])
    image = torch.where(hit[..., None], image, torch.full_like(image, background))
    return image.permute(2, 0, 1).clamp(0, 1)


def main(argv):
    """python mesh.py view MESH.ply OUT.png [--size S]: the mesh from the canonical camera and from
    30 degrees to the right and above, in its colours and in grey."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument('command', choices=['view'])
    p.add_argument('ply')
    p.add_argument('png')
    p.add_argument('--size', type=int, default=256)
    args = p.parse_args(argv)
    vertices, colors, faces = load_ply(args.ply)
    if faces is None:
        raise ValueError(f"{args.ply} has no faces (a point cloud): view it in MeshLab or Blender")
    views = [(CANONICAL_YAW, CANONICAL_PITCH), (CANONICAL_YAW + math.radians(30), CANONICAL_PITCH - math.radians(20))]
    pictures = [render_mesh(vertices, faces, c, yaw, pitch, args.size) for yaw, pitch in views for c in (colors, None)]
    save_grid(torch.stack(pictures), args.png, nrow=len(pictures))
    print(f"wrote {args.png}")


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
