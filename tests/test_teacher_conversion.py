"""A foreign teacher's prediction as the linear path's velocity (cmt_bench/teacher_conversion.py),
checked against closed forms: on Gaussian data the exact teacher of every schedule and prediction
is known, and so is the exact linear-path velocity it must become."""
import numpy as np
import pytest
import torch

from cmt_bench.paths import GaussianFlow
from cmt_bench.teacher_conversion import PREDICTIONS, SCHEDULES, ForeignVelocity, x0_and_eps

MU, S = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64), 0.7
BUILD = {"linear": lambda: SCHEDULES["linear"](), "edm": lambda: SCHEDULES["edm"](),
         "vp_cosine": lambda: SCHEDULES["vp_cosine"](time_scale=1000.0), "vp_ddpm": lambda: SCHEDULES["vp_ddpm"]()}


def _tau_of_net_time(schedule, time):
    return time / schedule.time_scale if schedule.name == "vp_cosine" else time


class ExactTeacher(torch.nn.Module):
    """The Bayes-optimal network of a schedule and prediction on N(MU, S^2 I) data: from the
    posterior mean E[x0 | x] = MU + a S^2 (x - a MU) / (a^2 S^2 + b^2) at x = a x0 + b eps."""

    def __init__(self, schedule, prediction):
        super().__init__()
        self.schedule, self.prediction = schedule, prediction

    def forward(self, x, time):
        a, b, da, db = (c.reshape(-1, 1) for c in self.schedule.coefficients(_tau_of_net_time(self.schedule, time)))
        x0 = MU + a * S**2 * (x - a * MU) / (a**2 * S**2 + b**2)
        eps = (x - a * x0) / b
        return {"eps": eps, "x0": x0, "edm": x0, "v": a * eps - b * x0, "velocity": da * x0 + db * eps}[self.prediction]


def _times(schedule, n=9):
    lo, hi = schedule.t_min, schedule.t_max
    return torch.linspace(lo + 0.02 * (hi - lo), hi - 0.02 * (hi - lo), n, dtype=torch.float64)


def _points(n):
    return torch.randn(n, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.5


@pytest.mark.parametrize("prediction", PREDICTIONS)
@pytest.mark.parametrize("name", list(BUILD))
def test_an_exact_teacher_of_every_schedule_and_prediction_gives_the_exact_linear_velocity(name, prediction):
    schedule = BUILD[name]()
    t = _times(schedule)
    z = _points(len(t))
    v = ForeignVelocity(ExactTeacher(schedule, prediction), schedule, prediction)(z, t)
    torch.testing.assert_close(v, GaussianFlow(MU, S).velocity(z, t), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(BUILD))
def test_the_matched_time_has_the_linear_paths_signal_to_noise_ratio(name):
    schedule = BUILD[name]()
    t = _times(schedule, 50)
    a, b, _, _ = schedule.coefficients(schedule.tau_at(t))
    torch.testing.assert_close(a / b, (1 - t) / t, rtol=1e-9, atol=0)
    assert torch.all(torch.diff(schedule.tau_at(t)) > 0)  # noisier linear times, noisier teacher times


@pytest.mark.parametrize("name", list(BUILD))
def test_the_coefficients_rates_equal_finite_differences(name):
    """da, db (what a velocity-predicting teacher's output is made of) by central differences."""
    schedule = BUILD[name]()
    tau = schedule.tau_at(_times(schedule, 20))
    if name == "vp_ddpm":
        tau = tau.floor() + 0.5  # the middle of a step: the log-SNR is linear in k between steps
    h = 1e-6 * (1 if name != "edm" else tau)
    a, b, da, db = schedule.coefficients(tau)
    (a1, b1, _, _), (a0, b0, _, _) = schedule.coefficients(tau + h), schedule.coefficients(tau - h)
    torch.testing.assert_close(da, (a1 - a0) / (2 * h), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(db, (b1 - b0) / (2 * h), rtol=1e-6, atol=1e-9)


def test_the_ddpm_schedule_at_its_steps_is_the_product_of_one_minus_beta():
    schedule = BUILD["vp_ddpm"]()
    abar = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    k = torch.arange(1000, dtype=torch.float64)
    a, b, _, _ = schedule.coefficients(k)
    np.testing.assert_allclose(a.numpy() ** 2, abar, rtol=1e-12)
    np.testing.assert_allclose(b.numpy() ** 2, 1 - abar, rtol=1e-10)
    # and back: the linear time of step k's noise level is matched to step k
    torch.testing.assert_close(schedule.tau_at(_linear_t(abar[::97])), k[::97], rtol=0, atol=1e-9)


def test_the_cosine_schedule_is_nichol_and_dhariwals():
    tau = np.linspace(0, 0.99, 12)
    f = np.cos((tau + 0.008) / 1.008 * np.pi / 2) ** 2
    a, b, _, _ = BUILD["vp_cosine"]().coefficients(torch.tensor(tau))
    np.testing.assert_allclose(a.numpy() ** 2, f / f[0], rtol=1e-12)
    np.testing.assert_allclose(a.numpy() ** 2 + b.numpy() ** 2, 1, rtol=1e-12)


def _linear_t(abar):
    """The linear time of the noise level abar: (1 - t) / t = sqrt(abar / (1 - abar))."""
    r = np.sqrt(abar / (1 - abar))
    return torch.tensor(1 / (1 + r), dtype=torch.float64)


@pytest.mark.parametrize("wrong", [("eps", "x0"), ("v", "eps"), ("velocity", "v")])
def test_a_wrongly_declared_prediction_or_schedule_is_far_off(wrong):
    """The closed-form check has power: a teacher taken for another prediction, or a cosine teacher
    taken for EDM, misses the exact velocity by far more than the tolerance above."""
    true, declared = wrong
    schedule = BUILD["vp_cosine"]()
    t = _times(schedule)
    z, exact = _points(len(t)), GaussianFlow(MU, S).velocity(_points(len(t)), t)
    v = ForeignVelocity(ExactTeacher(schedule, true), schedule, declared)(z, t)
    assert (v - exact).abs().max() > 0.1
    edm_view = ForeignVelocity(ExactTeacher(schedule, "eps"), BUILD["edm"](), "eps")
    assert (edm_view(z, t.clamp(max=0.95)) - GaussianFlow(MU, S).velocity(z, t.clamp(max=0.95))).abs().max() > 0.1


def test_times_beyond_the_teachers_noisiest_level_are_evaluated_there_and_bad_input_is_refused():
    schedule = BUILD["edm"]()
    net = ForeignVelocity(ExactTeacher(schedule, "edm"), schedule, "edm")
    z = _points(4)
    torch.testing.assert_close(net(z, torch.ones(4, dtype=torch.float64)),
                               net(z, torch.full((4,), schedule.t_max, dtype=torch.float64)))
    assert schedule.t_max == pytest.approx(80 / 81)
    with pytest.raises(ValueError, match="prediction: 'score'; allowed: eps, x0, v, edm, velocity"):
        ForeignVelocity(net, schedule, "score")
    with pytest.raises(ValueError, match="allowed"):
        x0_and_eps(z, z, "score", 1.0, 1.0, 0.0, 1.0)
