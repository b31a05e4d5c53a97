"""Tests of outputs.py (atomic writes, JSON, depth colouring, grids and GIFs) and of the two helpers
every script's command line shares from configurator.py (one_line, resolve_device)."""
import json
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

import outputs
from configurator import ConfigError, one_line, resolve_device


def test_atomic_write_replaces_whole_files_and_cleans_up(tmp_path):
    path = tmp_path / 'sub' / 'ckpt.pt'
    outputs.atomic_write(path, lambda f: f.write(b'first'))  # missing folders are made
    assert path.read_bytes() == b'first'
    seen = []

    def write(f):
        f.write(b'half')
        seen.append(Path(f.name).name)
        assert path.read_bytes() == b'first'  # the old file stays whole while the new one is written
        raise KeyboardInterrupt  # killed mid-write
    with pytest.raises(KeyboardInterrupt):
        outputs.atomic_write(path, write)
    assert seen == [f"ckpt.pt.tmp-{os.getpid()}"]  # the name train.py's start-up cleanup looks for
    assert path.read_bytes() == b'first' and sorted(p.name for p in path.parent.iterdir()) == ['ckpt.pt']
    outputs.atomic_write(str(path), lambda f: f.write(b'second'))
    assert path.read_bytes() == b'second' and sorted(p.name for p in path.parent.iterdir()) == ['ckpt.pt']


def test_write_json(tmp_path, capsys):
    record = dict(fid=13.1, settings=dict(views=['canonical', 'novel'], n=50000))
    outputs.write_json(record, tmp_path / 'out' / 'metrics.json')
    text = (tmp_path / 'out' / 'metrics.json').read_text()
    assert json.loads(text) == record and text == json.dumps(record, indent=2) + '\n'
    assert capsys.readouterr().out == ''  # prints nothing
    assert sorted(p.name for p in (tmp_path / 'out').iterdir()) == ['metrics.json']


def _read(path):
    with Image.open(path) as image:
        image.load()
    return image


def test_colorize_and_save_pictures(tmp_path):
    depth = torch.tensor([4.0, 4.5, 5.0, 5.99, 0.0]).view(1, 1, 1, 5)
    rgb = outputs.colorize_depth(depth)
    assert rgb.shape == (1, 3, 1, 5) and 0 <= rgb.min() and rgb.max() <= 1
    brightness = rgb[0].sum(0)[0]
    assert (brightness[:4].diff() < 0).all() and brightness[4] == 0  # near bright, far dark, empty black
    outputs.save_grid(torch.rand(5, 3, 8, 6), tmp_path / 'g' / 'grid.png', nrow=2, padding=2)
    assert _read(tmp_path / 'g' / 'grid.png').size == (2 * 8 + 2, 3 * 10 + 2)
    outputs.save_gif(torch.rand(4, 3, 8, 6), tmp_path / 'orbit.gif')
    with Image.open(tmp_path / 'orbit.gif') as gif:
        assert gif.size == (6, 8) and gif.n_frames == 4


def test_one_line():
    assert one_line(ValueError('bad value\n  in   file x.png\n')) == 'bad value in file x.png'
    assert one_line(KeyError()) == 'KeyError'  # no text: the class name
    # what a DataLoader worker's error looks like in the main process: the original message is kept
    wrapped = RuntimeError("Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent "
                           "call last):\n  File \"data.py\", line 1, in x\n    raise DataError(...)\n"
                           "data.DataError: cannot read image /d/a.jpg: truncated")
    assert one_line(wrapped) == 'cannot read image /d/a.jpg: truncated'


def test_resolve_device():
    assert resolve_device('auto') == ('cuda' if torch.cuda.is_available() else 'cpu')
    assert resolve_device('cpu') == 'cpu'
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match='--device cuda:1: CUDA is not available'):
            resolve_device('cuda:1')
        assert issubclass(ConfigError, ValueError)
