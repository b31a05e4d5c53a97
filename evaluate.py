"""
Everything that scores G3DR: held-out reconstruction, meshes, and generated 3D.

    python evaluate.py [--ckpt out/ckpt.pt] [--scenes 16]   # PSNR / depth error / NFS + baselines -> eval.json
    python evaluate.py --mesh [--mesh_res 256]              # mesh completeness / precision -> mesh_eval.json
    python evaluate.py --rgbd_ckpt out-rgbd/ckpt.pt         # f_rgbd samples vs held-out scenes -> its eval.json
    python evaluate.py --fid --real DIR --rgbd_ckpt R --ckpt C   # FID / IS / KID of generated 3D -> fid.json

Reconstruction and mesh accuracy use synthetic scenes the training run never saw (the seed after its own),
whose true 3D is known. JSON files go beside the checkpoint scored, and a table is printed. FID / IS / KID
(protocol: `evaluate_fidelity`) come from torch-fidelity's port of the TF-Inception graph published FIDs use.
"""
import argparse
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import diffusion
import fidelity
import mesh
from configurator import resolve_device, run_script
from outputs import write_json
from render import (CAMERA_RADIUS, CANONICAL_PITCH, CANONICAL_YAW, DEPTH_FAR, DEPTH_NEAR, FOV_DEGREES, get_rays,
                    orbit_camera)
from sample import HELDOUT_SEED, heldout_seed, load_model
from scenes import SyntheticScenes
from sr import load_sr

NOVEL_VIEWS = [(-math.pi / 12, 0.0), (math.pi / 12, 0.0), (-math.pi / 6, 0.0), (math.pi / 6, 0.0),
               (0.0, -math.pi / 18), (0.0, math.pi / 18)]  # (yaw, pitch) offsets from the canonical camera
# the views the mesh accuracy sees the scene from: (yaw, pitch) offsets from the canonical camera
FRONT_VIEWS = [(0.0, 0.0), (-math.pi / 12, 0.0), (math.pi / 12, 0.0), (0.0, -math.pi / 18), (0.0, math.pi / 18)]


def view_name(dyaw, dpitch):
    if dyaw == 0 and dpitch == 0:
        return 'canonical'
    return f"yaw{math.degrees(dyaw):+.0f}" if dpitch == 0 else f"pitch{math.degrees(dpitch):+.0f}"


# -----------------------------------------------------------------------------
# Reconstruction of held-out scenes, beside baselines scored on the same pixels

def psnr(a, b, mask=None):
    """Peak signal-to-noise ratio of images (B, 3, H, W) in [0, 1], per image, in dB, over `mask` (B, 1, H, W)."""
    mask = torch.ones_like(a[:, :1]) if mask is None else mask.float()
    mse = (((a - b) ** 2) * mask).flatten(1).sum(1) / (3 * mask.flatten(1).sum(1)).clamp_min(1)
    return -10 * torch.log10(mse.clamp_min(1e-10))


def depth_mae(pred, true, mask):
    """Mean absolute depth error over the pixels of `mask`: pred, true, mask (B, 1, H, W); a float
    over the whole batch (0 when the mask is empty)."""
    return ((pred - true).abs() * mask).sum().item() / max(1, mask.sum().item())


def fill_holes(image, valid):
    """Fill the pixels where `valid` (B, 1, H, W) is False: each pass gives every hole pixel that has
    valid 8-neighbours their mean and marks it valid, until nothing is left to fill (a diffusion from
    the hole's border inwards). image (B, K, H, W) -> filled image."""
    image, valid = image * valid, valid.float()
    kernel = torch.ones(1, 1, 3, 3, device=image.device)
    while (valid < 1).any():
        count = F.conv2d(valid, kernel, padding=1)                                    # (B, 1, H, W)
        if not ((count > 0) & (valid < 1)).any():
            break  # an image with no valid pixel at all stays zero
        total = F.conv2d(image.flatten(0, 1)[:, None], kernel, padding=1).view_as(image)
        grow = (count > 0) & (valid < 1)
        image = torch.where(grow, total / count.clamp_min(1), image)
        valid = torch.where(grow, torch.ones_like(valid), valid)
    return image


def forward_warp(image, depth, yaw, pitch, radius=CAMERA_RADIUS, fov=FOV_DEGREES):
    """The input RGB-D view (the canonical camera) moved into the orbit camera (yaw, pitch): every input
    pixel is lifted to its 3D point (ray origin + depth * unit ray), projected into the new camera and
    written to the nearest pixel there; where several land on one pixel the nearest to the new camera
    wins (z-buffer). Pixels nothing lands on are filled by `fill_holes`.
    image (B, K, S, S), depth (B, 1, S, S) -> warped image (B, K, S, S), its depth along the new rays
    (B, 1, S, S) and the mask (B, 1, S, S) of pixels that received a point."""
    B, K, S, _ = image.shape
    dev = image.device
    rays_o, rays_d = get_rays(orbit_camera(CANONICAL_YAW, CANONICAL_PITCH, radius).to(dev).expand(B, 4, 4), fov, S)
    points = rays_o + rays_d * depth.flatten(2).transpose(1, 2)                       # (B, S*S, 3)
    cam2world = orbit_camera(yaw, pitch, radius).to(dev).expand(B, 4, 4)
    rot, origin = cam2world[:, :3, :3], cam2world[:, :3, 3]
    p_cam = torch.bmm(points - origin[:, None], rot)                                  # (B, S*S, 3), world -> camera
    focal = 1 / math.tan(math.radians(fov) / 2)
    in_front = p_cam[..., 2] < 0                                                      # the camera looks along -z
    x = p_cam[..., 0] * focal / (-p_cam[..., 2]).clamp_min(1e-6)                     # image plane, [-1, 1] inside
    y = p_cam[..., 1] * focal / (-p_cam[..., 2]).clamp_min(1e-6)
    col = torch.round((x + 1) / 2 * (S - 1)).long()                                   # corner-inclusive grid
    row = torch.round((1 - y) / 2 * (S - 1)).long()
    ok = in_front & (col >= 0) & (col < S) & (row >= 0) & (row < S)                   # (B, S*S)
    dist = (points - origin[:, None]).norm(dim=-1)                                    # depth along the new ray
    target = torch.where(ok, row * S + col, S * S)                                    # S*S: a discard slot
    zbuf = torch.full((B, S * S + 1), float('inf'), device=dev)
    zbuf = zbuf.scatter_reduce(1, target, torch.where(ok, dist, torch.inf), reduce='amin')
    wins = ok & (dist <= zbuf.gather(1, target))                                      # nearest point per pixel
    target = torch.where(wins, target, S * S)
    values = torch.cat([image.flatten(2).transpose(1, 2), dist[..., None]], -1)       # (B, S*S, K+1)
    out = torch.zeros(B, S * S + 1, K + 1, device=dev)
    out.scatter_(1, target[..., None].expand(-1, -1, K + 1), values)
    hit = torch.zeros(B, S * S + 1, device=dev).scatter_(1, target, wins.float())[:, :-1] > 0
    out = out[:, :-1].transpose(1, 2).reshape(B, K + 1, S, S)
    hit = hit.view(B, 1, S, S)
    warped = fill_holes(out, hit)
    return warped[:, :K], warped[:, K:], hit


def _scene_metrics(model, scenes, index, side, render_opts, device):
    """Every metric of scene `index` at the canonical view and NOVEL_VIEWS: {view name: {metric: value}},
    and the model's canonical depth (1, 1, side, side)."""
    item = scenes[index]
    planes = model.encode(item['image'][None].to(device), item['depth'][None].to(device))
    # the input as seen at the evaluation resolution (the input itself when side = image_size)
    input_rgb, input_depth = (x[None].to(device) for x in
                              scenes.render_view(index, CANONICAL_YAW, CANONICAL_PITCH, side))
    metrics, canonical_depth = {}, None
    for dyaw, dpitch in [(0.0, 0.0)] + NOVEL_VIEWS:
        yaw, pitch = CANONICAL_YAW + dyaw, CANONICAL_PITCH + dpitch
        true_rgb, true_depth = (x[None].to(device) for x in scenes.render_view(index, yaw, pitch, side))
        rgb, d, opacity = model.render_view(planes, yaw, pitch, side, with_opacity=True, **render_opts)
        # Novel views can look past the edge of the scene box, where the truth is empty (depth 0):
        # every metric is over the pixels where there is something to see (opacity: 1 = nothing seen through).
        valid = true_depth > 0                                        # (1, 1, S, S)
        m = dict(psnr=psnr(rgb, true_rgb, valid).item(), depth_mae=depth_mae(d, true_depth, valid),
                 opacity=opacity[valid].mean().item() if valid.any() else 1.0,
                 psnr_static=psnr(input_rgb, true_rgb, valid).item(),
                 depth_mae_static=depth_mae(input_depth, true_depth, valid))
        warp_rgb, _, _ = forward_warp(input_rgb, input_depth, yaw, pitch)
        m['psnr_warp'] = psnr(warp_rgb, true_rgb, valid).item()
        if dyaw == 0 and dpitch == 0:
            mean_rgb = input_rgb.mean((2, 3), keepdim=True).expand_as(input_rgb)
            m['psnr_mean'] = psnr(mean_rgb, true_rgb, valid).item()
            canonical_depth = d.cpu()
        metrics[view_name(dyaw, dpitch)] = m
    return metrics, canonical_depth


def _mean(values):
    return sum(values) / len(values)


@torch.no_grad()
def evaluate_reconstruction(model, scenes, resolution=None, n_coarse=64, n_fine=64, device='cpu'):
    """Model metrics on held-out `scenes` (SyntheticScenes), and beside them baselines scored on the same
    pixels of the same views: the input image left as it is (`static`), the input RGB-D forward-warped
    into the view with its true depth (`warp`, see forward_warp) and, at the canonical view, a constant
    image of the input's mean colour (`mean`). `per_view` holds every metric for each view."""
    side = resolution or scenes.image_size
    opts = dict(n_coarse=n_coarse, n_fine=n_fine)
    rows, depths = [], []
    for i in tqdm(range(len(scenes)), desc='eval'):
        metrics, depth = _scene_metrics(model, scenes, i, side, opts, device)
        rows.append(metrics)
        depths.append(depth)
    per_view = {name: {k: _mean([r[name][k] for r in rows]) for k in m} for name, m in rows[0].items()}
    novel = [per_view[view_name(*v)] for v in NOVEL_VIEWS]
    novel_mean = lambda key: _mean([v[key] for v in novel])
    canonical = per_view['canonical']
    return dict(psnr_canonical=canonical['psnr'], depth_mae_canonical=canonical['depth_mae'],
                psnr_novel=novel_mean('psnr'), depth_mae_novel=novel_mean('depth_mae'),
                opacity_novel=novel_mean('opacity'), opacity_yaw30=min(per_view['yaw-30']['opacity'],
                                                                      per_view['yaw+30']['opacity']),
                nfs=non_flatness_score(torch.cat(depths)),
                psnr_novel_static=novel_mean('psnr_static'), psnr_novel_warp=novel_mean('psnr_warp'),
                depth_mae_novel_static=novel_mean('depth_mae_static'), psnr_canonical_mean=canonical['psnr_mean'],
                psnr_canonical_warp=canonical['psnr_warp'], per_view=per_view, scenes=len(scenes),
                novel_views=[[round(y, 4), round(p, 4)] for y, p in NOVEL_VIEWS], resolution=side,
                samples=[n_coarse, n_fine], seed=scenes.seed,
                baselines=dict(static='the input image / depth as the novel view',
                               warp='input RGB-D forward-warped with its true depth (nearest pixel, z-buffer), '
                                    'holes filled by repeated 3x3 means of filled neighbours',
                               mean='a constant image of the input\'s mean colour'))


# -----------------------------------------------------------------------------
# Generated RGB-D: non-flatness (3DGP) and sample quality against held-out scenes

def non_flatness_score(depth_maps, near=DEPTH_NEAR, far=DEPTH_FAR, bins=64):
    """Non-flatness score (3DGP): for each depth map a `bins`-bin histogram of its values over
    [near, far], H = entropy (nats) of the normalised histogram, NFS = mean exp(H). A flat map (one
    bin) scores 1, a map spread evenly over all bins scores `bins`.

    depth_maps (N, 1, H, W) or (N, H, W) in scene units. Values outside [near, far] are clamped into
    the end bins (our sampled depth is clamped to that range anyway). Returns a float."""
    if not near < far:
        raise ValueError(f"non_flatness_score needs near < far, got near={near}, far={far}")
    if depth_maps.dim() not in (3, 4) or depth_maps.shape[0] == 0:
        raise ValueError(f"depth_maps must be (N,1,H,W) or (N,H,W), got {tuple(depth_maps.shape)}")
    d = depth_maps.detach().double().flatten(1)                                # (N, P)
    idx = ((d - near) / (far - near) * bins).floor().long().clamp(0, bins - 1)
    counts = torch.zeros(d.shape[0], bins, dtype=torch.float64, device=d.device)
    counts.scatter_add_(1, idx, torch.ones_like(d))
    p = counts / counts.sum(1, keepdim=True)                                    # (N, bins)
    entropy = -(p * p.clamp_min(1e-300).log()).sum(1)                           # 0 log 0 = 0
    return float(entropy.exp().mean())


def quality_features(x, size=16):
    """The fixed feature space of `sample_quality`: model-space RGB-D x (N, 4, H, W) area-averaged
    to size x size and flattened, divided by sqrt(dim) so that a distance is the root-mean-square
    per-value difference (in [-1, 1] units, comparable across resolutions). No learned weights:
    reproducible anywhere, and sensitive to exactly what the synthetic scenes vary in."""
    f = F.adaptive_avg_pool2d(x.float(), size).flatten(1)                       # (N, 4 size^2)
    return f / f.shape[1] ** 0.5


def sample_quality(gen_x, ref_x, gen_labels=None, ref_labels=None, size=16):
    """Sample quality against held-out scenes, in the `quality_features` space:
      nn_dist       mean over generated samples of the distance to the nearest held-out scene (fidelity);
      ref_nn_dist   mean over held-out scenes of the distance to the nearest generated sample (coverage);
      class_acc     (with labels) the fraction of generated samples whose nearest held-out scene has
                    the requested class (1-NN classification: is it recognisably class K?);
      ref_loo_*     the same distance and class accuracy of each held-out scene among the other held-out
                    scenes (leave one out): what a generator that matches the data would roughly score.
    gen_x (N, 4, H, W), ref_x (M >= 2, 4, H', W') in model space; labels (N,), (M,)."""
    if ref_x.shape[0] < 2:
        raise ValueError(f"sample_quality needs at least 2 held-out scenes, got {ref_x.shape[0]}")
    fg, fr = quality_features(gen_x, size).double(), quality_features(ref_x, size).double()
    dist = torch.cdist(fg, fr)                                                  # (N, M)
    loo = torch.cdist(fr, fr).fill_diagonal_(float('inf'))                      # (M, M)
    out = dict(nn_dist=float(dist.min(1).values.mean()), ref_nn_dist=float(dist.min(0).values.mean()),
               ref_loo_nn_dist=float(loo.min(1).values.mean()))
    if gen_labels is not None and ref_labels is not None:
        ref_labels = torch.as_tensor(ref_labels).cpu()
        nearest = ref_labels[dist.argmin(1).cpu()]
        out['class_acc'] = float((nearest == torch.as_tensor(gen_labels).cpu()).double().mean())
        out['ref_loo_class_acc'] = float((ref_labels[loo.argmin(1).cpu()] == ref_labels).double().mean())
    return out


@torch.no_grad()
def evaluate_generation(denoiser, scenes, per_class=4, steps=50, eta=0.0, guidance=3.0, seed=0, device='cpu'):
    """f_rgbd: `per_class` samples of every class against held-out `scenes` (SyntheticScenes at the
    denoiser's size): non-flatness of the generated depth and nearest-neighbour scores (sample_quality)."""
    size = denoiser.image_size
    labels = torch.arange(denoiser.num_classes, device=device).repeat_interleave(per_class)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = diffusion.ddim_sample(denoiser, (len(labels), 4, size, size), labels, steps=steps, eta=eta,
                              guidance_scale=guidance, generator=gen, progress=True)
    ref = torch.utils.data.default_collate([scenes[i] for i in range(len(scenes))])
    ref_x = diffusion.rgbd_to_x(ref['image'], ref['depth']).to(device)
    _, depth = diffusion.x_to_rgbd(x)
    return dict(nfs_generated=non_flatness_score(depth), nfs_heldout=non_flatness_score(ref['depth']),
                **sample_quality(x, ref_x, labels, ref['label']),
                samples=len(labels), guidance=guidance, steps=steps, seed=seed)


# -----------------------------------------------------------------------------
# Mesh accuracy against the true surfaces of the synthetic scenes

def _tree(points):
    from scipy.spatial import cKDTree  # nearest neighbours (scipy comes with PyMCubes)
    # compact_nodes (the default) makes queries 10x+ slower on meshes with many coplanar points (the box caps)
    return cKDTree(np.asarray(points, np.float64), balanced_tree=False, compact_nodes=False)


def true_surface_points(scenes, index, resolution=256):
    """Points of scene `index`'s surface visible from FRONT_VIEWS, from exact ray casting: (N, 3) numpy."""
    points = []
    for dyaw, dpitch in FRONT_VIEWS:
        yaw, pitch = CANONICAL_YAW + dyaw, CANONICAL_PITCH + dpitch
        _, depth = scenes.render_view(index, yaw, pitch, resolution)
        rays_o, rays_d = get_rays(orbit_camera(yaw, pitch), FOV_DEGREES, resolution)
        depth = depth.view(-1, 1)
        points.append((rays_o[0] + depth * rays_d[0])[depth[:, 0] > 0])
    return torch.cat(points).numpy()


def visible_vertices(vertices, faces, resolution=256, tolerance=0.02):
    """Mask (V,) of the vertices some view of FRONT_VIEWS sees: in the picture and no more than
    `tolerance` behind the nearest surface at their pixel."""
    vertices, faces = torch.as_tensor(vertices, dtype=torch.float32), torch.as_tensor(faces).long()
    seen = torch.zeros(len(vertices), dtype=torch.bool)
    for dyaw, dpitch in FRONT_VIEWS:
        yaw, pitch = CANONICAL_YAW + dyaw, CANONICAL_PITCH + dpitch
        zbuf, _, _ = mesh.rasterize(vertices, faces, yaw, pitch, resolution)
        pix, z = mesh.project(vertices, yaw, pitch, resolution)
        p = pix.round().long()
        inside = ((p >= 0) & (p < resolution)).all(1)
        p = p.clamp(0, resolution - 1)
        seen |= inside & (z <= zbuf[p[:, 1], p[:, 0]] + tolerance)
    return seen.numpy()


def mesh_accuracy(vertices, faces, scenes, index, resolution=256):
    """(completeness, precision) of a mesh of scene `index` of `scenes` (SyntheticScenes), in scene units:
    completeness = median distance from the true surface seen from FRONT_VIEWS to the mesh (to its nearest
    vertex or face centre); precision = median distance from the mesh vertices those views see to the
    true surface (to its nearest ray-cast point; the views are cast at resolution x resolution)."""
    vertices, faces = np.asarray(vertices, np.float32), np.asarray(faces)
    truth = true_surface_points(scenes, index, resolution)
    mesh_points = np.concatenate([vertices, vertices[faces].mean(1)])
    completeness = np.median(_tree(mesh_points).query(truth)[0])
    seen = vertices[visible_vertices(vertices, faces, resolution)]
    precision = np.median(_tree(truth).query(seen)[0]) if len(seen) else math.inf
    return float(completeness), float(precision)


@torch.no_grad()
def evaluate_meshes(model, scenes, mesh_res=mesh.MESH_RES, mesh_level='depth', device='cpu'):
    """Mesh accuracy (mesh_accuracy) on held-out `scenes` -> metrics dict with a row per scene."""
    rows = []
    for k in tqdm(range(len(scenes)), desc='mesh eval'):
        item = scenes[k]
        start = time.perf_counter()
        planes = model.encode(item['image'][None].to(device), item['depth'][None].to(device))
        m = mesh.mesh_of(model, planes, mesh_res, mesh_level, device, progress=False)
        seconds = time.perf_counter() - start
        completeness, precision = mesh_accuracy(m['vertices'], m['faces'], scenes, k)
        rows.append(dict(scene=k, completeness=completeness, precision=precision, level=m['level'],
                         vertices=len(m['vertices']), seconds=seconds))
    mean = lambda key: _mean([r[key] for r in rows])
    return dict(completeness=mean('completeness'), precision=mean('precision'), seconds_per_scene=mean('seconds'),
                mesh_res=mesh_res, level='auto' if mesh_level is None else mesh_level, scenes=len(rows),
                seed=scenes.seed, front_views=[[round(y, 4), round(p, 4)] for y, p in FRONT_VIEWS], per_scene=rows)


# -----------------------------------------------------------------------------
# FID, IS and KID of generated 3D, through torch-fidelity

@torch.no_grad()
def render_generated(denoiser, model, labels, side, steps=50, eta=0.0, guidance=3.0, seed=0, batch_size=50,
                     n_coarse=64, n_fine=64, device='cpu', sr=None):
    """f_rgbd samples of `labels` (N,), each lifted to 3D by f_trigen and rendered side x side at the
    canonical view and at one novel view (sample k at NOVEL_VIEWS[k % 6]) -> (canonical (N, 3, S, S) uint8,
    novel (N, 3, S, S) uint8, NFS of the generated depth maps, NFS of the canonical renders' depth). With
    sr (a 2x network, --sr_ckpt) the renders are its 2S x 2S outputs, as the paper reports at 256 x 256."""
    sr = sr or (lambda x: x)
    gen = torch.Generator(device=device).manual_seed(seed)
    size, input_size = denoiser.image_size, model.config['image_size']
    canonical, novel, nfs_depth, nfs_render = [], [], 0.0, 0.0
    offsets, opts = torch.tensor(NOVEL_VIEWS), dict(n_coarse=n_coarse, n_fine=n_fine)  # (6, 2) yaw, pitch offsets
    with tqdm(total=len(labels), desc='generate 3D', unit='sample') as bar:
        for start in range(0, len(labels), batch_size):
            batch = labels[start:start + batch_size].to(device)
            x = diffusion.ddim_sample(denoiser, (len(batch), 4, size, size), batch, steps=steps, eta=eta,
                                      guidance_scale=guidance, generator=gen)
            image, depth = diffusion.x_to_rgbd(x)                             # [0, 1] and scene units
            nfs_depth += len(batch) * non_flatness_score(depth)              # summed, for the mean over N
            if size != input_size:  # f_trigen takes its own training size
                image, depth = (F.interpolate(v, size=input_size, mode='bilinear', antialias=True,
                                              align_corners=False) for v in (image, depth))
            planes = model.encode(image, depth)
            rgb, rendered = model.render_view(planes, CANONICAL_YAW, CANONICAL_PITCH, side, **opts)
            view = offsets[torch.arange(start, start + len(batch)) % len(NOVEL_VIEWS)].to(device)  # (B, 2)
            yaw, pitch = CANONICAL_YAW + view[:, 0], CANONICAL_PITCH + view[:, 1]      # (B,) each
            novel_rgb, _ = model.render_view(planes, yaw, pitch, side, **opts)
            canonical.append((sr(rgb).clamp(0, 1) * 255).round().byte().cpu())  # what a PNG of it holds
            novel.append((sr(novel_rgb).clamp(0, 1) * 255).round().byte().cpu())
            nfs_render += len(batch) * non_flatness_score(rendered)
            bar.update(len(batch))
    return torch.cat(canonical), torch.cat(novel), nfs_depth / len(labels), nfs_render / len(labels)


def evaluate_fidelity(denoiser, model, args, device='cpu'):
    """FID, IS and KID of generated 3D, the protocol written into the JSON: `args.samples` f_rgbd samples
    (sample k of class k mod classes: balanced classes; DDIM with --steps, --eta, --guidance, --seed),
    each lifted by f_trigen and rendered at --resolution (default its training size; 2x through --sr_ckpt) once at the
    canonical view and once at a novel view (sample k at NOVEL_VIEWS[k % 6]: yaw +-15, +-30 degrees,
    pitch +-10 degrees), each set of N renders scored against the real images of --real (or their
    features cached as --real_cache) with torch-fidelity: FID and KID on the 2048-d pool features, IS
    on the logits of its TF-Inception port, unless --feature_extractor names another of its extractors."""
    import torch_fidelity
    sr = load_sr(args.sr_ckpt, device, trust=args.trust_checkpoint) if args.sr_ckpt else None
    side = args.resolution or model.config['image_size']
    scored = side * (2 if sr else 1)                                    # the side of the images scored
    reference, cache_name, n_ref = fidelity.reference_set(args.real, scored, args.real_cache)
    cache_root = fidelity.default_cache_root()  # $TORCH_HOME/fidelity_cache
    weights = fidelity.inception_weights(args.inception_weights, trust=args.trust_checkpoint) \
        if args.feature_extractor == fidelity.INCEPTION else None  # found (or refused) before the long sampling
    labels = torch.arange(args.samples) % denoiser.num_classes
    canonical, novel, nfs_generated, nfs_rendered = render_generated(
        denoiser, model, labels, side, args.steps, args.eta, args.guidance, args.seed, args.batch_size,
        args.n_coarse, args.n_fine, device, sr)
    metrics = {}
    for name, images in (('canonical', canonical), ('novel', novel)):
        scores = fidelity.score(images, reference, cache_name, cache_root, args.feature_extractor, weights, device,
                                args.is_splits, args.kid_subset_size, progress=True)
        metrics.update({f"{k}_{name}": v for k, v in scores.items()})
    metrics.update(nfs_generated=nfs_generated, nfs_rendered=nfs_rendered)
    metrics['protocol'] = dict(
        samples=len(labels), classes=denoiser.num_classes, labels='sample k has class k mod classes',
        resolution=scored, super_resolution=args.sr_ckpt or None,
        views=dict(canonical=[0.0, 0.0], novel=[[round(y, 4), round(p, 4)] for y, p in NOVEL_VIEWS],
                   rule='every sample at the canonical view and at novel view k mod 6'),
        reference=dict(folder=args.real, images=n_ref, cache_name=cache_name, cache_root=cache_root,
                       preprocessing=f'shorter side resized to {scored}, centre crop (torch-fidelity)'),
        feature_extractor=args.feature_extractor, weights=weights,
        is_splits=min(args.is_splits, len(labels)), kid_subsets=100,
        kid_subset_size=min(args.kid_subset_size, len(labels), n_ref or len(labels)),
        sampler=dict(steps=args.steps, eta=args.eta, guidance=args.guidance, seed=args.seed),
        render=dict(n_coarse=args.n_coarse, n_fine=args.n_fine), torch_fidelity=torch_fidelity.__version__)
    return metrics


# -----------------------------------------------------------------------------
# the command line

def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', default='out/ckpt.pt', help='f_trigen checkpoint (ours; the authors\' with --official)')
    p.add_argument('--official', action='store_true', help='--ckpt is in the authors\' release format')
    p.add_argument('--trust_checkpoint', action='store_true', help='load files the safe loader refuses with full '
                   'unpickling, which runs code stored in them: only for files from a source you trust')
    p.add_argument('--scenes', type=int, default=16, help='held-out synthetic scenes to score')
    p.add_argument('--resolution', type=int, default=0, help='render size (default: the model\'s image size)')
    p.add_argument('--n_coarse', type=int, default=64)
    p.add_argument('--n_fine', type=int, default=64)
    p.add_argument('--mesh', action='store_true', help='mesh accuracy on the held-out scenes -> mesh_eval.json')
    p.add_argument('--mesh_res', default=256, help='--mesh: marching-cubes grid points per side of the box')
    p.add_argument('--mesh_level', default='depth', help='--mesh: depth (mesh.fused_grid), auto (mesh.auto_level) '
                   'or a density')
    p.add_argument('--rgbd_ckpt', default=None, help='f_rgbd checkpoint (train_rgbd.py): adds its generative metrics')
    p.add_argument('--per_class', type=int, default=4, help='f_rgbd vs held-out scenes: samples per class')
    p.add_argument('--guidance', type=float, default=3.0, help='classifier-free guidance scale')
    p.add_argument('--steps', type=int, default=50, help='DDIM steps')
    p.add_argument('--eta', type=float, default=0.0, help='DDIM eta (0 = deterministic)')
    p.add_argument('--fid', action='store_true', help='FID / IS / KID of generated 3D -> fid.json')
    p.add_argument('--real', default='', help='--fid: a folder of real images (e.g. ImageNet validation)')
    p.add_argument('--real_cache', default='', help='--fid: name of the real images\' features in torch-fidelity\'s '
                   'cache (written on the first run with --real; alone, reused without the folder)')
    p.add_argument('--samples', type=int, default=10000, help='--fid: generated objects (classes in turn)')
    p.add_argument('--batch_size', type=int, default=50, help='--fid: objects generated at once')
    p.add_argument('--inception_weights', default='', help='--fid: torch-fidelity\'s weights-inception-2015-12-05-'
                   '6726825d.pth (default: from its cache, $TORCH_HOME/hub/checkpoints, downloaded there if missing)')
    p.add_argument('--feature_extractor', default=fidelity.INCEPTION, help='--fid: a torch-fidelity feature extractor')
    p.add_argument('--sr_ckpt', default='', help='--fid: score the 2x outputs of this train_sr.py network')
    p.add_argument('--is_splits', type=int, default=10, help='--fid: Inception Score splits')
    p.add_argument('--kid_subset_size', type=int, default=1000, help='--fid: KID subset size')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='auto')
    return p.parse_args(argv)


def print_table(rows):
    """The numbers of a metrics dict, one per line; `per_view` as a table of the model beside the baselines."""
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        if k in ('per_view', 'baselines', 'per_scene', 'protocol'):
            continue
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if 'per_view' in rows:
        keys = ['psnr', 'psnr_static', 'psnr_warp', 'psnr_mean', 'depth_mae', 'depth_mae_static', 'opacity']
        print(f"{'view':<10}" + ''.join(f"{k:>17}" for k in keys))
        for name, m in rows['per_view'].items():
            print(f"{name:<10}" + ''.join(f"{m[k]:>17.3f}" if k in m else f"{'':>17}" for k in keys))


def _report(metrics, ckpt, name):
    """The table, and the JSON file `name` beside the checkpoint `ckpt` scored."""
    print_table(metrics)
    path = os.path.join(os.path.dirname(os.path.abspath(ckpt)), name)
    write_json(metrics, path)
    print(f"wrote {path}")


def main(argv):
    args = parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.mesh:
        args.mesh_res, args.mesh_level = mesh.check_options(args.mesh_res, args.mesh_level)
    args.rgbd_ckpt = args.rgbd_ckpt or ('out-rgbd/ckpt.pt' if args.fid else None)
    denoiser = checkpoint.load_denoiser(args.rgbd_ckpt, device, trust=args.trust_checkpoint) if args.rgbd_ckpt else None
    if denoiser is not None and not args.fid and not os.path.isfile(args.ckpt):
        # generative metrics only: an f_rgbd checkpoint and no f_trigen one
        scenes = SyntheticScenes(max(2, args.scenes), image_size=denoiser.image_size, seed=HELDOUT_SEED)
        _report(evaluate_generation(denoiser, scenes, args.per_class, args.steps, args.eta, args.guidance, args.seed,
                                    device), args.rgbd_ckpt, 'eval.json')
        return
    model, train_config = load_model(args.ckpt, args.official, device, trust=args.trust_checkpoint)
    if args.fid:
        _report(evaluate_fidelity(denoiser, model, args, device), args.rgbd_ckpt, 'fid.json')
        return
    image_size, seed = model.config['image_size'], heldout_seed(train_config)
    scenes = SyntheticScenes(args.scenes, image_size=image_size, seed=seed)
    if args.mesh:
        metrics = evaluate_meshes(model, scenes, args.mesh_res, args.mesh_level, device)
        _report(metrics, args.ckpt, 'mesh_eval.json')
        return
    metrics = evaluate_reconstruction(model, scenes, args.resolution, args.n_coarse, args.n_fine, device)
    _report(metrics, args.ckpt, 'eval.json')
    if denoiser is not None:
        scenes = SyntheticScenes(max(2, args.scenes), image_size=denoiser.image_size, seed=seed)
        _report(evaluate_generation(denoiser, scenes, args.per_class, args.steps, args.eta, args.guidance, args.seed,
                                    device), args.rgbd_ckpt, 'eval.json')


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
