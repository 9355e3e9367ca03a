"""A test-only init, dropped into cmt_bench/inits/ by test_plugins: halfway between the fresh
network and the teacher (every teacher weight averaged with its fresh value), a partial warm start."""
import torch

from ..checkpoint import stage_weights
from ..layout import out_dir
from . import Init, register


def start(net, method: str) -> None:
    teacher = stage_weights("pretrain")
    with torch.no_grad():
        for name, value in net.state_dict().items():
            if name in teacher:
                value.copy_((value + teacher[name]) / 2)


INIT = register(Init(name="half_teacher", label="half-teacher", color="#2ca02c", upstream=("pretrain",),
                     start=start, inputs=lambda method: [out_dir("pretrain") / "model.pt"]))
