"""Frechet distances of image features through torch-fidelity; names say which features.

`fd_digits` / `fd_fashion`: FID's formula on the penultimate features of our own classifier
(`cmt_bench.classifier`, trained on the preset's training split), registered with torch-fidelity
as the feature extractor `cmt-classifier`. `fid_inception`: torch-fidelity's `inception-v3-compat`
(the standard FID network), only from a local weights file: nothing is ever downloaded.

The held-out reference's features and statistics are computed once and cached by torch-fidelity
in `reference_cache` (a directory a DVC stage can declare as its output), under
`<reference_name>-<weights sha256[:12]>`; later calls may pass `reference_images=None`.
`torch_fidelity` is imported only here, after `_stand_in_for_torchvision`.
"""
from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from . import classifier
from .data import sha256


def _stand_in_for_torchvision() -> None:
    """torch-fidelity 0.4.0 imports torchvision when it is imported (its CIFAR/STL dataset classes,
    transforms), but no torchvision wheel loads beside torch 2.13.0+cpu, and the path used here
    (Dataset inputs, a registered extractor or its own Inception) never calls it. So, only where the
    real torchvision is absent, empty modules stand in; using anything from them raises."""
    if "torchvision" in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return

    class Unavailable:  # torch-fidelity subclasses these dataset classes at import time
        def __init__(self, *args, **kwargs):
            raise ImportError("torchvision is not installed (cmt_bench.fidelity put a placeholder in its place): "
                              "this torch-fidelity feature needs the real torchvision")

    def missing(module: str):
        def __getattr__(attr: str):
            raise AttributeError(f"{module}.{attr}: torchvision is not installed (cmt_bench.fidelity placeholder)")
        return __getattr__

    names = ("torchvision", "torchvision.datasets", "torchvision.transforms",
             "torchvision.transforms.functional", "torchvision.models")
    modules = {name: types.ModuleType(name) for name in names}
    for name, module in modules.items():
        module.__getattr__ = missing(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, None)
        parent, _, child = name.rpartition(".")
        if parent:
            setattr(modules[parent], child, module)
    for cls in ("CIFAR10", "CIFAR100", "STL10"):
        setattr(modules["torchvision.datasets"], cls, Unavailable)
    sys.modules.update(modules)


_stand_in_for_torchvision()
import torch_fidelity  # noqa: E402
from torch_fidelity.feature_extractor_base import FeatureExtractorBase  # noqa: E402
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY  # noqa: E402

CLASSIFIER = "cmt-classifier"  # our extractor's registered name
INCEPTION = "inception-v3-compat"
EXTRACTORS = {"classifier": CLASSIFIER, "inception": INCEPTION}
FEATURE = {CLASSIFIER: "penultimate", INCEPTION: "2048"}  # the layer FID / KID use
KID_SUBSET = 1000  # torch-fidelity's default subset size, lowered for smaller sets
# images per forward pass. 10k digits on 2 idle cores: ~0.2 s at any size from 64 to 10k; with the
# cores shared (load 4) 64 took 3-6 s, 1000-2000 about 1 s. Inception at 299x299 needs ~6 GB of
# activations per 1000 images, so it keeps torch-fidelity's 64.
BATCH_SIZE = {CLASSIFIER: 1000, INCEPTION: 64}


class ClassifierFeatures(FeatureExtractorBase):
    """torch-fidelity's view of our classifier: uint8 [N, C, H, W] in, ("penultimate", "logits") out."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if feature_extractor_weights_path is None:
            raise FileNotFoundError("the classifier extractor needs feature_extractor_weights_path (its .pt file)")
        self.model = classifier.load(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "penultimate", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "penultimate", "kid": "penultimate", "prc": "penultimate"}[metric]

    @staticmethod
    def can_be_compiled():
        return False  # torch.compile gave no gain on CPU and a 43 s first call

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        if x.dtype != torch.uint8 or x.ndim != 4:
            raise ValueError(f"expected uint8 images [N, C, H, W], got {x.dtype} {tuple(x.shape)}")
        features = self.model.features(x.float() / 127.5 - 1)  # as data.as_float maps the stored bytes
        out = {"penultimate": features, "logits": self.model.head(features)}
        return tuple(out[name] for name in self.features_list)


if CLASSIFIER not in FEATURE_EXTRACTORS_REGISTRY:
    torch_fidelity.register_feature_extractor(CLASSIFIER, ClassifierFeatures)


class _Images(Dataset):
    """uint8 [N, C, H, W] as torch-fidelity reads a Dataset: one C x H x W tensor per item. (Per-item
    fetch and collation cost 13 ms for 10k 8x8 images; a batched `__getitems__` was slower.)"""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i]


class _NotLoaded(Dataset):
    """Stands for the reference when its statistics are cached: torch-fidelity must not read it."""

    def __len__(self):
        return 0

    def __getitem__(self, i):
        raise RuntimeError("torch-fidelity tried to read the reference images, but the cached statistics were "
                           "to be used: the reference cache is incomplete; pass reference_images")


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1] to the uint8 bytes they would be stored as (inverse of data.as_float)."""
    if not torch.isfinite(x).all():
        raise ValueError("samples contain NaN or inf: nothing to score")
    return ((x.detach().cpu().float() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)


def _check_images(images: torch.Tensor, what: str) -> None:
    if not torch.is_tensor(images) or images.dtype != torch.uint8 or images.ndim != 4:
        raise ValueError(f"{what} must be a uint8 tensor [N, C, H, W] (see to_uint8); got "
                         f"{getattr(images, 'dtype', type(images))} {tuple(getattr(images, 'shape', ()))}")


def _weights(extractor: str, weights_path) -> Path:
    """The extractor's weights file, checked: a clear error instead of a download or a late failure."""
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; allowed: {', '.join(EXTRACTORS)}")
    path = None if weights_path is None else Path(weights_path).expanduser()
    if extractor == "inception":
        if path is None or not path.is_file():
            raise FileNotFoundError(
                f"fid_inception needs the Inception-v3 weights as a local file: set evaluate.inception_weights "
                f"(now {None if weights_path is None else str(weights_path)!r}) to torch-fidelity's "
                f"weights-inception-2015-12-05-6726825d.pth; it is never downloaded")
        # torch-fidelity loads this file with weights_only=False; loading it once with weights_only=True
        # first refuses a file that holds anything but tensors
        torch.load(path, map_location="cpu", weights_only=True)
    elif path is None or not path.is_file():
        raise FileNotFoundError(f"classifier weights {weights_path!r} not found: train the classifier first")
    return path


def reference_files(reference_cache, reference_name: str, extractor: str, weights_path) -> dict:
    """The reference's cache entry `name` (torch-fidelity's input2_cache_name: the weights' hash in
    it, since torch-fidelity keys its cache by extractor name only) and its files: `info` (ours:
    count, shape, sha256 of the images), `features` and `stats` (torch-fidelity's:
    `<name>-<extractor>-features-<layer>.pt`, `<name>-<extractor>-stat-fid-<layer>.pt`)."""
    if not reference_name or "/" in reference_name or reference_name.startswith("."):
        raise ValueError(f"reference_name {reference_name!r} must be a plain file name part")
    if extractor not in EXTRACTORS:
        raise ValueError(f"unknown extractor {extractor!r}; allowed: {', '.join(EXTRACTORS)}")
    name, fe = f"{reference_name}-{sha256(Path(weights_path).expanduser())[:12]}", EXTRACTORS[extractor]
    root, layer = Path(reference_cache), FEATURE[fe]
    return {"name": name, "info": root / f"{name}-{fe}.json",
            "features": root / f"{name}-{fe}-features-{layer}.pt", "stats": root / f"{name}-{fe}-stat-fid-{layer}.pt"}


def _describe(images: torch.Tensor) -> dict:
    return {"count": len(images), "shape": list(images.shape[1:]),
            "sha256": hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()}


def frechet_distance(samples_uint8: torch.Tensor, *, extractor: str, weights_path, reference_cache,
                     reference_name: str, reference_images: torch.Tensor | None = None, cuda: bool = False,
                     kid: bool = False, batch_size: int | None = None) -> dict[str, float]:
    """FID's formula between `samples_uint8` and the cached reference, on the features of `extractor`
    ("classifier": ours, from `weights_path`; "inception": torch-fidelity's Inception-v3 from the
    local file `weights_path`). Returns {"fd": ...} and with `kid`, {"kd": mean, "kd_std": std} (KID's
    polynomial-kernel MMD over subsets of min(1000, both set sizes)).

    The first call for a (reference_name, weights file) needs `reference_images` (uint8) and caches
    the reference's features and statistics under `reference_cache`; later calls may pass None.
    Passing images that differ from the cached ones raises instead of mixing them. `batch_size`:
    images per forward pass (None: 1000 for the classifier, torch-fidelity's 64 for Inception)."""
    _check_images(samples_uint8, "samples_uint8")
    weights = _weights(extractor, weights_path)
    files = reference_files(reference_cache, reference_name, extractor, weights)
    if reference_images is not None:
        _check_images(reference_images, "reference_images")
        info = _describe(reference_images)
        if files["info"].exists() and json.loads(files["info"].read_text()) != info:
            raise ValueError(f"{files['info']} was computed from other reference images: "
                             f"use another reference_name or delete the cache")
        files["info"].parent.mkdir(parents=True, exist_ok=True)
        files["info"].write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
        reference = reference_images
    else:
        missing = [str(files[k]) for k in ("info", "features", "stats") if not files[k].exists()]
        if missing:
            raise FileNotFoundError(f"no cached reference statistics ({', '.join(missing)} missing): "
                                    f"pass reference_images once to compute them")
        info, reference = json.loads(files["info"].read_text()), None
    if extractor == "inception":  # Inception takes RGB; it resizes to 299x299 itself
        samples_uint8 = samples_uint8.expand(-1, 3, -1, -1)
        reference = None if reference is None else reference.expand(-1, 3, -1, -1)
    subset = min(KID_SUBSET, len(samples_uint8), info["count"])
    metrics = torch_fidelity.calculate_metrics(
        input1=_Images(samples_uint8), input2=_NotLoaded() if reference is None else _Images(reference),
        input2_cache_name=files["name"], cache=True, cache_root=str(reference_cache),
        fid=True, kid=kid, kid_subset_size=subset,
        feature_extractor=EXTRACTORS[extractor], feature_extractor_weights_path=str(weights), cuda=cuda,
        batch_size=batch_size or BATCH_SIZE[EXTRACTORS[extractor]],
        save_cpu_ram=True, verbose=False)  # save_cpu_ram: no loader worker processes (2 cores)
    out = {"fd": metrics[torch_fidelity.KEY_METRIC_FID]}
    if kid:
        out.update(kd=metrics[torch_fidelity.KEY_METRIC_KID_MEAN], kd_std=metrics[torch_fidelity.KEY_METRIC_KID_STD])
    return out


def feature_function(extractor: str, weights_path, device: torch.device):
    """features(x): the FID layer's features of images x in [-1, 1] (any device), as the bytes an image
    file would hold, from torch-fidelity's extractor on `device` (fid_stream streams them)."""
    from torch_fidelity.utils import create_feature_extractor
    weights, name = _weights(extractor, weights_path), EXTRACTORS[extractor]
    net = create_feature_extractor(name, [FEATURE[name]], cuda=device.type == "cuda",
                                   feature_extractor_weights_path=str(weights), verbose=False)
    batch = BATCH_SIZE[name]

    @torch.no_grad()
    def features(x: torch.Tensor) -> torch.Tensor:
        images = to_uint8(x)
        if extractor == "inception":  # Inception takes RGB, as frechet_distance gives it
            images = images.expand(-1, 3, -1, -1)
        return torch.cat([net(images[i:i + batch].to(device))[0].cpu() for i in range(0, len(images), batch)])
    return features


def frechet_of_statistics(stats: dict, reference: dict) -> float:
    """FID's formula as torch-fidelity computes it (what frechet_distance returns), between two sets
    of statistics {"mu", "sigma"}, in float64."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric
    as64 = lambda s: {k: np.asarray(s[k], dtype=np.float64) for k in ("mu", "sigma")}  # noqa: E731
    return fid_statistics_to_metric(as64(stats), as64(reference), verbose=False)[KEY_METRIC_FID]


def reference_statistics(reference_cache, reference_name: str, extractor: str, weights_path) -> dict:
    """mu and sigma of the reference's cached features (frechet_distance cached them), as
    torch-fidelity computes its own reference statistics from them."""
    from torch_fidelity.metric_fid import fid_features_to_statistics
    files = reference_files(reference_cache, reference_name, extractor, _weights(extractor, weights_path))
    if not files["features"].exists():
        raise FileNotFoundError(f"no cached reference features ({files['features']}): the features stage caches them")
    return fid_features_to_statistics(torch.load(files["features"], map_location="cpu", weights_only=True))
