"""The Frechet distance over as many samples as papers use (50,000), streamed and split across
processes: evaluate.fid_samples.

Samples are made in blocks of BLOCK whose noise is seeded by (evaluate.seed, block), so the sample
set is the same for any number of processes: rank r of W takes blocks r, r + W, ... Each block is
sampled (1 and 2 steps), turned into the bytes an image file would hold, and its features are
added to running moments (count, sum, sum of outer products, in float64, about the reference's
mean so nothing cancels); no image and no feature outlives its block. One all_reduce adds the
ranks' moments, and torch-fidelity's own formula compares the result with the reference
statistics the features stage cached (of the split evaluate.fid_reference names): score()."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from . import data as datasets
from . import metrics, sampling
from .distributed import World
from .layout import REFERENCE_CACHE, out_dir
from .paths import noise
from .scoring import feature_weights, key
from .train import derive_seed

if TYPE_CHECKING:
    from .config import Params

BLOCK = 1000  # samples per block: the unit the sample seeds and the ranks' shares are counted in


def blocks(n: int, world: World) -> list[tuple[int, int]]:
    """(block index, size) of the blocks this rank makes: every world.size-th, from its rank."""
    return [(b, min(BLOCK, n - b * BLOCK)) for b in range(world.rank, -(-n // BLOCK), world.size)]


def block_noise(block: int, size: int, shape: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise of one block (and its 2-step re-noising draw), on the CPU: a function of (seed, block) only."""
    return noise(size, shape, derive_seed(seed, "fid_block", block))


class Moments:
    """Running count, sum and sum of outer products of feature vectors minus `shift`, in float64."""

    def __init__(self, shift: np.ndarray):
        self.shift = torch.as_tensor(shift, dtype=torch.float64)
        self.n = 0
        self.sum = torch.zeros_like(self.shift)
        self.outer = torch.zeros(len(self.shift), len(self.shift), dtype=torch.float64)

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().double().cpu() - self.shift
        self.n += len(f)
        self.sum += f.sum(0)
        self.outer += f.T @ f

    def reduced(self, world: World) -> "Moments":
        """The moments of every rank's features together (the same on every rank)."""
        if world.size > 1:
            flat = world.sum(torch.cat([torch.tensor([float(self.n)], dtype=torch.float64), self.sum,
                                        self.outer.flatten()]))
            d = len(self.shift)
            self.n, self.sum, self.outer = int(flat[0].item()), flat[1:d + 1], flat[d + 1:].reshape(d, d)
        return self

    def statistics(self) -> dict[str, np.ndarray]:
        """mu and the unbiased covariance sigma, as torch-fidelity's fid_features_to_statistics gives them."""
        centred = self.sum / self.n
        sigma = (self.outer - self.n * torch.outer(centred, centred)) / (self.n - 1)
        return {"mu": (centred + self.shift).numpy(), "sigma": sigma.numpy()}


def streamed_moments(net, path, n: int, shape: tuple[int, ...], seed: int, t_mid: float, features, shift: np.ndarray,
                     world: World = World(), batch_size: int = 1024, two_step: str = "renoise") -> dict[str, Moments]:
    """{"1step": Moments, "2step": Moments} of `features(samples)` over n samples made in blocks,
    this rank's blocks here, every rank's after the all_reduce."""
    device = next(net.parameters(), torch.empty(0)).device
    moments = {"1step": Moments(shift), "2step": Moments(shift)}
    for block, size in blocks(n, world):
        eps, eps_mid = block_noise(block, size, shape, seed)
        for i in range(0, size, batch_size):
            e, m = eps[i:i + batch_size].to(device), eps_mid[i:i + batch_size].to(device)
            moments["1step"].add(features(sampling.one_step(net, e)))
            moments["2step"].add(features(sampling.two_step(net, path, e, m, t_mid, two_step)))
    return {name: m.reduced(world) for name, m in moments.items()}



def score(params: Params, net, path, n: int, shape: tuple[int, ...], world: World, device,
          two_step: str = "renoise") -> dict[str, float]:
    """The Frechet distance of n 1- and 2-step samples made in blocks across the ranks and streamed,
    against the split evaluate.fid_reference names, under the same keys as the in-memory scores:
    e.g. fid_inception_2step_n50000."""
    ev = params.evaluate
    if params.features == "raw":
        features = lambda x: x.reshape(len(x), -1)  # noqa: E731
        reference = dict(zip(("mu", "sigma"), metrics.gaussian_fit(datasets.load_split(out_dir("data"), ev.fid_reference))))
        frechet = lambda s, r: metrics.frechet_of_statistics(s["mu"], s["sigma"], r["mu"], r["sigma"])  # noqa: E731
    else:
        from . import fidelity  # torch-fidelity only where images are scored
        weights = feature_weights(params)
        features = fidelity.feature_function(params.features, weights, device)
        reference = fidelity.reference_statistics(REFERENCE_CACHE, ev.fid_reference, params.features, weights)
        frechet = fidelity.frechet_of_statistics
    moments = streamed_moments(net, path, n, shape, ev.seed, params.sampling.t_mid, features, reference["mu"], world,
                               two_step=two_step)
    return {key(f"{params.fd_name}_{name}", n): frechet(m.statistics(), reference) for name, m in moments.items()}
