"""The ImageNet recipe exercised on the CPU: the 12 real pairs in fixtures/, a tiny f_trigen, and random-weight
VGG16 and CLIP ViT-B-16 files placed where torchvision and open_clip look for pretrained weights (no download).
Also the recipe's system choices: dtype, device, global batch (its split over 1-8 processes: test_train.py)."""
import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import checkpoint
import resume
import train

REPO = Path(__file__).resolve().parent
SAMPLES = REPO / 'fixtures' / 'imagenet_samples'  # 12 real ImageNet images with depth


@pytest.fixture(scope='module')
def pretrained_files(tmp_path_factory):
    """(TORCH_HOME holding a random-weight VGG16 at torchvision's cache path, a random-weight CLIP ViT-B-16 file)."""
    import open_clip
    from torchvision.models import VGG16_Weights
    from torchvision.models.vgg import cfgs, make_layers
    root = tmp_path_factory.mktemp('pretrained')
    hub = root / 'torch_home' / 'hub' / 'checkpoints'
    hub.mkdir(parents=True)
    torch.manual_seed(0)
    state = {f'features.{k}': v for k, v in make_layers(cfgs['D']).state_dict().items()}
    # the classifier, which the loss never uses, as zero tensors expanded from one stored number: a 59 MB file
    # instead of 550 MB that loads into torchvision's vgg16() like the real one
    for name, (n_out, n_in) in (('classifier.0', (4096, 25088)), ('classifier.3', (4096, 4096)),
                                ('classifier.6', (1000, 4096))):
        state[f'{name}.weight'] = torch.zeros(1).expand(n_out, n_in)
        state[f'{name}.bias'] = torch.zeros(1).expand(n_out)
    torch.save(state, hub / os.path.basename(VGG16_Weights.IMAGENET1K_V1.url))
    clip_file = root / 'clip_vit_b16_random.pt'
    torch.save(open_clip.create_model('ViT-B-16', pretrained=None).state_dict(), clip_file)
    return root / 'torch_home', clip_file


def _covering_seed(cfg, accumulation):
    """A seed whose draws give several novel micro-batches and several canonical ones of the second half
    (where VGG and CLIP apply), so one short run meets every term."""
    for seed in range(1000):
        cfg = dict(cfg, seed=seed)
        draws = [[train.draw_view(s, k, cfg['batch_size'], cfg)[0] for k in range(accumulation)]
                 for s in range(cfg['max_steps'])]
        late = cfg['perceptual_start'] * cfg['max_steps']
        novel_steps = sum(any(d) for d in draws)
        late_canonical = sum(not n for s, d in enumerate(draws) if s >= late for n in d)
        mixed = sum(any(d) and not all(d) for d in draws)
        if novel_steps >= 2 and late_canonical >= 2 and mixed >= 1:
            return seed
    raise AssertionError('no seed covers every term')


def test_imagenet_recipe_end_to_end(pretrained_files, tmp_path):
    torch_home, clip_file = pretrained_files
    out = tmp_path / 'run'
    argv = ['--dataset', 'imagenet', '--data_dir', str(SAMPLES), '--model_size', 'tiny', '--image_size', '32',
            '--render_size', '16', '--n_coarse', '8', '--n_fine', '8', '--max_steps', '6', '--batch_size', '1',
            '--global_batch', '2', '--log_every', '1', '--device', 'cpu', '--num_workers', '0',
            '--clip_pretrained', str(clip_file), '--out_dir', str(out)]
    cfg = train.parse_config(argv)
    assert train.batch_split(cfg, argv, world_size=1) == (1, 2)  # --batch_size 1 as given, 2 micro-batches a step
    seed = _covering_seed(cfg, 2)
    cfg['seed'] = seed
    env = dict(os.environ, TORCH_HOME=str(torch_home))
    r = subprocess.run([sys.executable, 'train.py', *argv, '--seed', str(seed)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    assert '1 process x 1 micro-batch x 2 accumulation = 2 images a step' in r.stdout, r.stdout
    records = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
    assert [m['step'] for m in records] == [1, 2, 3, 4, 5, 6]

    # the optimisation: the release's one-cycle lr with beta1 cycling 0.95 -> 0.85 -> 0.95 (torch's OneCycleLR)
    p = torch.nn.Parameter(torch.zeros(1))
    ref_opt = torch.optim.Adam([p], lr=5e-5, betas=(0.9, 0.99))
    ref = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=5e-5, total_steps=6, pct_start=0.02, div_factor=25.0,
                                              cycle_momentum=True)
    for m in records:
        assert m['lr'] == pytest.approx(ref_opt.param_groups[0]['lr'], rel=1e-9)
        assert m['beta1'] == pytest.approx(ref_opt.param_groups[0]['betas'][0], rel=1e-9)
        ref_opt.step()
        ref.step()
    assert records[-1]['beta1'] == pytest.approx(0.95) and min(m['beta1'] for m in records) < 0.9

    # every micro-batch: its own canonical/novel draw, the terms and weights of that view at that step
    seen = set()
    for m in records:
        step = m['step'] - 1
        assert len(m['views']) == 2  # global_batch 2 = batch 1 x 1 process x 2 micro-batches
        for micro_index, view in enumerate(m['views']):
            novel = train.draw_view(step, micro_index, 1, cfg)[0]
            assert view['novel'] is novel
            expected = train.term_weights(step, novel, cfg)  # without the zero-weight perceptual terms
            assert all(w or k not in ('vgg', 'clip') for k, w in expected.items())
            assert view['weights'] == pytest.approx(expected)
            terms = {k: view[k] for k in expected}
            assert set(view) == {'loss', 'novel', 'weights', *expected}
            assert all(math.isfinite(v) for v in terms.values())
            assert all(v > 0 for k, v in terms.items() if expected[k] > 0)
            assert view['loss'] == pytest.approx(sum(terms.values()), rel=1e-5)
            seen.add(('novel' if novel else 'canonical', *sorted(k for k in expected if k in ('vgg', 'clip'))))
        assert m['loss'] == pytest.approx(sum(v['loss'] for v in m['views']) / 2, rel=1e-6)
    # canonical steps without and with the perceptual terms, and novel steps with both
    assert seen == {('canonical',), ('canonical', 'clip', 'vgg'), ('novel', 'clip', 'vgg')}
    ckpt = checkpoint.load_run(out / 'ckpt.pt', 'trigen')  # the safe loader reads it
    assert ckpt['step'] == 6 and ckpt['config']['global_batch'] == 2 and ckpt['config']['grad_clip'] == 0


def test_imagenet_needs_a_gpu_unless_told_cpu(tmp_path):
    # no CUDA device visible: --device auto refuses to fall back to a CPU run of the paper's model
    env = dict(os.environ, CUDA_VISIBLE_DEVICES='')
    r = subprocess.run([sys.executable, 'train.py', '--dataset', 'imagenet', '--data_dir', str(SAMPLES),
                        '--out_dir', str(tmp_path / 'run')], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 1 and r.stderr.strip().count('\n') == 0, r.stderr[-2000:]
    assert '--device cpu' in r.stderr and 'CUDA' in r.stderr
    assert not (tmp_path / 'run').exists()


def test_device_choice(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    imagenet = train.parse_config(['--dataset', 'imagenet', '--data_dir', 'x'])
    with pytest.raises(train.ConfigError, match='--device cpu'):
        train.device_of(imagenet)
    assert train.device_of(dict(imagenet, device='cpu')) == 'cpu'
    assert train.device_of(train.parse_config([])) == 'cpu'  # synthetic runs are meant for the CPU
    with pytest.raises(train.ConfigError, match='--device cuda:1'):
        train.device_of(dict(imagenet, device='cuda:1'))


def test_global_batch_must_divide(tmp_path):
    """An explicit --batch_size that cannot make global_batch stops the run before anything is written,
    naming the nearest micro-batches that can."""
    argv = ['--model_size', 'tiny', '--image_size', '32', '--global_batch', '6', '--batch_size', '4',
            '--out_dir', str(tmp_path / 'run'), '--device', 'cpu']
    with pytest.raises(train.ConfigError, match='--batch_size 4 .*--global_batch 6 .*use --batch_size 3 or 6'):
        train.main(argv)
    assert not (tmp_path / 'run').exists()
    # left out, the largest micro-batch at or under the recipe's that makes 6: 3 x 2
    cfg = train.parse_config(argv[:6])
    assert train.batch_split(cfg, argv[:6], world_size=1) == (3, 2)


def test_bfloat16_autocasts_the_unet_only():
    """--dtype bfloat16: in a training step (trigen_losses under resume.autocast_for) f_trigen runs in bf16,
    f_dec, the compositing and the loss in float32."""
    from model import G3DR, MODEL_PRESETS
    model = G3DR(dict(MODEL_PRESETS['tiny'], image_size=16))
    dtypes = {}
    model.unet.register_forward_hook(lambda m, i, o: dtypes.__setitem__('unet', o.dtype))
    model.decoder.net.register_forward_hook(lambda m, i, o: dtypes.__setitem__('decoder', (i[0].dtype, o.dtype)))
    cfg = train.parse_config(['--dtype', 'bfloat16', '--model_size', 'tiny', '--image_size', '16',
                              '--render_size', '4', '--n_coarse', '4', '--n_fine', '4'])
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        autocast = resume.autocast_for('cpu', train.DTYPES[cfg['dtype']])
        batch = dict(image=torch.rand(1, 3, 16, 16), depth=torch.full((1, 1, 16, 16), 5.0))
        loss, terms, _ = train.trigen_losses(model, batch, 0, 0, cfg, {}, 'cpu', autocast)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    assert dtypes['unet'] == torch.bfloat16
    assert dtypes['decoder'] == (torch.float32, torch.float32)
    assert loss.dtype == torch.float32 and all(t.dtype == torch.float32 for t in terms.values())
    assert train.DTYPES['float32'] is None
    assert resume.autocast_for('cpu', None) is contextlib.nullcontext  # float32: no autocast at all
