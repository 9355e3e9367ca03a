"""What samples score: the preset's Frechet distance and the sliced Wasserstein distance against the
held-out split, under keys that say the metric, the sampler and the sample count, e.g.
`fd_digits_2step_n2000` or `sw_1step_n4000`. On data whose flow map is known (the Gaussian
mixture) also the distance from the exact map's samples at the same noise (`flowmap_err_2step_n4000`)
and the modes reached (`mode_coverage_*`, `mode_precision_*`).

The Frechet distance is `fd_raw` on raw coordinates (2-D points), or torch-fidelity's FID in the
features of the classifier the `features` stage trained (`fd_<dataset>`) or of Inception
(`fid_inception`), against held-out statistics that stage cached.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import numpy as np

from . import metrics
from .config import EXACT_DATASETS, Params
from .layout import CLASSIFIER, EXACT_SAMPLES, REFERENCE_CACHE

REFERENCE_NAME = "heldout"  # the held-out statistics' name in torch-fidelity's cache
# the last reference's sorted projections, per process: a study worker scores every trial against the
# same held-out split, and sorting its projections took 0.1 s of each toy trial
_SLICED: dict[tuple, metrics.SlicedWasserstein] = {}


def feature_weights(params) -> Path:
    """The feature network's weights: the classifier the features stage trained, or Inception's local file."""
    return CLASSIFIER if params.features == "classifier" else Path(params.evaluate.inception_weights)


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
    two_step: str = "renoise"  # how the 2-step samples were drawn (sampling.two_step): sets their exact target
    _exact: dict = field(default_factory=dict, repr=False)  # sample count -> the exact map's samples

    @cached_property
    def reference_uint8(self):
        """The held-out images as torch-fidelity reads them: converted once, not at every in-loop point."""
        from . import fidelity
        return fidelity.to_uint8(_tensor(self.reference))

    @cached_property
    def sliced_wasserstein(self) -> metrics.SlicedWasserstein:
        ev = self.params.evaluate
        reference = np.ascontiguousarray(self.reference)
        key = (hashlib.sha256(reference).hexdigest(), reference.shape, str(reference.dtype), ev.sw_projections, ev.seed)
        if key not in _SLICED:
            _SLICED.clear()
            _SLICED[key] = metrics.SlicedWasserstein(reference, ev.sw_projections, ev.seed)
        return _SLICED[key]

    @cached_property
    def mixture(self):
        """The data's Gaussian mixture where its flow map is known, else None."""
        if self.params.data.dataset not in EXACT_DATASETS:
            return None
        from .gmm import GaussianMixture
        return GaussianMixture.from_config(self.params.data.gmm)

    def exact(self, n: int) -> dict[str, np.ndarray]:
        """What the samplers would give with no error, from the noise they draw at evaluate.seed
        (`paths.noise`): the exact map's 1-step jump (also the teacher ODE's target, from the same
        starting noise) and its re-noised 2-step sample (re-noised with the same noise at sampling.t_mid).
        The features stage saves them (a float64 ODE solve takes seconds); others read that file."""
        if n not in self._exact:
            what = self._exact_key(n)
            path = EXACT_SAMPLES / f"n{n}.npz"
            if path.exists():
                with np.load(path, allow_pickle=False) as saved:
                    if str(saved["key"]) == what:
                        self._exact[n] = {name: saved[name] for name in ("1step", "2step", "ode")}
                        return self._exact[n]
            from .paths import PATHS, noise
            eps, eps_mid = noise(n, (self.mixture.dim,), self.params.evaluate.seed)
            one = self.mixture.flow_map(eps, 1.0, 0.0)
            t_mid = self.params.sampling.t_mid
            two = self.mixture.flow_map(PATHS["linear"]().sample(one, eps_mid.double(), t_mid), t_mid, 0.0)
            self._exact[n] = {"1step": one.numpy(), "2step": two.numpy(), "ode": one.numpy()}
        return self._exact[n]

    def _exact_key(self, n: int) -> str:
        """What the exact samples depend on, stored beside them (a file from other settings is not used)."""
        return json.dumps({"gmm": self.params.data.gmm.model_dump(), "seed": self.params.evaluate.seed, "n": n,
                           "t_mid": self.params.sampling.t_mid}, sort_keys=True)

    def save_exact(self, n: int) -> None:
        EXACT_SAMPLES.mkdir(parents=True, exist_ok=True)
        np.savez(EXACT_SAMPLES / f"n{n}.npz", key=np.array(self._exact_key(n)), **self.exact(n))

    def exact_scores(self, name: str, x: np.ndarray) -> dict[str, float]:
        """flowmap_err (where `name` is a sampler whose noise is known) and mode coverage/precision."""
        from . import gmm
        out = {key(f"{m}_{name}", len(x)): v for m, v in gmm.mode_scores(self.mixture, x).items()}
        exact = self.exact(len(x))
        # the exact map composes: a chain's 2-step sample has the 1-step jump as its target
        target = exact["1step"] if name == "2step" and self.two_step == "chain" else exact.get(name)
        if target is not None:
            out[key(f"flowmap_err_{name}", len(x))] = gmm.flowmap_err(x, target)
        return out

    def frechet(self, x: np.ndarray) -> float:
        features = self.params.features
        if features == "raw":
            return metrics.fd_raw(x, self.reference)
        from . import fidelity  # torch-fidelity only where images are scored
        weights = feature_weights(self.params)
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
            if self.mixture is not None:
                out.update(self.exact_scores(name, x))
        return out


def _tensor(x: np.ndarray):
    import torch
    return torch.as_tensor(x)
