"""The midtrain stage: CMT for one post-training method, in the variant midtrain.variants[method]."""
from __future__ import annotations

import functools

import torch

from .. import data as datasets
from .. import losses, nets
from ..checkpoint import stage_weights
from ..config import Params
from ..data import read_json
from ..layout import out_dir
from ..paths import PATHS
from ..train import Job
from .common import finish_training, heldout_eval, seeded_net, train_stage

LOSS = {"cm": losses.cmt_cm_loss, "mf": losses.cmt_mf_loss}


def run(params: Params, method: str) -> None:
    """CMT for the post-training `method`, in the variant midtrain.variants[method]."""
    traj_dir = out_dir("trajectories")
    manifest = read_json(traj_dir / "manifest.json")
    traj = datasets.read_shards(traj_dir, "traj", manifest["traj"])
    times = torch.tensor(manifest["times"], dtype=traj.dtype)
    heldout = datasets.load_split(out_dir("data"), "heldout")
    shape, path, cfg = tuple(traj.shape[2:]), PATHS["linear"](), params.midtrain
    variant = cfg.variants[method]
    # seeded: the teacher has no gap embedding, so its first layers keep their fresh random values
    net = seeded_net(params.seed, params, shape, True, "midtrain")
    nets.load_teacher_into(net, stage_weights("pretrain"))
    loss = LOSS[variant]
    times_on = functools.cache(times.to)  # copied to the training device once, not every step
    job = Job("midtrain", data=traj,
              loss=lambda n, x, g, seen: loss(n, x, times_on(x.device), g, cfg.distance),
              evaluate=heldout_eval(params, path, heldout, shape), label=f"midtrain CMT-{variant.upper()} for {method}")
    result, tracker = train_stage(params, "midtrain", net, job, cfg.train,
                                  [traj_dir / "manifest.json", out_dir("pretrain") / "model.pt"], method=method,
                                  method_tag=f"cmt_{variant}", stage_params={
                                      "midtrain": {"train": cfg.train.model_dump(), "distance": cfg.distance.model_dump(),
                                                   "variant": variant}, "for_method": method})
    finish_training("midtrain", result, tracker, method=method)
