"""Where training runs: the processes of torch.distributed (as launched by `torchrun`), the device
of each, and its precision.

Without torchrun's environment (WORLD_SIZE unset or 1) everything here is a no-op, so one process
runs the same code unchanged. Under torchrun each process trains a DistributedDataParallel copy of
the network on its own share of every batch (gloo on CPU, nccl on CUDA); rank 0 alone logs to
MLflow, checkpoints and writes the stage's outputs.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the process's index on its machine: its GPU

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _tensor(self, values: list[float]) -> torch.Tensor:
        device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        return torch.tensor(values, dtype=torch.float64, device=device)

    def any(self, flag: bool) -> bool:
        """True on every rank if it is true on any (so all ranks stop together)."""
        if self.size == 1:
            return flag
        t = self._tensor([float(flag)])
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, values: torch.Tensor) -> torch.Tensor:
        """The float64 sum of `values` over the ranks, on the CPU (itself on one process)."""
        if self.size == 1:
            return values.double().cpu()
        t = values.double().to(self._tensor([0.0]).device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.cpu()

    def same_everywhere(self, params: list[torch.Tensor]) -> bool:
        """Whether every rank holds bit-identical `params` (compared through a float64 checksum)."""
        if self.size == 1:
            return True
        flat = torch.cat([p.detach().flatten().double().cpu() for p in params])
        weights = torch.arange(1, len(flat) + 1, dtype=torch.float64)
        mine = self._tensor([flat.sum().item(), (flat * weights).sum().item()])
        low, high = mine.clone(), mine.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool(torch.equal(low, high))


def init() -> World:
    """Join the process group torchrun describes (once per process); World() when not under torchrun."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size(), local_rank)


def device(choice: str, world: World = World()) -> torch.device:
    """compute.device resolved for this process: auto picks CUDA when one is visible."""
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("compute.device: 'cuda' but torch sees no CUDA device; allowed here: auto, cpu")
        return torch.device("cuda", world.local_rank)
    return torch.device("cpu")


def precision_used(precision: str, dev: torch.device) -> str:
    return precision if dev.type == "cuda" else "fp32"


def autocast(precision: str, dev: torch.device):
    """bf16 autocast on CUDA when asked; fp32 otherwise (a CPU always trains in fp32)."""
    if precision_used(precision, dev) == "bf16":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def close() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def wrap(net: torch.nn.Module, world: World) -> torch.nn.Module:
    """DDP over `net` when there are several processes: gradients are averaged in backward."""
    if world.size == 1:
        return net
    from torch.nn.parallel import DistributedDataParallel
    on_gpu = next(net.parameters()).is_cuda
    return DistributedDataParallel(net, device_ids=[world.local_rank] if on_gpu else None)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The bare network inside the wrappers of a training step: compiling.StepModel (`inner`),
    torch.compile (`_orig_mod`) and DDP (`module`)."""
    for attr in ("inner", "_orig_mod", "module"):
        net = getattr(net, attr, net)
    return net
