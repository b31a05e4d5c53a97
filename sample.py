"""
Turn a G3DR checkpoint into pictures, orbits and meshes (the numbers are evaluate.py's).

    python sample.py                                   # held-out synthetic scenes, with out/ckpt.pt
    python sample.py --ckpt CKPT --input photo.jpg --depth photo_depth.png
    python sample.py --official --ckpt g3dr_imagenet.pt --input photos/   # the authors' checkpoint
    python sample.py --class_id 2 --num 4 --rgbd_ckpt out-rgbd/ckpt.pt --ckpt out/ckpt.pt   # generate 3D
    python sample.py --mesh --points                   # a coloured mesh and point cloud per scene (mesh.py)

For every input it writes the canonical reconstruction (input | render | depth) as a PNG and an orbit GIF
(the "front circle", see front_circle: RGB beside colourised depth).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

import checkpoint
import data
from configurator import resolve_device, run_script
from outputs import colorize_depth, save_gif, save_grid
from render import CANONICAL_PITCH, CANONICAL_YAW
from scenes import SyntheticScenes


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--ckpt', default='out/ckpt.pt', help='f_trigen checkpoint (ours; the authors\' with --official)')
    p.add_argument('--official', action='store_true', help='--ckpt is in the authors\' release format')
    p.add_argument('--trust_checkpoint', action='store_true', help='load checkpoints the safe loader refuses with '
                   'full unpickling, which runs code stored in the file: only for files from a source you trust')
    p.add_argument('--input', default='', help='an image or a folder of images (default: held-out synthetic scenes)')
    p.add_argument('--depth', default='', help='depth PNG (or folder) in the authors\' encoding; default: '
                   'NAME_depth.png beside each image, else estimated with MiDaS (see prepare_depth.py)')
    p.add_argument('--out_dir', default='', help='where pictures go (default: samples/ beside the checkpoint)')
    p.add_argument('--num_scenes', type=int, default=4, help='held-out synthetic scenes to show')
    p.add_argument('--resolution', type=int, default=0, help='render size (default: the model\'s image size)')
    p.add_argument('--frames', type=int, default=64, help='frames of the orbit GIF')
    p.add_argument('--n_coarse', type=int, default=64)
    p.add_argument('--n_fine', type=int, default=64)
    p.add_argument('--class_id', type=int, default=None, help='generate 3D objects of this class with f_rgbd')
    p.add_argument('--num', type=int, default=4, help='how many objects to generate')
    p.add_argument('--rgbd_ckpt', default=None, help='f_rgbd checkpoint (train_rgbd.py; default: out-rgbd/ckpt.pt)')
    p.add_argument('--guidance', type=float, default=3.0, help='classifier-free guidance scale')
    p.add_argument('--steps', type=int, default=50, help='DDIM steps')
    p.add_argument('--eta', type=float, default=0.0, help='DDIM eta (0 = deterministic)')
    p.add_argument('--mesh', action='store_true', help='write a vertex-coloured mesh per input instead of pictures: '
                   'scene_K.ply / NAME.ply (mesh.py; its accuracy: evaluate.py --mesh)')
    p.add_argument('--mesh_res', default=256, help='--mesh: marching-cubes grid points per side of the box')
    p.add_argument('--mesh_level', default='depth', help='--mesh: which surface. depth: where the rendered canonical '
                   'view puts it (mesh.fused_grid); auto: a density iso-surface at the density where canonical '
                   'rays stop (mesh.auto_level); or a density')
    p.add_argument('--points', action='store_true', help='write the canonical view as a coloured point cloud '
                   '(NAME_points.ply)')
    p.add_argument('--sr_ckpt', default='', help='a 2x super-resolution checkpoint (train_sr.py): also write every '
                   'picture and GIF at twice the render size, beside the native ones (NAME_*_sr2x.png/.gif)')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--device', default='auto')
    return p.parse_args(argv)


# -----------------------------------------------------------------------------

HELDOUT_SEED = 1338  # train.py's default seed + 1: scenes the default training run never saw


def heldout_seed(train_config):
    """The seed of the held-out scenes of a run: its training seed + 1, a family it never saw."""
    return train_config.get('seed', HELDOUT_SEED - 1) + 1


def load_model(path, official, device, trust=False):
    """(model in eval mode, the training config stored with it, {} for the authors' checkpoints)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint at {path} (train one with `python train.py`, or pass --ckpt PATH)")
    model, train_config = checkpoint.load_g3dr(path, official=official, trust=trust)
    return model.to(device).eval(), train_config


def front_circle(frames):
    """The front circle: yaw = pi/2 + 0.25 sin(2 pi s), pitch = pi/2 + 0.1 cos(2 pi s), s in [0, 1)."""
    s = torch.linspace(0, 1, frames + 1)[:-1]  # the last frame would repeat the first
    return CANONICAL_YAW + 0.25 * torch.sin(2 * math.pi * s), CANONICAL_PITCH + 0.1 * torch.cos(2 * math.pi * s)


@torch.no_grad()
def reconstruct(model, image, depth, name, out_dir, args):
    """image (B, 3, S, S) in [0, 1], depth (B, 1, S, S): canonical PNG + orbit GIF per item, and with
    args.sr (--sr_ckpt) the same at 2x: the SR network's upsampled renders beside depth (pixels doubled)."""
    side = args.resolution or image.shape[-1]
    sr = getattr(args, 'sr', None)  # the 2x network of --sr_ckpt, or None
    opts = dict(n_coarse=args.n_coarse, n_fine=args.n_fine)
    planes = model.encode(image, depth)
    rgb, d = model.render_view(planes, CANONICAL_YAW, CANONICAL_PITCH, side, **opts)
    cells = [F.interpolate(image, size=side, mode='bilinear', antialias=True, align_corners=False), rgb,
             colorize_depth(d)]
    save_grid(torch.stack(cells, 1).flatten(0, 1), os.path.join(out_dir, f"{name}_canonical.png"), nrow=3)
    if sr is not None:
        cells = [F.interpolate(image, size=2 * side, mode='bicubic', align_corners=False).clamp(0, 1),
                 sr(rgb), _doubled(colorize_depth(d))]                      # (B, 3, 2S, 2S) each
        save_grid(torch.stack(cells, 1).flatten(0, 1), os.path.join(out_dir, f"{name}_canonical_sr2x.png"), nrow=3)
    yaws, pitches = front_circle(args.frames)
    frames, frames_sr = [], []
    for yaw, pitch in tqdm(list(zip(yaws, pitches)), desc=f"orbit {name}", leave=False):
        rgb, d = model.render_view(planes, float(yaw), float(pitch), side, **opts)
        frames.append(torch.cat([rgb, colorize_depth(d)], -1))  # (B, 3, S, 2S)
        if sr is not None:
            frames_sr.append(torch.cat([sr(rgb), _doubled(colorize_depth(d))], -1))  # (B, 3, 2S, 4S)
    for suffix, clip in (('', frames), ('_sr2x', frames_sr)):
        if not clip:
            continue
        clip = torch.stack(clip, 1)                              # (B, T, 3, S, 2S) or (B, T, 3, 2S, 4S)
        for b in range(clip.shape[0]):
            item = f"_{b}" if clip.shape[0] > 1 else ''
            save_gif(clip[b], os.path.join(out_dir, f"{name}{item}_orbit{suffix}.gif"))


def _doubled(images):
    """(B, C, S, S) -> (B, C, 2S, 2S), every pixel repeated: depth is shown, not super-resolved."""
    return F.interpolate(images, scale_factor=2, mode='nearest')


def load_inputs(args, image_size):
    """(name, image (1, 3, S, S), depth (1, 1, S, S)) for each input image."""
    paths = data.list_images(args.input)
    depth_paths = data.match_depth(paths, args.depth)  # None where depth must be estimated
    estimator = None
    for path, depth_path in zip(paths, depth_paths):
        if depth_path is None and estimator is None:
            print(f"no depth map for {path}: estimating it with MiDaS", file=sys.stderr)
            import prepare_depth
            estimator = prepare_depth.load_midas(device=args.device)
        image, depth = data.load_rgbd(path, depth_path, image_size, estimator=estimator)
        yield os.path.splitext(os.path.basename(path))[0], image[None], depth[None]


@torch.no_grad()
def write_meshes(model, items, out_dir, args, device='cpu'):
    """items: (name, image (1, 3, S, S) in [0, 1], depth (1, 1, S, S)) -> NAME.ply with --mesh,
    NAME_points.ply with --points, in out_dir."""
    import mesh
    for name, image, depth in items:
        start = time.perf_counter()
        planes = model.encode(image.to(device), depth.to(device))
        if args.mesh:
            m = mesh.mesh_of(model, planes, args.mesh_res, args.mesh_level, device)
            path = os.path.join(out_dir, f"{name}.ply")
            mesh.save_ply(path, m['vertices'], m['colors'], m['faces'])
            how = {'depth': 'the surfaces of the rendered canonical depth',
                   'auto': f"density iso-level {m['level']:.4g}, automatic: the density whose crossings best "
                           f"match where canonical rays stop",
                   'given': f"density iso-level {m['level']:.4g}, given"}[m['level_rule']]
            print(f"wrote {path}: {len(m['vertices']):,} vertices, {len(m['faces']):,} faces, "
                  f"{args.mesh_res}^3 grid, {how}, {time.perf_counter() - start:.1f} s")
        if args.points:
            points, colors = mesh.canonical_points(mesh.scene_field(model, planes), args.resolution or image.shape[-1],
                                                   args.n_coarse, args.n_fine, device)
            path = os.path.join(out_dir, f"{name}_points.ply")
            mesh.save_ply(path, points, colors)
            print(f"wrote {path}: {len(points):,} points")


# -----------------------------------------------------------------------------
# --class_id: generate RGB-D images with f_rgbd, then lift each to 3D with f_trigen

@torch.no_grad()
def generate(args, device, out_dir):
    import diffusion
    denoiser = checkpoint.load_denoiser(args.rgbd_ckpt, device, trust=args.trust_checkpoint)
    labels = torch.full((args.num,), args.class_id, device=device, dtype=torch.long)
    gen = torch.Generator(device=device).manual_seed(args.seed)
    size = denoiser.image_size
    x = diffusion.ddim_sample(denoiser, (args.num, 4, size, size), labels, steps=args.steps, eta=args.eta,
                              guidance_scale=args.guidance, generator=gen, progress=True)
    image, depth = diffusion.x_to_rgbd(x)                                    # [0, 1] and scene units
    grid = torch.stack([image, colorize_depth(depth)], 1).flatten(0, 1)
    save_grid(grid, os.path.join(out_dir, f"class{args.class_id}_rgbd.png"), nrow=2)
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
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    args.sr = None
    if args.sr_ckpt:
        from sr import load_sr
        args.sr = load_sr(args.sr_ckpt, device=device, trust=args.trust_checkpoint)  # eval mode, [0, 1] -> [0, 1]
    if args.mesh or args.points:
        import mesh
        args.mesh_res, args.mesh_level = mesh.check_options(args.mesh_res, args.mesh_level)
    if args.class_id is not None:
        args.rgbd_ckpt = args.rgbd_ckpt or 'out-rgbd/ckpt.pt'
        out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.rgbd_ckpt)), 'samples')
        generate(args, device, out_dir)
        return
    model, train_config = load_model(args.ckpt, args.official, device, trust=args.trust_checkpoint)
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), 'samples')
    image_size = model.config['image_size']
    # held-out scenes: a seed the training run never used (train.py shows these in its grids)
    scenes = SyntheticScenes(args.num_scenes, image_size=image_size, seed=heldout_seed(train_config))
    if args.mesh or args.points:
        items = load_inputs(args, image_size) if args.input else \
            ((f"scene_{k}", item['image'][None], item['depth'][None]) for k, item in enumerate(scenes))
        write_meshes(model, items, out_dir, args, device)
        return
    if args.input:
        for name, image, depth in load_inputs(args, image_size):
            reconstruct(model, image.to(device), depth.to(device), name, out_dir, args)
    else:
        batch = torch.utils.data.default_collate([scenes[i] for i in range(len(scenes))])
        reconstruct(model, batch['image'].to(device), batch['depth'].to(device), 'scene', out_dir, args)
    print(f"wrote pictures to {out_dir}")


if __name__ == '__main__':
    run_script(main, sys.argv[1:])
