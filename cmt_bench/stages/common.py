"""What the training stages share: seeded networks, in-loop evaluation, one training run with its
MLflow run and checkpoint, and writing a finished stage's outputs."""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .. import data as datasets
from .. import distributed, linear, nets, progress, sampling, scoring, teacher_import
from ..config import Params, fingerprint
from ..data import write_json
from ..layout import checkpoint, out_dir
from ..ledger import FLOPS_MEASURES, Ledger, device_name
from ..tracking import Tracker
from ..train import FLOP_PROBES, Job, derive_seed, train


def build_net(params: Params, shape: tuple[int, ...], two_times: bool) -> torch.nn.Module:
    """The network of this run, with torch's current random weights: the `net` section's, or the
    imported teacher's architecture (pretrain.source import)."""
    if params.pretrain.source == "import":
        return teacher_import.network(params.pretrain.teacher, shape, two_times)
    return nets.build(shape, params.net, two_times)


def seeded_net(seed: int, params: Params, shape: tuple[int, ...], two_times: bool, *tag) -> torch.nn.Module:
    torch.manual_seed(derive_seed(seed, "init", *tag))
    return build_net(params, shape, two_times)


def heldout_eval(params: Params, path, heldout: torch.Tensor, shape: tuple[int, ...], two_step: str):
    """In-loop 1- and 2-step metrics at a fixed sample seed, so curve points are comparable; `two_step`
    is the post-training method's 2-step sampler (sampling.two_step)."""
    score = scoring.Scorer(params, heldout.numpy(), two_step)

    def evaluate(net) -> dict[str, float]:
        net.eval()
        out = sampling.sample(net, path, params.evaluate.inloop_samples, shape, params.evaluate.seed,
                              params.sampling.t_mid, two_step)
        net.train()
        return score({k: v.numpy() for k, v in out.items()})
    return evaluate


def finish_training(stage: str, result, tracker, *, init: str | None = None, method: str | None = None,
                    seed: int | None = None, record: dict | None = None) -> None:
    """Write the stage's outputs (`record`: more fields of its run.json), close its run, then drop the
    resumable checkpoint (rank 0 only: the other ranks of a DDP run have no tracker)."""
    if tracker is None:
        return
    ledger = result.ledger
    loss = next((h["loss"] for h in reversed(result.history) if "loss" in h), None)
    progress.note(f"{progress.count(ledger.images_seen)} images in {ledger.seconds:.1f} s of steps"
                  + (f", loss {loss:.4g}" if loss is not None else ""), training_seconds=ledger.seconds)
    out = out_dir(stage, init, method, seed)
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": result.ema.state_dict(), "net": result.net.state_dict()}, out / "model.pt")
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": stage, "init": init, "method": method,
                                  "seed": seed, "ledger": result.ledger.to_dict(), **(record or {})})
    tracker.finish()
    shutil.rmtree(checkpoint(stage, init, method, seed), ignore_errors=True)


def train_stage(params: Params, stage: str, net, job: Job, train_cfg, inputs: list[Path], *,
                init: str | None = None, method: str | None = None, method_tag: str | None = None,
                seed: int | None = None, stage_params: dict, ckpt: Path | None = None, open_run=None):
    """Train one stage (or matrix cell) on this process's device; `method_tag` names the method in
    MLflow (flow_matching, cmt_cm, ...) where it is not a post-training method; `seed` is a
    post-training cell's seed (else the top-level one). A study trial passes its own checkpoint path
    and `open_run(run_id) -> Tracker`."""
    world = distributed.init()
    compute = params.compute
    dev = distributed.device(compute.device, world)
    net.to(dev, memory_format=torch.channels_last if compute.channels_last else torch.preserve_format)
    precision = distributed.precision_used(compute.precision, dev)
    ledger = Ledger(device=device_name(dev))
    fp = fingerprint(params, stage, init, method, seed, [datasets.sha256(p) for p in inputs])
    ckpt = ckpt or checkpoint(stage, init, method, seed) / "last.pt"

    def open_tracker(run_id):
        if open_run is not None:
            tracker = open_run(run_id)
        else:
            tracker = Tracker.open(params, stage, init=init, method=method_tag or method, run_id=run_id, seed=seed,
                                   stage_params=stage_params)
        if run_id is None:
            tracker.set_tags({"device": ledger.device, "world_size": ledger.world_size, "precision": precision,
                              "compile": compute.compile, "draws": compute.draws, "matmul": linear.route_for(dev),
                              "device_hours_measures": "wall time of training steps x devices; "
                                                       "excludes in-loop evaluation and checkpoint I/O",
                              "flops_measures": FLOPS_MEASURES + f"; mean of {FLOP_PROBES} probe steps, times steps"})
        return tracker
    return train(net, job, train_cfg, seed=params.seed if seed is None else seed, ckpt_path=ckpt, fingerprint=fp,
                 ledger=ledger, open_tracker=open_tracker, world=world, precision=precision,
                 compile=compute.compile, draws=compute.draws)
