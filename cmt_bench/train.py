"""The training loop shared by every stage; a stage differs only in its loss, data and init.

Reproducible and resumable: each step's randomness (batch indices, noise, times) comes from a
generator seeded by (seed, stage, images seen, rank) on the device the draws are made on, and a
periodic atomic checkpoint holds weights, EMA, optimizer, ledger and the MLflow run id. A rerun after
a kill continues from it into the same run and ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

import copy
import hashlib
import math
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import checkpoint, compiling, progress
from .config import TrainConfig
from .distributed import World, autocast, wrap
from .ledger import Ledger, count_flops

FLOP_PROBES = 4  # draws whose counted step FLOPs are averaged (a MeanFlow step's JVP rows vary per draw)


class NonFiniteLoss(RuntimeError):
    """Training produced NaN/inf; the last good checkpoint is left untouched."""


class RanksDiverged(RuntimeError):
    """Processes of one DDP run ended with different weights: gradients were not synchronised."""


def derive_seed(*parts) -> int:
    return int.from_bytes(hashlib.sha256("/".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def generator(*parts, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


@dataclass
class Job:
    """One training stage: the examples batches are drawn from (uniformly, with replacement), the
    loss, and an optional in-loop evaluation. A job whose examples are made per batch (trajectories
    drawn on the fly) gives `draw` instead of data."""
    stage: str
    data: torch.Tensor | None
    loss: Callable[[nn.Module, torch.Tensor, torch.Generator, int], torch.Tensor]
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None
    label: str = ""  # shown on the progress bar
    # called with (images seen, logged values) after each logged point; may raise to stop the run
    # (a study's pruner does); the checkpoint and the MLflow run stay as they were
    on_point: Callable[[int, dict[str, float]], None] | None = None
    # draw(n, generator, device) -> n examples made on `device` (on the clock), from the generator only
    draw: Callable[[int, torch.Generator, torch.device], torch.Tensor] | None = None
    teacher_nfe_per_example: int = 0  # teacher evaluations `draw` spends per example (the ledger counts them)
    # a stage that runs with nothing beside it (the teacher's): its in-loop evaluation may run on a core
    # the steps leave idle (a CPU with more cores than torch threads), on a copy of the EMA weights
    evaluate_beside: bool = False

    def batch(self, data: torch.Tensor | None, n: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
        """n examples on `device`: drawn from `data` (on the generator's device) or made by `draw`."""
        if self.draw is not None:
            return self.draw(n, gen, device)
        return data[torch.randint(len(data), (n,), generator=gen, device=data.device)].to(device, non_blocking=True)


@dataclass
class Result:
    net: nn.Module
    ema: nn.Module
    ledger: Ledger
    steps: int
    history: list[dict] = field(default_factory=list)


def _beside(job: Job, device: torch.device, world: World) -> ThreadPoolExecutor | None:
    """A thread for job's in-loop evaluation where it may run beside the steps (Job.evaluate_beside): a
    CPU with a core to spare, one process, no callback waiting on each point. It keeps the torch threads
    of the steps, so it computes what the steps' thread would."""
    threads = torch.get_num_threads()
    if not (job.evaluate_beside and job.evaluate is not None and job.on_point is None and device.type == "cpu"
            and world.size == 1 and len(os.sched_getaffinity(0)) > threads):
        return None
    return ThreadPoolExecutor(1, thread_name_prefix=f"{job.stage}-evaluate", initializer=torch.set_num_threads,
                              initargs=(threads,))


def _ema_update(ema_params: list, net_params: list, decay: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(ema_params, net_params, 1 - decay)


def make_optimizer(net: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """cfg.optimizer over net's parameters: Adam fused (one kernel per tensor for the whole update; a
    toy ECT step took 0.91 x its time with foreach in benchmarks/linear_cost.py), RAdam, which has no
    fused kernel, foreach (one kernel per op for all tensors)."""
    if cfg.optimizer == "adam":
        return torch.optim.Adam(net.parameters(), lr=cfg.lr, fused=True)
    return torch.optim.RAdam(net.parameters(), lr=cfg.lr, foreach=True)


def _crossed(before: int, after: int, every: int) -> bool:
    return after // every > before // every


def step_flops(net: nn.Module, job: Job, data: torch.Tensor | None, rank_batch: int, seed: int, precision: str,
               draw_device: torch.device) -> float:
    """One process's counted FLOPs per step (ledger.py): the batch's draw (a teacher's trajectories on
    the fly) and the loss's forward and backward on the bare network, mean over FLOP_PROBES draws of their own. The probes leave no trace: the global random
    state (dropout) is restored and the gradients are cleared, so training runs as if they never ran."""
    device = next(net.parameters()).device
    total = 0.0
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for probe in range(FLOP_PROBES):
            gen = generator(seed, job.stage, "flops", probe, device=draw_device)

            def step():
                batch = job.batch(data, rank_batch, gen, device)  # counted: a draw's teacher work is the step's
                with autocast(precision, device):
                    loss = job.loss(net, batch, gen, 0)
                loss.backward()
            total += count_flops(step)
    for p in net.parameters():
        p.grad = None
    return total / FLOP_PROBES


def train(net: nn.Module, job: Job, cfg: TrainConfig, *, seed: int, ckpt_path: Path, fingerprint: str,
          ledger: Ledger, open_tracker: Callable[[str | None], "object"],
          world: World = World(), precision: str = "fp32", compile: str = "none",
          draws: str = "device", flops_per_step: float | None = None) -> tuple[Result, "object"]:
    """Run `job` until `cfg.budget_images`; return the result and the (still open) tracker.

    Under torchrun (`world.size` > 1) each rank draws batch_size / world.size images per step and
    DDP averages the gradients; only rank 0 opens the tracker (others get None), logs and saves.
    `net` is already on its device; `precision` bf16 autocasts the step there if it is a GPU;
    `compile` is compute.compile (compiling.py); `draws` device keeps the data and every random draw
    on the net's device (nothing is copied from the host per step), host draws them on the CPU.
    `flops_per_step`: the counted FLOPs of a step where the caller has them (the plan's second timing
    run of the same job): counting costs FLOP_PROBES steps, most of a short timing run."""
    if cfg.batch_size % world.size:
        raise ValueError(f"{job.stage}: train.batch_size={cfg.batch_size} must divide by the number of "
                         f"processes ({world.size}): it is the global batch")
    rank_batch = cfg.batch_size // world.size
    rank_tag = (world.rank,) if world.size > 1 else ()  # one process keeps its historical random stream
    if world.size > 1:  # dropout draws from the global generator: different masks on each rank
        torch.manual_seed(derive_seed(seed, job.stage, "rank", world.rank))
    ledger.world_size = world.size
    device = next(net.parameters()).device
    draw_device = device if draws == "device" else torch.device("cpu")
    data = None if job.data is None else job.data.to(draw_device)  # once, not per step
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = make_optimizer(net, cfg)
    # listed once: walking the module tree every step cost 3% of a small MLP's step time
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    total_steps = math.ceil(cfg.budget_images / cfg.batch_size)
    step, run_id = 0, None
    loss_sum, loss_n = 0.0, 0  # the running mean of the loss since the last logged point

    if flops_per_step is None:  # off the clock
        flops_per_step = step_flops(net, job, data, rank_batch, seed, precision, draw_device) * world.size
    state = checkpoint.load(ckpt_path)
    if state is not None and state["fingerprint"] != fingerprint:
        print(f"[{job.stage}] {ckpt_path} belongs to other parameters or inputs; starting afresh", file=sys.stderr)
        state = None
    if state is not None:
        net.load_state_dict(state["net"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and "rng_cuda" in state:  # dropout's masks on a GPU come from its generator
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        step, run_id = state["step"], state["run_id"]
        loss_sum, loss_n = state["loss_sum"], state["loss_n"]
        ledger.seconds, ledger.images_seen, ledger.flops = (state["seconds"], state["images_seen"],
                                                        state.get("flops", flops_per_step * step))
        ledger.teacher_nfe = state.get("teacher_nfe", 0)
        if world.main:
            print(f"[{job.stage}] resuming from {ckpt_path} at step {step} ({ledger.images_seen} images)", file=sys.stderr)
    tracker = open_tracker(run_id) if world.main else None
    # after loading: DDP starts from identical weights on every rank
    model = compiling.for_step(wrap(net, world), compile)

    beside = _beside(job, device, world)
    pending = None  # (step, values, the evaluation running beside the steps): the point not yet logged

    def log_point(loss_mean: float | None) -> None:
        nonlocal pending
        if not world.main:
            return
        values = {**ledger.metrics(), "step": float(step)}
        if loss_mean is not None:
            values["loss"] = loss_mean
        if beside is not None:  # logged once it is done, before the next point or checkpoint
            finish_point()
            pending = (step, values, beside.submit(job.evaluate, copy.deepcopy(ema)))
            return
        if job.evaluate is not None:
            values.update(job.evaluate(ema))
        logged(step, values)

    def logged(at: int, values: dict) -> None:
        tracker.log_metrics(at, values)
        result.history.append(values)
        if job.on_point is not None:
            job.on_point(ledger.images_seen, values)

    def finish_point() -> None:
        nonlocal pending
        if pending is not None:
            (at, values, scores), pending = pending, None
            logged(at, {**values, **scores.result()})

    def save() -> None:
        if not world.main:
            return
        finish_point()  # a checkpoint follows every point before it, as without the thread
        checkpoint.save(ckpt_path, {
            "fingerprint": fingerprint, "step": step, "run_id": tracker.run_id, "seconds": ledger.seconds,
            "images_seen": ledger.images_seen, "flops": ledger.flops, "teacher_nfe": ledger.teacher_nfe,
            "loss_sum": loss_sum, "loss_n": loss_n,
            "net": net.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(), "rng_cpu": torch.get_rng_state(),
            **({"rng_cuda": torch.cuda.get_rng_state(device)} if device.type == "cuda" else {})})

    result = Result(net, ema, ledger, total_steps)
    if step == 0:
        log_point(None)  # the init's own quality, at zero compute
    bar = progress.bar(total_steps * cfg.batch_size, job.label or job.stage, "img", initial=ledger.images_seen,
                       enabled=world.main)
    try:
        while step < total_steps:
            before = ledger.images_seen
            with ledger.clock():
                gen = generator(seed, job.stage, before, *rank_tag, device=draw_device)
                batch = job.batch(data, rank_batch, gen, device)
                with autocast(precision, device):
                    loss = job.loss(model, batch, gen, before)
                if world.any(not torch.isfinite(loss)):
                    raise NonFiniteLoss(
                        f"{job.stage}: loss became {loss.item()} at step {step + 1} (images_seen={before}); stopped. "
                        f"The last good checkpoint is kept at {ckpt_path}. Try a lower learning rate.")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.lr_decay == "linear":  # a function of the step alone, so a resumed run decays alike
                    for group in opt.param_groups:
                        group["lr"] = cfg.lr * (1 - step / total_steps)
                opt.step()
                _ema_update(ema_params, net_params, cfg.ema_decay)
                if device.type == "cuda":
                    torch.cuda.synchronize()  # the clock must include the queued GPU work
            step += 1
            ledger.images_seen += cfg.batch_size
            ledger.flops += flops_per_step
            ledger.teacher_nfe += job.teacher_nfe_per_example * cfg.batch_size
            loss_sum, loss_n = loss_sum + loss.item(), loss_n + 1
            bar.update(cfg.batch_size)
            last = step == total_steps
            if last or _crossed(before, ledger.images_seen, cfg.log_every_images):
                log_point(loss_sum / loss_n)
                bar.set_postfix(loss=f"{loss_sum / loss_n:.4g}")
                loss_sum, loss_n = 0.0, 0
            if last or _crossed(before, ledger.images_seen, cfg.checkpoint_every_images):
                save()
        finish_point()
        if not world.same_everywhere(net_params):
            raise RanksDiverged(f"{job.stage}: the {world.size} processes ended with different weights "
                                f"(a gradient bypassed DDP's synchronisation)")
    except (NonFiniteLoss, RanksDiverged) as exc:
        if tracker is not None:
            finish_point()
            tracker.set_tags({"failure": str(exc)})
            tracker.finish("FAILED")
        raise
    finally:
        bar.close()
        if beside is not None:
            beside.shutdown(cancel_futures=True)
    if tracker is not None and world.size > 1:
        tracker.set_tags({"ranks_identical_weights": "true"})
    return result, tracker
