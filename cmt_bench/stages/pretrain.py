"""The pretrain stage: the flow-matching teacher v(x, t) on the linear path, trained here or, with
pretrain.source import, read from a file (scored the same way; its training cost is not measured)."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .. import data as datasets
from .. import distributed, losses, scoring, solvers, teacher_import
from ..config import Params
from ..data import write_json
from ..layout import out_dir
from ..ledger import Ledger, device_name
from ..paths import PATHS, noise
from ..tracking import Tracker
from ..train import Job
from .common import finish_training, seeded_net, train_stage


def run(params: Params) -> None:
    data_dir = out_dir("data")
    train_x, heldout = datasets.load_split(data_dir, "train"), datasets.load_split(data_dir, "heldout")
    shape, path, cfg = tuple(train_x.shape[1:]), PATHS["linear"](), params.pretrain
    score = scoring.Scorer(params, heldout.numpy())
    ode = cfg.ode_eval
    grid = solvers.time_grid(ode.steps, ode.grid, ode.rho)

    def evaluate(ema) -> dict[str, float]:  # the teacher's ODE samples (pretrain.ode_eval's solver)
        x1 = noise(params.evaluate.inloop_samples, shape, params.evaluate.seed)[0].to(next(ema.parameters()).device)
        with torch.no_grad():
            x0 = solvers.integrate(lambda x, t: ema(x, t), x1, grid, ode.solver)[0][-1].cpu().numpy()
        return score({"ode": x0})

    if cfg.source == "import":
        return imported(params, shape, evaluate)
    net = seeded_net(params.seed, params, shape, False, "pretrain")
    job = Job("pretrain", data=train_x,
              loss=lambda n, x, g, seen: losses.flow_matching_loss(n, path, x, g, cfg.t_sampling),
              evaluate=evaluate, label="pretrain (teacher)", evaluate_beside=True)  # it runs alone (schedule.py)
    result, tracker = train_stage(params, "pretrain", net, job, cfg.train, [data_dir / "manifest.json"],
                                  method_tag="flow_matching",
                                  stage_params={"pretrain": cfg.model_dump(), "net": params.net.model_dump()})
    finish_training("pretrain", result, tracker)


def imported(params: Params, shape: tuple[int, ...], evaluate) -> None:
    """The teacher from pretrain.teacher, scored like a trained one, saved as the stages read it. Its
    ledger is empty (nothing was trained here); what it cost is what the user declares, tagged so."""
    teacher = params.pretrain.teacher
    dev = distributed.device(params.compute.device)
    net = teacher_import.network(teacher, shape, two_times=False, weights=True).to(dev).eval()
    scores = evaluate(net)
    ledger = Ledger(device=device_name(dev))
    tracker = Tracker.open(params, "pretrain", method="imported_teacher",
                           stage_params={"pretrain": {"source": "import", "teacher": teacher.model_dump()}})
    tags = {"teacher_source": "import", "teacher_sha256": files_sha256(teacher.path, teacher.format),
            "device_hours_measures": "nothing: the teacher was imported, not trained here"}
    if teacher.declared_device_hours is not None:
        tags["declared_device_hours"] = str(teacher.declared_device_hours)
    tracker.set_tags(tags)
    tracker.log_metrics(0, {**ledger.metrics(), **scores})
    out = out_dir("pretrain")
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.cpu() for k, v in net.state_dict().items()}
    torch.save({"ema": state, "net": state}, out / "model.pt")
    write_json(out / "run.json", {"run_id": tracker.run_id, "stage": "pretrain", "source": "import",
                                  "teacher_sha256": tags["teacher_sha256"], "ledger": ledger.to_dict(),
                                  "declared_device_hours": teacher.declared_device_hours})
    tracker.finish()


def files_sha256(path: str, fmt: str) -> str:
    """One hash of the teacher's files (a diffusers folder's config and weights), so a run says which
    teacher it used; an entry point's checkpoint after '@', if it is a file."""
    files = sorted(Path(path).glob("*.json")) + sorted(Path(path).glob("*.safetensors")) if fmt == "diffusers" else \
        [Path(p) for p in [str(path).partition("@")[2]] if p and Path(p).is_file()]
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        digest.update(datasets.sha256(f).encode())
    return digest.hexdigest() if files else "unknown"
