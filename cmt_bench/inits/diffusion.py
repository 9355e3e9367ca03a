"""From the diffusion (flow-matching) teacher: its weights, the gap embedding left at zero, so the
flow map starts as the teacher's velocity field."""
from ..checkpoint import stage_weights
from ..layout import out_dir
from ..nets import load_teacher_into
from . import Init, register

INIT = register(Init(name="diffusion", label="diffusion", color="#1f77b4", upstream=("pretrain",),
                     start=lambda net, method: load_teacher_into(net, stage_weights("pretrain")),
                     inputs=lambda method: [out_dir("pretrain") / "model.pt"]))
