"""The trajectories stage: the teacher's probability-flow ODE from t=1 to 0, whole trajectories as
shards (trajectories.mode stored), or, on the fly, only the grid and solver mid-training draws them with."""
from __future__ import annotations

import shutil

import torch

from .. import data as datasets
from .. import distributed, progress, solvers
from ..checkpoint import stage_weights
from ..config import Params
from ..data import write_json
from ..layout import out_dir
from ..ledger import FLOPS_MEASURES, Ledger, count_flops, device_name
from ..tracking import Tracker
from ..train import generator
from .common import build_net


def teacher_velocity(params: Params, shape: tuple[int, ...], device) -> torch.nn.Module:
    """The pre-trained teacher v(x, t), frozen, on `device`."""
    teacher = build_net(params, shape, two_times=False)
    teacher.load_state_dict(stage_weights("pretrain"))
    return teacher.to(device).eval().requires_grad_(False)


def run(params: Params) -> None:
    cfg = params.trajectories
    shape = datasets.data_shape(out_dir("data"))
    dev = distributed.device(params.compute.device)
    teacher = teacher_velocity(params, shape, dev)
    grid = solvers.time_grid(cfg.steps, cfg.grid, cfg.rho)
    ledger = Ledger(device=device_name(dev))
    tracker = Tracker.open(params, "trajectories", method="teacher_ode",
                           stage_params={"trajectories": cfg.model_dump()})
    velocity = lambda x, t: teacher(x, t)  # noqa: E731
    # the teacher's work per trajectory, counted once on a trajectory of its own (not on the clock)
    one = torch.zeros(1, *shape, device=dev)
    flops_per_trajectory = count_flops(lambda: solvers.integrate(velocity, one, grid, cfg.solver))
    nfe = solvers.integrate(velocity, one, grid, cfg.solver)[1]
    out = out_dir("trajectories")
    shutil.rmtree(out, ignore_errors=True)
    manifest = {"times": grid.tolist(), "solver": cfg.solver, "grid": cfg.grid, "nfe_per_trajectory": nfe,
                "mode": cfg.mode}
    if cfg.mode == "stored":
        gen = generator(params.seed, "trajectories")
        chunks = []
        for start in progress.iterate(range(0, cfg.count, cfg.batch_size), "trajectories", "batch"):
            x1 = torch.randn(min(cfg.batch_size, cfg.count - start), *shape, generator=gen)
            with ledger.clock():
                traj = solvers.trajectories(velocity, x1.to(dev), grid, cfg.solver)[0]
                chunks.append(traj.cpu())  # waits for the GPU, so the clock includes its work
            ledger.images_seen += len(x1)
            ledger.teacher_nfe += nfe * len(x1)
            ledger.flops += flops_per_trajectory * len(x1)
        traj = torch.cat(chunks).numpy()
        manifest["traj"] = datasets.write_shards(out, "traj", traj,
                                                 params.data.samples_per_record // (cfg.steps + 1) or 1,
                                                 params.data.records_per_shard)
    else:
        out.mkdir(parents=True)
    write_json(out / "manifest.json", manifest)
    tracker.log_metrics(0, {**ledger.metrics(), "nfe_per_trajectory": float(nfe)})
    measures = "wall time of teacher ODE integration x devices" if cfg.mode == "stored" else \
        "nothing: trajectories are drawn on the fly, in mid-training's compute"
    tracker.set_tags({"device": ledger.device, "world_size": ledger.world_size, "trajectories_mode": cfg.mode,
                      "device_hours_measures": measures,
                      "flops_measures": FLOPS_MEASURES + "; one trajectory counted, times trajectories"})
    tracker.finish()
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "trajectories", "ledger": ledger.to_dict()})
