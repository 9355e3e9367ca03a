"""Atomic checkpoints: write a temp file, fsync, os.replace. A reader never sees half a file."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from . import layout


def save(path: Path, state: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def load(path: Path) -> dict | None:
    if not path.exists():
        return None
    return torch.load(path, map_location="cpu", weights_only=True)


def stage_weights(stage: str, method: str | None = None) -> dict:
    """The EMA weights a finished training stage wrote (artifacts/<stage>[/<method>]/model.pt)."""
    path = layout.out_dir(stage, method=method) / "model.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run the {layout.cell(stage, None, method)} stage first (dvc repro)")
    return torch.load(path, map_location="cpu", weights_only=True)["ema"]
