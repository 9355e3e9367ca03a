"""The posttrain stage: one init x method x seed cell, on real data, at the preset's budget in images."""
from __future__ import annotations

from pathlib import Path


from .. import data as datasets
from .. import inits, methods
from ..config import Params
from ..layout import out_dir
from ..paths import PATHS
from ..train import Job
from .common import finish_training, heldout_eval, seeded_net, train_stage


def initial_net(params: Params, init: str, method: str, shape: tuple[int, ...], seed: int):
    # every init is seeded: a diffusion init keeps the fresh values of the gap embedding's first
    # layers (the teacher has none), and an unseeded draw made reruns differ (measured)
    start = inits.get(init).start  # an unknown init fails before the net is built
    net = seeded_net(seed, params, shape, True, "posttrain")
    start(net, method)
    return net


def posttrain_loss(params: Params, method: str, path):
    """The post-training objective of `method` as a Job loss (net, batch, generator, images seen)."""
    m, cfg = methods.get(method), params.posttrain
    section = getattr(cfg, method)
    return lambda n, x, g, seen: m.loss(n, path, x, g, seen, section, cfg.distance)


def posttrain_inputs(init: str, method: str) -> list[Path]:
    """The files a post-training cell starts from (their hashes key its checkpoint)."""
    return [out_dir("data") / "manifest.json", *inits.get(init).inputs(method)]


def posttrain_params(params: Params, method: str) -> dict:
    """The post-training parameters `method` reads (what MLflow logs for its runs)."""
    reads_distance = methods.get(method).uses_distance
    return {k: v for k, v in params.posttrain.model_dump().items()
            if k in ("train", method) or (k == "distance" and reads_distance)}


def train_posttrain(params: Params, init: str, method: str, seed: int, *, inloop: bool = True, **stage_kwargs):
    """Post-train one init x method x seed; returns the result and its open tracker. A study trial
    passes its own checkpoint, run opener and `on_point` hook through `stage_kwargs`, and
    `inloop=False` where nothing reads its in-loop scores."""
    on_point = stage_kwargs.pop("on_point", None)
    if on_point is not None and not inloop:
        raise ValueError("on_point reads the in-loop scores: it needs inloop=True")
    data_dir = out_dir("data")
    train_x = datasets.load_split(data_dir, "train")
    shape, path, cfg = tuple(train_x.shape[1:]), PATHS["linear"](), params.posttrain
    loss = posttrain_loss(params, method, path)  # an unknown method fails before the net is built
    net = initial_net(params, init, method, shape, seed)
    evaluate = heldout_eval(params, path, datasets.load_split(data_dir, "heldout"), shape,
                            methods.get(method).two_step) if inloop else None
    job = Job("posttrain", data=train_x, loss=loss, evaluate=evaluate, label=f"posttrain {method} ({init} init)",
              on_point=on_point)
    return train_stage(params, "posttrain", net, job, cfg.train, posttrain_inputs(init, method), init=init,
                       method=method, seed=seed, stage_params={"posttrain": posttrain_params(params, method),
                                                               "init": init, "method": method, "seed": seed},
                       **stage_kwargs)


def run(params: Params, init: str, method: str, seed: int) -> None:
    result, tracker = train_posttrain(params, init, method, seed)
    finish_training("posttrain", result, tracker, init=init, method=method, seed=seed,
                    record={"two_step": methods.get(method).two_step})  # the evaluate stage samples alike
