"""The post-training methods, one module each in this package; each declares itself with `register`.

A method module holds everything about its method: its parameter section (`posttrain.<name>`), its
loss, the CMT variant that initialises it, the parameters a study may tune and the paper's figures
for it. `config`, the stages, the studies and the report read this registry; none of them names a
method. A new method is one new module here: every module of the package is imported below (the
paper's two first, in the order the report shows them), so nothing else needs an edit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Literal

from ..registry import Registry

BUILTIN = ("ect", "meanflow")  # the paper's methods, in report order; other modules follow by name


@dataclass(frozen=True)
class Method:
    name: str  # the key in posttrain.methods, the DVC matrix and MLflow's `method` tag
    label: str  # how the report names it
    config: type  # its pydantic section, posttrain.<name>
    # loss(net, path, x0, generator, images_seen, cfg, distance) -> the batch's mean loss, where cfg is
    # posttrain.<name> and distance posttrain.distance
    loss: Callable
    cmt_variant: Literal["cm", "mf"]  # the CMT mid-training that initialises it (midtrain.variants' default)
    uses_distance: bool = False  # whether posttrain.distance enters its loss (logged and tunable only then)
    # its 2-step sampler, as its paper draws one (sampling.two_step): "renoise" (consistency models: jump
    # to the data, re-noise to sampling.t_mid, jump again) or "chain" (a flow map: 1 -> t_mid -> 0)
    two_step: Literal["renoise", "chain"] = "renoise"
    in_default_run: bool = False  # listed in posttrain.methods by default
    # the paper's figure for each claim of the report this method has one for (claim id -> text)
    paper: dict[int, str] = field(default_factory=dict)
    saving: str | None = None  # the paper's data / time saving over training without CMT (claim 2), if any
    # the compute each of the paper's figures counts (claim id -> accounting, see evidence.ACCOUNTINGS):
    # "total" (every stage, the teacher's pre-training included) or "given_teacher" (the teacher is a
    # checkpoint someone else trained); a claim not listed is judged under both
    accounting: dict[int, Literal["total", "given_teacher"]] = field(default_factory=dict)
    # the paper's final 1-step figures from CMT vs from scratch: claim 3 (about half the total time to
    # equal or better 1-step quality) runs for the methods that give them
    from_scratch: str | None = None
    reference: str = ""  # where the method comes from
    # images-seen points where a step costs differently (a curriculum's phases), by name, from the
    # method's section; the step-cost benchmark times each. None: one point (0) tells the cost.
    cost_phases: Callable[[object], dict[str, int]] | None = None

    def tunable(self) -> tuple[str, ...]:
        """The dotted prefixes a sensitivity study of this method may vary."""
        return ("posttrain.train.", f"posttrain.{self.name}.", "sampling.") + \
            (("posttrain.distance.",) if self.uses_distance else ())


REGISTRY = Registry("post-training method", __name__, __path__, BUILTIN)
register, get = REGISTRY.register, REGISTRY.lookup


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


def label(name: str) -> str:
    return REGISTRY[name].label if name in REGISTRY else name


REGISTRY.discover()
