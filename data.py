"""
Data for G3DR: real photos with monocular depth, the tool that makes depth maps for a folder of
photos, and the reading and writing of pictures the other scripts share. (The synthetic 3D scenes,
whose true 3D is known, are in scenes.py.)

    ImageNetDepth(root, image_size=128, depth_root=None, flip=True, skip_missing_depth=False)
    python data.py make_depth SRC DST [--model DPT_Large|DPT_Hybrid|MiDaS_small] [--device auto]
    python data.py check ROOT [--depth_root DIR]

Every item is a dict: `image` (3, S, S) RGB in [0, 1], `depth` (1, S, S) distance along the unit
ray in scene units, `label` (int), `path` (str). Depth maps are 16-bit PNGs, per-image
normalised with 0 = nearest: `v` means depth DEPTH_NEAR + v / 65536 * (DEPTH_FAR - DEPTH_NEAR), in [4, 6)
(render.py's depth range: the front and back faces of the scene box seen from the camera radius 5).
Bad input raises DataError, whose message is one line naming the offending file or folder.
"""
import argparse
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from render import DEPTH_FAR, DEPTH_NEAR


class DataError(ValueError):
    """Bad input data. The message is a single line that names the file or folder at fault."""


def one_line(error):
    """Any exception as one line for a user-facing message: its text with line breaks and runs of
    spaces squeezed, or its class name when it has no text. An error raised inside a DataLoader
    worker arrives wrapped in a multi-line report whose last line is the original
    'module.Error: message'; that message is what is returned."""
    text = str(error)
    lines = [line for line in text.splitlines() if line.strip()]
    if len(lines) > 1 and 'Original Traceback' in text:
        text = lines[-1].split(': ', 1)[-1]
    return ' '.join(text.split()) or type(error).__name__


def atomic_write(path, write):
    """Write the file `path` through `write(f)`, f a binary file open on a temporary file beside it
    (PATH.tmp-PID), flushed to disk and then renamed over `path`: readers, and a run killed at any
    moment, see the old file or the new one, never half of one. The temporary file is removed when
    `write` fails. Missing parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, 'wb') as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# Image files we read; `NAME_depth.png` files are depth maps, never images.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
DEPTH_SUFFIX = '_depth.png'


def _is_depth_name(name):
    return name.lower().endswith(DEPTH_SUFFIX)


def _depth_relpath(image_rel):
    """'cls/NAME.JPEG' -> 'cls/NAME_depth.png' (posix relative paths)."""
    head, _, name = image_rel.rpartition('/')
    stem = os.path.splitext(name)[0]
    return f"{head}/{stem}{DEPTH_SUFFIX}" if head else f"{stem}{DEPTH_SUFFIX}"


def _walk(root):
    """All image and depth files under `root` (symlinked folders followed, hidden files skipped), as
    sorted posix paths relative to root: (images list, depth maps set)."""
    images, depths = [], set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        rel_folder = os.path.relpath(folder, root).replace(os.sep, '/')
        prefix = '' if rel_folder == '.' else rel_folder + '/'
        for name in sorted(filenames):
            if name.startswith('.') or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            (depths.add if _is_depth_name(name) else images.append)(prefix + name)
    return images, depths


def _check_folder(path, what):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder")
    return path


def _load_rgb(path):
    """Any image file -> PIL RGB, in its displayed orientation (EXIF rotation applied; make_depth
    reads photos the same way, so image and depth agree). Grey, palette, CMYK, 16-bit and
    transparent images are converted; transparency is composited over white."""
    try:
        with Image.open(path) as im:
            im.load()  # decode now: truncated or corrupt files fail here, not later
            im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {one_line(e)}") from None
    if im.mode in ('I', 'I;16', 'I;16L', 'I;16B', 'I;16N'):  # 16-bit grey: PIL's convert would clip at 255
        grey = np.clip(np.asarray(im, dtype=np.float64) / 257.0, 0, 255).round().astype(np.uint8)
        return Image.fromarray(grey).convert('RGB')
    if im.mode in ('RGBA', 'LA', 'PA') or (im.mode == 'P' and 'transparency' in im.info):
        im = im.convert('RGBA')
        return Image.alpha_composite(Image.new('RGBA', im.size, (255, 255, 255, 255)), im).convert('RGB')
    return im.convert('RGB') if im.mode != 'RGB' else im


def _load_depth_png(path):
    """A 16-bit depth PNG -> float32 array (H, W) of its raw values in [0, 65535]."""
    try:
        with Image.open(path) as im:
            im.load()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read depth map {path}: {one_line(e)}") from None
    if im.mode in ('I;16', 'I;16L', 'I;16B', 'I;16N'):
        return np.asarray(im).astype(np.float32)
    if im.mode == 'I':  # some Pillow versions open 16-bit grey PNGs as 32-bit 'I'
        values = np.asarray(im)
        if values.min() < 0 or values.max() > 65535:
            raise DataError(f"depth map {path} has values outside the 16-bit range [0, 65535]")
        return values.astype(np.float32)
    if im.mode in ('1', 'L', 'P', 'LA', 'RGB', 'RGBA'):
        raise DataError(f"depth map {path} is 8-bit ({im.mode}); G3DR needs 16-bit greyscale PNGs "
                        f"(value / 65536 * 2 + 4 = depth), e.g. from `python data.py make_depth`")
    raise DataError(f"depth map {path} has pixel mode {im.mode}; expected a 16-bit greyscale PNG")


def _center_square(width, height):
    """Crop box of the centred square of a width x height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def _crop_and_resize(image, depth, size):
    """PIL RGB image and its raw 16-bit depth values (H, W) -> image (3, S, S) in [0, 1] and depth
    (1, S, S) in scene units: the centred square of both, Lanczos-resized to S = size. Depth is
    resampled in float (never through 8 bits) and clipped to the 16-bit range, so Lanczos ringing
    cannot leave [4, 6)."""
    box = _center_square(image.width, image.height)
    image = image.crop(box).resize((size, size), Image.LANCZOS)
    depth = Image.fromarray(depth.astype(np.float32)).crop(box).resize((size, size), Image.LANCZOS)
    depth = DEPTH_NEAR + np.clip(np.asarray(depth), 0, 65535) / 65536 * (DEPTH_FAR - DEPTH_NEAR)  # in [4, 6)
    image = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255  # (3, S, S)
    return image, torch.from_numpy(depth.astype(np.float32))[None]  # (1, S, S)


# -----------------------------------------------------------------------------
# Real photos with monocular depth: class folders of NAME.jpg beside NAME_depth.png

class ImageNetDepth(torch.utils.data.Dataset):
    """Photos + 16-bit depth maps, in the authors' layout or with a separate depth tree.

    root/CLASS/NAME.jpg (any of IMAGE_EXTENSIONS, e.g. ImageNet's .JPEG) with its depth map at
    root/CLASS/NAME_depth.png, or at depth_root/CLASS/NAME_depth.png when `depth_root` is given (a
    tree that mirrors root, as `python data.py make_depth root depth_root` writes). Labels index the
    sorted class-folder names (images in deeper subfolders belong to their top-level class folder);
    a flat folder of images is one class, label 0.

    Items: the centred square crop, resized (Lanczos) to image_size; depth gets the same crop and
    the same Lanczos resize, in float (_crop_and_resize). With flip=True, image and depth are
    mirrored together with probability 0.5 (torch's global RNG, so DataLoader workers differ).

    The folder structure is checked here; each file's content (readable, 16-bit, same size as its
    image) when it is loaded. `python data.py check ROOT` loads every pair once.
    """

    def __init__(self, root, image_size=128, depth_root=None, flip=True, skip_missing_depth=False):
        self.root = _check_folder(root, 'image folder')
        self.depth_root = _check_folder(depth_root, 'depth folder') if depth_root is not None else self.root
        if int(image_size) < 1:
            raise DataError(f"image_size must be positive, got {image_size}")
        self.image_size, self.flip = int(image_size), bool(flip)

        images, depths = _walk(self.root)
        if not images:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {self.root}")
        if self.depth_root != self.root:
            depths = _walk(self.depth_root)[1]

        owner = {}  # NAME.jpg and NAME.png in one folder would share NAME_depth.png
        for rel in images:
            other = owner.setdefault(_depth_relpath(rel), rel)
            if other != rel:
                raise DataError(f"{self.root / other} and {self.root / rel} would share the depth map "
                                f"{_depth_relpath(rel)}; rename one of them")

        missing = [rel for rel in images if _depth_relpath(rel) not in depths]
        if missing and not skip_missing_depth:
            first = ', '.join(missing[:3]) + (', ...' if len(missing) > 3 else '')
            raise DataError(f"{len(missing)} of {len(images)} images under {self.root} have no NAME{DEPTH_SUFFIX} "
                            f"under {self.depth_root} (first: {first}); make them with `python data.py make_depth "
                            f"{self.root} {self.depth_root}` or skip them (skip_missing_depth=True)")
        if missing:
            if len(missing) == len(images):
                raise DataError(f"none of the {len(images)} images under {self.root} has a NAME{DEPTH_SUFFIX} "
                                f"under {self.depth_root}")
            warnings.warn(f"skipping {len(missing)} of {len(images)} images under {self.root} that have no depth map")
            skipped = set(missing)
            images = [rel for rel in images if rel not in skipped]

        top_level = [rel for rel in images if '/' not in rel]
        self.classes = sorted({rel.split('/', 1)[0] for rel in images if '/' in rel})
        if top_level and self.classes:
            raise DataError(f"{self.root} has images both at the top level ({top_level[0]}) and in class folders "
                            f"({self.classes[0]}/); put every image in a class folder, or none")
        if not self.classes:
            self.classes = [self.root.name]  # a flat folder: one class
        class_index = {name: i for i, name in enumerate(self.classes)}
        # (image path relative to root, label); 'cls/NAME.jpg' -> class of its first folder
        self.samples = [(rel, class_index[rel.split('/', 1)[0]] if '/' in rel else 0) for rel in images]

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        rel, label = self.samples[index]
        image_path, depth_path = self.root / rel, self.depth_root / _depth_relpath(rel)
        image = _load_rgb(image_path)
        depth = _load_depth_png(depth_path)  # (H, W) raw 16-bit values
        if depth.shape != (image.height, image.width):
            raise DataError(f"depth map {depth_path} is {depth.shape[1]}x{depth.shape[0]} but its image "
                            f"{image_path} is {image.width}x{image.height}")

        image, depth = _crop_and_resize(image, depth, self.image_size)
        if self.flip and torch.rand(()) < 0.5:
            image, depth = image.flip(-1), depth.flip(-1)
        return dict(image=image, depth=depth, label=label, path=str(image_path))


# -----------------------------------------------------------------------------
# Depth maps for real photos: MiDaS relative inverse depth, normalised per image, inverted, 16 bits

MIDAS_MODELS = ('DPT_Large', 'DPT_Hybrid', 'MiDaS_small')


def _multiple_of(x, base=32, max_value=None):
    y = round(x / base) * base
    if max_value is not None and y > max_value:
        y = math.floor(x / base) * base
    return max(y, base)


def load_midas(model='DPT_Large', device='cpu', repo='intel-isl/MiDaS'):
    """A MiDaS monocular depth estimator from torch.hub: returns estimate(image (1, 3, H, W) in [0, 1])
    -> relative inverse depth (1, h, w). `repo` may be a local clone of the MiDaS repository.
    The input preparation is MiDaS's own (its hub `transforms`, which need OpenCV, redone in torch):
    DPT models: scale by the factor closest to 1 that brings a side to 384, sides rounded to multiples
    of 32, mean = std = 0.5; MiDaS_small: fit inside 256 x 256, multiples of 32, ImageNet mean/std.
    Bicubic resizing."""
    if model not in MIDAS_MODELS:
        raise DataError(f"unknown depth model {model!r}; choose one of {', '.join(MIDAS_MODELS)}")
    local = Path(repo).is_dir()
    try:
        net = torch.hub.load(repo, model, source='local' if local else 'github', trust_repo=True)
    except Exception as e:  # no network, missing package (timm), missing cache, ...
        hub = torch.hub.get_dir()
        raise DataError(f"cannot load depth model {model} from torch.hub {repo!r}: {one_line(e)}. Offline, put a "
                        f"copy of the MiDaS repository in {hub}/intel-isl_MiDaS_master (or pass --repo PATH to a "
                        f"local clone) and its {model} weights in {hub}/checkpoints/, or run once with network "
                        f"access") from None
    net = net.eval().to(device)
    if model == 'MiDaS_small':
        target, method, mean, std = 256, 'upper_bound', (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    else:
        target, method, mean, std = 384, 'minimal', (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)

    @torch.no_grad()
    def estimate(image):
        H, W = image.shape[-2:]
        scale_h, scale_w = target / H, target / W
        if method == 'minimal':  # the scale closest to 1
            scale_h = scale_w = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
        else:  # fit inside target x target
            scale_h = scale_w = min(scale_h, scale_w)
        limit = target if method == 'upper_bound' else None
        size = (_multiple_of(scale_h * H, max_value=limit), _multiple_of(scale_w * W, max_value=limit))
        x = F.interpolate(image.float(), size=size, mode='bicubic', align_corners=False)
        x = (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
        return net(x.to(device)).float().cpu()

    return estimate


def encode_depth(inverse_depth):
    """Relative inverse depth (H, W) -> the authors' 16-bit encoding (uint16 array): normalised per
    image to [0, 1], inverted so that 0 = nearest, times 65535 (the encoding _load_depth_png reads)."""
    x = inverse_depth.double()
    if not torch.isfinite(x).all():
        raise DataError("the depth estimator returned NaN or inf")
    lo, hi = x.min(), x.max()
    normalised = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)  # no relief: one plane at the back
    return ((1 - normalised) * 65535).round().clamp(0, 65535).numpy().astype(np.uint16)


def _estimate_png(estimator, image):
    """PIL RGB image -> its depth map in the 16-bit encoding (uint16 (H, W)), from an estimator of
    inverse depth (see make_depth); a smaller prediction is resized bicubically to the image."""
    x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].float() / 255  # (1, 3, H, W)
    inverse = torch.as_tensor(estimator(x)).float()
    inverse = inverse.reshape(1, 1, *inverse.shape[-2:])
    if inverse.shape[-2:] != x.shape[-2:]:
        inverse = F.interpolate(inverse, size=x.shape[-2:], mode='bicubic', align_corners=False)
    return encode_depth(inverse[0, 0])


def make_depth(src, dst, estimator, progress=True):
    """Write dst/<relative path>/NAME_depth.png for every image under src (recursively), from
    `estimator(image (1, 3, H, W) in [0, 1]) -> inverse depth` (larger = nearer; any shape whose
    last two dimensions form the map, resized bicubically to H x W). dst may equal src (the
    authors' layout). Images whose depth map exists are skipped, so an interrupted run resumes.
    Unreadable images are reported and skipped. Returns dict(written, skipped, failed=[messages])."""
    from tqdm import tqdm
    src = _check_folder(src, 'image folder')
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise DataError(f"depth folder {dst} is not a folder")
    images = _walk(src)[0]
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {src}")
    written, skipped, failed = 0, 0, []
    for rel in tqdm(images, desc='depth', unit='img', disable=not progress):
        out = dst / _depth_relpath(rel)
        if out.exists():
            skipped += 1
            continue
        try:
            image = _load_rgb(src / rel)
        except DataError as e:
            failed.append(str(e))
            tqdm.write(f"skipped: {e}", file=sys.stderr)
            continue
        png16 = Image.fromarray(_estimate_png(estimator, image))  # uint16 -> a 16-bit greyscale PNG
        atomic_write(out, lambda f: png16.save(f, format='PNG'))
        written += 1
    return dict(written=written, skipped=skipped, failed=failed)


def load_depth_estimator(model='DPT_Large', device='auto', repo='intel-isl/MiDaS'):
    """load_midas on resolve_device(device)."""
    return load_midas(model, resolve_device(device), repo)


def resolve_device(name):
    """The device a `--device NAME` option means: 'auto' is the GPU when torch sees one, else the CPU; any
    other name is returned as given, after checking that a CUDA one can be had (ValueError naming it)."""
    if name == 'auto':
        return 'cuda' if torch.cuda.is_available() else 'cpu'
    if str(name).startswith('cuda') and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available in this torch install")
    return name


# -----------------------------------------------------------------------------
# single inputs and pictures (sample.py, train.py)

def list_images(path):
    """An image file -> [it]; a folder -> its images, recursively, sorted (depth maps left out)."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    images = _walk(_check_folder(path, 'input'))[0]
    if not images:
        raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {path}")
    return [str(path / rel) for rel in images]


def match_depth(image_paths, depth=''):
    """The depth map of each image: depth '' -> NAME_depth.png beside it, or None (to be estimated)
    when there is none; a file -> that map (one image only); a folder -> folder/NAME_depth.png,
    which must exist."""
    if not depth:
        beside = [Path(p).parent / _depth_relpath(Path(p).name) for p in image_paths]
        return [str(d) if d.is_file() else None for d in beside]
    depth = Path(depth)
    if depth.is_file():
        if len(image_paths) != 1:
            raise DataError(f"one depth map {depth} given for {len(image_paths)} images; pass a folder of NAME{DEPTH_SUFFIX}")
        return [str(depth)]
    folder = _check_folder(depth, 'depth folder')
    found = [folder / _depth_relpath(Path(p).name) for p in image_paths]
    for image_path, d in zip(image_paths, found):
        if not d.is_file():
            raise DataError(f"no depth map {d} for image {image_path}")
    return [str(d) for d in found]


def load_rgbd(image_path, depth_path, image_size, estimator=None):
    """One image and its depth as the datasets give them: image (3, S, S) in [0, 1], depth (1, S, S)
    in scene units. Without depth_path the depth comes from `estimator` (see make_depth), encoded
    in 16 bits exactly as a stored map would be."""
    image = _load_rgb(image_path)
    if depth_path is None:
        if estimator is None:
            raise DataError(f"no depth map for {image_path} and no depth estimator to make one")
        depth = _estimate_png(estimator, image)
    else:
        depth = _load_depth_png(depth_path)
        if depth.shape != (image.height, image.width):
            raise DataError(f"depth map {depth_path} is {depth.shape[1]}x{depth.shape[0]} but its image "
                            f"{image_path} is {image.width}x{image.height}")
    return _crop_and_resize(image, depth, int(image_size))


# Colour map for depth pictures: near = bright yellow, far = dark violet (anchor colours, linearly
# interpolated); pixels where nothing was hit (depth <= 0) are black.
_DEPTH_COLOURS = torch.tensor([[0.99, 0.96, 0.55], [0.98, 0.70, 0.25], [0.90, 0.40, 0.30],
                               [0.70, 0.20, 0.45], [0.40, 0.10, 0.50], [0.12, 0.05, 0.30]])


def colorize_depth(depth, near=DEPTH_NEAR, far=DEPTH_FAR):
    """depth (B, 1, H, W) in scene units -> RGB (B, 3, H, W) in [0, 1]: near..far along a
    yellow-to-purple colour ramp, black where depth is 0 (no surface)."""
    t = ((depth - near) / (far - near)).clamp(0, 1) * (len(_DEPTH_COLOURS) - 1)  # (B, 1, H, W)
    lo = t.floor().long().clamp(max=len(_DEPTH_COLOURS) - 2)
    colours = _DEPTH_COLOURS.to(depth.device)
    c0, c1 = colours[lo[:, 0]], colours[lo[:, 0] + 1]  # (B, H, W, 3)
    rgb = (c0 + (c1 - c0) * (t - lo)[:, 0, ..., None]).permute(0, 3, 1, 2)
    return torch.where(depth > 0, rgb, torch.zeros_like(rgb))


def _to_uint8(images):
    return (images.detach().float().cpu().clamp(0, 1) * 255).round().byte()


def save_grid(images, path, nrow=8, padding=2):
    """images (N, 3, H, W) in [0, 1] -> one PNG, nrow images per row, white gaps."""
    N, _, H, W = images.shape
    rows = math.ceil(N / nrow)
    grid = torch.ones(3, rows * (H + padding) + padding, nrow * (W + padding) + padding)
    for i, image in enumerate(images.detach().float().cpu()):
        top, left = padding + (i // nrow) * (H + padding), padding + (i % nrow) * (W + padding)
        grid[:, top:top + H, left:left + W] = image
    picture = Image.fromarray(_to_uint8(grid).permute(1, 2, 0).numpy())
    atomic_write(path, lambda f: picture.save(f, format='PNG'))


def save_gif(frames, path, fps=24):
    """frames (T, 3, H, W) in [0, 1] -> a looping GIF."""
    pictures = [Image.fromarray(frame) for frame in _to_uint8(frames).permute(0, 2, 3, 1).numpy()]
    atomic_write(path, lambda f: pictures[0].save(f, format='GIF', save_all=True, append_images=pictures[1:],
                                                  duration=round(1000 / fps), loop=0))


# -----------------------------------------------------------------------------
# command line

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 1 (see main)
        raise DataError(f"{message} (see python data.py --help)")


def main(argv=None):
    parser = _Parser(prog='data.py', description='Data tools for G3DR.')
    commands = parser.add_subparsers(dest='command', required=True)
    p = commands.add_parser('make_depth', help='write NAME_depth.png for every image under SRC, into DST')
    p.add_argument('src', help='folder of images (searched recursively)')
    p.add_argument('dst', help='output folder mirroring SRC (may be SRC itself)')
    p.add_argument('--model', default='DPT_Large', choices=MIDAS_MODELS)
    p.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    p.add_argument('--repo', default='intel-isl/MiDaS', help='torch.hub repository, or a local clone of it')
    c = commands.add_parser('check', help='load every image/depth pair of a dataset folder once')
    c.add_argument('root')
    c.add_argument('--depth_root', default=None)
    c.add_argument('--image_size', type=int, default=128)
    try:
        args = parser.parse_args(argv)
        if args.command == 'make_depth':
            _check_folder(args.src, 'image folder')  # before the (slow) model load
            estimator = load_depth_estimator(args.model, args.device, args.repo)
            result = make_depth(args.src, args.dst, estimator)
            print(f"wrote {result['written']} depth maps, skipped {result['skipped']} already done, "
                  f"{len(result['failed'])} unreadable images")
            if result['failed']:
                raise DataError(f"{len(result['failed'])} images could not be read (first: {result['failed'][0]})")
        else:
            from tqdm import tqdm
            dataset = ImageNetDepth(args.root, args.image_size, args.depth_root, flip=False)
            errors = []
            for i in tqdm(range(len(dataset)), desc='check', unit='img'):
                try:
                    dataset[i]
                except DataError as e:
                    errors.append(str(e))
                    tqdm.write(str(e), file=sys.stderr)
            print(f"{len(dataset)} pairs in {dataset.num_classes} classes, {len(errors)} bad")
            if errors:
                raise DataError(f"{len(errors)} of {len(dataset)} pairs are bad (first: {errors[0]})")
    except DataError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
