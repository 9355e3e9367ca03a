"""The starts stage: a digest of each post-training cell's starting weights.

A cell depends on its own digest instead of on every upstream output an init might read, so DVC
reruns it exactly when the weights it starts from change: a random-init cell never for a new
teacher or mid-training, a CMT cell for its own method's mid-training only. This stage itself reruns
whenever any upstream output changes; it only builds the networks (no training), and a digest that
comes out the same leaves its cells alone, because DVC compares dependencies by content.
"""
from __future__ import annotations

import hashlib

import torch

from .. import data as datasets
from ..config import Params
from ..data import write_json
from ..layout import out_dir, start_digest
from .posttrain import initial_net


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 of a state dict's names, dtypes, shapes and bytes (torch.save's bytes are not stable)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(state.items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def run(params: Params) -> None:
    shape = datasets.data_shape(out_dir("data"))
    post = params.posttrain
    for method in post.methods:
        for init in post.inits:
            for seed in post.seeds:
                net = initial_net(params, init, method, shape, seed)
                path = start_digest(init, method, seed)
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json(path, {"init": init, "method": method, "seed": seed,
                                  "sha256": weights_digest(net.state_dict())})
