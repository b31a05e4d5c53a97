"""
Turn a G3DR checkpoint into pictures and numbers.

    python sample.py                                   # held-out synthetic scenes, with out/ckpt.pt
    python sample.py --ckpt CKPT --input photo.jpg --depth photo_depth.png
    python sample.py --official --ckpt g3dr_imagenet.pt --input photos/   # the authors' checkpoint
    python sample.py --eval --ckpt out/ckpt.pt         # PSNR / depth error / non-flatness, writes eval.json
    python sample.py --class_id 2 --num 4 --rgbd_ckpt out-rgbd/ckpt.pt --ckpt out/ckpt.pt   # generate 3D

For every input it writes the canonical reconstruction (input | render | depth) as a PNG and an orbit GIF
(the "front circle", see front_circle: RGB beside colourised depth).
"""
import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

import data
from model import G3DR, load_checkpoint
from scenes import SyntheticScenes
from render import CAMERA_RADIUS, CANONICAL_PITCH, CANONICAL_YAW, FOV_DEGREES, get_rays, orbit_camera


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', default='out/ckpt.pt', help='f_trigen checkpoint (ours; the authors\' with --official)')
    p.add_argument('--official', action='store_true', help='--ckpt is in the authors\' release format')
    p.add_argument('--trust_checkpoint', action='store_true', help='load checkpoints the safe loader refuses with '
                   'full unpickling, which runs code stored in the file: only for files from a source you trust')
    p.add_argument('--input', default='', help='an image or a folder of images (default: held-out synthetic scenes)')
    p.add_argument('--depth', default='', help='depth PNG (or folder) in the authors\' encoding; default: '
                   'NAME_depth.png beside each image, else estimated with MiDaS (see data.py make_depth)')
    p.add_argument('--out_dir', default='', help='where pictures go (default: samples/ beside the checkpoint)')
    p.add_argument('--num_scenes', type=int, default=4, help='held-out synthetic scenes to show')
    p.add_argument('--resolution', type=int, default=0, help='render size (default: the model\'s image size)')
    p.add_argument('--frames', type=int, default=64, help='frames of the orbit GIF')
    p.add_argument('--n_coarse', type=int, default=64)
    p.add_argument('--n_fine', type=int, default=64)
    p.add_argument('--eval', action='store_true', help='metrics on 16 held-out synthetic scenes -> eval.json')
    p.add_argument('--eval_scenes', type=int, default=16)
    p.add_argument('--class_id', type=int, default=None, help='generate 3D objects of this class with f_rgbd')
    p.add_argument('--num', type=int, default=4, help='how many objects to generate')
    p.add_argument('--rgbd_ckpt', default=None, help='f_rgbd checkpoint (train.py --stage rgbd; default for '
                   '--class_id: out-rgbd/ckpt.pt); with --eval, adds the generative metrics')
    p.add_argument('--guidance', type=float, default=3.0, help='classifier-free guidance scale')
    p.add_argument('--steps', type=int, default=50, help='DDIM steps')
    p.add_argument('--eta', type=float, default=0.0, help='DDIM eta (0 = deterministic)')
    p.add_argument('--per_class', type=int, default=4, help='--eval with f_rgbd: samples per class')
    p.add_argument('--fid_stats', default='', help='--eval with f_rgbd: reference Inception statistics (.npz with '
                   'mu, sigma) for FID; needs torchvision\'s Inception-v3 weights in the torch hub cache')
    p.add_argument('--mesh', action='store_true', help='write a vertex-coloured mesh per input instead of pictures: '
                   'scene_K.ply / NAME.ply (mesh.py); with --eval, its accuracy on held-out scenes -> mesh_eval.json')
    p.add_argument('--mesh_res', default=256, help='--mesh: marching-cubes grid points per side of the box')
    p.add_argument('--mesh_level', default='auto', help='--mesh: iso-level, a density; auto: the median density '
                   'where the canonical view\'s transmittance falls to 1/2')
    p.add_argument('--points', action='store_true', help='write the canonical view as a coloured point cloud '
                   '(NAME_points.ply)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='auto')
    return p.parse_args(argv)


# -----------------------------------------------------------------------------

HELDOUT_SEED = 1338  # train.py's default seed + 1: scenes the default training run never saw


def load_model(path, official, device, trust=False):
    """(model in eval mode, the training config stored with it, {} for the authors' checkpoints)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path} (train one with `python train.py`, or pass --ckpt PATH)")
    if official:
        return G3DR.from_official(path, trust=trust).to(device).eval(), {}
    ckpt = load_checkpoint(path, trust=trust)
    return G3DR.from_checkpoint(ckpt).to(device).eval(), ckpt.get('config', {})


def front_circle(frames):
    """The front circle: yaw = pi/2 + 0.25 sin(2 pi s), pitch = pi/2 + 0.1 cos(2 pi s), s in [0, 1)."""
    s = torch.linspace(0, 1, frames + 1)[:-1]  # the last frame would repeat the first
    return CANONICAL_YAW + 0.25 * torch.sin(2 * math.pi * s), CANONICAL_PITCH + 0.1 * torch.cos(2 * math.pi * s)


@torch.no_grad()
def reconstruct(model, image, depth, name, out_dir, args):
    """image (B, 3, S, S) in [0, 1], depth (B, 1, S, S): canonical PNG + orbit GIF per item."""
    S = args.resolution or image.shape[-1]
    opts = dict(n_coarse=args.n_coarse, n_fine=args.n_fine)
    planes = model.encode(torch.cat([image * 2 - 1, depth], 1))
    rgb, d = model.render_view(planes, CANONICAL_YAW, CANONICAL_PITCH, S, **opts)
    cells = [F.interpolate(image, size=S, mode='bilinear', antialias=True, align_corners=False), rgb,
             data.colorize_depth(d)]
    data.save_grid(torch.stack(cells, 1).flatten(0, 1), os.path.join(out_dir, f"{name}_canonical.png"), nrow=3)
    yaws, pitches = front_circle(args.frames)
    frames = []
    from tqdm import tqdm
    for yaw, pitch in tqdm(list(zip(yaws, pitches)), desc=f"orbit {name}", leave=False):
        rgb, d = model.render_view(planes, float(yaw), float(pitch), S, **opts)
        frames.append(torch.cat([rgb, data.colorize_depth(d)], -1))  # (B, 3, S, 2S)
    frames = torch.stack(frames, 1)                                          # (B, T, 3, S, 2S)
    for b in range(frames.shape[0]):
        suffix = f"_{b}" if frames.shape[0] > 1 else ''
        data.save_gif(frames[b], os.path.join(out_dir, f"{name}{suffix}_orbit.gif"))


def load_inputs(args, image_size):
    """(name, image (1, 3, S, S), depth (1, 1, S, S)) for each input image."""
    paths = data.list_images(args.input)
    depth_paths = data.match_depth(paths, args.depth)  # None where depth must be estimated
    estimator = None
    for path, depth_path in zip(paths, depth_paths):
        if depth_path is None and estimator is None:
            print(f"no depth map for {path}: estimating it with MiDaS", file=sys.stderr)
            estimator = data.load_depth_estimator()
        image, depth = data.load_rgbd(path, depth_path, image_size, estimator=estimator)
        yield os.path.splitext(os.path.basename(path))[0], image[None], depth[None]


# -----------------------------------------------------------------------------
# --eval: reconstruction quality on held-out synthetic scenes, where the true 3D is known

NOVEL_VIEWS = [(-math.pi / 12, 0.0), (math.pi / 12, 0.0), (-math.pi / 6, 0.0), (math.pi / 6, 0.0),
               (0.0, -math.pi / 18), (0.0, math.pi / 18)]  # (yaw, pitch) offsets from the canonical camera


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
    """The input RGB-D view (the canonical camera, render.CANONICAL_YAW / CANONICAL_PITCH) moved into the orbit camera (yaw, pitch):
    every input pixel is lifted to its 3D point (ray origin + depth * unit ray), projected into the
    new camera and written to the nearest pixel there; where several land on one pixel the nearest
    to the new camera wins (z-buffer). Pixels nothing lands on are filled by `fill_holes`.
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


def _view_name(dyaw, dpitch):
    if dyaw == 0 and dpitch == 0:
        return 'canonical'
    return f"yaw{math.degrees(dyaw):+.0f}" if dpitch == 0 else f"pitch{math.degrees(dpitch):+.0f}"


@torch.no_grad()
def evaluate(model, args, device, seed, image_size):
    """Model metrics on held-out scenes, and beside them baselines scored on the same pixels of the
    same views: the input image left as it is (`static`), the input RGB-D forward-warped into the view
    with its true depth (`warp`, see forward_warp) and, at the canonical view, a constant image of the
    input's mean colour (`mean`). `per_view` holds every metric for each view."""
    import diffusion
    from tqdm import tqdm
    scenes = SyntheticScenes(args.eval_scenes, image_size=image_size, seed=seed)
    S = args.resolution or image_size
    opts = dict(n_coarse=args.n_coarse, n_fine=args.n_fine)
    views = [(0.0, 0.0)] + NOVEL_VIEWS
    per_view = {_view_name(*v): {} for v in views}   # name -> metric -> list over scenes
    depths = []
    for i in tqdm(range(len(scenes)), desc='eval'):
        item = scenes[i]
        image, depth = item['image'][None].to(device), item['depth'][None].to(device)
        planes = model.encode(torch.cat([image * 2 - 1, depth], 1))
        # the input as seen at the evaluation resolution (the input itself when S = image_size)
        input_rgb, input_depth = (x[None].to(device) for x in scenes.render_view(i, CANONICAL_YAW, CANONICAL_PITCH, S))
        for dyaw, dpitch in views:
            yaw, pitch = CANONICAL_YAW + dyaw, CANONICAL_PITCH + dpitch
            true_rgb, true_depth = (x[None].to(device) for x in scenes.render_view(i, yaw, pitch, S))
            rgb, d = model.render_view(planes, yaw, pitch, S, **opts)
            # Novel views can look past the edge of the scene box, where the truth is empty (depth 0):
            # every metric is over the pixels where there is something to see.
            valid = true_depth > 0                                        # (1, 1, S, S)
            m = dict(psnr=psnr(rgb, true_rgb, valid).item(),
                     depth_mae=depth_mae(d, true_depth, valid),
                     psnr_static=psnr(input_rgb, true_rgb, valid).item(),
                     depth_mae_static=depth_mae(input_depth, true_depth, valid))
            warp_rgb, _, _ = forward_warp(input_rgb, input_depth, yaw, pitch)
            m['psnr_warp'] = psnr(warp_rgb, true_rgb, valid).item()
            if dyaw == 0 and dpitch == 0:
                mean_rgb = input_rgb.mean((2, 3), keepdim=True).expand_as(input_rgb)
                m['psnr_mean'] = psnr(mean_rgb, true_rgb, valid).item()
                depths.append(d.cpu())
            for key, value in m.items():
                per_view[_view_name(dyaw, dpitch)].setdefault(key, []).append(value)
    mean = lambda v: sum(v) / len(v)
    per_view = {name: {k: mean(v) for k, v in metrics.items()} for name, metrics in per_view.items()}
    novel = [per_view[_view_name(*v)] for v in NOVEL_VIEWS]
    novel_mean = lambda key: mean([v[key] for v in novel])
    canonical = per_view['canonical']
    return dict(psnr_canonical=canonical['psnr'], depth_mae_canonical=canonical['depth_mae'],
                psnr_novel=novel_mean('psnr'), depth_mae_novel=novel_mean('depth_mae'),
                nfs=float(diffusion.non_flatness_score(torch.cat(depths))),
                psnr_novel_static=novel_mean('psnr_static'), psnr_novel_warp=novel_mean('psnr_warp'),
                depth_mae_novel_static=novel_mean('depth_mae_static'), psnr_canonical_mean=canonical['psnr_mean'],
                psnr_canonical_warp=canonical['psnr_warp'],
                per_view=per_view, scenes=len(scenes),
                novel_views=[[round(y, 4), round(p, 4)] for y, p in NOVEL_VIEWS], resolution=S,
                samples=[args.n_coarse, args.n_fine], seed=seed,
                baselines=dict(static='the input image / depth as the novel view',
                               warp='input RGB-D forward-warped with its true depth (nearest pixel, z-buffer), '
                                    'holes filled by repeated 3x3 means of filled neighbours',
                               mean='a constant image of the input\'s mean colour'))


@torch.no_grad()
def evaluate_generation(args, device, seed):
    """f_rgbd: `per_class` samples of every class against held-out synthetic scenes: non-flatness of
    the generated depth, nearest-neighbour distances in a fixed feature space, and FID when asked."""
    import diffusion
    denoiser = diffusion.load_denoiser(args.rgbd_ckpt, device, trust=args.trust_checkpoint)
    num_classes, size = denoiser.num_classes, denoiser.image_size
    labels = torch.arange(num_classes, device=device).repeat_interleave(args.per_class)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x = diffusion.ddim_sample(denoiser, (len(labels), 4, size, size), labels, steps=args.steps, eta=args.eta,
                              guidance_scale=args.guidance, generator=gen, progress=True)
    scenes = SyntheticScenes(max(2, args.eval_scenes), image_size=size, seed=seed)
    ref = torch.utils.data.default_collate([scenes[i] for i in range(len(scenes))])
    ref_x = diffusion.rgbd_to_x(ref['image'], ref['depth']).to(device)
    image, depth = diffusion.x_to_rgbd(x)
    metrics = dict(nfs_generated=diffusion.non_flatness_score(depth),
                   nfs_heldout=diffusion.non_flatness_score(ref['depth']),
                   **diffusion.sample_quality(x, ref_x, labels, ref['label']),
                   samples=len(labels), guidance=args.guidance, steps=args.steps, seed=args.seed)
    if args.fid_stats:
        mu, sigma = diffusion.load_fid_stats(args.fid_stats)
        features = diffusion.InceptionFeatures().to(device)(image)
        metrics['fid'] = diffusion.fid_from_features(*diffusion.feature_stats(features), mu, sigma)
    return metrics


def write_json(metrics, path):
    data.atomic_write(path, lambda f: f.write(json.dumps(metrics, indent=2).encode()))
    print(f"wrote {path}")


def print_table(rows):
    width = max(len(k) for k in rows)
    for k, v in rows.items():
        if k in ('per_view', 'baselines'):
            continue
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")
    if 'per_view' in rows:  # one row per view: model beside the baselines
        keys = ['psnr', 'psnr_static', 'psnr_warp', 'psnr_mean', 'depth_mae', 'depth_mae_static']
        print(f"{'view':<10}" + ''.join(f"{k:>17}" for k in keys))
        for name, m in rows['per_view'].items():
            print(f"{name:<10}" + ''.join(f"{m[k]:>17.3f}" if k in m else f"{'':>17}" for k in keys))


# -----------------------------------------------------------------------------
# --class_id: generate RGB-D images with f_rgbd, then lift each to 3D with f_trigen

@torch.no_grad()
def generate(args, device, out_dir):
    import diffusion
    denoiser = diffusion.load_denoiser(args.rgbd_ckpt, device, trust=args.trust_checkpoint)
    labels = torch.full((args.num,), args.class_id, device=device, dtype=torch.long)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    size = denoiser.image_size
    x = diffusion.ddim_sample(denoiser, (args.num, 4, size, size), labels, steps=args.steps, eta=args.eta,
                              guidance_scale=args.guidance, generator=gen, progress=True)
    image, depth = diffusion.x_to_rgbd(x)                                    # [0, 1] and scene units
    grid = torch.stack([image, data.colorize_depth(depth)], 1).flatten(0, 1)
    data.save_grid(grid, os.path.join(out_dir, f"class{args.class_id}_rgbd.png"), nrow=2)
    print(f"wrote {os.path.join(out_dir, f'class{args.class_id}_rgbd.png')}")
    if os.path.isfile(args.ckpt):
        model, _ = load_model(args.ckpt, args.official, device, trust=args.trust_checkpoint)
        size = model.config['image_size']
        if image.shape[-1] != size:  # f_trigen takes its own training size
            image = F.interpolate(image, size=size, mode='bilinear', antialias=True, align_corners=False)
            depth = F.interpolate(depth, size=size, mode='bilinear', antialias=True, align_corners=False)
        for b in range(args.num):
            reconstruct(model, image[b:b + 1], depth[b:b + 1], f"class{args.class_id}_{b}", out_dir, args)
        print(f"wrote {args.num} orbit GIFs to {out_dir}")
    else:
        print(f"no f_trigen checkpoint at {args.ckpt}: wrote the RGB-D samples only")
    return image, depth


def main(argv):
    args = parse_args(argv)
    device = data.resolve_device(args.device)
    torch.manual_seed(args.seed)
    if args.mesh or args.points:
        import mesh
        args.mesh_res, args.mesh_level = mesh.check_options(args.mesh_res, args.mesh_level)
    if args.class_id is not None:
        args.rgbd_ckpt = args.rgbd_ckpt or 'out-rgbd/ckpt.pt'
        out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.rgbd_ckpt)), 'samples')
        generate(args, device, out_dir)
        return
    if args.eval and args.rgbd_ckpt and not os.path.isfile(args.ckpt):
        # generative metrics only: an f_rgbd checkpoint and no f_trigen one
        metrics = evaluate_generation(args, device, HELDOUT_SEED)
        print_table(metrics)
        write_json(metrics, os.path.join(os.path.dirname(os.path.abspath(args.rgbd_ckpt)), 'eval.json'))
        return
    model, train_config = load_model(args.ckpt, args.official, device, trust=args.trust_checkpoint)
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'samples')
    image_size = model.config['image_size']
    # held-out scenes: a seed the training run never used (train.py shows these in its grids)
    heldout_seed = train_config.get('seed', HELDOUT_SEED - 1) + 1
    if args.mesh and args.eval:
        metrics = mesh.evaluate(model, args, heldout_seed, image_size, device)
        print_table({k: v for k, v in metrics.items() if k != 'per_scene'})
        write_json(metrics, os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'mesh_eval.json'))
        return
    if args.mesh or args.points:
        scenes = SyntheticScenes(args.num_scenes, image_size=image_size, seed=heldout_seed)
        items = load_inputs(args, image_size) if args.input else \
            ((f"scene_{k}", item['image'][None], item['depth'][None]) for k, item in enumerate(scenes))
        mesh.export(model, items, out_dir, args, device)
        return
    if args.eval:
        metrics = evaluate(model, args, device, heldout_seed, image_size)
        print_table(metrics)
        write_json(metrics, os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'eval.json'))
        if args.rgbd_ckpt:
            metrics = evaluate_generation(args, device, heldout_seed)
            print_table(metrics)
            write_json(metrics, os.path.join(os.path.dirname(os.path.abspath(args.rgbd_ckpt)), 'eval.json'))
        return
    if args.input:
        for name, image, depth in load_inputs(args, image_size):
            reconstruct(model, image.to(device), depth.to(device), name, out_dir, args)
    else:
        scenes = SyntheticScenes(args.num_scenes, image_size=image_size, seed=heldout_seed)
        batch = torch.utils.data.default_collate([scenes[i] for i in range(len(scenes))])
        reconstruct(model, batch['image'].to(device), batch['depth'].to(device), 'scene', out_dir, args)
    print(f"wrote pictures to {out_dir}")


if __name__ == '__main__':
    try:
        main(sys.argv[1:])
    except (FileNotFoundError, ValueError, OSError) as e:
        print(f"error: {data.one_line(e)}", file=sys.stderr)
        sys.exit(1)
