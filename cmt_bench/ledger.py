"""The compute ledger: measured wall time x devices, samples seen, teacher evaluations, counted FLOPs.

`device_hours` counts the wall time of training steps (data, forward, backward, optimizer, EMA)
or of ODE integration, times the number of devices; in-loop evaluation and checkpoint I/O are
not counted, so every init pays the same accounting. On CPU the device is the whole CPU.

`flops` does not move with machine load: the floating-point operations of the same work, counted
by `torch.utils.flop_counter.FlopCounterMode` (matrix multiplies, convolutions and attention, in the
forward pass, the backward pass and forward-mode JVPs; elementwise work, the optimizer and EMA are
not counted). A training stage counts its step on probe draws before it trains (`train.py`), a
teacher ODE stage one whole trajectory; the same work on any machine gives the same count.
"""
from __future__ import annotations

import platform
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Callable

import torch


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"


@dataclass
class Ledger:
    device: str
    world_size: int = 1
    seconds: float = 0.0
    images_seen: int = 0
    teacher_nfe: int = 0
    flops: float = 0.0

    @property
    def device_hours(self) -> float:
        return self.seconds * self.world_size / 3600

    @contextmanager
    def clock(self):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        out = {"device_hours": self.device_hours, "images_seen": float(self.images_seen), "flops": self.flops}
        if self.teacher_nfe:
            out["teacher_nfe"] = float(self.teacher_nfe)
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "device_hours": self.device_hours}


FLOPS_MEASURES = ("matrix-multiply, convolution and attention FLOPs (torch.utils.flop_counter) of forward, "
                  "backward and JVPs; elementwise work, optimizer and EMA not counted")


def count_flops(work: Callable[[], object]) -> float:
    """The FLOPs FlopCounterMode counts while `work()` runs."""
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as counter:
        work()
    return float(counter.get_total_flops())
