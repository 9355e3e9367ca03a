"""Training objectives shared across stages: flow matching (the teacher), CMT (mid-training) and the
distances. Each post-training method keeps its own loss in its module under `cmt_bench/methods/`;
what several of them share (the average-velocity identity) is `average_velocity`."""
from .distance import distance
from .flow_matching import flow_matching_loss
from .cmt import cmt_cm_loss, cmt_mf_loss

__all__ = ["distance", "flow_matching_loss", "cmt_cm_loss", "cmt_mf_loss"]
