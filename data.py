"""
Real photos with monocular depth for G3DR: the ImageNet-with-depth dataset and the 16-bit depth PNG
format. (The synthetic 3D scenes, whose true 3D is known, are in scenes.py; depth maps for a folder
of photos are made by prepare_depth.py.)

    ImageNetDepth(root, image_size=128, depth_root=None, flip=True, skip_missing_depth=False)
    python data.py check ROOT [--depth_root DIR]      load every image/depth pair once

Every item is a dict: `image` (3, S, S) RGB in [0, 1], `depth` (1, S, S) distance along the unit
ray in scene units, `label` (int), `path` (str).

The depth format (the authors'): NAME_depth.png beside NAME.jpg (or in a tree mirroring the image
folder), a 16-bit greyscale PNG of the image's size, per-image normalised with 0 = nearest: value `v`
means depth DEPTH_NEAR + v / 65536 * (DEPTH_FAR - DEPTH_NEAR), in [4, 6) (render.py's depth range:
the front and back faces of the scene box seen from the camera radius 5). encode_depth makes it
from a depth estimator's relative inverse depth, load_depth_png reads it.

Bad input raises DataError, whose message is one line naming the offending file or folder.
"""
import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps

from configurator import one_line
from outputs import atomic_write
from render import DEPTH_FAR, DEPTH_NEAR


class DataError(ValueError):
    """Bad input data. The message is a single line that names the file or folder at fault."""


# -----------------------------------------------------------------------------
# finding images and their depth maps

# Image files we read; `NAME_depth.png` files are depth maps, never images.
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.webp', '.tif', '.tiff')
DEPTH_SUFFIX = '_depth.png'


def depth_relpath(image_rel):
    """The depth map's path for an image's: 'cls/NAME.JPEG' -> 'cls/NAME_depth.png' (posix relative paths)."""
    head, _, name = image_rel.rpartition('/')
    stem = os.path.splitext(name)[0]
    return f"{head}/{stem}{DEPTH_SUFFIX}" if head else f"{stem}{DEPTH_SUFFIX}"


def _check_folder(path, what):
    path = Path(path)
    if not path.exists():
        raise DataError(f"{what} {path} does not exist")
    if not path.is_dir():
        raise DataError(f"{what} {path} is not a folder")
    return path


def walk_images(root, what='image folder'):
    """All image and depth files under the folder `root` (symlinked folders followed, hidden files
    skipped), as sorted posix paths relative to root: (images list, depth maps set). DataError,
    calling root `what`, when root is not a folder."""
    root = _check_folder(root, what)
    images, depths = [], set()
    for folder, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith('.'))
        rel_folder = os.path.relpath(folder, root).replace(os.sep, '/')
        prefix = '' if rel_folder == '.' else rel_folder + '/'
        for name in sorted(filenames):
            if name.startswith('.') or not name.lower().endswith(IMAGE_EXTENSIONS):
                continue
            (depths.add if name.lower().endswith(DEPTH_SUFFIX) else images.append)(prefix + name)
    return images, depths


def _no_images(root):
    return DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {root}")


# -----------------------------------------------------------------------------
# reading photos, and the 16-bit depth format

def load_rgb(path):
    """Any image file -> PIL RGB, in its displayed orientation (EXIF rotation applied; prepare_depth.py
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


def rgb_tensor(image):
    """PIL RGB image -> float tensor (3, H, W) in [0, 1]."""
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float() / 255


def load_depth_png(path):
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
                        f"(value / 65536 * 2 + 4 = depth), e.g. from `python prepare_depth.py`")
    raise DataError(f"depth map {path} has pixel mode {im.mode}; expected a 16-bit greyscale PNG")


def encode_depth(inverse_depth, size=None):
    """Relative inverse depth (h, w) (larger = nearer, any scale and shift, as monocular estimators
    give it) -> the authors' 16-bit encoding (uint16 array): normalised per image to [0, 1], inverted
    so that 0 = nearest, times 65535 (the encoding load_depth_png reads). With size = (H, W) a map of
    another size is first resized to it, bicubically in float32 (an estimator's output at its input
    size -> the photo's size)."""
    x = torch.as_tensor(inverse_depth).float()
    if size is not None and tuple(x.shape[-2:]) != tuple(size):
        x = F.interpolate(x.reshape(1, 1, *x.shape[-2:]), size=tuple(size), mode='bicubic', align_corners=False)
    x = x.reshape(x.shape[-2:]).double()
    if not torch.isfinite(x).all():
        raise DataError("the depth estimator returned NaN or inf")
    lo, hi = x.min(), x.max()
    normalised = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)  # no relief: one plane at the back
    return ((1 - normalised) * 65535).round().clamp(0, 65535).numpy().astype(np.uint16)


def save_depth_png(path, depth16):
    """A uint16 array (H, W) (encode_depth's) -> the 16-bit greyscale PNG `path`, written atomically
    (a run killed mid-write leaves no half file that a resumed run would take for a finished one)."""
    depth16 = np.asarray(depth16)
    assert depth16.dtype == np.uint16 and depth16.ndim == 2, (depth16.dtype, depth16.shape)
    png16 = Image.fromarray(depth16)  # uint16 -> a 16-bit greyscale ('I;16') image
    atomic_write(path, lambda f: png16.save(f, format='PNG'))


def _center_square(width, height):
    """Crop box of the centred square of a width x height image."""
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def crop_and_resize(image, depth, size):
    """PIL RGB image and its raw 16-bit depth values (H, W) -> image (3, S, S) in [0, 1] and depth
    (1, S, S) in scene units: the centred square of both, Lanczos-resized to S = size. Depth is
    resampled in float (never through 8 bits) and clipped to the 16-bit range, so Lanczos ringing
    cannot leave [4, 6)."""
    box = _center_square(image.width, image.height)
    image = image.crop(box).resize((size, size), Image.LANCZOS)
    depth = Image.fromarray(depth.astype(np.float32)).crop(box).resize((size, size), Image.LANCZOS)
    depth = DEPTH_NEAR + np.clip(np.asarray(depth), 0, 65535) / 65536 * (DEPTH_FAR - DEPTH_NEAR)  # in [4, 6)
    return rgb_tensor(image), torch.from_numpy(depth.astype(np.float32))[None]  # (3, S, S), (1, S, S)


def _load_pair(image_path, depth_path):
    """An image (PIL RGB) and its depth map's raw values (H, W), checked to be the same size."""
    image = load_rgb(image_path)
    depth = load_depth_png(depth_path)  # (H, W) raw 16-bit values
    if depth.shape != (image.height, image.width):
        raise DataError(f"depth map {depth_path} is {depth.shape[1]}x{depth.shape[0]} but its image "
                        f"{image_path} is {image.width}x{image.height}")
    return image, depth


# -----------------------------------------------------------------------------
# Real photos with monocular depth: class folders of NAME.jpg beside NAME_depth.png

class ImageNetDepth(torch.utils.data.Dataset):
    """Photos + 16-bit depth maps, in the authors' layout or with a separate depth tree.

    root/CLASS/NAME.jpg (any of IMAGE_EXTENSIONS, e.g. ImageNet's .JPEG) with its depth map at
    root/CLASS/NAME_depth.png, or at depth_root/CLASS/NAME_depth.png when `depth_root` is given (a
    tree that mirrors root, as `python prepare_depth.py root depth_root` writes). Labels index the
    sorted class-folder names (images in deeper subfolders belong to their top-level class folder);
    a flat folder of images is one class, label 0.

    Items: the centred square crop, resized (Lanczos) to image_size; depth gets the same crop and
    the same Lanczos resize, in float (crop_and_resize). With flip=True, image and depth are
    mirrored together with probability 0.5 (torch's global RNG, so DataLoader workers differ).

    The folder structure is checked here; each file's content (readable, 16-bit, same size as its
    image) when it is loaded. `python data.py check ROOT` loads every pair once.
    """

    def __init__(self, root, image_size=128, depth_root=None, flip=True, skip_missing_depth=False, hr_size=None):
        self.root = _check_folder(root, 'image folder')
        self.hr_size = hr_size  # also give `image_hr`, the same crop at hr_size (train.py --sr_ckpt)
        self.depth_root = _check_folder(depth_root, 'depth folder') if depth_root is not None else self.root
        if int(image_size) < 1:
            raise DataError(f"image_size must be positive, got {image_size}")
        self.image_size, self.flip = int(image_size), bool(flip)
        images = self._with_depth(*walk_images(self.root), skip_missing_depth)

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

    def _with_depth(self, images, depths, skip_missing_depth):
        """The images (relative paths) that have a depth map; the others are an error, or skipped."""
        if not images:
            raise _no_images(self.root)
        if self.depth_root != self.root:
            depths = walk_images(self.depth_root, 'depth folder')[1]
        owner = {}  # NAME.jpg and NAME.png in one folder would share NAME_depth.png
        for rel in images:
            other = owner.setdefault(depth_relpath(rel), rel)
            if other != rel:
                raise DataError(f"{self.root / other} and {self.root / rel} would share the depth map "
                                f"{depth_relpath(rel)}; rename one of them")

        missing = [rel for rel in images if depth_relpath(rel) not in depths]
        if missing and not skip_missing_depth:
            first = ', '.join(missing[:3]) + (', ...' if len(missing) > 3 else '')
            raise DataError(f"{len(missing)} of {len(images)} images under {self.root} have no NAME{DEPTH_SUFFIX} "
                            f"under {self.depth_root} (first: {first}); make them with `python prepare_depth.py "
                            f"{self.root} {self.depth_root}` (the old `data.py make_depth`) or skip them "
                            f"(skip_missing_depth=True)")
        if missing:
            if len(missing) == len(images):
                raise DataError(f"none of the {len(images)} images under {self.root} has a NAME{DEPTH_SUFFIX} "
                                f"under {self.depth_root}")
            warnings.warn(f"skipping {len(missing)} of {len(images)} images under {self.root} that have no depth map")
            skipped = set(missing)
            images = [rel for rel in images if rel not in skipped]
        return images

    @property
    def num_classes(self):
        return len(self.classes)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        rel, label = self.samples[index]
        image_path = self.root / rel
        image, depth = _load_pair(image_path, self.depth_root / depth_relpath(rel))
        item = dict(label=label, path=str(image_path))
        if self.hr_size:  # the same square, Lanczos-resized to hr_size as well (the depth is not needed there)
            item['image_hr'] = crop_and_resize(image, depth, self.hr_size)[0]
        item['image'], item['depth'] = crop_and_resize(image, depth, self.image_size)
        if self.flip and torch.rand(()) < 0.5:  # one coin for all of them
            item = {k: v.flip(-1) if torch.is_tensor(v) else v for k, v in item.items()}
        return item


# -----------------------------------------------------------------------------
# single inputs (sample.py)

def list_images(path):
    """An image file -> [it]; a folder -> its images, recursively, sorted (depth maps left out)."""
    path = Path(path)
    if path.is_file():
        return [str(path)]
    images = walk_images(path, 'input')[0]
    if not images:
        raise _no_images(path)
    return [str(path / rel) for rel in images]


def match_depth(image_paths, depth=''):
    """The depth map of each image: depth '' -> NAME_depth.png beside it, or None (to be estimated)
    when there is none; a file -> that map (one image only); a folder -> folder/NAME_depth.png,
    which must exist."""
    if not depth:
        beside = [Path(p).parent / depth_relpath(Path(p).name) for p in image_paths]
        return [str(d) if d.is_file() else None for d in beside]
    depth = Path(depth)
    if depth.is_file():
        if len(image_paths) != 1:
            raise DataError(f"one depth map {depth} given for {len(image_paths)} images; pass a folder of NAME{DEPTH_SUFFIX}")
        return [str(depth)]
    folder = _check_folder(depth, 'depth folder')
    found = [folder / depth_relpath(Path(p).name) for p in image_paths]
    for image_path, d in zip(image_paths, found):
        if not d.is_file():
            raise DataError(f"no depth map {d} for image {image_path}")
    return [str(d) for d in found]


def load_rgbd(image_path, depth_path, image_size, estimator=None):
    """One image and its depth as the datasets give them: image (3, S, S) in [0, 1], depth (1, S, S)
    in scene units. Without depth_path the depth comes from `estimator(images (B, 3, H, W) in [0, 1])
    -> inverse depth (B, h, w)` (e.g. prepare_depth.load_midas()), encoded in 16 bits exactly as
    prepare_depth.py would store it."""
    if depth_path is not None:
        return crop_and_resize(*_load_pair(image_path, depth_path), int(image_size))
    if estimator is None:
        raise DataError(f"no depth map for {image_path} and no depth estimator to make one")
    image = load_rgb(image_path)
    inverse = torch.as_tensor(estimator(rgb_tensor(image)[None]))  # (1, h, w)
    depth = encode_depth(inverse.reshape(-1, *inverse.shape[-2:])[0], size=(image.height, image.width))
    return crop_and_resize(image, depth, int(image_size))


# -----------------------------------------------------------------------------
# command line: python data.py check ROOT

class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit status 1 (see main)
        raise DataError(f"{message} (see python data.py --help)")


def check(root, depth_root=None, image_size=128):
    """Load every image/depth pair of a dataset folder once; report each bad one. Returns the bad ones' messages."""
    from tqdm import tqdm
    dataset = ImageNetDepth(root, image_size, depth_root, flip=False)
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


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = _Parser(prog='data.py', description='Check a G3DR dataset folder (depth maps: prepare_depth.py).')
    commands = parser.add_subparsers(dest='command', required=True)
    c = commands.add_parser('check', help='load every image/depth pair of a dataset folder once')
    c.add_argument('root')
    c.add_argument('--depth_root', default=None)
    c.add_argument('--image_size', type=int, default=128)
    try:
        if argv[:1] == ['make_depth']:
            raise DataError("make_depth moved to its own script: python prepare_depth.py SRC DST")
        args = parser.parse_args(argv)
        check(args.root, args.depth_root, args.image_size)
    except DataError as e:
        print(f"data.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
