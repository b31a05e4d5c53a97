"""
Tests for losses.py. The network losses run with small random-initialised backbones (pretrained
weights cannot be downloaded in tests); the pretrained paths are tested for their offline errors with
every network access blocked.
"""
import json
import socket
import urllib.error
import urllib.request

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import losses


def _pair(shape, seed=0):
    """Two random images in [0, 1], the range of every image input of losses.py."""
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g), torch.rand(shape, generator=g)


def _released(x):
    """An image in [0, 1] in the range the released code measured its losses on, [-1, 1]: what the
    references below (and the lpips package) are given."""
    return 2 * x - 1


def _zero_positive_differentiable(loss_fn, a, b):
    assert loss_fn(a, a.clone()).item() == pytest.approx(0.0, abs=1e-7)
    p = a.clone().requires_grad_(True)
    loss = loss_fn(p, b)
    assert loss.item() > 0
    loss.backward()
    assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0
    return loss


# -----------------------------------------------------------------------------
# pixel losses

def test_recon_and_depth_losses():
    a, b = _pair((2, 3, 8, 8))
    for kind in ('l1', 'l2'):
        _zero_positive_differentiable(lambda x, y: losses.recon_loss(x, y, kind), a, b)
    # the released values: the errors of the same images in [-1, 1]
    a1, b1 = _released(a), _released(b)
    assert losses.recon_loss(a, b, 'l1').item() == pytest.approx((a1 - b1).abs().mean().item(), rel=1e-6)
    assert losses.recon_loss(a, b, 'l2').item() == pytest.approx(((a1 - b1) ** 2).mean().item(), rel=1e-6)
    with pytest.raises(ValueError, match="'l3'"):
        losses.recon_loss(a, b, 'l3')

    d, e = _pair((2, 1, 8, 8), seed=1)
    d, e = d + 5, e + 5  # scene units
    _zero_positive_differentiable(losses.depth_loss, d, e)
    assert losses.depth_loss(d, e).item() == pytest.approx((d - e).abs().mean().item(), rel=1e-6)


def _old_and_new(loss01, loss_released, seed=0, shape=(2, 3, 32, 32)):
    """(value, gradient) of a loss on a render as 6e0eacb computed it, on [-1, 1] images (render.py's
    rgb, the target x * 2 - 1), and as now, on the same render mapped to [0, 1] against the [0, 1] target;
    the gradients are with respect to render.py's rgb, which is what trains."""
    g = torch.Generator().manual_seed(seed)
    rgb = (torch.rand(shape, generator=g) * 2 - 1).requires_grad_(True)  # render.py's range
    target01 = torch.rand(shape, generator=g)
    out = []
    for loss in (loss_released(rgb, _released(target01)), loss01((rgb + 1) / 2, target01)):
        (grad,) = torch.autograd.grad(loss, rgb)
        out.append((loss.detach(), grad))
    return out


def _assert_equivalent(old, new, tol=1e-6, grad_tol=1e-6):
    """Same value and gradient to float32 rounding (relative; a deep backbone's gradient gathers more)."""
    (v_old, g_old), (v_new, g_new) = old, new
    assert abs(v_new - v_old).item() <= tol * abs(v_old).item(), (v_new, v_old)
    assert ((g_new - g_old).norm() / g_old.norm()).item() <= grad_tol


def test_recon_loss_on_0_1_is_the_released_loss_on_minus_1_1():
    _assert_equivalent(*_old_and_new(lambda a, b: losses.recon_loss(a, b, 'l1'),
                                     lambda a, b: (a - b).abs().mean()))
    _assert_equivalent(*_old_and_new(lambda a, b: losses.recon_loss(a, b, 'l2'),
                                     lambda a, b: (a - b).pow(2).mean()))


def test_pairwise_losses_reject_shape_mismatch():
    # (B, R, 1) render output against a (B, 1, S, S) map would broadcast silently into nonsense
    with pytest.raises(ValueError, match=r"\(2, 64, 1\).*\(2, 1, 8, 8\)"):
        losses.depth_loss(torch.zeros(2, 64, 1), torch.zeros(2, 1, 8, 8))
    with pytest.raises(ValueError, match="differ in shape"):
        losses.recon_loss(torch.zeros(2, 3, 8, 8), torch.zeros(1, 3, 8, 8))


def test_tv_loss_matches_hand_computation():
    d = torch.tensor([[1., 2., 4.],
                      [1., 3., 7.]]).view(1, 1, 2, 3)
    # along rows: (1-2)^2, (2-4)^2, (1-3)^2, (3-7)^2 -> mean 25/4
    # along columns: (1-1)^2, (2-3)^2, (4-7)^2 -> mean 10/3
    assert losses.tv_loss(d).item() == pytest.approx(25 / 4 + 10 / 3, rel=1e-6)
    # batch of two: the mean runs over the batch too
    d2 = torch.cat([d, torch.zeros_like(d)])
    assert losses.tv_loss(d2).item() == pytest.approx((25 / 4 + 10 / 3) / 2, rel=1e-6)
    # constant depth -> 0; otherwise positive with a gradient
    assert losses.tv_loss(torch.full((2, 1, 5, 5), 4.5)).item() == 0.0
    p = (torch.rand(2, 1, 6, 6) + 4).requires_grad_(True)
    loss = losses.tv_loss(p)
    assert loss.item() > 0
    loss.backward()
    assert p.grad.abs().sum() > 0
    with pytest.raises(ValueError, match=r"\(2, 36, 1\)"):
        losses.tv_loss(torch.zeros(2, 36, 1))


def test_opacity_loss():
    assert losses.opacity_loss(torch.ones(2, 16, 1)).item() == 0.0
    assert losses.opacity_loss(torch.full((2, 16, 1), 0.25)).item() == pytest.approx(0.75)
    o = torch.full((2, 16, 1), 0.5, requires_grad=True)
    losses.opacity_loss(o).backward()
    assert torch.allclose(o.grad, torch.full_like(o, -1 / 32))


# -----------------------------------------------------------------------------
# VGG perceptual

@pytest.fixture(scope='module')
def vgg():
    return losses.VGGPerceptual(pretrained=False, channel_weights='uniform')


def _lpips_reference(backbone, pred, target, lin_weights, levels):
    """LPIPS written out independently, on images in [0, 1] taken to LPIPS' [-1, 1]: scaling layer,
    sqrt-norm channel normalisation, 1x1 'lin' conv on the squared difference, spatial mean, sum over levels."""
    shift = torch.tensor([-.030, -.088, -.188]).view(1, 3, 1, 1)
    scale = torch.tensor([.458, .448, .450]).view(1, 3, 1, 1)
    x, y = (_released(pred) - shift) / scale, (_released(target) - shift) / scale
    total = 0
    for l, part in enumerate(backbone):
        x, y = part(x), part(y)
        if l in levels:
            nx = x / (torch.sqrt((x ** 2).sum(1, keepdim=True)) + 1e-10)
            ny = y / (torch.sqrt((y ** 2).sum(1, keepdim=True)) + 1e-10)
            total = total + F.conv2d((nx - ny) ** 2, lin_weights[l]).mean(dim=(2, 3))  # (B, 1)
    return total.mean()


def test_vgg_backbone_is_vgg16_sliced_at_the_lpips_relus(vgg):
    with torch.device('meta'):
        ref = torchvision.models.vgg16(weights=None).features  # shapes only, no memory, no download
    for l, (a, b) in enumerate(losses.VGG_SLICES):
        assert isinstance(ref[b - 1], nn.ReLU)  # each level ends at relu{l+1}_{2 or 3}
        ours = vgg.backbone[l]
        assert [type(m) for m in ours] == [type(m) for m in ref[a:b]]
        assert [p.shape for p in ours.parameters()] == [p.shape for p in ref[a:b].parameters()]
        assert ours[-2].out_channels == losses.VGG_CHANNELS[l]
    assert [b - 1 for _, b in losses.VGG_SLICES] == [3, 8, 15, 22, 29]


def test_vgg_zero_positive_differentiable_and_frozen(vgg):
    a, b = _pair((2, 3, 32, 32))
    _zero_positive_differentiable(vgg, a, b)
    for p in vgg.backbone.parameters():
        assert not p.requires_grad and p.grad is None
    assert not vgg.backbone.training
    loss = _zero_positive_differentiable(lambda x, y: vgg(x, y, levels=(3, 4)), a, b)
    assert loss.item() > 0


def test_vgg_matches_lpips_formula_with_uniform_weights(vgg):
    a, b = _pair((2, 3, 32, 32), seed=3)
    ones = [torch.ones(1, c, 1, 1) for c in losses.VGG_CHANNELS]
    with torch.no_grad():
        ref = _lpips_reference(vgg.backbone, a, b, ones, levels=range(5))
        assert vgg(a, b).item() == pytest.approx(ref.item(), rel=1e-5)
        ref34 = _lpips_reference(vgg.backbone, a, b, ones, levels=(3, 4))
        assert vgg(a, b, levels=(3, 4)).item() == pytest.approx(ref34.item(), rel=1e-5)
    # uniform weights = sum over unit vectors' squared differences: each level lies in [0, 4]
    for d in vgg.level_distances(a, b):
        assert (d >= 0).all() and (d <= 4).all()


def test_vgg_level_selection_and_weights(vgg):
    a, b = _pair((2, 3, 32, 32), seed=4)
    with torch.no_grad():
        d = [x.mean().item() for x in vgg.level_distances(a, b)]
        assert all(x > 0 for x in d)
        full = vgg(a, b).item()
        assert full == pytest.approx(sum(d), rel=1e-5)
        deep = vgg(a, b, levels=(3, 4)).item()
        assert deep == pytest.approx(d[3] + d[4], rel=1e-5)
        assert vgg(a, b, levels=(1,)).item() == pytest.approx(d[1], rel=1e-5)
        # levels=(3, 4) ignores the shallow levels whatever their weights
        assert vgg(a, b, levels=(3, 4), weights=(100., 100., 100., 1., 1.)).item() == pytest.approx(deep, rel=1e-6)
        # zero weights on the shallow levels == selecting the deep ones
        assert vgg(a, b, weights=(0., 0., 0., 1., 1.)).item() == pytest.approx(deep, rel=1e-5)
        # changing only level 2's weight changes the loss by exactly that much of d_2
        assert vgg(a, b, weights=(1., 1., 3., 1., 1.)).item() == pytest.approx(full + 2 * d[2], rel=1e-5)
        # reduction='none' keeps the batch
        per = vgg(a, b, reduction='none')
        assert per.shape == (2,) and per.mean().item() == pytest.approx(full, rel=1e-6)
    # shallow-level-only changes: only levels <= max(levels) are computed, grads reach the input
    p = a.clone().requires_grad_(True)
    vgg(p, b, levels=(0,)).backward()
    assert p.grad.abs().sum() > 0
    for bad in [(5,), (), (3, 3), (-1,)]:
        with pytest.raises(ValueError, match='levels'):
            vgg(a, b, levels=bad)
    with pytest.raises(ValueError, match='weights'):
        vgg(a, b, weights=(1., 1.))
    with pytest.raises(ValueError, match=r'\(2, 1, 32, 32\)'):
        vgg(a[:, :1], b[:, :1])


def test_vgg_backbone_loaded_once_and_never_in_a_checkpoint(vgg):
    other = losses.VGGPerceptual(pretrained=False, channel_weights='uniform')
    assert other.backbone is vgg.backbone  # module-level cache: no second build/load
    # the loss owns no parameters and adds nothing to a state_dict, even if attached to a model
    assert list(other.parameters()) == [] and len(other.state_dict()) == 0
    model = nn.Linear(2, 2)
    model.perceptual = other
    assert set(model.state_dict()) == {'weight', 'bias'}
    assert len(list(model.parameters())) == 2
    model.train()  # a parent's train() cannot switch the shared backbone out of eval mode
    assert not other.backbone.training


def test_vgg_calibration_file(vgg, tmp_path):
    g = torch.Generator().manual_seed(5)
    # the lpips package's vgg.pth layout: lin{k}.model.1.weight (1, C, 1, 1) (model.0 is a Dropout)
    state = {f'lin{k}.model.1.weight': torch.rand(1, c, 1, 1, generator=g) * 0.1
             for k, c in enumerate(losses.VGG_CHANNELS)}
    path = tmp_path / 'vgg.pth'
    torch.save(state, path)
    cal = losses.VGGPerceptual(pretrained=False, channel_weights=str(path))
    assert cal.backbone is vgg.backbone
    assert len(cal.state_dict()) == 0
    a, b = _pair((2, 3, 32, 32), seed=6)
    lin = [state[f'lin{k}.model.1.weight'] for k in range(5)]
    with torch.no_grad():
        ref = _lpips_reference(vgg.backbone, a, b, lin, levels=range(5))
        got = cal(a, b).item()
        assert got == pytest.approx(ref.item(), rel=1e-5)
        assert got != pytest.approx(vgg(a, b).item(), rel=1e-2)  # the weights are actually used
        ref34 = _lpips_reference(vgg.backbone, a, b, lin, levels=(3, 4))
        assert cal(a, b, levels=(3, 4)).item() == pytest.approx(ref34.item(), rel=1e-5)
    _zero_positive_differentiable(cal, a, b)

    missing = dict(state)
    del missing['lin3.model.1.weight']
    torch.save(missing, tmp_path / 'missing.pth')
    with pytest.raises(ValueError) as info:
        losses.VGGPerceptual(pretrained=False, channel_weights=str(tmp_path / 'missing.pth'))
    assert str(tmp_path / 'missing.pth') in str(info.value) and 'lin3.model.1.weight' in str(info.value)
    wrong = dict(state)
    wrong['lin2.model.1.weight'] = torch.rand(1, 128, 1, 1)
    torch.save(wrong, tmp_path / 'wrong.pth')
    with pytest.raises(ValueError) as info:
        losses.VGGPerceptual(pretrained=False, channel_weights=str(tmp_path / 'wrong.pth'))
    for fact in (str(tmp_path / 'wrong.pth'), 'lin2.model.1.weight', '(1, 128, 1, 1)', '(1, 256, 1, 1)'):
        assert fact in str(info.value), fact
    (tmp_path / 'junk.pth').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match=r'junk\.pth'):
        losses.VGGPerceptual(pretrained=False, channel_weights=str(tmp_path / 'junk.pth'))


def test_vgg_on_0_1_is_the_released_lpips_form_on_minus_1_1(vgg):
    """LPIPS' scaling layer folded into one for [0, 1] inputs gives 6e0eacb's loss (its layer on
    [-1, 1] images), values and gradients, at every level selection the recipe uses."""
    old = losses.VGGPerceptual(pretrained=False, channel_weights='uniform')
    old.shift.copy_(torch.tensor(losses.LPIPS_SHIFT).view(1, 3, 1, 1))  # the layer as LPIPS writes it
    old.scale.copy_(torch.tensor(losses.LPIPS_SCALE).view(1, 3, 1, 1))
    # values agree to float32 rounding; the gradients to 1e-2 only: the two float32 paths differ by ~1e-7 at the
    # input, enough to flip the few ReLU units (and max-pool winners) of a random backbone that sit at a tie,
    # each of which moves the gradient by a discrete amount (seen: 2.5e-6 to 6e-3, depending on the backbone)
    for levels in ((0, 1, 2, 3, 4), (3, 4)):
        _assert_equivalent(*_old_and_new(lambda a, b: vgg(a, b, levels=levels),
                                         lambda a, b: old(a, b, levels=levels), seed=len(levels)), grad_tol=1e-2)


def test_clip_on_0_1_is_the_released_loss_on_minus_1_1(tiny_clip):
    def released(a, b):  # 6e0eacb's embed: [-1, 1] -> [0, 1] first
        with torch.no_grad():
            e_b = tiny_clip.embed((b + 1) / 2)
        return (tiny_clip.embed((a + 1) / 2) - e_b).abs().mean()
    _assert_equivalent(*_old_and_new(tiny_clip, released, shape=(2, 3, 48, 48)))


def test_vgg_default_equals_lpips_package(vgg):
    """The default (LPIPS' learned channel weights, read from the installed lpips package) gives the value of
    lpips.LPIPS(net='vgg') on the same (random) backbone weights."""
    import lpips
    ref = lpips.LPIPS(net='vgg', pnet_rand=True, verbose=False).eval()
    for l, part in enumerate(vgg.backbone):  # lpips slices VGG16 at the same relus, with the same layer names
        getattr(ref.net, f'slice{l + 1}').load_state_dict(part.state_dict())  # strict: every tensor copied
    default = losses.VGGPerceptual(pretrained=False)
    assert default.backbone is vgg.backbone
    a, b = _pair((3, 3, 32, 32), seed=8)
    with torch.no_grad():
        expected = ref(_released(a), _released(b)).flatten()  # (B,): lpips takes images in [-1, 1]
        got = default(a, b, reduction='none')
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-7), (got, expected)
        # uniform weights are about ten times stronger: what the default corrects
        assert 4 < vgg(a, b).item() / default(a, b).item() < 30


def test_vgg_default_needs_the_lpips_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, 'find_spec', lambda name, *a: None if name == 'lpips' else real(name, *a))
    with pytest.raises(losses.WeightsUnavailable, match='pip install lpips.*uniform'):
        losses.VGGPerceptual(pretrained=False)
    assert losses.VGGPerceptual(pretrained=False, channel_weights='uniform').channel_weight0.sum() == 64


def test_vgg_and_clip_run_float32_under_autocast(vgg, tiny_clip):
    a, b = _pair((2, 3, 32, 32), seed=9)
    with torch.no_grad():
        plain = vgg(a, b)
        with torch.autocast(device_type='cpu', dtype=torch.bfloat16):
            inside = vgg(a, b)
            clip_inside = tiny_clip.embed(a)
        assert inside.dtype == torch.float32 and torch.equal(inside, plain)
        assert clip_inside.dtype == torch.float32 and torch.equal(clip_inside, tiny_clip.embed(a))


def test_vgg_gradient_finite_at_all_zero_features(vgg):
    # an input equal to the LPIPS shift is zero after scaling, so with the zero biases of the random
    # init every feature vector is exactly zero (norm 0): the loss and its gradient must stay finite
    p = torch.tensor(losses.SHIFT_01).view(1, 3, 1, 1).expand(1, 3, 32, 32).clone().requires_grad_(True)
    assert all((f == 0).all() for f in _features(vgg, p.detach()))
    t = torch.rand(1, 3, 32, 32)
    loss = vgg(p, t)
    loss.backward()
    # unit vectors against zero vectors: every level contributes exactly 1
    assert loss.item() == pytest.approx(5.0, rel=1e-5)
    assert torch.isfinite(p.grad).all()


def _features(vgg, x):
    x = (x - torch.tensor(losses.SHIFT_01).view(1, 3, 1, 1)) / torch.tensor(losses.SCALE_01).view(1, 3, 1, 1)
    out = []
    for part in vgg.backbone:
        x = part(x)
        out.append(x)
    return out


def _block_network(monkeypatch):
    """Every way out refused (the sockets too), so these tests mean the same on a machine with network."""
    attempts = []

    def offline(*args, **kwargs):
        attempts.append(args)
        raise urllib.error.URLError('network disabled by test')
    monkeypatch.setattr(torch.hub, 'download_url_to_file', offline)
    monkeypatch.setattr(urllib.request, 'urlopen', offline)
    monkeypatch.setattr(socket.socket, 'connect', offline)
    monkeypatch.setattr(socket, 'create_connection', offline)
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    try:
        from huggingface_hub import constants
        monkeypatch.setattr(constants, 'HF_HUB_OFFLINE', True)  # read at import time, so patch it too
    except ImportError:
        pass
    return attempts


def test_vgg_pretrained_offline_error(tmp_path, monkeypatch):
    _block_network(monkeypatch)
    monkeypatch.setattr(losses, '_BACKBONES', {})
    old_hub = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / 'hub'))
    try:
        with pytest.raises(losses.WeightsUnavailable) as info:
            losses.VGGPerceptual(pretrained=True)
    finally:
        torch.hub.set_dir(old_hub)
    msg = str(info.value)
    assert '\n' not in msg
    assert 'VGG16' in msg and 'IMAGENET1K_V1' in msg
    assert str(tmp_path / 'hub' / 'checkpoints' / 'vgg16-397923af.pth') in msg
    assert 'download.pytorch.org' in msg
    assert 'w_vgg=0' in msg
    assert losses._BACKBONES == {}  # never a silent fallback to random weights


# -----------------------------------------------------------------------------
# CLIP embedding loss

TINY_CLIP = 'g3dr-test-tiny-clip'


@pytest.fixture(scope='module')
def tiny_clip(tmp_path_factory):
    """A tiny open_clip ViT registered as a model config, so the loss goes through open_clip's real
    create_model path (random init, input size 32)."""
    import open_clip
    cfg = dict(embed_dim=16,
               vision_cfg=dict(image_size=32, layers=2, width=32, patch_size=8, head_width=16),
               text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=1, layers=1))
    path = tmp_path_factory.mktemp('open_clip_cfg') / f'{TINY_CLIP}.json'
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return losses.CLIPEmbeddingLoss(TINY_CLIP, pretrained=None)


def test_clip_zero_positive_differentiable_and_frozen(tiny_clip):
    a, b = _pair((2, 3, 48, 48), seed=7)
    _zero_positive_differentiable(tiny_clip, a, b)
    assert tiny_clip.image_size == (32, 32)
    assert all(not p.requires_grad for p in tiny_clip.model.parameters())
    assert not tiny_clip.model.training
    # the target branch gets no gradient
    p, t = a.clone().requires_grad_(True), b.clone().requires_grad_(True)
    tiny_clip(p, t).backward()
    assert p.grad.abs().sum() > 0 and t.grad is None
    assert len(tiny_clip.state_dict()) == 0 and list(tiny_clip.parameters()) == []
    assert losses.CLIPEmbeddingLoss(TINY_CLIP, pretrained=None).model is tiny_clip.model  # loaded once


def test_clip_preprocessing(tiny_clip):
    import open_clip
    a, b = _pair((2, 3, 48, 48), seed=8)
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)

    def embed(x):  # [0, 1] -> bilinear to 32 -> CLIP normalisation -> encode_image
        x = F.interpolate(x, size=(32, 32), mode='bilinear', align_corners=False)
        return tiny_clip.model.encode_image((x - mean) / std)

    with torch.no_grad():
        ref = (embed(a) - embed(b)).abs().mean()
        assert tiny_clip(a, b).item() == pytest.approx(ref.item(), rel=1e-5)
        # a wrong input range gives a different value (the mapping matters)
        wrong = (embed(_released(a)) - embed(b)).abs().mean()
        assert tiny_clip(a, b).item() != pytest.approx(wrong.item(), rel=1e-3)
    with pytest.raises(ValueError, match=r'\(2, 4, 48, 48\)'):
        tiny_clip(torch.zeros(2, 4, 48, 48), torch.zeros(2, 4, 48, 48))


def test_clip_openai_tag_asks_for_quick_gelu(tiny_clip, monkeypatch):
    # the OpenAI ViT-B/16 was trained with QuickGELU; the plain 'ViT-B-16' config says GELU
    import open_clip
    calls, tiny = [], tiny_clip.model

    def fake_create_model(name, **kwargs):
        calls.append((name, kwargs))
        return tiny

    monkeypatch.setattr(open_clip, 'create_model', fake_create_model)
    monkeypatch.setattr(losses, '_BACKBONES', {})
    losses.CLIPEmbeddingLoss('ViT-B-16', 'openai')
    assert calls[0][0] == 'ViT-B-16' and calls[0][1]['pretrained'] == 'openai'
    assert calls[0][1]['force_quick_gelu'] is True


def test_clip_pretrained_offline_error(tmp_path, monkeypatch):
    _block_network(monkeypatch)
    monkeypatch.setattr(losses, '_BACKBONES', {})
    cache = tmp_path / 'clip_cache'
    with pytest.raises(losses.WeightsUnavailable) as info:
        losses.CLIPEmbeddingLoss('ViT-B-16', 'openai', cache_dir=str(cache))
    msg = str(info.value)
    assert '\n' not in msg
    assert "'ViT-B-16'" in msg and "'openai'" in msg
    assert 'timm/vit_base_patch16_clip_224.openai' in msg
    assert str(cache) in msg
    assert 'w_clip=0' in msg and 'clip_pretrained' in msg and 'clip_model' in msg
    assert losses._BACKBONES == {}


def test_clip_bad_names():
    with pytest.raises(ValueError, match="'no-such-model'.*clip_model"):
        losses.CLIPEmbeddingLoss('no-such-model', 'openai')
    with pytest.raises(ValueError, match="'no-such-tag'.*clip_pretrained"):
        losses.CLIPEmbeddingLoss('ViT-B-16', 'no-such-tag')


def test_clip_weights_from_a_local_file(tiny_clip, tmp_path, monkeypatch):
    """clip_pretrained may be a weights file, which open_clip loads itself; a bad file is a one-line error."""
    path = tmp_path / 'clip.pt'
    state = {k: torch.randn_like(v) for k, v in tiny_clip.model.state_dict().items()}
    torch.save(state, path)
    monkeypatch.setattr(losses, '_BACKBONES', dict(losses._BACKBONES))
    loaded = losses.CLIPEmbeddingLoss(TINY_CLIP, pretrained=str(path))
    assert all(torch.equal(v, state[k]) for k, v in loaded.model.state_dict().items())
    (tmp_path / 'junk.pt').write_bytes(b'not a checkpoint')
    with pytest.raises(ValueError, match=r'junk\.pt') as info:
        losses.CLIPEmbeddingLoss(TINY_CLIP, pretrained=str(tmp_path / 'junk.pt'))
    assert '\n' not in str(info.value)


def test_cache_only_loading_fails_at_once_without_trying_the_network(tmp_path, monkeypatch):
    """download=False (what synthetic training runs use): no network attempt, an immediate clear error."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf'))
    attempts = _block_network(monkeypatch)
    for key in [k for k in losses._BACKBONES if k[0] in ('vgg16_lpips', 'open_clip') and k[-1] in (True, 'openai')]:
        monkeypatch.delitem(losses._BACKBONES, key)
    with pytest.raises(losses.WeightsUnavailable, match='vgg16-397923af.pth'):
        losses.VGGPerceptual(pretrained=True, download=False)
    with pytest.raises(losses.WeightsUnavailable, match="ViT-B-16"):
        losses.CLIPEmbeddingLoss('ViT-B-16', pretrained='openai', download=False)
    assert attempts == []  # cache only: not even one connection was tried


# -----------------------------------------------------------------------------
# load_perceptual: the backbones a caller names

def test_load_perceptual_loads_exactly_the_names_given(vgg, tiny_clip, monkeypatch):
    monkeypatch.setitem(losses._BACKBONES, ('vgg16_lpips', True), vgg.backbone)  # as if cached: no download
    monkeypatch.setitem(losses._BACKBONES, ('open_clip', TINY_CLIP, 'tiny-tag'), tiny_clip.model)
    assert losses.load_perceptual([], 'cpu') == {}
    got = losses.load_perceptual(['vgg'], 'cpu', lpips_weights='uniform')
    assert list(got) == ['vgg'] and got['vgg'].backbone is vgg.backbone
    assert got['vgg'].channel_weight0.sum() == 64  # lpips_weights reached the module
    got = losses.load_perceptual(['clip', 'vgg'], 'cpu', clip_model=TINY_CLIP, clip_pretrained='tiny-tag')
    assert list(got) == ['clip', 'vgg'] and got['clip'].model is tiny_clip.model
    assert got['vgg'].channel_weight0.sum() != 64  # the default: LPIPS' learned weights
    with pytest.raises(ValueError, match=r"\['lpips'\].*'vgg', 'clip'"):
        losses.load_perceptual(['lpips'], 'cpu')


def test_load_perceptual_raises_when_weights_are_missing(tmp_path, monkeypatch):
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    monkeypatch.setenv('HF_HUB_CACHE', str(tmp_path / 'hf'))
    attempts = _block_network(monkeypatch)
    monkeypatch.setattr(losses, '_BACKBONES', {})
    for name, facts in (('vgg', ('vgg16-397923af.pth', 'w_vgg=0')), ('clip', ("'ViT-B-16'", 'w_clip=0'))):
        with pytest.raises(losses.WeightsUnavailable) as info:
            losses.load_perceptual([name], 'cpu', download=False)
        assert '\n' not in str(info.value) and all(f in str(info.value) for f in facts), str(info.value)
    assert attempts == [] and losses._BACKBONES == {}  # cache only: no connection tried, nothing half-loaded
