"""A diffusion model trained under another convention, seen as a velocity on this package's path.

Every stage here works on the linear path x_t = (1 - t) x0 + t eps (t = 1 is noise) with a network
that predicts the velocity eps - x0. A pre-trained teacher from a file (EDM, a diffusers UNet, ...)
was trained on its own path x = a(tau) x0 + b(tau) eps and predicts one of eps, x0, v, EDM's
denoiser D(x; sigma) or its own path's velocity. Two facts make it one velocity field:

- The two paths agree up to scale where their signal-to-noise ratios agree: at the tau with
  a(tau) / b(tau) = (1 - t) / t, the point x = c z with c = a(tau) / (1 - t) is the teacher's noisy
  sample of the same (x0, eps) as the linear path's z (so no retraining, only a change of variables).
- Any prediction gives both x0 and eps through x = a x0 + b eps, and the linear velocity is
  eps_hat - x0_hat.

So `ForeignVelocity(net, schedule, prediction)(z, t)` is the linear-path velocity of the teacher,
exact for an exact teacher (tests/test_teacher_conversion.py checks it against the closed form on
Gaussian data for every schedule and prediction). A schedule has a finite noisiest level (EDM's
sigma_max = 80, DDPM's last step): times beyond it are evaluated at it (`t_max`), and the samplers
here start at t = 1, an error of order 1 / sigma_max that this module states rather than hides.
"""
from __future__ import annotations

import inspect
import math
from functools import cached_property

import torch
from torch import nn

from .paths import LinearPath
from .schema import TEACHER_PREDICTIONS as PREDICTIONS
from .schema import TEACHER_SCHEDULES



def linear_log_snr(t):
    """log(a^2 / b^2) of the linear path at t: what a teacher's time is matched by."""
    return 2 * torch.log((1 - t) / t)


class Schedule:
    """A teacher's path x = a(tau) x0 + b(tau) eps over tau in [tau_min, tau_max]. A schedule gives
    coefficients(tau) -> (a, b, da/dtau, db/dtau), tau_at(t) (the tau of the linear time t's
    signal-to-noise ratio) and net_time(tau) (what its network takes); the linear times it covers
    follow from its tau range."""
    tau_min: float
    tau_max: float

    def linear_time(self, tau: float) -> float:
        a, b, _, _ = self.coefficients(torch.tensor(float(tau), dtype=torch.float64))
        return float(b / (a + b))  # (1 - t) / t = a / b

    @cached_property
    def t_min(self) -> float:
        return self.linear_time(self.tau_min)

    @cached_property
    def t_max(self) -> float:
        return self.linear_time(self.tau_max)


class LinearSchedule(Schedule):
    """This package's own path (a = 1 - tau, b = tau); the network takes tau."""
    name = "linear"
    tau_min, tau_max = 0.0, 1.0

    def coefficients(self, tau):
        return 1 - tau, tau, -torch.ones_like(tau), torch.ones_like(tau)

    def tau_at(self, t):
        return t

    def net_time(self, tau):
        return tau


class EdmSchedule(Schedule):
    """EDM's variance-exploding sigma path x = x0 + sigma eps (Karras et al. 2022); the network (the
    preconditioned denoiser D(x; sigma)) takes sigma. Also the VP checkpoints EDM publishes, which it
    wraps in the same sigma form."""
    name = "edm"

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0):
        self.tau_min, self.tau_max = sigma_min, sigma_max

    def coefficients(self, sigma):
        return torch.ones_like(sigma), sigma, torch.zeros_like(sigma), torch.ones_like(sigma)

    def tau_at(self, t):
        return LinearPath.noise_to_signal(t)  # the linear path's noise-to-signal ratio is EDM's sigma

    def net_time(self, sigma):
        return sigma


class VpCosineSchedule(Schedule):
    """Variance-preserving cosine schedule (Nichol & Dhariwal 2021): abar(tau) = f(tau) / f(0),
    f(tau) = cos^2((tau + s) / (1 + s) * pi / 2); the network takes tau * time_scale."""
    name = "vp_cosine"

    def __init__(self, s: float = 0.008, time_scale: float = 1.0, tau_max: float = 0.9999):
        self.s, self.time_scale = s, time_scale
        self.tau_min, self.tau_max = 0.0, tau_max

    def _angle(self, tau):
        return (tau + self.s) / (1 + self.s) * math.pi / 2

    def _abar(self, tau):
        return torch.cos(self._angle(tau)) ** 2 / math.cos(self._angle(0.0)) ** 2

    def coefficients(self, tau):
        abar = self._abar(tau)
        a, b = abar.sqrt(), (1 - abar).sqrt()
        dabar = -math.pi / (1 + self.s) * torch.sin(2 * self._angle(tau)) / (2 * math.cos(self._angle(0.0)) ** 2)
        return a, b, dabar / (2 * a), -dabar / (2 * b)

    def tau_at(self, t):
        abar = torch.sigmoid(linear_log_snr(t))  # a^2, with a^2 + b^2 = 1
        return torch.acos((abar * math.cos(self._angle(0.0)) ** 2).sqrt()) * 2 / math.pi * (1 + self.s) - self.s

    def net_time(self, tau):
        return tau * self.time_scale


class VpDdpmSchedule(Schedule):
    """DDPM's discrete variance-preserving schedule (Ho et al. 2020; diffusers' DDPMScheduler with
    beta_schedule "linear"): abar_k = prod_{i <= k} (1 - beta_i), betas linear from beta_start to
    beta_end over `steps`; the network takes the step k, fractional between steps (log-SNR linear in k
    between neighbours, which the sinusoidal time embeddings of such networks accept)."""
    name = "vp_ddpm"

    def __init__(self, beta_start: float = 1e-4, beta_end: float = 0.02, steps: int = 1000):
        betas = torch.linspace(beta_start, beta_end, steps, dtype=torch.float64)
        abar = torch.cumprod(1 - betas, 0)
        self.log_snr = torch.log(abar / (1 - abar))  # falling in k
        self.tau_min, self.tau_max = 0.0, float(steps - 1)

    def _log_snr(self, k):
        k = k.clamp(0, len(self.log_snr) - 1)
        lo = k.floor().clamp(max=len(self.log_snr) - 2).long()
        w = k - lo
        table = self.log_snr.to(k.device, k.dtype)
        return (1 - w) * table[lo] + w * table[lo + 1], table[lo + 1] - table[lo]

    def coefficients(self, k):
        lam, dlam = self._log_snr(k)  # log-SNR and its slope in k
        a, b = torch.sigmoid(lam).sqrt(), torch.sigmoid(-lam).sqrt()
        return a, b, a * (1 - a**2) * dlam / 2, -b * a**2 * dlam / 2

    def tau_at(self, t):
        lam = linear_log_snr(t)
        table = self.log_snr.to(t.device, t.dtype)
        desc = -table  # rising in k, for searchsorted
        hi = torch.searchsorted(desc, -lam).clamp(1, len(table) - 1)
        return hi - 1 + (lam - table[hi - 1]) / (table[hi] - table[hi - 1])

    def net_time(self, k):
        return k


SCHEDULES = {cls.name: cls for cls in (LinearSchedule, EdmSchedule, VpCosineSchedule, VpDdpmSchedule)}
# the parameter file names these schedules and their constants (schema.TEACHER_SCHEDULES): the same ones
if {name: () if cls.__init__ is object.__init__ else tuple(inspect.signature(cls.__init__).parameters)[1:]
        for name, cls in SCHEDULES.items()} != TEACHER_SCHEDULES:
    raise ImportError("schema.TEACHER_SCHEDULES differs from teacher_conversion's schedule classes")


def x0_and_eps(out, x, prediction: str, a, b, da, db):
    """(x0_hat, eps_hat) from a network output under `prediction`, at x = a x0 + b eps (da, db: the
    coefficients' rates in the schedule's time, for a `velocity` model)."""
    if prediction == "eps":
        return (x - b * out) / a, out
    if prediction in ("x0", "edm"):  # EDM's D(x; sigma) estimates x0 on x = x0 + sigma eps
        return out, (x - a * out) / b
    if prediction == "v":  # v = a eps - b x0 (Salimans & Ho 2022)
        norm = a**2 + b**2
        return (a * x - b * out) / norm, (b * x + a * out) / norm
    if prediction == "velocity":  # dx/dtau = da x0 + db eps on the teacher's own path
        det = a * db - da * b
        return (db * x - b * out) / det, (a * out - da * x) / det
    raise ValueError(f"prediction: {prediction!r}; allowed: {', '.join(PREDICTIONS)}")


class ForeignVelocity(nn.Module):
    """A foreign diffusion network net(x, time) as the linear path's velocity v(z, t) = eps - x0.

    `schedule` says how the teacher noised its data and what time it takes, `prediction` what it
    outputs. t is clamped to the schedule's range [t_min, t_max] (see the module's docstring)."""

    def __init__(self, net: nn.Module, schedule, prediction: str):
        super().__init__()
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: {prediction!r}; allowed: {', '.join(PREDICTIONS)}")
        self.net, self.schedule, self.prediction = net, schedule, prediction

    def forward(self, z: torch.Tensor, t: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        """v(z, t); with a target time s (a flow map's u(z, s, t)), `net` also takes the gap t - s
        (teacher_import.GapConditioned), the teacher's own time staying t's."""
        t = torch.as_tensor(t, dtype=z.dtype, device=z.device).expand(z.shape[0])
        gap = None if s is None else t - torch.as_tensor(s, dtype=z.dtype, device=z.device).expand(z.shape[0])
        t = t.clamp(max(self.schedule.t_min, 1e-12), min(self.schedule.t_max, 1 - 1e-12))
        tau = self.schedule.tau_at(t)
        col = (-1, *([1] * (z.ndim - 1)))
        a, b, da, db = (c.reshape(col) for c in self.schedule.coefficients(tau))
        x = a / (1 - t.reshape(col)) * z  # the teacher's noisy sample of the same (x0, eps)
        time = self.schedule.net_time(tau)
        out = self.net(x, time) if gap is None else self.net(x, time, gap)
        x0, eps = x0_and_eps(out, x, self.prediction, a, b, da, db)
        return eps - x0
