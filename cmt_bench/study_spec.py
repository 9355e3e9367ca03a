"""A sensitivity study's spec (`experiments/studies/<name>.yaml`), validated before any trial runs.

A spec names the pipeline it starts from (preset), one post-training method, the inits to compare,
the search space, the objective (a final metric at a fixed budget of images), trials per init,
sampler, pruner and seed. Every value of the space is checked against the parameter schema at its
extremes, so a space that would produce an invalid trial is refused up front with its key.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from . import methods
from .config import INITS, METHODS, Params, ParamsError, PositiveInt, Section, flatten, override, report_metrics
from .layout import STUDY_SPECS as STUDIES_DIR


class Range(Section):
    low: float
    high: float
    log: bool = False
    int: bool = False  # integers (e.g. batch sizes); a range keeps QMC sampling deterministic, choices do not

    @model_validator(mode="after")
    def _ordered(self) -> "Range":
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("a log range needs low > 0")
        if self.int and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("an int range needs whole low and high")
        return self


class Choices(Section):
    choices: Annotated[list[Any], Field(min_length=2)]


class PrunerConfig(Section):
    # median: stop a trial whose in-loop metric is worse than the median of earlier trials at the
    # same point; successive_halving: keep the best 1/reduction at each rung; none: run every trial out,
    # and score no in-loop points (the pruner is their only reader; each trial's curve still logs its loss)
    kind: Literal["none", "median", "successive_halving"] = "median"
    startup_trials: Annotated[int, Field(ge=0, strict=True)] = 5  # median: trials before pruning starts
    warmup_points: Annotated[int, Field(ge=0, strict=True)] = 1  # median: logged points before a trial can be pruned
    reduction: Annotated[int, Field(ge=2, strict=True)] = 3  # successive halving


class ObjectiveConfig(Section):
    metric: str = "auto"  # a report metric (e.g. sw_2step, fd_digits_2step); auto: the preset's report metric
    budget_images: PositiveInt  # fixed compute per trial, in images seen


class StudySpec(Section):
    name: str = ""  # filled from the file name
    path: str = ""  # the file it was read from (workers read it again)
    preset: str
    method: Literal[METHODS]  # type: ignore[valid-type]
    inits: list[Literal[INITS]] = list(INITS)  # type: ignore[valid-type]
    trials: PositiveInt  # per init: every init gets the same number over the same space
    seed: int = 0  # the post-training seed of every trial (so trials differ only by their parameters)
    sampler: Literal["random", "tpe", "qmc"] = "random"
    sampler_seed: int = 0
    pruner: PrunerConfig = PrunerConfig()
    objective: ObjectiveConfig
    space: dict[str, Range | Choices]

    @model_validator(mode="after")
    def _inits_once(self) -> "StudySpec":
        if not self.inits or len(set(self.inits)) != len(self.inits):
            raise ValueError(f"inits: list each at most once, at least one of {', '.join(INITS)}")
        if not self.space:
            raise ValueError("space: give at least one parameter to vary")
        return self

    def metric(self, params: Params) -> str:
        return params.report_metric if self.objective.metric == "auto" else self.objective.metric


def trial_params(params: Params, spec: StudySpec, values: dict[str, Any], source: str = "trial") -> Params:
    """The pipeline's params with one trial's values and the study's budget applied (validated)."""
    return override(params, {"posttrain.train.budget_images": spec.objective.budget_images, **values}, source)


def _check_against(params: Params, spec: StudySpec, source: str) -> None:
    """Refuse a spec that does not fit the pipeline in params.yaml, naming the key."""
    errors = []
    if spec.preset != params.preset:
        errors.append(f"preset: the study is for preset {spec.preset!r}, params.yaml holds {params.preset!r} "
                      f"(run `cmt-bench preset {spec.preset}` first)")
    if spec.method not in params.posttrain.methods:  # the CMT init needs this method's mid-training
        errors.append(f"method: {spec.method!r} is not post-trained by this pipeline; posttrain.methods holds "
                      f"{', '.join(params.posttrain.methods)} (add it there, or study one of those)")
    metric = spec.metric(params)
    if metric not in report_metrics(params):
        errors.append(f"objective.metric: {metric!r} is not measured for this preset; allowed: auto, "
                      f"{', '.join(report_metrics(params))}")
    leaves = set(flatten(params))
    # what a trial may change: post-training (the method's own keys) and sampling; upstream stages are fixed
    prefixes = methods.get(spec.method).tunable()
    for key, dist in spec.space.items():
        if not key.startswith(prefixes) or key not in leaves:
            tunable = sorted(k for k in leaves if k.startswith(prefixes))
            errors.append(f"space.{key}: not a tunable parameter; allowed: {', '.join(tunable)}")
            continue
        ends = dist.choices if isinstance(dist, Choices) else \
            [int(dist.low), int(dist.high)] if dist.int else [dist.low, dist.high]
        for value in ends:
            try:
                trial_params(params, spec, {key: value})
            except ParamsError as exc:
                errors.append(f"space.{key}: value {value!r} is invalid: {str(exc).splitlines()[-1].strip(' -')}")
    try:
        trial_params(params, spec, {})
    except ParamsError as exc:
        errors.append(f"objective.budget_images: {str(exc).splitlines()[-1].strip(' -')}")
    if errors:
        raise ParamsError(f"{source}: {len(errors)} problem(s):\n" + "\n".join(f"  - {e}" for e in errors))


def spec_path(name_or_path: str, root: Path = Path(".")) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return root / STUDIES_DIR / f"{name_or_path}.yaml"


def load_spec(name_or_path: str, params: Params, root: Path = Path(".")) -> StudySpec:
    """Read and validate a spec by name (experiments/studies/<name>.yaml) or path, against `params`."""
    path = spec_path(name_or_path, root)
    if not path.is_file():
        known = sorted(p.stem for p in (root / STUDIES_DIR).glob("*.yaml"))
        raise ParamsError(f"study spec {name_or_path!r} not found at {path}; known: {', '.join(known) or 'none'}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ParamsError(f"{path}: expected a mapping with preset, method, trials, objective and space")
    try:
        spec = StudySpec.model_validate({**raw, "name": path.stem, "path": str(path)})
    except ValidationError as exc:
        lines = "\n".join(f"  - {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise ParamsError(f"{path}: {exc.error_count()} invalid key(s):\n{lines}") from None
    _check_against(params, spec, str(path))
    return spec
