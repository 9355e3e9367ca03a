import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

ROOT = Path(__file__).resolve().parents[1]


class ExactFlowMap(torch.nn.Module):
    """u(x, s, t) of a Gaussian's exact flow map, optionally scaled by (1 + scale) to step off it."""

    def __init__(self, flow, scale=0.0):
        super().__init__()
        self.flow, self.scale = flow, scale

    def forward(self, x, t, s=None):
        t = torch.as_tensor(t, dtype=x.dtype).expand(x.shape[0])
        s = t if s is None else torch.as_tensor(s, dtype=x.dtype).expand(x.shape[0])
        gap = (s - t).reshape(-1, 1)
        safe = torch.where(gap == 0, torch.ones_like(gap), gap)
        u = torch.where(gap == 0, self.flow.velocity(x, t), (self.flow.flow_map(x, t, s) - x) / safe)
        return u * (1 + self.scale)


@pytest.fixture
def gaussian():
    from cmt_bench.paths import GaussianFlow
    return GaussianFlow(torch.tensor([0.7, -0.3], dtype=torch.float64), 0.5)
