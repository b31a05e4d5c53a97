"""
Files written for people to read or look at: pictures, animations and JSON reports, each written
atomically so that a run killed at any moment leaves the old file or the new one, never half of one.

    atomic_write(path, write)          any file, through write(f) on a temporary file renamed over path
    write_json(obj, path)              json.dumps(obj, indent=2)
    colorize_depth(depth)              depth (B, 1, H, W) in scene units -> RGB (B, 3, H, W) in [0, 1]
    save_grid(images, path, nrow=8)    images (N, 3, H, W) in [0, 1] -> one PNG
    save_gif(frames, path, fps=24)     frames (T, 3, H, W) in [0, 1] -> a looping GIF
"""
import json
import math
import os
from pathlib import Path

import torch
from PIL import Image

from render import DEPTH_FAR, DEPTH_NEAR


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


def write_json(obj, path):
    """obj as indented JSON (json.dumps(obj, indent=2) and a final newline) in the file `path`, atomically."""
    text = json.dumps(obj, indent=2) + '\n'
    atomic_write(path, lambda f: f.write(text.encode('utf-8')))


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
