"""CPS (coefficients-preserving sampling), the sampler dispatch and DPM-Solver++ (2M).

CPS references are Flow-GRPO's ``sde_step_with_logprob(..., sde_type="cps")`` written in
its own form (read from the official code; the repository is not installable here).
DPM-Solver++ is checked against diffusers' ``DPMSolverMultistepScheduler`` in its
flow-matching configuration, run here, on MixGRPO-Flash's compressed sigmas.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler

from dancegrpo_trainer.core.dpm_solver import dpm_solver_pp_step
from dancegrpo_trainer.core.samplers import flow_step
from dancegrpo_trainer.core.schedules import flow_sigmas
from dancegrpo_trainer.core.sde import cps_step, flow_sde_step
from dancegrpo_trainer.windows import flash_sigmas

SHAPE = (3, 4, 5)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)


def _flow_grpo_cps(v, x, sigma, sigma_prev, noise_level):
    """Flow-GRPO's CPS mean/std in its original form (``sigma_prev`` = next sigma)."""
    std_dev_t = sigma_prev * math.sin(noise_level * math.pi / 2)
    pred_original_sample = x - sigma * v
    noise_estimate = x + v * (1 - sigma)
    mean = pred_original_sample * (1 - sigma_prev) + noise_estimate * math.sqrt(
        sigma_prev**2 - std_dev_t**2
    )
    return mean, std_dev_t


@pytest.mark.parametrize(("sigma", "sigma_next", "eta"), [(1.0, 0.8, 0.7), (0.6, 0.45, 1.0)])
def test_cps_mean_and_std_equal_flow_grpo_closed_form(sigma, sigma_next, eta):
    v, x = _inputs()
    out = cps_step(v, x, sigma, sigma_next, eta=eta, generator=torch.Generator().manual_seed(1))
    mean, std = _flow_grpo_cps(v, x, sigma, sigma_next, eta)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((3, 1, 1), std))
    torch.testing.assert_close(out.pred_original_sample, x - sigma * v)
    normal = torch.distributions.Normal(out.mean, out.std)
    torch.testing.assert_close(out.log_prob, normal.log_prob(out.prev_sample).mean(dim=(1, 2)))


def test_cps_flow_grpo_log_prob_drops_constants_and_scale():
    v, x = _inputs(2)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    gauss = cps_step(v, x, 0.7, 0.5, eta=0.8, noise=noise)
    fg = cps_step(v, x, 0.7, 0.5, eta=0.8, noise=noise, log_prob="flow_grpo")
    assert torch.equal(fg.prev_sample, gauss.prev_sample)
    torch.testing.assert_close(fg.log_prob, -((fg.prev_sample - fg.mean) ** 2).mean(dim=(1, 2)))
    # The same draw under a shifted mean: Flow-GRPO's log-ratio is 2σ̃² times the Gaussian one.
    shifted = cps_step(v + 0.01, x, 0.7, 0.5, eta=0.8, prev_sample=gauss.prev_sample)
    shifted_fg = cps_step(
        v + 0.01, x, 0.7, 0.5, eta=0.8, prev_sample=gauss.prev_sample, log_prob="flow_grpo"
    )
    s2 = (0.5 * math.sin(0.8 * math.pi / 2)) ** 2
    torch.testing.assert_close(
        shifted_fg.log_prob - fg.log_prob, 2 * s2 * (shifted.log_prob - gauss.log_prob)
    )


def test_cps_preserves_the_marginal_coefficients_for_a_perfect_velocity():
    g = torch.Generator().manual_seed(4)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    sigma, sigma_next, eta = 0.8, 0.5, 0.6
    x = (1 - sigma) * x0 + sigma * eps
    out = cps_step(eps - x0, x, sigma, sigma_next, eta=eta, generator=g)
    c = math.cos(eta * math.pi / 2)
    torch.testing.assert_close(out.mean, (1 - sigma_next) * x0 + sigma_next * c * eps)
    # x' = (1−σn)x0 + σn(cos·ε + sin·ξ): unit-variance noise at σn.
    assert c**2 + (out.std[0].item() / sigma_next) ** 2 == pytest.approx(1.0)


def test_cps_eta_to_zero_is_the_euler_ode_and_on_policy_ratio_is_one():
    v, x = _inputs(5)
    euler = flow_sde_step(v, x, 0.7, 0.55, eta=0.0).prev_sample  # x − Δ·v (diffusers-tested)
    exact = cps_step(v, x, 0.7, 0.55, eta=0.0)
    assert torch.equal(exact.prev_sample, euler) and torch.all(exact.log_prob == 0)
    small = cps_step(v, x, 0.7, 0.55, eta=1e-5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(small.mean, euler, atol=1e-6, rtol=0)
    again = cps_step(v, x, 0.7, 0.55, eta=0.9, generator=torch.Generator().manual_seed(6))
    recomputed = cps_step(v, x, 0.7, 0.55, eta=0.9, prev_sample=again.prev_sample)
    assert torch.equal(torch.exp(recomputed.log_prob - again.log_prob), torch.ones(3))


def test_cps_last_step_is_deterministic_and_returns_x0():
    v, x = _inputs(7)
    out = cps_step(v, x, 0.2, 0.0, eta=0.8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.prev_sample, x - 0.2 * v)
    assert torch.all(out.log_prob == 0) and torch.all(out.std == 0)
    with pytest.raises(ValueError, match=r"\[0, 1\] for CPS"):
        cps_step(v, x, 0.2, 0.1, eta=1.5)


def test_flow_step_dispatches_by_name():
    v, x = _inputs(8)
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(9))
    for name, schedule in (("dancegrpo", "dance"), ("flow_grpo", "flow_grpo")):
        a = flow_step(name, v, x, 0.7, 0.5, eta=0.5, noise=noise)
        b = flow_sde_step(v, x, 0.7, 0.5, eta=0.5, noise=noise, noise_schedule=schedule)
        assert torch.equal(a.prev_sample, b.prev_sample) and torch.equal(a.log_prob, b.log_prob)
    c = flow_step("cps", v, x, 0.7, 0.5, eta=0.5, noise=noise)
    assert torch.equal(c.prev_sample, cps_step(v, x, 0.7, 0.5, eta=0.5, noise=noise).prev_sample)
    with pytest.raises(ValueError, match="unknown flow sampler"):
        flow_step("ddim", v, x, 0.7, 0.5, eta=0.5)


@pytest.mark.parametrize("window_stop", [2, 5])
def test_dpm_solver_pp_2m_equals_diffusers_flow_dpm_solver_on_flash_sigmas(window_stop):
    """MixGRPO-Flash's tail: diffusers' scheduler started at the window's end (fresh
    history) on the compressed sigmas, vs. our step with first order at the first and last
    steps and second-order midpoint between."""
    sigmas = flash_sigmas(flow_sigmas(12, 3.0), window_stop, 3.0, 0.6)
    post = sigmas[window_stop:]
    assert post[-1] == 0 and len(post) >= 4
    scheduler = DPMSolverMultistepScheduler(
        use_flow_sigmas=True,
        prediction_type="flow_prediction",
        algorithm_type="dpmsolver++",
        solver_order=2,
        solver_type="midpoint",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    scheduler.set_timesteps(len(post) - 1)
    scheduler.sigmas = post.clone()
    scheduler.timesteps = post[:-1] * 1000
    scheduler.set_begin_index(0)
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(8, 8, generator=g) * 0.3

    def velocity(x: torch.Tensor, sigma: float) -> torch.Tensor:
        return torch.tanh(x @ weight) + sigma

    x_ref = x = torch.randn(2, 8, generator=g)
    history = None
    for i in range(len(post) - 1):
        s, s_next = float(post[i]), float(post[i + 1])
        x_ref = scheduler.step(velocity(x_ref, s), scheduler.timesteps[i], x_ref).prev_sample
        x0 = x - s * velocity(x, s)
        if history is None or i == len(post) - 2:
            x_next = dpm_solver_pp_step(x, x0, s, s_next)
        else:
            x_next = dpm_solver_pp_step(x, x0, s, s_next, prev_x0=history[0], prev_sigma=history[1])
        history, x = (x0, s), x_next
        torch.testing.assert_close(x, x_ref, rtol=1e-5, atol=1e-6)
    # Second order differs from first order: the comparison above exercised it.
    first = dpm_solver_pp_step(x, x0, 0.5, 0.3)
    second = dpm_solver_pp_step(x, x0, 0.5, 0.3, prev_x0=x0 + 0.1, prev_sigma=0.6)
    assert not torch.allclose(first, second)
