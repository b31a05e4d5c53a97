"""
G3DR training losses (weights and schedule: train.term_weights): pixel reconstruction, depth, TV on depth, the opacity term,
an LPIPS-form VGG16 perceptual loss and the CLIP embedding loss.

Every image input is RGB in [0, 1] (what G3DR.render returns and the datasets give). The released code
measured its losses on [-1, 1] images; each loss here returns that same value (recon_loss by its factor,
VGGPerceptual through LPIPS' input scaling rewritten for [0, 1]). Depth is in scene units.

The two network losses use frozen pretrained backbones (VGG16 from torchvision, CLIP from open_clip).
Keep these losses OUTSIDE the model (do not assign them as attributes of G3DR): the model's
optimizer and checkpoints must only see the model. As a second line of defence the loss modules own
no parameters and no state_dict entries at all: each backbone lives in the module-level cache
`_BACKBONES` (loaded once per process, shared by every instance) and is moved to the input's device
on first use, so a loss attached to the model by mistake adds nothing to `model.parameters()` or
`model.state_dict()`.
"""
import contextlib
import logging
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from configurator import one_line

# frozen backbones, keyed by what identifies their weights; see _frozen()
_BACKBONES = {}


class WeightsUnavailable(RuntimeError):
    """Pretrained backbone weights were asked for but cannot be had (offline, empty cache)."""


def _frozen(module):
    # backbones are fixed feature extractors: eval mode (no dropout), no parameter gradients;
    # gradients still flow through them to the inputs
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _on_device(module, device):
    # move a cached backbone (in place, so the cache follows) to where the inputs are
    p = next(module.parameters())
    if p.device != device:
        module.to(device)
    return module


def _check_pair(pred, target, name):
    if pred.shape != target.shape:
        raise ValueError(f"{name}: pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")


def _check_images(pred, target, name):
    _check_pair(pred, target, name)
    if pred.dim() != 4 or pred.shape[1] != 3:
        raise ValueError(f"{name}: expected images (B, 3, H, W) in [0, 1], got {tuple(pred.shape)}")


# -----------------------------------------------------------------------------
# pixel losses

def recon_loss(pred, target, kind='l1'):
    """RGB reconstruction of the canonical view, weight 1 in the released recipe. pred, target in [0, 1].
    kind='l1': mean absolute error, as the released code trains.
    kind='l2': the paper's squared error (Sec. 3, written there as a total squared error). We take
    the mean rather than the sum so that the loss weights do not depend on the image size.

    The value is the released one, which is measured on images in [-1, 1]: a difference there is twice
    the difference in [0, 1], so the mean absolute error is 2x and the mean squared error 4x ours."""
    _check_pair(pred, target, 'recon_loss')
    if kind == 'l1':
        return 2 * (pred - target).abs().mean()
    if kind == 'l2':
        return 4 * (pred - target).pow(2).mean()
    raise ValueError(f"recon_loss: kind must be 'l1' or 'l2', got {kind!r}")


def depth_loss(pred, target):
    """L1 between rendered depth and ground-truth depth (scene units), weight 2 on canonical steps."""
    _check_pair(pred, target, 'depth_loss')
    return (pred - target).abs().mean()


def tv_loss(depth):
    """Total variation prior on the novel-view depth, weight 0.1 as released:
    mean of squared horizontal differences + mean of squared vertical differences."""
    if depth.dim() != 4:
        raise ValueError(f"tv_loss: expected depth (B, 1, H, W), got {tuple(depth.shape)}")
    d = depth  # (B, 1, H, W)
    dx = d[:, :, :, :-1] - d[:, :, :, 1:]  # (B, 1, H, W-1) neighbours along a row
    dy = d[:, :, :-1] - d[:, :, 1:]  # (B, 1, H-1, W) neighbours along a column
    return dx.pow(2).mean() + dy.pow(2).mean()


def opacity_loss(opacity):
    """mean(1 - opacity): pushes every ray to end on a surface; its weight rises linearly from 0 to 1
    over the first part of training (train.py's opacity_ramp: half as released, a tenth in the synthetic recipe)."""
    return (1 - opacity).mean()


# -----------------------------------------------------------------------------
# VGG16 perceptual loss in the LPIPS form

# LPIPS input scaling ("ScalingLayer", LPIPS v0.1): (x - shift) / scale on images x in [-1, 1] is the
# ImageNet normalisation VGG16 was trained with, ((x + 1) / 2 - (0.485, 0.456, 0.406)) / (0.229, 0.224, 0.225),
# to the three decimals LPIPS keeps.
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
# The same layer for images y = (x + 1) / 2 in [0, 1]: (x - shift) / scale = (y - (1 + shift) / 2) / (scale / 2),
# so VGG sees exactly what LPIPS feeds it.
SHIFT_01 = tuple((1 + s) / 2 for s in LPIPS_SHIFT)
SCALE_01 = tuple(s / 2 for s in LPIPS_SCALE)
LPIPS_EPS = 1e-10  # added to the channel norm before dividing, as LPIPS does
# torchvision vgg16().features index ranges ending at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
VGG_SLICES = ((0, 4), (4, 9), (9, 16), (16, 23), (23, 30))
VGG_CHANNELS = (64, 128, 256, 512, 512)


def _vgg16_weights_help():
    from torchvision.models import VGG16_Weights
    url = VGG16_Weights.IMAGENET1K_V1.url
    path = os.path.join(torch.hub.get_dir(), 'checkpoints', os.path.basename(url))
    return url, path


def _load_vgg16_features(pretrained, download=True):
    """The five LPIPS slices of torchvision's VGG16 as a ModuleList (frozen, eval, on the CPU).
    download=False: use the cached weights only, fail at once when they are not there."""
    from torchvision.models import vgg16, VGG16_Weights
    from torchvision.models.vgg import make_layers, cfgs
    if pretrained:
        try:
            if not download and not os.path.isfile(_vgg16_weights_help()[1]):
                raise FileNotFoundError("not in the cache, and downloading was not asked for")
            # torchvision's own download + cache (torch.hub.get_dir()/checkpoints)
            features = vgg16(weights=VGG16_Weights.IMAGENET1K_V1).features
        except Exception as e:
            url, path = _vgg16_weights_help()
            raise WeightsUnavailable(
                f"VGGPerceptual: cannot load the torchvision VGG16 ImageNet weights (IMAGENET1K_V1): "
                f"looked for {path} (fetched from {url} when missing), failed with {type(e).__name__}: {one_line(e)}; "
                f"put that file at {path} (download it where there is network access; TORCH_HOME moves "
                f"the cache), or set the train config key w_vgg=0 to turn the VGG perceptual term off"
            ) from e
    else:
        # random init, for tests of the plumbing only, never for training. Only the convolutional part
        # of VGG16 (configuration 'D', as vgg16() builds it): the 124M-parameter classifier we drop
        # anyway takes seconds to initialise. Convs initialised as torchvision's VGG does.
        features = make_layers(cfgs['D'])
        for m in features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode='fan_out', nonlinearity='relu')
                nn.init.zeros_(m.bias)
    return _frozen(nn.ModuleList([features[a:b] for a, b in VGG_SLICES]))


def _normalize_channels(f):
    # LPIPS normalize_tensor: unit length over channels, eps added to the norm. f: (B, C, H, W)
    return f / (torch.sqrt(f.pow(2).sum(dim=1, keepdim=True)) + LPIPS_EPS)


def _lpips_package_weights():
    """Path of LPIPS' learned VGG channel weights as the lpips package ships them (no download needed)."""
    import importlib.util
    spec = importlib.util.find_spec('lpips')
    if spec is None or spec.origin is None:
        raise WeightsUnavailable("VGGPerceptual: LPIPS' channel weights come from the lpips package, which is not "
                                 "installed: pip install lpips (see requirements.txt), or pass channel_weights='uniform' "
                                 "(train config key lpips_weights=uniform)")
    return os.path.join(os.path.dirname(spec.origin), 'weights', 'v0.1', 'vgg.pth')


def _load_calibration(path):
    """Per-channel LPIPS calibration weights from a file in the lpips package layout ('vgg.pth':
    lin{k}.model.1.weight of shape (1, C_k, 1, 1), k = 0..4) -> list of five (C_k,) tensors."""
    try:
        state = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:
        raise ValueError(f"VGGPerceptual: cannot read LPIPS calibration file {path} ({type(e).__name__}: {one_line(e)})") from e
    if not isinstance(state, dict):
        raise ValueError(f"VGGPerceptual: LPIPS calibration file {path} holds a {type(state).__name__}, not a state dict")
    weights = []
    for k, c in enumerate(VGG_CHANNELS):
        key = f'lin{k}.model.1.weight'
        if key not in state:
            raise ValueError(f"VGGPerceptual: LPIPS calibration file {path} lacks key {key}")
        w = state[key]
        if tuple(w.shape) != (1, c, 1, 1):
            raise ValueError(f"VGGPerceptual: {key} in {path} has shape {tuple(w.shape)}, expected {(1, c, 1, 1)}")
        weights.append(w.detach().float().reshape(c))
    return weights


class VGGPerceptual(nn.Module):
    """LPIPS-form perceptual distance with a frozen torchvision VGG16.

    Per level l (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 = levels 0..4):
        d_l = mean_{h,w} sum_c w_{l,c} (f̂_l(pred) - f̂_l(target))^2,  f̂ = channel-unit-normalised features
    and the loss is sum over the chosen levels of weight_l * d_l, averaged over the batch. The released
    recipe uses all five levels on canonical steps and the last two (levels=(3, 4)) on novel steps.

    Channel weights w_{l,c} (channel_weights=):
    * 'lpips' (default): LPIPS' learned non-negative per-channel weights (the "lin" layers, averaging
      0.108 / 0.069 / 0.068 / 0.101 / 0.092 over the five levels), read from the installed lpips package
      (lpips/weights/v0.1/vgg.pth). With these the value equals lpips.LPIPS(net='vgg') on the same backbone
      and the same images in [-1, 1], as the release trains.
    * 'uniform': w_{l,c} = 1, the sum over channels, LPIPS's own uncalibrated mode (lpips=False). With
      unit channel vectors each level's d_l then lies in [0, 4] whatever its width (64..512), so the
      levels count alike, about 10x the calibrated value.
    * a path: a file in the lpips 'vgg.pth' layout.
    Where this differs from the released LPIPS (lpips package, net='vgg', version 0.1):
    * No dropout in front of the channel weights (the release only has it for training the
      calibration; it is inactive in eval mode anyway).
    * Levels can be selected and weighted; the release sums all five with weight 1.

    pretrained=True loads torchvision's IMAGENET1K_V1 VGG16 (its own download/cache; download=False:
    the cache only) and raises a clear error when it cannot be had; pretrained=False gives a
    random-init backbone for tests only.
    """

    def __init__(self, pretrained=True, channel_weights='lpips', download=True):
        super().__init__()
        self.pretrained = bool(pretrained)
        if channel_weights == 'uniform':
            channel_weights = [torch.ones(c) for c in VGG_CHANNELS]
        else:
            channel_weights = _load_calibration(_lpips_package_weights() if channel_weights == 'lpips'
                                                else channel_weights)
        self._key = ('vgg16_lpips', self.pretrained)
        if self._key not in _BACKBONES:
            _BACKBONES[self._key] = _load_vgg16_features(self.pretrained, download)
        # non-persistent buffers: they follow .to() but never reach a state_dict / checkpoint
        for l, w in enumerate(channel_weights):
            self.register_buffer(f'channel_weight{l}', w, persistent=False)  # (C_l,)
        self.register_buffer('shift', torch.tensor(SHIFT_01).view(1, 3, 1, 1), persistent=False)  # for [0, 1]
        self.register_buffer('scale', torch.tensor(SCALE_01).view(1, 3, 1, 1), persistent=False)

    @property
    def backbone(self):
        return _BACKBONES[self._key]

    def level_distances(self, pred, target, n_levels=5):
        """d_l for l < n_levels, each (B,). Runs the backbone only as deep as needed."""
        _check_images(pred, target, 'VGGPerceptual')
        B = pred.shape[0]
        slices = _on_device(self.backbone, pred.device)
        x = torch.cat([pred, target]).float()  # (2B, 3, H, W): one backbone pass for both
        x = (x - self.shift.to(x.device)) / self.scale.to(x.device)
        out = []
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 even inside a bf16 step
            for l in range(n_levels):
                x = slices[l](x)  # (2B, C_l, H_l, W_l)
                f = _normalize_channels(x)
                diff = (f[:B] - f[B:]).pow(2)  # (B, C_l, H_l, W_l)
                w = getattr(self, f'channel_weight{l}').to(diff.device).view(1, -1, 1, 1)
                out.append((diff * w).sum(dim=1).mean(dim=(1, 2)))  # (B,)
        return out

    def forward(self, pred, target, levels=(0, 1, 2, 3, 4), weights=None, reduction='mean'):
        """pred, target (B, 3, H, W) in [0, 1]. levels: which of the five levels to use (0-based).
        weights: optional per-level multipliers, a sequence of five indexed by level.
        Returns a scalar (reduction='mean') or (B,) (reduction='none')."""
        levels = tuple(levels)
        if not levels or any(l not in range(5) for l in levels) or len(set(levels)) != len(levels):
            raise ValueError(f"VGGPerceptual: levels must be distinct values in 0..4, got {levels}")
        if weights is None:
            weights = (1.0,) * 5
        if len(weights) != 5:
            raise ValueError(f"VGGPerceptual: weights must give one value per level (5), got {len(weights)}")
        dists = self.level_distances(pred, target, n_levels=max(levels) + 1)
        loss = sum(weights[l] * dists[l] for l in levels)  # (B,)
        if reduction == 'mean':
            return loss.mean()
        if reduction == 'none':
            return loss
        raise ValueError(f"VGGPerceptual: reduction must be 'mean' or 'none', got {reduction!r}")


# -----------------------------------------------------------------------------
# CLIP embedding loss

def _clip_weights_help(model_name, pretrained, cache_dir):
    """(where the weights come from, where open_clip looks for them) for the error message."""
    import open_clip
    tag = open_clip.get_pretrained_cfg(model_name, pretrained)
    try:
        from huggingface_hub import constants
        hf_cache = constants.HF_HUB_CACHE
    except ImportError:
        hf_cache = None
    if tag.get('hf_hub') and hf_cache is not None:
        # open_clip prefers the Hugging Face Hub when huggingface_hub is installed
        source = f"Hugging Face Hub repo {tag['hf_hub'].rstrip('/')}"
        where = cache_dir or hf_cache
    else:
        source = tag.get('url', '?')
        where = cache_dir or os.path.expanduser('~/.cache/clip')
    return source, where


def _load_clip(model_name, pretrained, cache_dir, download=True):
    """An open_clip model (frozen, eval, on the CPU). pretrained: an open_clip tag ('openai'), a local
    checkpoint file, or None for random init (tests only)."""
    import open_clip
    if open_clip.get_model_config(model_name) is None:
        raise ValueError(f"CLIPEmbeddingLoss: unknown open_clip model {model_name!r} (config key clip_model)")
    if pretrained is None:
        return _frozen(open_clip.create_model(model_name, pretrained=None))
    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained)
    if not tag_cfg and not os.path.isfile(pretrained):
        raise ValueError(
            f"CLIPEmbeddingLoss: {pretrained!r} is neither an open_clip pretrained tag of {model_name} "
            f"({', '.join(open_clip.list_pretrained_tags_by_model(model_name))}) nor a file "
            f"(config key clip_pretrained)")
    try:
        # The OpenAI weights were trained with QuickGELU while the plain 'ViT-B-16' config uses GELU;
        # open_clip only warns about the mismatch, so ask for QuickGELU when the tag says so (for a
        # checkpoint file, choose e.g. 'ViT-B-16-quickgelu' as the model name instead).
        with _hub_offline(not download):
            model = open_clip.create_model(model_name, pretrained=pretrained, cache_dir=cache_dir,
                                           force_quick_gelu=bool(tag_cfg.get('quick_gelu', False)))
    except Exception as e:
        if not tag_cfg:
            raise ValueError(f"CLIPEmbeddingLoss: cannot load the weights file {pretrained} into open_clip model "
                             f"{model_name!r} ({one_line(e)}) (config keys clip_pretrained, clip_model)") from e
        source, where = _clip_weights_help(model_name, pretrained, cache_dir)
        raise WeightsUnavailable(
            f"CLIPEmbeddingLoss: cannot load open_clip weights for model {model_name!r} with pretrained "
            f"{pretrained!r} ({source}), looked for in {where}, failed with {type(e).__name__}: {one_line(e)}; "
            f"fill that cache (run once with network access, or copy it there; HF_HOME/HF_HUB_CACHE move it), "
            f"or set the train config key clip_pretrained to a local checkpoint file (clip_model picks the "
            f"model), or set w_clip=0 to turn the CLIP term off"
        ) from e
    return _frozen(model)


@contextlib.contextmanager
def _hub_offline(offline):
    """Hugging Face Hub in offline mode: cached files load, missing ones fail at once instead of
    after the hub's network retries (tens of seconds where there is no network)."""
    try:
        from huggingface_hub import constants
    except ImportError:
        yield
        return
    before = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = before or offline
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = before


class CLIPEmbeddingLoss(nn.Module):
    """Mean L1 distance between the CLIP image embeddings of the render and of the ground truth
    (ViT-B/16 with OpenAI weights in the released recipe: weight 0.175 on canonical
    steps in the second half of training, 0.35 on novel steps).

    pred, target (B, 3, H, W) in [0, 1] -> bilinear resize to the model's input size (224
    for ViT-B-16) -> CLIP mean/std -> encode_image (unnormalised embedding). The target's embedding
    is computed without gradient; gradients flow to pred.

    pretrained=None builds a random-init model (tests only); model_name may be any open_clip config,
    including one registered with open_clip.add_model_config (the tests use a tiny one). cache_dir is
    handed to open_clip (None: its defaults, the Hugging Face Hub cache for the OpenAI weights).
    download=False uses cached weights only and fails at once when they are not there.
    """

    def __init__(self, model_name='ViT-B-16', pretrained='openai', cache_dir=None, download=True):
        super().__init__()
        import open_clip
        self.model_name, self.pretrained = model_name, pretrained
        self._key = ('open_clip', model_name, pretrained)
        if self._key not in _BACKBONES:
            _BACKBONES[self._key] = _load_clip(model_name, pretrained, cache_dir, download)
        pp = open_clip.get_model_preprocess_cfg(self.model)
        size = pp.get('size', 224)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        # CLIP normalisation (OPENAI_DATASET_MEAN/STD for the OpenAI weights); non-persistent buffers
        self.register_buffer('mean', torch.tensor(pp.get('mean', open_clip.OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer('std', torch.tensor(pp.get('std', open_clip.OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             persistent=False)

    @property
    def model(self):
        return _BACKBONES[self._key]

    def embed(self, x):
        """x (B, 3, H, W) in [0, 1] (what CLIP's preprocessing starts from) -> CLIP image embedding (B, D)."""
        model = _on_device(self.model, x.device)
        x = F.interpolate(x.float(), size=self.image_size, mode='bilinear', align_corners=False)
        x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        with torch.autocast(device_type=x.device.type, enabled=False):  # float32 even inside a bf16 step
            return model.encode_image(x)

    def forward(self, pred, target):
        _check_images(pred, target, 'CLIPEmbeddingLoss')
        with torch.no_grad():
            e_target = self.embed(target)  # (B, D)
        e_pred = self.embed(pred)  # (B, D)
        return (e_pred - e_target).abs().mean()


# -----------------------------------------------------------------------------
# the backbones of a training run

PERCEPTUAL = ('vgg', 'clip')


def load_perceptual(names, device, *, lpips_weights='lpips', clip_model='ViT-B-16', clip_pretrained='openai',
                    download=True):
    """{name: loss module on `device`} for each of `names` in PERCEPTUAL: 'vgg' (VGGPerceptual, pretrained,
    channel weights lpips_weights) and 'clip' (CLIPEmbeddingLoss(clip_model, clip_pretrained)). Raises
    WeightsUnavailable when pretrained weights cannot be had (download=False: from the local cache only);
    what to do then is the caller's decision."""
    unknown = [n for n in names if n not in PERCEPTUAL]
    if unknown:
        raise ValueError(f"load_perceptual: unknown names {unknown}; known: {list(PERCEPTUAL)}")
    perceptual = {}
    for name in names:
        logging.disable(logging.ERROR)  # open_clip logs its failed download before raising; the error says it
        try:
            if name == 'vgg':
                module = VGGPerceptual(pretrained=True, channel_weights=lpips_weights, download=download)
            else:
                module = CLIPEmbeddingLoss(clip_model, pretrained=clip_pretrained, download=download)
        finally:
            logging.disable(logging.NOTSET)
        perceptual[name] = module.to(device)
    return perceptual
