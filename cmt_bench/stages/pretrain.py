"""The pretrain stage: the flow-matching teacher v(x, t) on the linear path."""
from __future__ import annotations

from .. import data as datasets
from .. import losses, scoring, solvers
from ..config import Params
from ..layout import out_dir
from ..paths import PATHS, noise
from ..train import Job
from .common import finish_training, seeded_net, train_stage


def run(params: Params) -> None:
    data_dir = out_dir("data")
    train_x, heldout = datasets.load_split(data_dir, "train"), datasets.load_split(data_dir, "heldout")
    shape, path, cfg = tuple(train_x.shape[1:]), PATHS["linear"](), params.pretrain
    net = seeded_net(params.seed, params, shape, False, "pretrain")
    score = scoring.Scorer(params, heldout.numpy())
    ode = cfg.ode_eval
    grid = solvers.time_grid(ode.steps, ode.grid, ode.rho)

    def evaluate(ema) -> dict[str, float]:  # the teacher's ODE samples (pretrain.ode_eval's solver)
        x1 = noise(params.evaluate.inloop_samples, shape, params.evaluate.seed)[0].to(next(ema.parameters()).device)
        x0 = solvers.integrate(lambda x, t: ema(x, t), x1, grid, ode.solver)[0][-1].cpu().numpy()
        return score({"ode": x0})

    job = Job("pretrain", data=train_x,
              loss=lambda n, x, g, seen: losses.flow_matching_loss(n, path, x, g, cfg.t_sampling),
              evaluate=evaluate, label="pretrain (teacher)")
    result, tracker = train_stage(params, "pretrain", net, job, cfg.train, [data_dir / "manifest.json"],
                                  method_tag="flow_matching",
                                  stage_params={"pretrain": cfg.model_dump(), "net": params.net.model_dump()})
    finish_training("pretrain", result, tracker)
