"""
Depth maps for a folder of photos: SRC/CLASS/NAME.jpg -> DST/CLASS/NAME_depth.png (16-bit, data.py's
format), the step before training G3DR on real photos (nanoGPT's data/*/prepare.py pattern).

    python prepare_depth.py SRC DST [--model DPT_Large|DPT_Hybrid|MiDaS_small] [--batch_size 16]
                            [--device auto] [--repo intel-isl/MiDaS] [--num_workers 4]
    torchrun --standalone --nproc_per_node=8 prepare_depth.py SRC DST      # one process per GPU

DST may be SRC itself (the authors' layout: NAME_depth.png beside NAME.jpg).

The estimator. Monocular depth comes from MiDaS (Ranftl et al.) through torch.hub. We recommend
DPT_Large (the default): the most accurate of the MiDaS v3 hub models (DPT_Hybrid is faster and a
little worse, MiDaS_small much faster and clearly worse). The G3DR authors made their ImageNet depth
maps with LeReS (Yin et al.), which is not on torch.hub; their prepared set is linked from their
README. Any other model plugs in behind one small interface,

    estimator(images (B, 3, H, W) in [0, 1]) -> relative inverse depth (B, h, w)   (larger = nearer)

with an optional `estimator.input_size(H, W) -> (h, w)`, the size it resizes an H x W photo to: pass
`--estimator module:function`, a callable `function(device) -> estimator` importable from the working
directory or PYTHONPATH (the tests plug in a stand-in that way).

Batching: each photo is resized as MiDaS's own transform does (keep the aspect ratio, sides multiples
of 32, one side at 384 for DPT), and photos whose resized size agrees are batched together. We group
by size instead of squashing every photo to 384 x 384 because the DPT models are run at their
training resolution but with the photo's shape (that is how MiDaS is evaluated): squashing would
distort the geometry the depth is inferred from. A batch then gives the same maps as one photo at a
time (tested), and ImageNet's few aspect ratios make few distinct sizes. The prediction is resized
back to the photo's size (bicubic) and encoded with data.encode_depth.

Work is split over processes by rank: the sorted image list is dealt out round-robin (image i goes
to rank i % world_size), so every shard spans all classes and finishes at about the same time. A
run resumes where it stopped: images whose depth map exists are skipped (depth maps are written
atomically, so an existing one is complete). Unreadable photos are reported and skipped; the
summary (summed over processes) counts written / skipped / failed. The exit status is 0 when the
run got through the list (failed photos included: they are listed on stderr, and ImageNetDepth
refuses photos without depth unless skip_missing_depth=True), 1 when an error stopped it. The
progress bar is rank 0's (its shard); the whole run goes about world_size times faster.
"""
import argparse
import datetime
import importlib
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import data
from configurator import ConfigError, one_line, resolve_device

MIDAS_MODELS = ('DPT_Large', 'DPT_Hybrid', 'MiDaS_small')


class EstimatorError(ValueError):
    """The depth estimator cannot be loaded. The message is one line saying what to do."""


# -----------------------------------------------------------------------------
# the estimator: MiDaS through torch.hub

def _multiple_of(x, base=32, max_value=None):
    y = round(x / base) * base
    if max_value is not None and y > max_value:
        y = (x // base) * base
    return int(max(y, base))


def midas_input_size(height, width, model='DPT_Large'):
    """The size MiDaS's hub transform resizes a height x width photo to, keeping its aspect ratio:
    DPT models: the scale closest to 1 that brings a side to 384; MiDaS_small: fit inside 256 x 256;
    sides rounded to multiples of 32."""
    if model == 'MiDaS_small':  # 'upper_bound'
        scale = min(256 / height, 256 / width)
        return _multiple_of(scale * height, max_value=256), _multiple_of(scale * width, max_value=256)
    scale_h, scale_w = 384 / height, 384 / width  # 'minimal'
    scale = scale_w if abs(1 - scale_w) < abs(1 - scale_h) else scale_h
    return _multiple_of(scale * height), _multiple_of(scale * width)


def resize_bicubic(images, size):
    """images (B, 3, H, W) -> (B, 3, h, w) float, bicubic (cv2.INTER_CUBIC's kernel, as MiDaS); unchanged
    when already that size, so resizing before batching and inside the estimator agree exactly."""
    images = images.float()
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode='bicubic', align_corners=False)


class _InputSize:
    """A picklable `input_size(H, W)` for one MiDaS model (DataLoader workers resize with it)."""

    def __init__(self, model):
        self.model = model

    def __call__(self, height, width):
        return midas_input_size(height, width, self.model)


def load_midas(model='DPT_Large', device='cpu', repo='intel-isl/MiDaS'):
    """A MiDaS monocular depth estimator from torch.hub: estimate(images (B, 3, H, W) in [0, 1]) ->
    relative inverse depth (B, h, w) on the CPU, with estimate.input_size(H, W) -> (h, w). `repo` may be
    a local clone of the MiDaS repository; device 'auto' is the GPU when there is one. The input
    preparation is MiDaS's own (its hub `transforms`, which need OpenCV, redone in torch): resize to
    midas_input_size (bicubic), then DPT models: mean = std = 0.5; MiDaS_small: ImageNet mean/std."""
    if model not in MIDAS_MODELS:
        raise EstimatorError(f"unknown depth model {model!r}; choose one of {', '.join(MIDAS_MODELS)}")
    device = resolve_device(device)
    local = Path(repo).is_dir()
    try:
        net = torch.hub.load(repo, model, source='local' if local else 'github', trust_repo=True)
    except Exception as e:  # no network, missing package (timm), missing cache, ...
        hub = torch.hub.get_dir()
        raise EstimatorError(f"cannot load depth model {model} from torch.hub {repo!r}: {one_line(e)}. Offline, put "
                             f"a copy of the MiDaS repository in {hub}/intel-isl_MiDaS_master (or pass --repo PATH to "
                             f"a local clone) and its {model} weights in {hub}/checkpoints/, or run once with network "
                             f"access") from None
    net = net.eval().to(device)
    if model == 'MiDaS_small':
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    else:
        mean, std = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
    mean, std = torch.tensor(mean, device=device)[:, None, None], torch.tensor(std, device=device)[:, None, None]
    input_size = _InputSize(model)

    @torch.no_grad()
    def estimate(images):
        x = resize_bicubic(images, input_size(*images.shape[-2:])).to(device)  # (B, 3, h, w)
        return net((x - mean) / std).float().cpu()  # (B, h, w)

    estimate.input_size = input_size
    return estimate


def load_estimator(spec, device):
    """'module:function' -> function(device), the estimator of another depth model (see the module docstring)."""
    module_name, _, function_name = spec.partition(':')
    if not module_name or not function_name:
        raise ConfigError(f"--estimator {spec!r}: expected module:function")
    try:
        factory = getattr(importlib.import_module(module_name), function_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"--estimator {spec}: {one_line(e)}") from None
    return factory(device)


# -----------------------------------------------------------------------------
# the work: which images, read in DataLoader workers, batched by size, written atomically

def shard(items, rank, world_size):
    """This rank's items: every world_size-th one starting at `rank` (the shards are disjoint and
    together cover every item exactly once)."""
    assert 0 <= rank < world_size, (rank, world_size)
    return items[rank::world_size]


def plan(src, dst, rank=0, world_size=1):
    """This rank's share of SRC: (relative paths of its images still without a depth map in DST, the
    number of its images already done)."""
    images = data.walk_images(src)[0]
    if not images:
        raise data.DataError(f"no images ({', '.join(data.IMAGE_EXTENSIONS)}) found under {src}")
    mine = shard(images, rank, world_size)
    todo = [rel for rel in mine if not (Path(dst) / data.depth_relpath(rel)).exists()]
    return todo, len(mine) - len(todo)


class _Photos(torch.utils.data.Dataset):
    """Item i: dict(rel, size=(H, W) of the photo, image=(3, h, w) resized to input_size, or error=message)."""

    def __init__(self, root, rels, input_size=None):
        self.root, self.rels, self.input_size = Path(root), rels, input_size

    def __len__(self):
        return len(self.rels)

    def __getitem__(self, index):
        rel = self.rels[index]
        try:
            image = data.rgb_tensor(data.load_rgb(self.root / rel))  # (3, H, W)
        except data.DataError as e:
            return dict(rel=rel, error=str(e))
        size = tuple(image.shape[-2:])
        if self.input_size is not None:
            image = resize_bicubic(image[None], self.input_size(*size))[0]
        return dict(rel=rel, size=size, image=image)


def _batches(items, batch_size, max_waiting):
    """Group the photos by prepared size into batches of up to batch_size; unreadable ones pass
    through alone. When more than max_waiting photos wait in part-filled groups, the fullest goes."""
    groups = {}
    for item in items:
        if 'error' in item:
            yield [item]
            continue
        group = groups.setdefault(tuple(item['image'].shape), [])
        group.append(item)
        if len(group) == batch_size:
            yield groups.pop(tuple(item['image'].shape))
        elif sum(map(len, groups.values())) > max_waiting:
            yield groups.pop(max(groups, key=lambda key: len(groups[key])))
    yield from groups.values()


def _write_batch(batch, estimator, dst):
    """Estimate a batch of same-size photos and write their depth maps. Returns the failures' messages."""
    inverse = torch.as_tensor(estimator(torch.stack([item['image'] for item in batch]))).float().cpu()
    inverse = inverse.reshape(len(batch), *inverse.shape[-2:])  # (B, h, w)
    failed = []
    for item, prediction in zip(batch, inverse):
        try:
            depth16 = data.encode_depth(prediction, size=item['size'])  # at the photo's size
        except data.DataError as e:  # NaN or inf from the estimator
            failed.append(f"{item['rel']}: {e}")
            continue
        data.save_depth_png(Path(dst) / data.depth_relpath(item['rel']), depth16)
    return failed


def _as_is(item):  # the DataLoader's collate_fn: items are batched by _batches instead
    return item


def make_depth(src, dst, estimator, images, batch_size=16, num_workers=0, progress=True):
    """Write DST/<rel minus extension>_depth.png for each image path `rel` (relative to SRC) in `images`.
    Returns dict(written=int, failed=[one-line messages]); failures are also printed as they happen."""
    from tqdm import tqdm
    assert batch_size >= 1, batch_size
    photos = _Photos(src, images, getattr(estimator, 'input_size', None))
    loader = torch.utils.data.DataLoader(photos, batch_size=None, num_workers=min(num_workers, len(images)),
                                         collate_fn=_as_is)
    written, failed = 0, []
    with tqdm(total=len(images), desc='depth', unit='img', disable=not progress, smoothing=0.1) as bar:
        for batch in _batches(loader, batch_size, max_waiting=8 * batch_size):
            errors = [batch[0]['error']] if 'error' in batch[0] else _write_batch(batch, estimator, dst)
            for message in errors:
                tqdm.write(f"prepare_depth.py: skipped: {message}", file=sys.stderr)
            written += len(batch) - len(errors)
            failed += errors
            bar.update(len(batch))
            bar.set_postfix(written=written, failed=len(failed), refresh=False)
    return dict(written=written, failed=failed)


# -----------------------------------------------------------------------------
# command line

def _distributed():
    """(rank, world_size, local_rank) from torchrun's environment; joins the process group (gloo: it
    only sums three counts at the end, and works on CPU and GPU machines alike)."""
    world_size = int(os.environ.get('WORLD_SIZE', 1))
    if world_size == 1:
        return 0, 1, 0
    # a long timeout: ranks meet only at the end, after hours of work that may finish unevenly
    torch.distributed.init_process_group('gloo', timeout=datetime.timedelta(days=2))
    return torch.distributed.get_rank(), world_size, int(os.environ.get('LOCAL_RANK', 0))


def _device(name, local_rank, world_size):
    device = resolve_device(name)
    if device == 'cuda' and world_size > 1:
        return f"cuda:{local_rank}"  # one GPU per process
    return device


def _parse(argv):
    parser = argparse.ArgumentParser(prog='prepare_depth.py', description=__doc__.split('\n\n')[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = lambda message: _fail(f"{message} (see python prepare_depth.py --help)")
    parser.add_argument('src', help='folder of photos (searched recursively)')
    parser.add_argument('dst', help='output folder mirroring SRC (may be SRC itself)')
    parser.add_argument('--model', default='DPT_Large', choices=MIDAS_MODELS)
    parser.add_argument('--batch_size', type=int, default=16, help='photos per forward pass (per process)')
    parser.add_argument('--device', default='auto', help="'auto', 'cpu', 'cuda', 'cuda:1', ... (torchrun: cuda:LOCAL_RANK)")
    parser.add_argument('--repo', default='intel-isl/MiDaS', help='torch.hub repository, or a local clone of it')
    parser.add_argument('--num_workers', type=int, default=4, help='DataLoader processes reading photos (per process)')
    parser.add_argument('--estimator', default='', help='module:function, function(device) -> estimator: '
                                                         'another depth model instead of MiDaS ')
    args = parser.parse_args(argv)
    if args.batch_size < 1 or args.num_workers < 0:
        _fail(f"--batch_size must be at least 1 and --num_workers at least 0, got {args.batch_size}, {args.num_workers}")
    return args


def _fail(message):
    print(f"prepare_depth.py: error: {message}", file=sys.stderr)
    sys.exit(1)


def main(argv=None):
    args = _parse(sys.argv[1:] if argv is None else argv)
    rank, world_size, local_rank = _distributed()
    try:
        if Path(args.dst).exists() and not Path(args.dst).is_dir():
            raise data.DataError(f"depth folder {args.dst} is not a folder")
        todo, skipped = plan(args.src, args.dst, rank, world_size)  # before the (slow) model load
        device = _device(args.device, local_rank, world_size)
        estimator = (load_estimator(args.estimator, device) if args.estimator
                     else load_midas(args.model, device, args.repo))
        result = make_depth(args.src, args.dst, estimator, todo, args.batch_size, args.num_workers,
                            progress=rank == 0)
    except ValueError as e:  # DataError, ConfigError, EstimatorError: one line
        _fail(one_line(e))
    counts = torch.tensor([result['written'], skipped, len(result['failed'])])
    if world_size > 1:
        torch.distributed.all_reduce(counts)  # sums over ranks
        torch.distributed.destroy_process_group()
    written, skipped, failed = counts.tolist()
    if rank == 0:
        print(f"prepare_depth.py: wrote {written} depth maps, skipped {skipped} already done, "
              f"{failed} failed" + (f" over {world_size} processes" if world_size > 1 else '')
              + (" (the failed photos are listed above)" if failed else ''))
    return 0


if __name__ == '__main__':
    sys.exit(main())
