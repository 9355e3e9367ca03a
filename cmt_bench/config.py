"""Typed parameters: `params.yaml` is validated here before any stage does work.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key or a value outside
its allowed set is refused with its dotted path and what would have been accepted.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, ValidationInfo, create_model, field_validator, model_validator

from . import inits as init_registry
from . import methods as method_registry
from .layout import EXPERIMENTS
from .schema import (CompileMode, Distance, MatmulRoute, NetConfig, PositiveFloat, PositiveInt,  # noqa: F401
                     Probability, Section, TeacherFile, TimeSampling)

# what the registries hold (cmt_bench/inits/, cmt_bench/methods/): one module each
INITS = init_registry.names()
METHODS = method_registry.names()
FEATURES = ("auto", "raw", "classifier", "inception")
LABELLED_DATASETS = ("digits", "fashion", "cifar10")  # the datasets a feature classifier can learn


class TrackingConfig(Section):
    uri: str | None = None  # None: MLFLOW_TRACKING_URI, else sqlite:///<repo root>/mlflow.db
    experiment: str = "cmt_bench"


TOY_DATASETS = ("checkerboard", "eight_gaussians", "two_moons", "gmm")
IMAGE_DATASETS = ("digits", "fashion", "folder", "cifar10")
EXACT_DATASETS = ("gmm",)  # data whose flow map is known: scored by flowmap_err and mode coverage (gmm.py)


class GmmConfig(Section):
    """data.dataset=gmm: equal-weight isotropic Gaussians in `dim` dimensions, whose flow map is known."""
    dim: PositiveInt = 8
    components: PositiveInt = 8
    spread: PositiveFloat = 2.0  # the means are drawn N(0, spread^2 I)
    scale: PositiveFloat | list[PositiveFloat] = 0.1  # every component's std, or one per component
    seed: int = 0  # draws the means: the mixture itself, apart from the seed that draws its samples

    @model_validator(mode="after")
    def _one_scale_each(self) -> "GmmConfig":
        if isinstance(self.scale, list) and len(self.scale) != self.components:
            raise ValueError(f"scale: give one std for all components or one per component "
                             f"({self.components}), not {len(self.scale)}")
        return self


class DataConfig(Section):
    dataset: Literal[TOY_DATASETS + IMAGE_DATASETS] = "checkerboard"  # type: ignore[valid-type]
    # toy: how many points to draw; images: at most this many (digits split their one pool)
    train_size: PositiveInt = 20_000
    heldout_size: PositiveInt = 4_000
    path: str | None = None  # folder / cifar10: where the images are (never downloaded); fashion: optional
    resolution: PositiveInt | None = None  # folder: resize to this square size (None: the first image's)
    channels: Literal[1, 3] = 3  # folder: grey or RGB
    pad_to: PositiveInt | None = None  # zero-pad images to this square size (fashion 28 -> 32)
    samples_per_record: PositiveInt = 1_000  # several samples per tar member: headers cost 512 B
    records_per_shard: PositiveInt = 10
    gmm: GmmConfig = GmmConfig()

    @property
    def is_image(self) -> bool:
        return self.dataset in IMAGE_DATASETS


class TrainConfig(Section):
    batch_size: PositiveInt = 512
    budget_images: PositiveInt = 1_000_000
    lr: PositiveFloat = 1e-3
    optimizer: Literal["adam", "radam"] = "adam"  # radam: sony/cmt's CIFAR-10 recipe
    lr_decay: Literal["none", "linear"] = "none"  # linear: from lr at the first step to 0 at the last
    ema_decay: Annotated[float, Field(ge=0, lt=1)] = 0.999
    log_every_images: PositiveInt = 50_000
    checkpoint_every_images: PositiveInt = 100_000

    @field_validator("budget_images")
    @classmethod
    def _budget_covers_a_step(cls, budget: int, info: ValidationInfo) -> int:
        batch = info.data.get("batch_size")
        if batch is not None and budget < batch:
            raise ValueError(f"smaller than batch_size ({batch}): not one step would run")
        return budget


Solver = Literal["euler", "heun", "dpm_solver_pp_2m", "dpm_solver_pp_3m"]
Grid = Literal["uniform", "edm", "logsnr"]


class TeacherOde(Section):
    """The ODE solve that scores the teacher during pre-training. Its own setting, apart from the
    trajectories stage's, so that an ablation of the trajectory solver or steps reuses the teacher."""
    steps: PositiveInt = 16
    solver: Solver = "heun"
    grid: Grid = "uniform"
    rho: PositiveFloat = 7.0


class PretrainConfig(Section):
    source: Literal["train", "import"] = "train"  # train the teacher here, or import one (pretrain.teacher)
    teacher: TeacherFile = TeacherFile()
    train: TrainConfig = TrainConfig()
    t_sampling: TimeSampling = TimeSampling()
    ode_eval: TeacherOde = TeacherOde()



class TrajectoriesConfig(Section):
    # stored: `count` trajectories drawn once and kept as shards (small runs); on_the_fly: mid-training
    # draws each batch's trajectories from the teacher from fresh noise, as sony/cmt does (no storage;
    # the teacher's work is then mid-training's compute)
    mode: Literal["stored", "on_the_fly"] = "stored"
    count: PositiveInt = 8192
    steps: PositiveInt = 16
    solver: Solver = "heun"
    grid: Grid = "uniform"
    rho: PositiveFloat = 7.0  # EDM grid exponent, used when grid == "edm"
    batch_size: PositiveInt = 4096


class MidtrainConfig(Section):
    # Mid-training runs once per post-training method, in the variant given here: cm jumps to
    # time 0 (CMT-CM, for consistency post-training); mf jumps between any two trajectory points
    # (CMT-MF, for flow maps such as MeanFlow). Default: the variant each method's module declares.
    variants: dict[Literal[METHODS], Literal["cm", "mf"]] = {  # type: ignore[valid-type]
        name: m.cmt_variant for name, m in method_registry.REGISTRY.items()}
    train: TrainConfig = TrainConfig()
    distance: Distance = Distance()


class PosttrainBase(Section):
    # which post-training methods (cmt_bench/methods/) and inits (cmt_bench/inits/) the DVC matrix runs:
    # init x method x seed. The claims compare CMT with the random and diffusion inits, so those stay.
    methods: list[Literal[METHODS]] = [  # type: ignore[valid-type]
        name for name, m in method_registry.REGISTRY.items() if m.in_default_run]
    inits: list[Literal[INITS]] = list(init_registry.BUILTIN)  # type: ignore[valid-type]
    # post-training seeds (init of fresh layers, batches, noise): every init x method cell runs once
    # per seed, the report shows their mean and spread. Upstream stages use the top-level `seed`.
    seeds: list[Annotated[int, Field(ge=0, strict=True)]] = [0]
    train: TrainConfig = TrainConfig()
    distance: Distance = Distance()  # for the methods whose loss takes a distance (ECT)

    @field_validator("methods")
    @classmethod
    def _some_methods_once_each(cls, methods: list[str]) -> list[str]:
        if not methods or len(set(methods)) != len(methods):
            raise ValueError(f"list each post-training method at most once, at least one of: {', '.join(METHODS)}")
        return methods

    @field_validator("inits")
    @classmethod
    def _claimed_inits_once_each(cls, inits: list[str]) -> list[str]:
        missing = [i for i in init_registry.BUILTIN if i not in inits]
        if missing or len(set(inits)) != len(inits):
            raise ValueError(f"list each init at most once, including {', '.join(init_registry.BUILTIN)} (the claims "
                             f"compare them; missing: {', '.join(missing) or 'none'}); allowed: {', '.join(INITS)}")
        return inits

    @field_validator("seeds")
    @classmethod
    def _some_seeds_once_each(cls, seeds: list[int]) -> list[int]:
        if not seeds or len(set(seeds)) != len(seeds):
            raise ValueError("list each seed at most once, at least one, e.g. [0, 1, 2]")
        return seeds


# posttrain.<method>: each registered method's own section, with its defaults
PosttrainConfig = create_model("PosttrainConfig", __base__=PosttrainBase, **{
    name: (m.config, m.config()) for name, m in method_registry.REGISTRY.items()})


class SamplingConfig(Section):
    t_mid: Probability = 0.5  # the intermediate time of 2-step sampling


class ClassifierConfig(Section):
    """The feature network of `fd_<dataset>`: a small CNN trained on the training split's labels."""
    epochs: PositiveInt = 30
    batch_size: PositiveInt = 128
    lr: PositiveFloat = 2e-3
    feature_dim: PositiveInt = 64


class EvaluateConfig(Section):
    samples: PositiveInt = 4000  # final evaluation; metric keys carry the count, e.g. fd_digits_2step_n4000
    inloop_samples: PositiveInt = 1000  # during training, at every logged point
    # a paper-grade Frechet distance over this many samples (50000 for FID), streamed in blocks and
    # split over compute.processes (fid_stream.py), beside the in-memory scores of `samples`
    fid_samples: PositiveInt | None = None
    # ... against the statistics of this split: heldout (as the in-memory scores) or train (EDM's
    # protocol: FID against the training images; the features stage scores held-out against it)
    fid_reference: Literal["heldout", "train"] = "heldout"
    seed: int = 1234
    sw_projections: PositiveInt = 256
    # Feature space of the Frechet distance: raw coordinates (fd_raw), a classifier trained in the
    # pipeline (fd_<dataset>) or torch-fidelity's Inception (fid_inception, from a local file only).
    # auto: raw for 2-D points, the classifier for labelled images, Inception where weights are given.
    features: Literal[FEATURES] = "auto"  # type: ignore[valid-type]
    inception_weights: str | None = None  # local path of torch-fidelity's pt_inception weights
    classifier: ClassifierConfig = ClassifierConfig()


class ComputeConfig(Section):
    # Training processes: above 1, training stages relaunch themselves under `torchrun
    # --standalone` on this machine (DDP: gloo on CPU, nccl on CUDA); train.batch_size stays the
    # global batch. For several machines, start `torchrun ... -m cmt_bench STAGE` yourself.
    processes: PositiveInt = 1
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when one is visible
    # bf16 autocast of the training step on CUDA; on a CPU training stays fp32 (the run's
    # `precision` tag says which was used)
    precision: Literal["fp32", "bf16"] = "fp32"
    # torch.compile of the training step (compiling.py): none (eager), step (the network's forward
    # and backward), jvp (step, and the forward-mode JVP of MeanFlow-style losses). Compiled kernels
    # round differently from eager ones (tests bound it), so the mode is part of a run's parameters.
    compile: CompileMode = "none"
    # Where each step's batch indices, noise and times are drawn: device (on the training device, so
    # a GPU step copies nothing from the host) or host (the CPU: one seed then gives the same draws on
    # any device). On a CPU both are the same numbers.
    draws: Literal["device", "host"] = "device"
    channels_last: bool = False  # channels-last memory format for the UNet (images only)
    # torch CPU threads of every stage (None: torch's default, one per core). Part of a result: the
    # count changes the order of float sums. With a count set, `cmt-bench repro` runs the matrix
    # cells (mid-training, post-training, evaluation) cores / threads at a time (schedule.py)
    threads: PositiveInt | None = None
    # Which library multiplies the linear layers' float32 matrices on a CPU (linear.py): auto
    # (oneDNN on AMD processors with AVX-512, where it was measured faster; else torch's MKL), torch,
    # or onednn. The two round differently, so the route is part of a result: a run's `matmul` tag
    # records the one taken. Set torch or onednn for the same numbers on every machine.
    matmul: MatmulRoute = "auto"


class ReportConfig(Section):
    # the metric curves, targets and claims use: a family (fd_raw, sw, or the feature metric such
    # as fd_digits) and a step count; auto: the feature metric at 2 steps
    metric: str = "auto"
    # The verdict rules' thresholds. Claims 1-3: a target within floor_margin x the metric's noise floor
    # cannot be told from sampling noise; a compute ratio CMT / baseline holds or fails only when its
    # bootstrap interval over seeds (at `confidence`) lies below or above 1, and needs min_seeds seeds
    # (repeated toy runs measured ratios 0.70-0.85 for the same weights, from wall-time noise alone).
    # The ablation reports still call ratios within time_tie of 1 a tie.
    floor_margin: Annotated[float, Field(ge=1)] = 1.25
    # The compute the verdicts of claims 1-3 rest on (the other is reported beside it): flops, counted
    # floating-point work (ledger.py), which does not move with machine load; or device_hours, wall time
    # (the headline figure; a disturbed toy run moved a ratio's interval from 0.70-0.87 to 0.69-1.05).
    measure: Literal["flops", "device_hours"] = "flops"
    confidence: Probability = 0.90
    min_seeds: Annotated[int, Field(ge=2, strict=True)] = 3
    time_tie: Annotated[float, Field(ge=0, lt=1)] = 0.10
    # Claim 4 (studies): a trial within within_best of its init's best counts as good; CMT may diverge
    # diverged_margin more often than another init before that alone fails the claim; an init with
    # fewer than min_trials finished trials is not tested; resamples of the bootstrap interval.
    within_best: Probability = 0.10
    diverged_margin: Annotated[float, Field(ge=0, le=1)] = 0.10
    min_trials: PositiveInt = 5
    resamples: PositiveInt = 2000


class StudiesConfig(Section):
    """Optuna sensitivity studies (specs in experiments/studies/) that `dvc repro` runs (stages studies@<name>)."""
    specs: list[str] = []  # names of experiments/studies/<name>.yaml; none: the stage only writes an empty index
    # Where and how wide studies run (not what they compute: with a QMC sampler and no pruner a trial's
    # parameters follow from its number, so results do not depend on these); $CMT_BENCH_STUDY_WORKERS
    # and $CMT_BENCH_STUDY_STORAGE override them, as MLFLOW_TRACKING_URI does tracking.uri.
    # worker processes on this machine (two: both cores of a small machine; each trial takes
    # `threads`). The default SQLite store takes local workers; workers on other machines need
    # PostgreSQL (or a journal file on a shared disk)
    workers: PositiveInt = 2
    # torch threads of every trial, however many workers: the thread count changes the order of
    # float sums, and a trial near divergence turns that into another value (two toy_ect runs with
    # 1 and 2 threads per trial agreed on no trial, by up to 0.3). So this one is part of a result.
    threads: PositiveInt = 1
    # None: $CMT_BENCH_STUDY_STORAGE, else sqlite:///<repo root>/optuna.db. Also postgresql+psycopg://...
    # (parallel workers, any machine) or journal:<path> (a JournalStorage file)
    storage: str | None = None
    # a worker that sends no heartbeat for 2x this long has its trial failed and retried
    heartbeat_seconds: PositiveInt = 10


class Params(Section):
    preset: str = "toy"
    seed: int = 0
    tracking: TrackingConfig = TrackingConfig()
    data: DataConfig = DataConfig()
    net: NetConfig = NetConfig()
    pretrain: PretrainConfig = PretrainConfig()
    trajectories: TrajectoriesConfig = TrajectoriesConfig()
    midtrain: MidtrainConfig = MidtrainConfig()
    posttrain: PosttrainConfig = PosttrainConfig()
    sampling: SamplingConfig = SamplingConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    compute: ComputeConfig = ComputeConfig()
    report: ReportConfig = ReportConfig()
    studies: StudiesConfig = StudiesConfig()

    @model_validator(mode="after")
    def _consistent(self) -> "Params":
        missing = [m for m in self.posttrain.methods if m not in self.midtrain.variants]
        if missing:
            raise ValueError(f"midtrain.variants: give a CMT variant (cm or mf) for post-training method(s) "
                             f"{', '.join(missing)}")
        if self.data.is_image != (self.net.kind == "unet") and self.pretrain.source == "train":
            raise ValueError(f"net.kind: {self.net.kind!r} does not fit data.dataset={self.data.dataset!r}; "
                             f"use unet for images ({', '.join(IMAGE_DATASETS)}), mlp for points")
        for key, dist in (("midtrain", self.midtrain.distance), ("posttrain", self.posttrain.distance)):
            if dist.kind == "lpips" and not self.data.is_image:
                raise ValueError(f"{key}.distance.kind: 'lpips' compares images, not data.dataset="
                                 f"{self.data.dataset!r}; use 'l2' or 'pseudo_huber'")
        velocity = [m for m in self.posttrain.methods if self.midtrain.variants[m] == "mf"]
        if self.midtrain.distance.kind == "lpips" and velocity:
            raise ValueError(f"midtrain.distance.kind: 'lpips' compares images, and CMT-MF (for {', '.join(velocity)}) "
                             f"regresses velocities; use 'l2' or 'pseudo_huber', or post-train only CMT-CM methods")
        features, dataset = self.evaluate.features, self.data.dataset
        if features == "classifier" and dataset not in LABELLED_DATASETS:
            raise ValueError(f"evaluate.features: 'classifier' needs labelled images ({', '.join(LABELLED_DATASETS)}), "
                             f"not data.dataset={dataset!r}; use 'raw'" + (" or 'inception'" if self.data.is_image else ""))
        if features == "inception" and not self.data.is_image:
            raise ValueError("evaluate.features: 'inception' scores images; 2-D points use 'raw'")
        if features == "inception" and not self.evaluate.inception_weights:
            raise ValueError("evaluate.inception_weights: give the local path of the Inception weights file "
                             "(it is never downloaded), or choose evaluate.features 'raw' or 'classifier'")
        if self.evaluate.fid_reference != "heldout" and not self.evaluate.fid_samples:
            raise ValueError(f"evaluate.fid_reference: {self.evaluate.fid_reference!r} is the reference of the streamed "
                             f"score; set evaluate.fid_samples, or leave fid_reference 'heldout'")
        if self.evaluate.fid_samples == self.evaluate.samples:
            raise ValueError(f"evaluate.fid_samples: {self.evaluate.fid_samples} is evaluate.samples too, and both "
                             f"would write the key {self.fd_name}_2step_n{self.evaluate.samples}; change one of them")
        if self.compute.channels_last and self.net.kind != "unet":
            raise ValueError("compute.channels_last: true is a memory format for the UNet's images; "
                             f"net.kind is {self.net.kind!r}: set it to false")
        if self.report.metric != "auto" and self.report.metric not in report_metrics(self):
            raise ValueError(f"report.metric: {self.report.metric!r} is not measured for this preset; allowed: "
                             f"auto, {', '.join(report_metrics(self))}")
        return self

    @property
    def features(self) -> str:
        """The feature space actually used: raw, classifier or inception (auto resolved)."""
        if self.evaluate.features != "auto":
            return self.evaluate.features
        if self.data.dataset in LABELLED_DATASETS:
            return "classifier"
        return "inception" if self.data.is_image and self.evaluate.inception_weights else "raw"

    @property
    def fd_name(self) -> str:
        """The Frechet distance's honest name: fd_raw, fd_<dataset> or fid_inception."""
        return {"raw": "fd_raw", "classifier": f"fd_{self.data.dataset}", "inception": "fid_inception"}[self.features]

    @property
    def report_metric(self) -> str:
        return f"{self.fd_name}_2step" if self.report.metric == "auto" else self.report.metric


def report_metrics(params: Params) -> list[str]:
    """Metric families a run measures (its Frechet distance and sliced Wasserstein; on data with a
    known flow map also the distance from it), at 1 and 2 steps."""
    exact = ("flowmap_err",) if params.data.dataset in EXACT_DATASETS else ()
    return [f"{family}_{k}step" for family in (params.fd_name, "sw", *exact) for k in (1, 2)]


class ParamsError(ValueError):
    """A parameter file that cannot be used; the message names each bad key."""


def _allowed_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    for part in loc[:-1]:
        field = model.model_fields.get(part)
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return []
        model = field.annotation
    return sorted(model.model_fields)


def _describe(err: dict) -> str:
    loc = tuple(str(p) for p in err["loc"])
    key = ".".join(loc) or "<top level>"
    if err["type"] == "extra_forbidden":
        allowed = ", ".join(_allowed_keys(Params, loc))
        return f"{key}: unknown key; allowed keys here: {allowed}"
    got = err.get("input")
    if err["type"] == "model_type" and got is None:
        return f"{key}: the section is empty; give its keys or remove it"
    if err["type"] == "model_type":
        return f"{key}: must be a mapping of keys, got {got!r}"
    got = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{key}: {err['msg']}{got}"


def validate(raw: Any, source: str = "params") -> Params:
    if raw is None:
        raise ParamsError(f"{source}: the file is empty; expected sections such as {', '.join(Params.model_fields)}")
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = "\n".join(f"  - {_describe(e)}" for e in exc.errors())
        raise ParamsError(f"{source}: {exc.error_count()} invalid parameter(s):\n{lines}") from None


def load(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ParamsError(f"{path}: no such parameter file") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return validate(raw, str(path))


def deep_merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def override(params: Params, dotted: dict[str, Any], source: str) -> Params:
    """`params` with values set by dotted key (e.g. posttrain.train.lr), validated as a whole."""
    tree: dict = {}
    for key, value in dotted.items():
        *parents, leaf = key.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return validate(deep_merge(params.model_dump(), tree), source)


def preset(name: str, root: Path = Path(".")) -> Params:
    """A named preset: `experiments/<name>.yaml` holds overrides of the defaults above."""
    path = root / EXPERIMENTS / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in (root / EXPERIMENTS).glob("*.yaml"))
        raise ParamsError(f"preset {name!r} not found; known presets: {', '.join(known)}")
    overrides = yaml.safe_load(path.read_text()) or {}
    return validate(deep_merge(Params().model_dump(), {**overrides, "preset": name}), str(path))


def to_yaml(params: Params) -> str:
    header = (f"# Preset `{params.preset}` (experiments/{params.preset}.yaml over the defaults in "
              f"cmt_bench/config.py), written by `cmt-bench preset {params.preset}`.\n")
    return header + yaml.safe_dump(params.model_dump(), sort_keys=False)


def fingerprint(*parts: Any) -> str:
    """A short stable hash of config sections and other JSON-able values."""
    blob = json.dumps([p.model_dump() if isinstance(p, BaseModel) else p for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def flatten(params: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    data = params.model_dump() if isinstance(params, BaseModel) else params
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = value
    return out
