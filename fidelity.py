"""
FID, IS and KID through torch-fidelity (evaluate.py --fid is its user): where the Inception weights come
from, the set of real images and its feature cache, and one call that scores a set of generated images.

    weights = inception_weights()                             # torch-fidelity's cache, or a file you pass
    reference, cache_name, n = reference_set('imagenet/val', 128)
    scores = score(images_uint8, reference, cache_name, default_cache_root(), weights=weights)
    # -> dict(fid, is_mean, is_std, kid_mean, kid_std)

Why torch-fidelity: published FIDs and ISs use the TF-Inception graph; torch-fidelity ships a port of it with
its own weights file (and FID, IS, KID, precision/recall over it), so the numbers are comparable with the
field's, and no Inception network is built in this project. Its feature extractors are pluggable
(torch_fidelity.register_feature_extractor), which is how the tests check the plumbing without the weights.
"""
import hashlib
import os

import torch

import checkpoint
from configurator import one_line

INCEPTION = 'inception-v3-compat'  # torch-fidelity's port of the TF-Inception graph behind published FIDs / ISs


def inception_weights(path='', download=True, trust=False):
    """The file of torch-fidelity's Inception weights: `path` when given, else the copy in torch-fidelity's
    own cache (torch.hub's checkpoints folder, where its first use downloads it), fetched there when
    missing and `download`. Missing: a one-line FileNotFoundError naming the file and where it was looked for."""
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
    name = URL_INCEPTION_V3.rsplit('/', 1)[-1]                      # weights-inception-2015-12-05-6726825d.pth
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--inception_weights {path}: no such file (expected torch-fidelity's {name})")
        checkpoint.load(path, trust=trust)  # torch-fidelity unpickles it fully: first make sure it is tensors only
        return path
    folder = os.path.join(torch.hub.get_dir(), 'checkpoints')
    cached, why = os.path.join(folder, name), 'download not allowed'
    if not os.path.isfile(cached) and download:
        try:
            os.makedirs(folder, exist_ok=True)
            torch.hub.download_url_to_file(URL_INCEPTION_V3, cached)
        except Exception as e:  # offline: a refused connection, no DNS, ...
            why = f"download failed: {one_line(e)}"
    if not os.path.isfile(cached):
        raise FileNotFoundError(f"Inception weights {name} not found in {folder} (torch-fidelity's cache; {why}): "
                                f"put {URL_INCEPTION_V3} there or pass --inception_weights PATH")
    return cached


def default_cache_root():
    """torch-fidelity's default cache of features and statistics: fidelity_cache beside torch.hub's folder."""
    return os.path.join(os.path.dirname(torch.hub.get_dir()), 'fidelity_cache')


class _Images(torch.utils.data.Dataset):
    """uint8 images (N, 3, S, S) as torch-fidelity reads a data set: one (3, S, S) tensor per item."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index]


def reference_set(folder, side, cache_name=''):
    """(torch-fidelity data set of the real images under `folder`, or None, cache name, number of images).
    Every image below the folder (data.list_images: depth maps left out) is resized on its shorter side to
    `side` and centre-cropped, torch-fidelity's samples_resize_and_crop. Its features are cached by
    torch-fidelity under `cache_name` (default: made from the folder, its size and `side`); folder ''
    reads that cache alone."""
    if not folder:
        if not cache_name:
            raise ValueError("the real images are missing: pass a folder (--real DIR) or the name of their "
                             "cached features (--real_cache NAME)")
        return None, cache_name, None
    import data  # here: only a reference folder needs it
    import torchvision.transforms as T
    from torch_fidelity.datasets import ImagesPathDataset, TransformPILtoRGBTensor
    paths = data.list_images(folder)
    if not cache_name:
        cache_name = f"real-{hashlib.sha1(os.path.abspath(folder).encode()).hexdigest()[:10]}-{len(paths)}x{side}"
    transform = T.Compose([T.Resize(side), T.CenterCrop(side), TransformPILtoRGBTensor()])
    return ImagesPathDataset(paths, transform), cache_name, len(paths)


def _check_cache(cache_name, cache_root, feature_extractor):
    """Without a reference folder its cached features must be there: a one-line error naming them otherwise."""
    from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY
    extractor = FEATURE_EXTRACTORS_REGISTRY[feature_extractor]
    layers = sorted({extractor.get_default_feature_layer_for_metric(m) for m in ('isc', 'fid', 'kid')})
    # the names torch-fidelity gives its cached features (utils.extract_featuresdict_from_input_id_cached)
    files = [os.path.join(cache_root, f"{cache_name}-{feature_extractor}-features-{layer}.pt") for layer in layers]
    missing = [f for f in files if not os.path.isfile(f)]
    if missing:
        raise FileNotFoundError(f"no cached reference features {', '.join(missing)}: pass --real DIR "
                                f"(with --real_cache {cache_name}) once to make them")


def score(images, reference, cache_name, cache_root, feature_extractor=INCEPTION, weights=None, device='cpu',
          is_splits=10, kid_subset_size=1000, save_cpu_ram=False, progress=False):
    """FID, IS and KID of `images` (N, 3, S, S) uint8 against `reference` (a data set of real uint8 images,
    or None: its features cached under `cache_name`), computed by torch-fidelity's calculate_metrics with
    `feature_extractor` (any it has registered). IS and KID std are over splits / subsets. progress:
    torch-fidelity's own bars and messages (on stderr), e.g. over a large reference folder."""
    import torch_fidelity
    if reference is None:
        _check_cache(cache_name, cache_root, feature_extractor)
    n_ref = len(images) if reference is None else len(reference)
    m = torch_fidelity.calculate_metrics(
        input1=_Images(images), input2=cache_name if reference is None else reference, input2_cache_name=cache_name,
        cache_root=cache_root, fid=True, isc=True, kid=True, feature_extractor=feature_extractor,
        feature_extractor_weights_path=weights, cuda=str(device).startswith('cuda'),
        isc_splits=min(is_splits, len(images)), kid_subset_size=min(kid_subset_size, len(images), n_ref),
        save_cpu_ram=save_cpu_ram, verbose=progress)
    return dict(fid=m[torch_fidelity.KEY_METRIC_FID], is_mean=m[torch_fidelity.KEY_METRIC_ISC_MEAN],
                is_std=m[torch_fidelity.KEY_METRIC_ISC_STD], kid_mean=m[torch_fidelity.KEY_METRIC_KID_MEAN],
                kid_std=m[torch_fidelity.KEY_METRIC_KID_STD])
