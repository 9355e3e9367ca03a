"""The midtrain stage: CMT for one post-training method, in the variant midtrain.variants[method],
on the stored teacher trajectories or on trajectories drawn from the teacher for each batch."""
from __future__ import annotations

import functools

import torch

from .. import data as datasets
from .. import losses, nets, solvers
from ..checkpoint import stage_weights
from ..config import Params
from ..data import read_json
from ..layout import out_dir
from ..paths import PATHS
from ..train import Job
from .common import finish_training, heldout_eval, seeded_net, train_stage
from .trajectories import teacher_velocity

LOSS = {"cm": losses.cmt_cm_loss, "mf": losses.cmt_mf_loss}
# the in-loop 2-step sampler of each variant (sampling.two_step): CMT-CM learns jumps to the data, which
# re-noising uses; CMT-MF jumps between any two times, as a flow map's chain does
TWO_STEP = {"cm": "renoise", "mf": "chain"}


def on_the_fly(teacher, shape: tuple[int, ...], times: torch.Tensor, solver: str):
    """draw(n, generator, device): n whole teacher trajectories from fresh noise of the generator, as
    the trajectories stage stores them from the same noise (tested equal)."""
    def draw(n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        x1 = torch.randn(n, *shape, generator=gen, device=gen.device).to(device)
        return solvers.trajectories(lambda x, t: teacher(x, t), x1, times, solver)[0]
    return draw


def run(params: Params, method: str) -> None:
    """CMT for the post-training `method`, in the variant midtrain.variants[method]."""
    traj_dir = out_dir("trajectories")
    manifest = read_json(traj_dir / "manifest.json")
    heldout = datasets.load_split(out_dir("data"), "heldout")
    shape, path, cfg = tuple(heldout.shape[1:]), PATHS["linear"](), params.midtrain
    variant = cfg.variants[method]
    # seeded: the teacher has no gap embedding, so its first layers keep their fresh random values
    net = seeded_net(params.seed, params, shape, True, "midtrain")
    nets.load_teacher_into(net, stage_weights("pretrain"))
    if manifest.get("mode", "stored") == "stored":
        traj = datasets.read_shards(traj_dir, "traj", manifest["traj"])
        source = dict(data=traj)
        times = torch.tensor(manifest["times"], dtype=traj.dtype)
    else:  # the teacher draws them per batch, on the training device, on mid-training's clock
        times = torch.tensor(manifest["times"], dtype=torch.float32)
        teacher = functools.cache(lambda device: teacher_velocity(params, shape, device))
        draw = on_the_fly(lambda x, t: teacher(x.device)(x, t), shape, times, manifest["solver"])
        source = dict(data=None, draw=draw, teacher_nfe_per_example=manifest["nfe_per_trajectory"])
    loss = LOSS[variant]
    times_on = functools.cache(times.to)  # copied to the training device once, not every step
    job = Job("midtrain", loss=lambda n, x, g, seen: loss(n, x, times_on(x.device), g, cfg.distance),
              evaluate=heldout_eval(params, path, heldout, shape, TWO_STEP[variant]),
              label=f"midtrain CMT-{variant.upper()} for {method}",
              **source)
    result, tracker = train_stage(params, "midtrain", net, job, cfg.train,
                                  [traj_dir / "manifest.json", out_dir("pretrain") / "model.pt"], method=method,
                                  method_tag=f"cmt_{variant}", stage_params={
                                      "midtrain": {"train": cfg.train.model_dump(), "distance": cfg.distance.model_dump(),
                                                   "variant": variant}, "for_method": method,
                                      "trajectories_mode": manifest.get("mode", "stored")})
    finish_training("midtrain", result, tracker, method=method)
