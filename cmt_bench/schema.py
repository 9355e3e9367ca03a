"""The parameter sections the lower layers are built from (networks, losses, post-training methods).

They live apart from `config`, which assembles the whole parameter file from them and from the
method registry: a method module imports these, and `config` imports the methods, without a cycle.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

# strict: a YAML `true` must not pass for the integer 1
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, lt=1)]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TimeSampling(Section):
    """Logit-normal t on (0, 1): logit(t) ~ N(mean, std). On the linear path logit(t) = log(sigma),
    so this is EDM/ECT's log-normal sigma density."""
    mean: float = 0.0
    std: PositiveFloat = 1.0


class NetConfig(Section):
    kind: Literal["mlp", "unet"] = "mlp"  # mlp for vectors (toy), unet for images
    hidden: PositiveInt = 128  # mlp width
    depth: PositiveInt = 3  # mlp residual blocks
    # unet: base channels, multiplier per resolution level (each level halves the size), residual
    # blocks per level, self-attention at the lowest resolution, dropout inside residual blocks
    channels: PositiveInt = 32
    channel_mult: list[PositiveInt] = [1, 2]
    blocks_per_level: PositiveInt = 1
    attention: bool = True
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    norm_groups: PositiveInt = 8
    time_features: PositiveInt = 32
    # Highest frequency (radians per unit time) of the sinusoidal time features. MeanFlow trains
    # through d/dt of the network: at 1000 its 1-step error on Gaussian data stayed at 0.43, at 20
    # it fell to 0.06 (same steps), so keep it low; the fields here are smooth in t.
    time_max_freq: PositiveFloat = 20.0

    @field_validator("channel_mult")
    @classmethod
    def _some_levels(cls, mult: list[int]) -> list[int]:
        if not mult:
            raise ValueError("give at least one level, e.g. [1, 2]")
        return mult


class Distance(Section):
    kind: Literal["l2", "pseudo_huber"] = "l2"
    huber_c: PositiveFloat = 0.01  # pseudo-Huber sqrt(|d|^2 + c^2) - c
