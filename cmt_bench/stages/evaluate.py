"""The evaluate stage: final 1- and 2-step scores of one post-trained cell at fixed sample seeds."""
from __future__ import annotations

import shutil
import time

import numpy as np
import torch

from .. import data as datasets
from .. import distributed, fid_stream, progress, sampling, scoring
from ..config import Params
from ..data import read_json, write_json
from ..layout import out_dir
from ..paths import PATHS
from ..tracking import Tracker
from .common import build_net


def final_scores(params: Params, ema, two_step: str) -> tuple[dict[str, float], dict[str, np.ndarray], float]:
    """1- and 2-step scores of a trained model with `evaluate.samples` samples at the fixed sample seed
    (the 2-step ones drawn by `two_step`, sampling.two_step); also the samples and the seconds sampling took."""
    heldout = datasets.load_split(out_dir("data"), "heldout")
    shape, cfg = tuple(heldout.shape[1:]), params.evaluate
    start = time.perf_counter()
    samples = {k: v.numpy() for k, v in sampling.sample(ema, PATHS["linear"](), cfg.samples, shape, cfg.seed,
                                                        params.sampling.t_mid, two_step).items()}
    seconds = time.perf_counter() - start
    return scoring.Scorer(params, heldout.numpy(), two_step)(samples), samples, seconds


def run(params: Params, init: str, method: str, seed: int) -> None:
    """Final 1- and 2-step scores of one post-trained cell with `evaluate.samples` samples, and with
    evaluate.fid_samples the streamed Frechet distance, its blocks shared by every process."""
    cfg = params.evaluate
    world = distributed.init()
    dev = distributed.device(params.compute.device, world)
    shape = datasets.data_shape(out_dir("data"))
    net = build_net(params, shape, two_times=True)
    trained = out_dir("posttrain", init, method, seed)
    # the method's 2-step sampler, as the post-training cell recorded it (its in-loop metrics used it)
    record = read_json(trained / "run.json")
    two_step = record.get("two_step")
    if two_step is None:
        raise ValueError(f"{trained / 'run.json'} names no 2-step sampler: it predates them; rerun its "
                         f"post-training (dvc repro {progress.dvc_name('posttrain', init, method, seed)})")
    net.load_state_dict(torch.load(trained / "model.pt", map_location="cpu", weights_only=True)["ema"])
    net.to(dev).eval()
    streamed, stream_seconds = {}, {}
    if cfg.fid_samples:
        start = time.perf_counter()
        streamed = fid_stream.score(params, net, PATHS["linear"](), cfg.fid_samples, shape, world, dev, two_step)
        stream_seconds = {"fid_stream_seconds": time.perf_counter() - start}
    if not world.main:
        return
    scores, samples, seconds = final_scores(params, net, two_step)
    scores.update(streamed)
    out = out_dir("evaluate", init, method, seed)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    np.savez_compressed(out / "samples.npz", **samples)
    posttrain_run = record["run_id"]
    tracker = Tracker.open(params, "evaluate", init=init, method=method, seed=seed,
                           stage_params={"evaluate": cfg.model_dump(), "sampling": params.sampling.model_dump()})
    tracker.set_tags({"posttrain_run_id": posttrain_run, "samples": str(cfg.samples),
                      "two_step": two_step,
                      **({"fid_samples": str(cfg.fid_samples), "fid_processes": str(world.size),
                         "fid_reference": cfg.fid_reference} if cfg.fid_samples else {})})
    tracker.log_metrics(0, {**scores, "sampling_seconds": seconds, **stream_seconds})
    tracker.log_artifact(out / "samples.npz")
    tracker.finish()
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "evaluate", "init": init, "method": method,
                                  "seed": seed, "posttrain_run_id": posttrain_run})
    write_json(out / "metrics.json", scores)  # DVC metrics: numbers only
    progress.note("  ".join(f"{k} {scores[k]:.4g}" for k in sorted(scores) if k.startswith(params.report_metric)))
