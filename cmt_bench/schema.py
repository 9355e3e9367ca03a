"""The parameter sections the lower layers are built from (networks, losses, post-training methods).

They live apart from `config`, which assembles the whole parameter file from them and from the
method registry: a method module imports these, and `config` imports the methods, without a cycle.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# strict: a YAML `true` must not pass for the integer 1
PositiveInt = Annotated[int, Field(gt=0, strict=True)]
PositiveFloat = Annotated[float, Field(gt=0)]
Probability = Annotated[float, Field(gt=0, lt=1)]
CompileMode = Literal["none", "step", "jvp"]  # compute.compile (compiling.py)
MatmulRoute = Literal["auto", "torch", "onednn"]  # compute.matmul (linear.py)

# an imported teacher (teacher_import, teacher_conversion): its file formats, what it predicts, and
# each noise schedule with the constants it takes (teacher_conversion checks its classes agree)
TEACHER_FORMATS = ("diffusers", "entrypoint")
TEACHER_PREDICTIONS = ("eps", "x0", "v", "edm", "velocity")
TEACHER_SCHEDULES = {"linear": (), "edm": ("sigma_min", "sigma_max"), "vp_cosine": ("s", "time_scale", "tau_max"),
                     "vp_ddpm": ("beta_start", "beta_end", "steps")}


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
    kind: Literal["l2", "pseudo_huber", "lpips"] = "l2"
    huber_c: PositiveFloat = 0.01  # pseudo-Huber sqrt(|d|^2 + c^2) - c
    # lpips (RGB images, losses/lpips.py): two local files, never downloaded
    vgg_weights: str | None = None  # torchvision's VGG16 state dict (vgg16-397923af.pth)
    lpips_weights: str | None = None  # the lpips package's linear heads (lpips/weights/v0.1/vgg.pth)


class TeacherFile(Section):
    """pretrain.source=import: a pre-trained teacher from a file instead of pre-training (see
    cmt_bench/teacher_import.py for the formats and teacher_conversion.py for the conventions)."""
    path: str | None = None  # a diffusers model folder, or "module:function[@checkpoint]" for an entry point
    format: Literal[TEACHER_FORMATS] = "diffusers"  # type: ignore[valid-type]
    prediction: Literal[TEACHER_PREDICTIONS] = "eps"  # type: ignore[valid-type]  # what the network outputs
    schedule: Literal[tuple(TEACHER_SCHEDULES)] = "vp_ddpm"  # type: ignore[valid-type]  # how it noised its data
    schedule_args: dict[str, float] = {}  # the schedule's constants, e.g. {sigma_max: 80} (its defaults otherwise)
    time_embedding: str = "unet.time_embedding"  # the module the gap embedding is added to (two-time nets)
    allow_code: bool = False  # an entry point (and a pickle it loads) runs code: only on this opt-in
    # what training it cost, as the user declares it (never measured here): the report labels it declared
    declared_device_hours: PositiveFloat | None = None

    @model_validator(mode="after")
    def _known_schedule_args(self) -> "TeacherFile":
        allowed = TEACHER_SCHEDULES[self.schedule]
        unknown = sorted(set(self.schedule_args) - set(allowed))
        if unknown:
            raise ValueError(f"schedule_args: {', '.join(unknown)} not a constant of schedule {self.schedule!r}; "
                             f"allowed: {', '.join(allowed) or 'none'}")
        return self
