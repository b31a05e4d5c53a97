"""Tests of bench.py ablate: one tiny variant table end to end."""
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
TINY = ('--model_size tiny --image_size 32 --render_size 8 --n_coarse 4 --n_fine 4 --num_scenes 8 '
        '--batch_size 2 --log_every 1')


def test_ablate_writes_table_and_json_and_reuses_finished_runs(tmp_path):
    out = tmp_path / 'ablate'
    argv = [sys.executable, 'bench.py', 'ablate', '--steps', '2', '--seeds', '3', '--variants', '0', '4',
            '--eval_scenes', '1', '--out_dir', str(out), '--extra', TINY, '--eval_extra', '--n_coarse 4 --n_fine 4']
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    result = json.loads((out / 'ablate.json').read_text())
    assert list(result['table']) == ['full recipe', 'single-resolution sampling, 1 level (Sec. 3.3)']
    for row in result['table'].values():
        for key in ('psnr_canonical', 'psnr_novel', 'depth_mae_novel', 'nfs', 'psnr_novel_static', 'psnr_novel_warp'):
            assert len(row[key]['runs']) == 1 and row[key]['half_range'] == 0, key
    # the variant really changed the model: its checkpoint has one triplane level
    import torch
    ckpt = torch.load(out / 'v4_seed3' / 'ckpt.pt', weights_only=False)
    assert ckpt['model_config']['levels'] == 1
    table = (out / 'ablate.md').read_text()
    assert '| full recipe |' in table and 'PSNR novel' in table
    # a second call reuses the finished runs instead of training again
    before = (out / 'v0_seed3' / 'ckpt.pt').stat().st_mtime_ns
    r = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0 and (out / 'v0_seed3' / 'ckpt.pt').stat().st_mtime_ns == before
