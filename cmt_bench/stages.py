"""The pipeline's stages. Each reads params, its inputs under artifacts/, and writes its outputs
(weights, shards, `run.json` with the MLflow run id and ledger) for the next stage."""
from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import data as datasets
from . import distributed, losses, nets, sampling, scoring, solvers
from .config import INITS, METHODS, Params, fingerprint
from .data import read_json, write_json
from .ledger import Ledger, device_name
from .paths import PATHS
from .tracking import Tracker
from .train import Job, derive_seed, generator, quiet, train

ART = Path("artifacts")
CKPT = Path("checkpoints")  # resumable state; not a DVC output, so a rerun after a kill finds it
METHOD = {"pretrain": "flow_matching", "trajectories": "teacher_ode"}
MIDTRAIN_LOSS = {"cm": losses.cmt_cm_loss, "mf": losses.cmt_mf_loss}


def out_dir(stage: str, init: str | None = None, method: str | None = None, seed: int | None = None) -> Path:
    """artifacts/<stage>[/<method>][/<init>][/seed<N>]: post-training and evaluation have one per cell."""
    return ART.joinpath(stage, *(part for part in (method, init, _seed_part(seed)) if part))


def cell(stage: str, init: str | None, method: str | None, seed: int | None = None) -> str:
    """A stage's name for one matrix cell, e.g. posttrain-meanflow-cmt-seed1 (run names, checkpoints)."""
    return "-".join(part for part in (stage, method, init, _seed_part(seed)) if part)


def _seed_part(seed: int | None) -> str | None:
    return None if seed is None else f"seed{seed}"


def _seeded_net(seed: int, params: Params, shape: tuple[int, ...], two_times: bool, *tag) -> torch.nn.Module:
    torch.manual_seed(derive_seed(seed, "init", *tag))
    return nets.build(shape, params.net, two_times)


def _load_weights(stage: str, method: str | None = None) -> dict:
    path = out_dir(stage, method=method) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the {cell(stage, None, method)} stage first (dvc repro)")
    return torch.load(path, map_location="cpu", weights_only=True)["ema"]


def _heldout_eval(params: Params, path, heldout: torch.Tensor, shape: tuple[int, ...]):
    """In-loop 1- and 2-step metrics at a fixed sample seed, so curve points are comparable."""
    score = scoring.Scorer(params, heldout.numpy())

    def evaluate(net) -> dict[str, float]:
        net.eval()
        out = sampling.sample(net, path, params.evaluate.inloop_samples, shape, params.evaluate.seed,
                              params.sampling.t_mid)
        net.train()
        return score({k: v.numpy() for k, v in out.items()})
    return evaluate


def _finish_training(stage: str, result, tracker, *, init: str | None = None, method: str | None = None,
                     seed: int | None = None) -> None:
    """Write the stage's outputs, close its run, then drop the resumable checkpoint (rank 0 only:
    the other ranks of a DDP run have no tracker)."""
    if tracker is None:
        return
    out = out_dir(stage, init, method, seed)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": result.ema.state_dict(), "net": result.net.state_dict()}, out / "model.pt")
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": stage, "init": init, "method": method,
                                  "seed": seed, "ledger": result.ledger.to_dict()})
    tracker.finish()
    shutil.rmtree(CKPT / cell(stage, init, method, seed), ignore_errors=True)


def _train_stage(params: Params, stage: str, net, job: Job, train_cfg, inputs: list[Path], *,
                 init: str | None = None, method: str | None = None, method_tag: str | None = None,
                 seed: int | None = None, stage_params: dict, ckpt: Path | None = None, open_run=None):
    """Train one stage (or matrix cell) on this process's device; `method_tag` names the method in
    MLflow where it is not a cell; `seed` is a post-training cell's seed (else the top-level one).
    A study trial passes its own checkpoint path and `open_run(run_id) -> Tracker`.
    Batches are drawn on the CPU and moved to the device."""
    world = distributed.init()
    dev = distributed.device(params.compute.device, world)
    net.to(dev)
    job = dataclasses.replace(job, batch=lambda g, b, draw=job.batch: draw(g, b).to(dev, non_blocking=True))
    precision = distributed.precision_used(params.compute.precision, dev)
    ledger = Ledger(device=device_name(dev))
    fp = fingerprint(params, stage, init, method, seed, [datasets.sha256(p) for p in inputs])
    ckpt = ckpt or CKPT / cell(stage, init, method, seed) / "last.pt"

    def open_tracker(run_id):
        if open_run is not None:
            tracker = open_run(run_id)
        else:
            tracker = Tracker.open(params, stage, init=init, method=method_tag or method or METHOD[stage],
                                   run_id=run_id, seed=seed, stage_params=stage_params)
        if run_id is None:
            tracker.set_tags({"device": ledger.device, "world_size": ledger.world_size, "precision": precision,
                              "device_hours_measures": "wall time of training steps x devices; "
                                                       "excludes in-loop evaluation and checkpoint I/O"})
        return tracker
    return train(net, job, train_cfg, seed=params.seed if seed is None else seed, ckpt_path=ckpt, fingerprint=fp,
                 ledger=ledger, open_tracker=open_tracker, world=world, precision=precision)


# --- stages -----------------------------------------------------------------------------------

def run_data(params: Params) -> None:
    out = out_dir("data")
    shutil.rmtree(out, ignore_errors=True)
    manifest = datasets.make_dataset(params.data, params.seed, out)
    tracker = Tracker.open(params, "data", stage_params={"data": params.data.model_dump()})
    tracker.log_artifact(out / "manifest.json")
    tracker.finish()
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "data",
                                  "counts": {k: v["count"] for k, v in manifest["splits"].items()}})


def run_features(params: Params) -> None:
    """The metric's feature space: for `fd_<dataset>` a classifier trained on the training split
    (held-out accuracy logged), then the held-out reference statistics cached once, and the
    metric's noise floor: training samples (never the reference) scored as if they were generated."""
    data_dir, out = out_dir("data"), out_dir("features")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    train_x, heldout = datasets.load_split(data_dir, "train"), datasets.load_split(data_dir, "heldout")
    tracker = Tracker.open(params, "features", method=params.fd_name,
                           stage_params={"features": params.features, "metric": params.fd_name,
                                         "evaluate": params.evaluate.model_dump()})
    result: dict = {"features": params.features, "metric": params.fd_name}
    if params.features == "classifier":
        from . import classifier
        cfg = params.evaluate.classifier
        labels = {split: datasets.load_labels(data_dir, split) for split in ("train", "heldout")}
        start = time.perf_counter()
        model = classifier.train_classifier(train_x, labels["train"], epochs=cfg.epochs, batch_size=cfg.batch_size,
                                            lr=cfg.lr, feature_dim=cfg.feature_dim, seed=params.seed)
        result["train_seconds"] = time.perf_counter() - start
        result["heldout_accuracy"] = classifier.accuracy(model, heldout, labels["heldout"])
        classifier.save(model, scoring.CLASSIFIER)
    score = scoring.Scorer(params, heldout.numpy())
    floors = {}
    for n in sorted({params.evaluate.inloop_samples, params.evaluate.samples}):
        floors.update(score({"floor": train_x[:n].numpy()}))  # at most n: a small training split gives fewer
    result["floor"] = floors
    tracker.log_metrics(0, {**{k: v for k, v in result.items() if isinstance(v, float)}, **floors})
    tracker.finish()
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "features", **result})
    # DVC metrics (`dvc metrics show`): numbers only
    write_json(ART / "features.json", {k: v for k, v in result.items() if k not in ("features", "metric")})


def run_pretrain(params: Params) -> None:
    data_dir = out_dir("data")
    train_x, heldout = datasets.load_split(data_dir, "train"), datasets.load_split(data_dir, "heldout")
    shape, path, cfg = tuple(train_x.shape[1:]), PATHS["linear"](), params.pretrain
    net = _seeded_net(params.seed, params, shape, False, "pretrain")
    score = scoring.Scorer(params, heldout.numpy())
    ode = cfg.ode_eval
    grid = solvers.time_grid(ode.steps, ode.grid, ode.rho)

    def evaluate(ema) -> dict[str, float]:  # the teacher's ODE samples (pretrain.ode_eval's solver)
        x1 = torch.randn(params.evaluate.inloop_samples, *shape,
                         generator=torch.Generator().manual_seed(params.evaluate.seed))
        x1 = x1.to(next(ema.parameters()).device)
        x0 = solvers.integrate(lambda x, t: ema(x, t), x1, grid, ode.solver)[0][-1].cpu().numpy()
        return score({"ode": x0})

    job = Job("pretrain", batch=lambda g, b: train_x[torch.randint(len(train_x), (b,), generator=g)],
              loss=lambda n, x, g, seen: losses.flow_matching_loss(n, path, x, g, cfg.t_sampling),
              evaluate=evaluate, label="pretrain (teacher)")
    result, tracker = _train_stage(params, "pretrain", net, job, cfg.train, [data_dir / "manifest.json"],
                                   stage_params={"pretrain": cfg.model_dump(), "net": params.net.model_dump()})
    _finish_training("pretrain", result, tracker)


def run_trajectories(params: Params) -> None:
    cfg = params.trajectories
    teacher_weights = _load_weights("pretrain")
    shape = datasets.data_shape(out_dir("data"))
    dev = distributed.device(params.compute.device)
    teacher = nets.build(shape, params.net, two_times=False)
    teacher.load_state_dict(teacher_weights)
    teacher.to(dev).eval()
    grid = solvers.time_grid(cfg.steps, cfg.grid, cfg.rho)
    ledger = Ledger(device=device_name(dev))
    tracker = Tracker.open(params, "trajectories", method=METHOD["trajectories"],
                           stage_params={"trajectories": cfg.model_dump()})
    gen = generator(params.seed, "trajectories")
    chunks, nfe = [], 0
    for start in tqdm(range(0, cfg.count, cfg.batch_size), desc="trajectories", disable=quiet()):
        x1 = torch.randn(min(cfg.batch_size, cfg.count - start), *shape, generator=gen)
        with ledger.clock():
            states, nfe = solvers.integrate(lambda x, t: teacher(x, t), x1.to(dev), grid, cfg.solver)
            states = states.cpu()  # waits for the GPU, so the clock includes its work
        chunks.append(states.transpose(0, 1).contiguous())
        ledger.images_seen += len(x1)
        ledger.teacher_nfe += nfe * len(x1)
    traj = torch.cat(chunks).numpy()
    out = out_dir("trajectories")
    shutil.rmtree(out, ignore_errors=True)
    entry = datasets.write_shards(out, "traj", traj, params.data.samples_per_record // (cfg.steps + 1) or 1,
                                  params.data.records_per_shard)
    write_json(out / "manifest.json", {"times": grid.tolist(), "solver": cfg.solver, "grid": cfg.grid,
                                       "nfe_per_trajectory": nfe, "traj": entry})
    tracker.log_metrics(0, {**ledger.metrics(), "nfe_per_trajectory": float(nfe)})
    tracker.set_tags({"device": ledger.device, "world_size": ledger.world_size,
                      "device_hours_measures": "wall time of teacher ODE integration x devices"})
    tracker.finish()
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "trajectories", "ledger": ledger.to_dict()})


def run_midtrain(params: Params, method: str) -> None:
    """CMT for the post-training `method`, in the variant midtrain.variants[method]."""
    traj_dir = out_dir("trajectories")
    manifest = read_json(traj_dir / "manifest.json")
    traj = datasets.read_shards(traj_dir, "traj", manifest["traj"])
    times = torch.tensor(manifest["times"], dtype=traj.dtype)
    heldout = datasets.load_split(out_dir("data"), "heldout")
    shape, path, cfg = tuple(traj.shape[2:]), PATHS["linear"](), params.midtrain
    variant = cfg.variants[method]
    # seeded: the teacher has no gap embedding, so its first layers keep their fresh random values
    net = _seeded_net(params.seed, params, shape, True, "midtrain")
    nets.load_teacher_into(net, _load_weights("pretrain"))
    loss = MIDTRAIN_LOSS[variant]
    job = Job("midtrain", batch=lambda g, b: traj[torch.randint(len(traj), (b,), generator=g)],
              loss=lambda n, x, g, seen: loss(n, x, times.to(x.device), g, cfg.distance),
              evaluate=_heldout_eval(params, path, heldout, shape), label=f"midtrain CMT-{variant.upper()} for {method}")
    result, tracker = _train_stage(params, "midtrain", net, job, cfg.train,
                                   [traj_dir / "manifest.json", out_dir("pretrain") / "model.pt"], method=method,
                                   method_tag=f"cmt_{variant}", stage_params={
                                       "midtrain": {"train": cfg.train.model_dump(), "distance": cfg.distance.model_dump(),
                                                    "variant": variant}, "for_method": method})
    _finish_training("midtrain", result, tracker, method=method)


def initial_net(params: Params, init: str, method: str, shape: tuple[int, ...], seed: int):
    # every init is seeded: a diffusion init keeps the fresh values of the gap embedding's first
    # layers (the teacher has none), and an unseeded draw made reruns differ (measured)
    net = _seeded_net(seed, params, shape, True, "posttrain")
    if init == "random":
        return net
    if init == "diffusion":
        nets.load_teacher_into(net, _load_weights("pretrain"))
    elif init == "cmt":
        net.load_state_dict(_load_weights("midtrain", method))
    else:
        raise ValueError(f"unknown init {init!r}; allowed: {', '.join(INITS)}")
    return net


def posttrain_loss(params: Params, method: str, path):
    """The post-training objective of `method` as a Job loss (net, batch, generator, images seen)."""
    cfg = params.posttrain
    if method == "ect":
        return lambda n, x, g, seen: losses.ect_loss(n, path, x, g, seen, cfg.ect, cfg.distance)
    if method == "meanflow":
        return lambda n, x, g, seen: losses.meanflow_loss(n, path, x, g, cfg.meanflow)
    raise ValueError(f"unknown post-training method {method!r}; allowed: {', '.join(METHODS)}")


def posttrain_inputs(init: str, method: str) -> list[Path]:
    """The files a post-training cell starts from (their hashes key its checkpoint)."""
    return [out_dir("data") / "manifest.json"] + {"random": [], "diffusion": [out_dir("pretrain") / "model.pt"],
                                                  "cmt": [out_dir("midtrain", method=method) / "model.pt"]}[init]


def posttrain_params(params: Params, method: str) -> dict:
    """The post-training parameters `method` reads (what MLflow logs for its runs)."""
    return {k: v for k, v in params.posttrain.model_dump().items()
            if k in ("train", method) or (k == "distance" and method == "ect")}


def train_posttrain(params: Params, init: str, method: str, seed: int, **stage_kwargs):
    """Post-train one init x method x seed; returns the result and its open tracker. A study trial
    passes its own checkpoint, run opener and `on_point` hook through `stage_kwargs`."""
    data_dir = out_dir("data")
    train_x, heldout = datasets.load_split(data_dir, "train"), datasets.load_split(data_dir, "heldout")
    shape, path, cfg = tuple(train_x.shape[1:]), PATHS["linear"](), params.posttrain
    loss = posttrain_loss(params, method, path)  # an unknown method fails before the net is built
    net = initial_net(params, init, method, shape, seed)
    job = Job("posttrain", batch=lambda g, b: train_x[torch.randint(len(train_x), (b,), generator=g)], loss=loss,
              evaluate=_heldout_eval(params, path, heldout, shape), label=f"posttrain {method} ({init} init)",
              on_point=stage_kwargs.pop("on_point", None))
    return _train_stage(params, "posttrain", net, job, cfg.train, posttrain_inputs(init, method), init=init,
                        method=method, seed=seed, stage_params={"posttrain": posttrain_params(params, method),
                                                                "init": init, "method": method, "seed": seed},
                        **stage_kwargs)


def run_posttrain(params: Params, init: str, method: str, seed: int) -> None:
    result, tracker = train_posttrain(params, init, method, seed)
    _finish_training("posttrain", result, tracker, init=init, method=method, seed=seed)


def final_scores(params: Params, ema) -> tuple[dict[str, float], dict[str, np.ndarray], float]:
    """1- and 2-step scores of a trained model with `evaluate.samples` samples at the fixed sample
    seed; also the samples and the seconds sampling took."""
    heldout = datasets.load_split(out_dir("data"), "heldout")
    shape, cfg = tuple(heldout.shape[1:]), params.evaluate
    start = time.perf_counter()
    samples = {k: v.numpy() for k, v in sampling.sample(ema, PATHS["linear"](), cfg.samples, shape, cfg.seed,
                                                        params.sampling.t_mid).items()}
    seconds = time.perf_counter() - start
    return scoring.Scorer(params, heldout.numpy())(samples), samples, seconds


def run_evaluate(params: Params, init: str, method: str, seed: int) -> None:
    """Final 1- and 2-step scores of one post-trained cell with `evaluate.samples` samples."""
    cfg = params.evaluate
    net = nets.build(datasets.data_shape(out_dir("data")), params.net, two_times=True)
    trained = out_dir("posttrain", init, method, seed)
    net.load_state_dict(torch.load(trained / "model.pt", map_location="cpu", weights_only=True)["ema"])
    net.to(distributed.device(params.compute.device)).eval()
    scores, samples, seconds = final_scores(params, net)
    out = out_dir("evaluate", init, method, seed)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    np.savez_compressed(out / "samples.npz", **samples)
    posttrain_run = read_json(trained / "run.json")["run_id"]
    tracker = Tracker.open(params, "evaluate", init=init, method=method, seed=seed,
                           stage_params={"evaluate": cfg.model_dump(), "sampling": params.sampling.model_dump()})
    tracker.set_tags({"posttrain_run_id": posttrain_run, "samples": str(cfg.samples)})
    tracker.log_metrics(0, {**scores, "sampling_seconds": seconds})
    tracker.log_artifact(out / "samples.npz")
    tracker.finish()
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "evaluate", "init": init, "method": method,
                                  "seed": seed, "posttrain_run_id": posttrain_run})
    write_json(out / "metrics.json", scores)  # DVC metrics: numbers only
