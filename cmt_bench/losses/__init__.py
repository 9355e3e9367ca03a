"""Training objectives, one module per method. Each returns the mean loss of a batch."""
from .distance import distance
from .flow_matching import flow_matching_loss
from .cmt import cmt_cm_loss, cmt_mf_loss
from .ect import consistency_loss, ect_loss, ect_r
from .meanflow import meanflow_loss, meanflow_target

__all__ = ["distance", "flow_matching_loss", "cmt_cm_loss", "cmt_mf_loss", "consistency_loss", "ect_loss", "ect_r",
           "meanflow_loss", "meanflow_target"]
