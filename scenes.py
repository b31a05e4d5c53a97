"""
Procedural 3D scenes with exact ground truth, for training and measuring G3DR without ImageNet.

    SyntheticScenes(num_scenes, image_size=64, seed=0)   # a Dataset, like data.ImageNetDepth
    make_scene(seed, index)                              # one scene as a dict of solids
    raycast(scenes, rays_o, rays_d)                      # their analytic ground-truth render

Why they exist: G3DR learns 3D from single views, and an ImageNet photo has no true 3D to compare a
novel view with. Here every scene is known exactly, so a reconstruction can be scored from any camera
(evaluate.py), and training runs in minutes on a CPU.

A scene is a few solids in the box [-1, 1]^3 (the scene box of render.py) in front of a back wall, seen by the
canonical camera at (-5, 0, 0) looking along +x with a field of view of 18 degrees. The wall is a
slab x in [wall_x, 1] that fills the back of the box (wall_x <= 0.8, so even the corner rays of the
canonical view stop at depth < 6), optionally with a plinth slab the objects stand on, so every
canonical ray hits something at depth in [4, 6), like the background of the ImageNet depth maps.
Nothing can stand outside the box, so novel views see past the wall's edges: a ray that misses
everything gets colour 0 and depth 0, what the renderer returns for an empty ray, and `depth > 0` is
the valid-pixel mask (empty on average: 6% of a view at yaw +-15 degrees, 18% at +-30, 1-3% at
pitch +-10; none in the canonical view).

Shading is Lambert + ambient with one directional light: view-independent, so the scene is a
radiance field that G3DR's decoder (which ignores the view direction) can represent exactly.
No shadows, one ray per pixel (the renderer also casts one ray per pixel).

Ray casting is analytic for spheres, boxes (slabs), cylinders, cones and capsules; tori are
sphere-traced on their exact signed distance function, then refined by Newton steps on it, so
their depth is exact to float precision as well.

Items are dicts like data.py's: `image` (3, S, S) in [0, 1], `depth` (1, S, S) in [4, 6),
`label` (the main object's shape, an index into SHAPES), `path` (a scene id). Bad arguments raise
ValueError with a one-line message.
"""
import colorsys
import math

import numpy as np
import torch
import torch.nn.functional as F

from render import CAMERA_RADIUS, CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera

SHAPES = ('sphere', 'box', 'cylinder', 'cone', 'torus', 'capsule')  # the class names
_ALBEDO_PARAMS = 16  # per solid: colour0 (3), colour1 (3), gradient (3), stripe_vec (3), stripe_amp, centre (3)


# -----------------------------------------------------------------------------
# a scene: solids, their sizes and placement

def _rotation_from_axis(axis, spin):
    """Rotation (local -> world, columns = local axes) whose local y axis is `axis`, turned by
    `spin` radians about it."""
    y = axis / np.linalg.norm(axis)
    helper = np.array([1.0, 0, 0]) if abs(y[0]) < 0.9 else np.array([0, 0, 1.0])
    z = np.cross(helper, y)
    z /= np.linalg.norm(z)
    x = np.cross(y, z)
    x, z = math.cos(spin) * x + math.sin(spin) * z, -math.sin(spin) * x + math.cos(spin) * z
    return np.stack([x, y, z], axis=1)


def _shape_size(rng, shape, radius):
    """Shape parameters whose bounding sphere (about the solid's centre) has the given radius."""
    if shape == 'sphere':
        return np.array([radius, 0, 0])
    if shape == 'box':  # half extents
        half = rng.uniform(0.5, 1.0, 3)
        return half / np.linalg.norm(half) * radius
    if shape in ('cylinder', 'cone'):  # (radius, half height); a cone has its apex at +half height
        angle = rng.uniform(math.radians(30), math.radians(60))
        return np.array([radius * math.cos(angle), radius * math.sin(angle), 0])
    if shape == 'capsule':  # (radius, half length of the core segment)
        r = radius * rng.uniform(0.35, 0.6)
        return np.array([r, radius - r, 0])
    if shape == 'torus':  # (major radius, tube radius), axis = local y
        r = radius * rng.uniform(0.22, 0.4)
        return np.array([radius - r, r, 0])
    raise ValueError(shape)


def _lowest_point(shape, size, rotation):
    """How far the solid reaches below its centre (support function along -y), to stand it on a floor."""
    u = rotation[1]  # world up in local coordinates
    across = math.sqrt(max(0.0, 1 - u[1] ** 2))
    if shape == 'sphere':
        return size[0]
    if shape == 'box':
        return float(np.abs(u) @ size)
    if shape == 'cylinder':
        return size[1] * abs(u[1]) + size[0] * across
    if shape == 'cone':
        return max(-size[1] * u[1], size[1] * u[1] + size[0] * across)
    if shape == 'capsule':
        return size[1] * abs(u[1]) + size[0]
    return size[0] * across + size[1]  # torus


def _random_colour(rng, saturation, value):
    hue = rng.uniform()
    return np.array(colorsys.hsv_to_rgb(hue, rng.uniform(*saturation), rng.uniform(*value))), hue


def _solid(shape, centre, size, rotation, colour0, colour1=None, gradient=(0, 0, 0),
           stripe_vec=(0, 0, 0), stripe_amp=0.0):
    """One solid of a scene. Albedo at a surface point p, with q = p - centre:
    lerp(colour0, colour1, clamp(0.5 + q . gradient, 0, 1)) * (1 + stripe_amp cos(q . stripe_vec))."""
    return dict(shape=shape, centre=np.asarray(centre, float), size=np.asarray(size, float),
                rotation=np.asarray(rotation, float), colour0=np.asarray(colour0, float),
                colour1=np.asarray(colour0 if colour1 is None else colour1, float),
                gradient=np.asarray(gradient, float), stripe_vec=np.asarray(stripe_vec, float),
                stripe_amp=float(stripe_amp))


def make_scene(seed, index):
    """The scene `index` of the family `seed` (deterministic): dict with `solids` (list of _solid
    dicts: solids[0] is the back wall, then maybe the plinth, then the objects), `main` (index in
    solids of the main object), `label` (its shape, an index into SHAPES), `light` (unit vector
    towards the light) and `ambient`."""
    rng = np.random.default_rng([seed, index])
    label = int(rng.integers(len(SHAPES)))

    # Background: a back-wall slab with a soft colour gradient (sometimes soft stripes) and, half of
    # the time, a plinth slab whose top the objects stand on.
    wall_x = rng.uniform(0.45, 0.8)
    colour0, hue = _random_colour(rng, (0.1, 0.45), (0.45, 0.9))
    colour1 = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.2, 0.2)) % 1, rng.uniform(0.1, 0.45),
                                           rng.uniform(0.3, 0.7)))
    angle = rng.uniform(0, 2 * math.pi)
    gradient = np.array([0, math.sin(angle), math.cos(angle)]) * rng.uniform(0.25, 0.5)
    stripes = np.zeros(3), 0.0
    if rng.uniform() < 0.35:
        angle = rng.uniform(0, 2 * math.pi)
        stripes = np.array([0, math.sin(angle), math.cos(angle)]) * rng.uniform(4, 8), rng.uniform(0.08, 0.18)
    solids = [_solid('box', [(wall_x + 1) / 2, 0, 0], [(1 - wall_x) / 2, 1, 1], np.eye(3), colour0, colour1,
                     gradient, *stripes)]
    floor_y = None
    if rng.uniform() < 0.5:
        floor_y = rng.uniform(-0.6, -0.4)
        colour0, hue = _random_colour(rng, (0.1, 0.5), (0.35, 0.8))
        colour1 = colour0 * rng.uniform(0.6, 0.9)
        solids.append(_solid('box', [(wall_x - 0.95) / 2, (floor_y - 1) / 2, 0],
                             [(wall_x + 0.95) / 2, (floor_y + 1) / 2, 1], np.eye(3), colour0, colour1,
                             [rng.uniform(0.25, 0.45), 0, 0]))

    # Objects: the main one (the label) is large and near the image centre; 0-2 smaller distractors
    # of any shape are placed so that their image discs barely overlap the others'.
    placed = []  # (image-plane centre (2,), image-plane radius)
    n_objects = 1 + int(rng.choice(3, p=[0.3, 0.45, 0.25]))
    for i in range(n_objects):
        shape = SHAPES[label] if i == 0 else SHAPES[int(rng.integers(len(SHAPES)))]
        radius = rng.uniform(0.3, 0.45) if i == 0 else rng.uniform(0.1, 0.22)
        size = _shape_size(rng, shape, radius)
        if shape == 'torus':  # ring roughly facing the camera, so the hole shows
            axis = np.array([-1.0, rng.uniform(-0.6, 0.6) * (floor_y is None), rng.uniform(-0.7, 0.7)])
        elif floor_y is not None:  # standing upright
            axis = np.array([0, 1.0, 0])
        elif shape == 'box':
            axis = rng.normal(size=3)
        else:
            axis = np.array([rng.uniform(-0.7, 0.7), 1.0, rng.uniform(-0.7, 0.7)])
        rotation = _rotation_from_axis(axis, rng.uniform(0, 2 * math.pi))

        for _ in range(20):  # rejection sampling of the position
            x = rng.uniform(max(-1 + radius, -0.55), wall_x - radius - 0.03)
            half_view = math.tan(math.radians(FOV_DEGREES) / 2) * (x + CAMERA_RADIUS)  # of the canonical view here
            spread = 0.25 if i == 0 else 0.85
            z = np.clip(rng.uniform(-spread, spread) * half_view, -0.98 + radius, 0.98 - radius)
            if floor_y is None:
                y = np.clip(rng.uniform(-spread, spread) * half_view, -0.98 + radius, 0.98 - radius)
            else:
                y = floor_y + _lowest_point(shape, size, rotation)
            centre_2d, radius_2d = np.array([z, y]) / (x + CAMERA_RADIUS), radius / (x + CAMERA_RADIUS)
            if all(np.linalg.norm(centre_2d - c) >= 0.75 * (radius_2d + r) for c, r in placed):
                break
        else:
            continue  # no room for this distractor
        placed.append((centre_2d, radius_2d))

        colour0, hue = _random_colour(rng, (0.45, 0.9), (0.55, 0.95))
        colour1, gradient = colour0, np.zeros(3)
        if rng.uniform() < 0.4:  # a soft two-tone gradient across the object
            colour1 = np.array(colorsys.hsv_to_rgb((hue + rng.uniform(-0.1, 0.1)) % 1, rng.uniform(0.45, 0.9),
                                                   rng.uniform(0.35, 0.7)))
            direction = rng.normal(size=3)
            gradient = direction / np.linalg.norm(direction) * 0.5 / radius
        solids.append(_solid(shape, [x, y, z], size, rotation, colour0, colour1, gradient))

    light = np.array([-rng.uniform(0.4, 1.0), rng.uniform(0.3, 1.0), rng.uniform(-0.8, 0.8)])
    return dict(solids=solids, light=light / np.linalg.norm(light), ambient=rng.uniform(0.3, 0.45), label=label,
                main=2 if floor_y is not None else 1)


# -----------------------------------------------------------------------------
# ray casting
#
# Ray-solid intersections in the solid's local frame. Inputs o, d (N, R, 3): ray origin (moved to
# the point of the ray nearest the solid's centre, for precision) and unit direction; size (N, 1, 3).
# Each returns the entry distance t (N, R) relative to that origin (inf where the ray misses) and
# the outward normal (N, R, 3). The camera is outside every solid, so the entry is the smallest
# intersection.

def _quadratic(a, b, c):
    """Both roots of a t^2 + 2 b t + c = 0 (numerically stable form), NaN where none."""
    disc = (b * b - a * c).clamp_min(0).sqrt().where(b * b - a * c >= 0, torch.nan)
    q = -(b + torch.where(b >= 0, disc, -disc))
    return q / a, c / q


def _valid(t, ok):
    return torch.where(ok & (t == t), t, torch.inf)  # t == t drops NaN


def _hit_sphere(o, d, radius, centre_y=0.0):
    oc = o.clone()
    oc[..., 1] -= centre_y
    b = (oc * d).sum(-1)
    # distance^2 of the centre to the line, computed without the b^2 - c cancellation
    dist2 = ((oc - b[..., None] * d) ** 2).sum(-1)
    t = _valid(-b - (radius ** 2 - dist2).clamp_min(0).sqrt(), dist2 <= radius ** 2)
    return t, (oc + t[..., None].nan_to_num(posinf=0) * d) / radius[..., None]


def _hit_box(o, d, half):
    d = torch.where(d.abs() < 1e-12, torch.full_like(d, 1e-12), d)
    t1, t2 = (-half - o) / d, (half - o) / d
    t_in, t_out = torch.minimum(t1, t2), torch.maximum(t1, t2)
    t_near, axis = t_in.max(-1)
    t = _valid(t_near, t_near <= t_out.min(-1).values)
    normal = -torch.sign(d) * F.one_hot(axis, 3).to(d.dtype)
    return t, normal


def _hit_cylinder(o, d, radius, half_height, caps=True):
    """Cylinder around the local y axis, |y| <= half_height; without caps, the side alone."""
    ox, oy, oz, dx, dy, dz = *o.unbind(-1), *d.unbind(-1)
    t1, t2 = _quadratic(dx * dx + dz * dz, ox * dx + oz * dz, ox * ox + oz * oz - radius ** 2)
    t_side = torch.minimum(t1, t2)
    t = _valid(t_side, (oy + t_side * dy).abs() <= half_height)
    normal = torch.stack([ox + t * dx, torch.zeros_like(t), oz + t * dz], -1).nan_to_num() / radius[..., None]
    if caps:
        for sign in (-1.0, 1.0):
            t_cap = (sign * half_height - oy) / dy
            inside = (ox + t_cap * dx) ** 2 + (oz + t_cap * dz) ** 2 <= radius ** 2
            t_cap = _valid(t_cap, inside)
            closer = t_cap < t
            t = torch.where(closer, t_cap, t)
            normal = torch.where(closer[..., None], torch.tensor([0.0, sign, 0.0]), normal)
    return t, normal


def _hit_cone(o, d, radius, half_height):
    """Solid cone around the local y axis: apex (0, h, 0), base disc of the given radius at y = -h."""
    ox, oy, oz, dx, dy, dz = *o.unbind(-1), *d.unbind(-1)
    k2 = (radius / (2 * half_height)) ** 2
    oY, dY = half_height - oy, -dy  # Y = distance below the apex
    roots = _quadratic(dx * dx + dz * dz - k2 * dY * dY, ox * dx + oz * dz - k2 * oY * dY,
                       ox * ox + oz * oz - k2 * oY * oY)
    t = torch.full_like(ox, torch.inf)
    for root in roots:  # either root can be the entry; the other nappe (Y < 0) and Y > 2h are not the cone
        Y = oY + root * dY
        t = torch.minimum(t, _valid(root, (Y >= 0) & (Y <= 2 * half_height)))
    px, pz, Y = (ox + t * dx).nan_to_num(), (oz + t * dz).nan_to_num(), (oY + t * dY).nan_to_num()
    normal = F.normalize(torch.stack([px, k2 * Y, pz], -1), dim=-1)  # gradient of x^2 + z^2 - k^2 Y^2
    t_base = (-half_height - oy) / dy
    t_base = _valid(t_base, (ox + t_base * dx) ** 2 + (oz + t_base * dz) ** 2 <= radius ** 2)
    base = t_base < t
    return torch.where(base, t_base, t), torch.where(base[..., None], torch.tensor([0.0, -1.0, 0.0]), normal)


def _hit_capsule(o, d, radius, half_length):
    """Capsule = union of two spheres and the cylinder side between them: the entry into a union of
    convex solids is the nearest of their entries."""
    t, normal = _hit_cylinder(o, d, radius, half_length, caps=False)
    for centre_y in (-half_length, half_length):
        t_cap, n_cap = _hit_sphere(o, d, radius, centre_y)
        closer = t_cap < t
        t, normal = torch.where(closer, t_cap, t), torch.where(closer[..., None], n_cap, normal)
    return t, normal


def _torus_sdf(p, major, minor):
    """Signed distance to the torus around the local y axis, and its gradient (the unit normal)."""
    ring = (p[..., 0] ** 2 + p[..., 2] ** 2).sqrt().clamp_min(1e-12)
    q = ring - major
    length = (q * q + p[..., 1] ** 2).sqrt().clamp_min(1e-12)
    grad = torch.stack([q / ring * p[..., 0], p[..., 1], q / ring * p[..., 2]], -1) / length[..., None]
    return length - minor, grad


def _hit_torus(o, d, size, steps=48, newton=3):
    """Torus around the local y axis, size = (major radius, tube radius). Sphere tracing on the exact
    SDF from the bounding-sphere entry (only rays that hit the bounding sphere are traced), then
    Newton steps on sdf(o + t d) = 0 for a float-exact depth."""
    bound = size[..., 0] + size[..., 1]  # (N, 1) bounding-sphere radius
    b = (o * d).sum(-1)
    dist2 = ((o - b[..., None] * d) ** 2).sum(-1)
    active = dist2 < bound ** 2  # (N, R)
    t = torch.full_like(b, torch.inf)
    normal = torch.zeros_like(o)
    if not active.any():
        return t, normal
    sizes = size[..., :2].expand(*active.shape, 2)[active]  # (M, 2)
    oa, da, R, r = o[active], d[active], sizes[:, 0], sizes[:, 1]
    half_chord = ((R + r) ** 2 - dist2[active]).sqrt()
    ta, t_exit = -b[active] - half_chord, -b[active] + half_chord
    for _ in range(steps):  # the SDF is exact, so a step of sdf never passes through the surface
        sdf = _torus_sdf(oa + ta[:, None] * da, R, r)[0]
        ta = torch.minimum(ta + sdf, t_exit)
    for _ in range(newton):
        sdf, grad = _torus_sdf(oa + ta[:, None] * da, R, r)
        slope = (grad * da).sum(-1)
        ta = ta - sdf / torch.where(slope.abs() < 1e-6, torch.full_like(slope, -1e-6), slope)
    sdf, grad = _torus_sdf(oa + ta[:, None] * da, R, r)
    hit = (sdf.abs() < 1e-4) & (ta < t_exit)
    t[active] = torch.where(hit, ta, torch.inf)
    normal[active] = grad
    return t, normal


def _hit(shape, o, d, size):
    if shape == 'sphere':
        return _hit_sphere(o, d, size[..., 0])
    if shape == 'box':
        return _hit_box(o, d, size)
    if shape == 'cylinder':
        return _hit_cylinder(o, d, size[..., 0], size[..., 1])
    if shape == 'cone':
        return _hit_cone(o, d, size[..., 0], size[..., 1])
    if shape == 'capsule':
        return _hit_capsule(o, d, size[..., 0], size[..., 1])
    return _hit_torus(o, d, size)


def raycast(scenes, rays_o, rays_d):
    """Ground-truth render of B scenes (make_scene dicts), one ray each per pixel.
    rays_o, rays_d: (B, R, 3), unit directions, cameras outside the box [-1, 1]^3.
    Returns rgb (B, R, 3) in [0, 1], depth (B, R) (distance along the ray, 0 where nothing is hit)
    and solid (B, R) (index into scene['solids'] of the visible solid, -1 where nothing is hit).
    Runs on one thread: its many small ops gain nothing from intra-op threads, and lose up to 10x
    when another process holds a core (measured on 2 cores: 20 ms vs 120-190 ms for 8 scenes of 64^2)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _raycast(scenes, rays_o, rays_d)
    finally:
        torch.set_num_threads(threads)


def _raycast(scenes, rays_o, rays_d):
    B, R, _ = rays_o.shape
    K = max(len(scene['solids']) for scene in scenes)
    t_all = torch.full((B * K, R), torch.inf)
    normal_all = torch.zeros(B * K, R, 3)
    albedo_params = torch.zeros(B * K, _ALBEDO_PARAMS)
    by_shape = {}
    for b, scene in enumerate(scenes):
        for k, s in enumerate(scene['solids']):
            by_shape.setdefault(s['shape'], []).append((b, b * K + k, s))
            albedo_params[b * K + k] = torch.from_numpy(np.concatenate(
                [s['colour0'], s['colour1'], s['gradient'], s['stripe_vec'], [s['stripe_amp']], s['centre']]))

    for shape, entries in by_shape.items():  # all solids of one shape at once
        scene_idx = torch.tensor([b for b, _, _ in entries])
        slot = torch.tensor([i for _, i, _ in entries])
        centre = torch.from_numpy(np.stack([s['centre'] for _, _, s in entries])).float()  # (N, 3)
        rot = torch.from_numpy(np.stack([s['rotation'] for _, _, s in entries])).float()  # (N, 3, 3) local -> world
        size = torch.from_numpy(np.stack([s['size'] for _, _, s in entries])).float()[:, None]  # (N, 1, 3)
        o = rays_o[scene_idx] - centre[:, None]  # (N, R, 3)
        d = rays_d[scene_idx]
        t0 = -(o * d).sum(-1)  # distance to the point of the ray nearest the centre
        o = o + t0[..., None] * d
        rows, cols = rot[:, None].unbind(-2), rot[:, None].unbind(-1)  # each (N, 1, 3)
        # world -> local: p_local = R^T p = sum_i p_i R[i, :]; elementwise, so a scene renders
        # bit-identically whatever batch it is in
        o_local = o[..., 0:1] * rows[0] + o[..., 1:2] * rows[1] + o[..., 2:3] * rows[2]
        d_local = d[..., 0:1] * rows[0] + d[..., 1:2] * rows[1] + d[..., 2:3] * rows[2]
        t, n = _hit(shape, o_local, d_local, size)
        t_all[slot] = torch.where(t0 + t > 0, t0 + t, torch.inf)
        normal_all[slot] = n[..., 0:1] * cols[0] + n[..., 1:2] * cols[1] + n[..., 2:3] * cols[2]  # local -> world

    t_all = t_all.view(B, K, R)
    depth, solid = t_all.min(1)  # (B, R): nearest solid per ray
    hit = depth.isfinite()
    depth = torch.where(hit, depth, torch.zeros_like(depth))
    flat = solid + torch.arange(B)[:, None] * K  # (B, R) row in the (B*K) arrays
    normal = normal_all[flat, torch.arange(R)[None].expand(B, R)]  # (B, R, 3)
    params = albedo_params[flat]  # (B, R, 16)
    c0, c1, grad, stripe_vec, stripe_amp, centre = params.split([3, 3, 3, 3, 1, 3], -1)

    q = rays_o + depth[..., None] * rays_d - centre  # hit point relative to the solid's centre
    w = (0.5 + (q * grad).sum(-1, keepdim=True)).clamp(0, 1)
    albedo = (c0 + (c1 - c0) * w) * (1 + stripe_amp * torch.cos((q * stripe_vec).sum(-1, keepdim=True)))
    light = torch.from_numpy(np.stack([s['light'] for s in scenes])).float()[:, None]  # (B, 1, 3)
    ambient = torch.tensor([s['ambient'] for s in scenes]).float()[:, None, None]  # (B, 1, 1)
    lambert = (normal * light).sum(-1, keepdim=True).clamp_min(0)
    rgb = (albedo * (ambient + (1 - ambient) * lambert)).clamp(0, 1)
    rgb = torch.where(hit[..., None], rgb, torch.zeros_like(rgb))
    return rgb, depth, torch.where(hit, solid, -1)


# -----------------------------------------------------------------------------
# the dataset

class SyntheticScenes(torch.utils.data.Dataset):
    """Procedural 3D scenes (see the module docstring) seen from the canonical camera, with
    exact depth, so that novel views can be compared with ground truth via render_view.

    Scene `index` depends only on (seed, index). Items: `image` (3, S, S) in [0, 1], `depth` (1, S, S)
    in [4, 6), `label` = shape of the main (largest) object, an index into `class_names`, and
    `path` = scene id. No flip: the ground-truth novel views must stay those of the same scene.
    `__getitems__` renders a whole DataLoader batch in one vectorised pass."""

    class_names = SHAPES
    num_classes = len(SHAPES)

    def __init__(self, num_scenes, image_size=64, seed=0):
        if int(num_scenes) < 1:
            raise ValueError(f"num_scenes must be positive, got {num_scenes}")
        if int(image_size) < 2:
            raise ValueError(f"image_size must be at least 2, got {image_size}")
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.num_scenes, self.image_size, self.seed = int(num_scenes), int(image_size), int(seed)
        self._canonical_rays = {}

    def __len__(self):
        return self.num_scenes

    def _index(self, index):
        index = int(index)
        if not -self.num_scenes <= index < self.num_scenes:
            raise IndexError(f"scene {index} out of range for {self.num_scenes} scenes")
        return index % self.num_scenes

    def scene(self, index):
        return make_scene(self.seed, self._index(index))

    def _render(self, scenes, yaw, pitch, resolution, radius, fov):
        S, B = int(resolution or self.image_size), len(scenes)
        yaw, pitch = [a.detach().cpu() if torch.is_tensor(a) else a for a in (yaw, pitch)]  # ray casting runs on the CPU
        canonical = not torch.is_tensor(yaw) and not torch.is_tensor(pitch) and \
            (yaw, pitch, radius, fov) == (CANONICAL_YAW, CANONICAL_PITCH, CAMERA_RADIUS, FOV_DEGREES)
        if canonical and S in self._canonical_rays:
            rays_o, rays_d = self._canonical_rays[S]
        else:
            rays_o, rays_d = get_rays(orbit_camera(yaw, pitch, radius), fov, S)  # (1 or B, S*S, 3)
            rays_o, rays_d = rays_o.float(), rays_d.float()
            if canonical:
                self._canonical_rays[S] = rays_o, rays_d
        rgb, depth, _ = raycast(scenes, rays_o.expand(B, -1, -1), rays_d.expand(B, -1, -1))
        return rgb.view(B, S, S, 3).permute(0, 3, 1, 2).contiguous(), depth.view(B, 1, S, S)

    def render_views(self, indices, yaw, pitch, resolution=None, radius=CAMERA_RADIUS, fov=FOV_DEGREES):
        """Ground truth of scenes `indices` from orbit cameras (yaw, pitch floats or (B,) tensors;
        render.orbit_camera). Returns images (B, 3, S, S) in [0, 1] and depth (B, 1, S, S), as
        model.G3DR.render_view."""
        return self._render([self.scene(i) for i in indices], yaw, pitch, resolution, radius, fov)

    def render_view(self, index, yaw, pitch, resolution=None, radius=CAMERA_RADIUS, fov=FOV_DEGREES):
        """Ground truth (image (3, S, S) in [0, 1], depth (1, S, S)) of scene `index` from an orbit camera."""
        images, depths = self.render_views([index], yaw, pitch, resolution, radius, fov)
        return images[0], depths[0]

    def __getitems__(self, indices):
        indices = [self._index(i) for i in indices]
        scenes = [make_scene(self.seed, i) for i in indices]
        images, depths = self._render(scenes, CANONICAL_YAW, CANONICAL_PITCH, None, CAMERA_RADIUS, FOV_DEGREES)
        return [dict(image=images[j], depth=depths[j], label=scenes[j]['label'], path=f"synthetic/seed{self.seed}/{i}")
                for j, i in enumerate(indices)]

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

