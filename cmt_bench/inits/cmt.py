"""From Consistency Mid-Training: the flow map mid-trained for this post-training method."""
from ..checkpoint import stage_weights
from ..layout import out_dir
from . import Init, register

INIT = register(Init(name="cmt", label="CMT", color="#d62728", upstream=("pretrain", "trajectories", "midtrain"),
                     start=lambda net, method: net.load_state_dict(stage_weights("midtrain", method)),
                     inputs=lambda method: [out_dir("midtrain", method=method) / "model.pt"]))
