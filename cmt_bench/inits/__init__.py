"""The inits post-training starts from, one module each in this package; each declares itself with
`register`.

An init says how it fills a freshly seeded flow-map network, which files it starts from (their
hashes key checkpoints and study names), which upstream stages it needs (the report counts their
compute in the init's total) and its colour. A new init is one new module here: every module of the
package is imported below (the paper's three first, in the order the report shows them).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..registry import Registry

BUILTIN = ("random", "diffusion", "cmt")  # the paper's inits, in report order; other modules follow by name
STAGES = ("pretrain", "trajectories", "midtrain")  # the upstream stages an init may need, in pipeline order


@dataclass(frozen=True)
class Init:
    name: str  # the key in posttrain.inits, the DVC matrix and MLflow's `init` tag
    label: str  # how the report names it in running text ("the CMT init")
    color: str  # its colour in every figure
    upstream: tuple[str, ...]  # stages of STAGES whose compute its total includes
    # start(net, method): load the init's weights into a freshly seeded two-time network (in place)
    start: Callable
    # inputs(method) -> the files it starts from (besides the data)
    inputs: Callable[[str], list[Path]] = lambda method: []


REGISTRY = Registry("init", __name__, __path__, BUILTIN)
get = REGISTRY.lookup


def register(init: Init) -> Init:
    unknown = [s for s in init.upstream if s not in STAGES]
    if unknown:
        raise ValueError(f"init {init.name!r}: unknown upstream stage(s) {unknown}; allowed: {', '.join(STAGES)}")
    return REGISTRY.register(init)


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def color(name: str) -> str:
    return REGISTRY[name].color if name in REGISTRY else "k"


REGISTRY.discover()
