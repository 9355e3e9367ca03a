"""What samples score: the preset's Frechet distance and the sliced Wasserstein distance against the
held-out split, under keys that say the metric, the sampler and the sample count, e.g.
`fd_digits_2step_n2000` or `sw_1step_n4000`.

The Frechet distance is `fd_raw` on raw coordinates (2-D points), or torch-fidelity's FID in the
features of the classifier the `features` stage trained (`fd_<dataset>`) or of Inception
(`fid_inception`), against held-out statistics that stage cached.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

from . import metrics
from .config import Params
from .layout import CLASSIFIER, REFERENCE_CACHE

REFERENCE_NAME = "heldout"  # the held-out statistics' name in torch-fidelity's cache


def key(metric: str, n: int) -> str:
    """A metric key with its sample count: key('fd_digits_2step', 2000) = 'fd_digits_2step_n2000'."""
    return f"{metric}_n{n}"


def family(metric: str) -> str:
    """fd_digits_2step -> fd_digits."""
    return metric.rsplit("_", 1)[0]


@dataclass
class Scorer:
    params: Params
    reference: np.ndarray  # the held-out split as floats (points, or images in [-1, 1])

    @cached_property
    def reference_uint8(self):
        """The held-out images as torch-fidelity reads them: converted once, not at every in-loop point."""
        from . import fidelity
        return fidelity.to_uint8(_tensor(self.reference))

    @cached_property
    def sliced_wasserstein(self) -> metrics.SlicedWasserstein:
        ev = self.params.evaluate
        return metrics.SlicedWasserstein(self.reference, ev.sw_projections, ev.seed)

    def frechet(self, x: np.ndarray) -> float:
        features = self.params.features
        if features == "raw":
            return metrics.fd_raw(x, self.reference)
        from . import fidelity  # torch-fidelity only where images are scored
        weights = CLASSIFIER if features == "classifier" else Path(self.params.evaluate.inception_weights)
        scores = fidelity.frechet_distance(fidelity.to_uint8(_tensor(x)), extractor=features, weights_path=weights,
                                           reference_cache=REFERENCE_CACHE, reference_name=REFERENCE_NAME,
                                           reference_images=self.reference_uint8)
        return scores["fd"]

    def __call__(self, samples: dict[str, np.ndarray]) -> dict[str, float]:
        """Scores of each sampler's samples ({'1step': x, '2step': y}) under counted keys."""
        out = {}
        for name, x in samples.items():
            out[key(f"{self.params.fd_name}_{name}", len(x))] = self.frechet(x)
            out[key(f"sw_{name}", len(x))] = self.sliced_wasserstein(x)
        return out


def _tensor(x: np.ndarray):
    import torch
    return torch.as_tensor(x)
