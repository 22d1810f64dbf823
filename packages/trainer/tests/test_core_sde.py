"""flow_sde_step: exact Gaussian log-probs, diffusers parity at η = 0, gradients, sampling."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from dancegrpo_trainer import flow_sde_step, flow_sigmas, flow_timesteps

SHAPE = (3, 4, 5, 6)


def _inputs(seed: int = 0, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    velocity = torch.randn(SHAPE, generator=g).to(dtype)
    sample = torch.randn(SHAPE, generator=g).to(dtype)
    return velocity, sample


def _dance_reference_mean(v, x, sigma, sigma_next, eta):
    """DanceGRPO's flux_step (sde_solver=True), written in its original score form."""
    dsigma = sigma_next - sigma
    x0 = x - sigma * v
    score = -(x - x0 * (1 - sigma)) / sigma**2
    return x + dsigma * v + (-0.5 * eta**2 * score) * dsigma


def _flow_grpo_reference(v, x, sigma, sigma_next, a, sigma_max):
    """Flow-GRPO's sde_step_with_logprob mean and std, in its original form."""
    dt = sigma_next - sigma
    s = sigma_max if sigma == 1 else sigma
    std_dev_t = math.sqrt(sigma / (1 - s)) * a
    mean = (
        x * (1 + std_dev_t**2 / (2 * sigma) * dt)
        + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    )
    return mean, std_dev_t * math.sqrt(-dt)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_log_prob_equals_torch_normal(reduction):
    velocity, sample = _inputs()
    out = flow_sde_step(velocity, sample, 0.7, 0.55, eta=0.3, reduction=reduction)

    normal = torch.distributions.Normal(out.mean, out.std)
    elementwise = normal.log_prob(out.prev_sample)
    expected = getattr(elementwise, reduction)(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected)
    assert out.log_prob.shape == (SHAPE[0],)


def test_mean_std_match_dancegrpo_reference_and_x0():
    velocity, sample = _inputs(1)
    out = flow_sde_step(velocity, sample, 0.8, 0.6, eta=0.3)
    torch.testing.assert_close(out.mean, _dance_reference_mean(velocity, sample, 0.8, 0.6, 0.3))
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), 0.3 * math.sqrt(0.2)))
    torch.testing.assert_close(out.pred_original_sample, sample - 0.8 * velocity)


@pytest.mark.parametrize(("sigma", "sigma_next"), [(0.8, 0.6), (1.0, 0.9)])
def test_flow_grpo_schedule_matches_flow_grpo_reference(sigma, sigma_next):
    velocity, sample = _inputs(2)
    out = flow_sde_step(velocity, sample, sigma, sigma_next, eta=0.7, noise_schedule="flow_grpo")
    # At σ = 1 Flow-GRPO substitutes sigma_max = sigmas[1] (= σ_next of the first step).
    mean, std = _flow_grpo_reference(velocity, sample, sigma, sigma_next, 0.7, sigma_next)
    torch.testing.assert_close(out.mean, mean)
    torch.testing.assert_close(out.std, torch.full((3, 1, 1, 1), std))
    assert torch.isfinite(out.log_prob).all()


def test_per_sample_sigma_equals_rowwise_float_sigma():
    velocity, sample = _inputs(3)
    sigmas = torch.tensor([0.9, 0.5, 0.2])
    sigmas_next = torch.tensor([0.8, 0.3, 0.0])
    batched = flow_sde_step(velocity, sample, sigmas, sigmas_next, eta=0.4)
    for i in range(3):
        row = flow_sde_step(
            velocity[i : i + 1],
            sample[i : i + 1],
            float(sigmas[i]),
            float(sigmas_next[i]),
            eta=0.4,
            prev_sample=batched.prev_sample[i : i + 1],
        )
        torch.testing.assert_close(batched.mean[i : i + 1], row.mean)
        torch.testing.assert_close(batched.log_prob[i : i + 1], row.log_prob)


def test_bf16_inputs_give_float32_log_prob_and_bf16_sample():
    velocity, sample = _inputs(4, torch.bfloat16)
    out = flow_sde_step(
        velocity, sample, 0.7, 0.6, eta=0.3, generator=torch.Generator().manual_seed(0)
    )
    assert out.prev_sample.dtype == torch.bfloat16
    assert out.log_prob.dtype == torch.float32
    assert out.mean.dtype == torch.float32
    expected = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample.float())
    torch.testing.assert_close(out.log_prob, expected.mean(dim=(1, 2, 3)))
    # Recomputing on the stored bf16 sample reproduces the log-prob bit for bit.
    again = flow_sde_step(velocity, sample, 0.7, 0.6, eta=0.3, prev_sample=out.prev_sample)
    assert torch.equal(again.log_prob, out.log_prob)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_eta_zero_equals_diffusers_flow_match_euler_trajectory(shift):
    num_steps = 6
    scheduler = FlowMatchEulerDiscreteScheduler(shift=shift)
    scheduler.set_timesteps(sigmas=torch.linspace(1.0, 0.0, num_steps + 1)[:-1].tolist())
    sigmas = flow_sigmas(num_steps, shift)
    timesteps = flow_timesteps(sigmas)
    g = torch.Generator().manual_seed(5)
    x_ref = x_ours = torch.randn(SHAPE, generator=g)
    for i in range(num_steps):
        velocity = torch.randn(SHAPE, generator=g)
        x_ref = scheduler.step(velocity, scheduler.timesteps[i], x_ref).prev_sample
        out = flow_sde_step(velocity, x_ours, sigmas[i], sigmas[i + 1], eta=0.0)
        x_ours = out.prev_sample
        torch.testing.assert_close(x_ours, x_ref)
        assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
        assert torch.equal(out.std, torch.zeros(SHAPE[0], 1, 1, 1))
    torch.testing.assert_close(timesteps, scheduler.timesteps)


def test_eta_zero_with_given_prev_sample_has_zero_finite_log_prob_and_grad():
    velocity, sample = _inputs(6)
    velocity.requires_grad_(True)
    out = flow_sde_step(velocity, sample, 0.5, 0.4, eta=0.0, prev_sample=sample)
    out.log_prob.sum().backward()
    assert torch.equal(out.log_prob, torch.zeros(SHAPE[0]))
    assert torch.isfinite(velocity.grad).all()


def test_eta_to_zero_limit_approaches_ode_step_quadratically():
    velocity, sample = _inputs(7)
    sigma, sigma_next = 0.6, 0.45
    ode = flow_sde_step(velocity, sample, sigma, sigma_next, eta=0.0).mean
    gaps = []
    for eta in (1e-1, 1e-2, 1e-3):
        mean = flow_sde_step(velocity, sample, sigma, sigma_next, eta=eta).mean
        gaps.append((mean - ode).abs().max().item())
    # mean − ode = −Δ·η²/(2σ)·(x + (1−σ)v): shrinks 100× per 10× smaller η.
    assert gaps[0] > gaps[1] > gaps[2]
    assert gaps[1] == pytest.approx(gaps[0] / 100, rel=1e-2)
    assert gaps[2] < 1e-5


def test_gradient_flows_through_mean_not_through_given_prev_sample():
    velocity, sample = _inputs(8)
    velocity.requires_grad_(True)
    stored = torch.randn(SHAPE, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    out = flow_sde_step(velocity, sample, 0.7, 0.5, eta=0.3, prev_sample=stored)
    out.log_prob.sum().backward()
    assert stored.grad is None
    assert not out.prev_sample.requires_grad
    # Analytic: ∂/∂v of mean_b[(x'−μ)²/(−2s²)] = (x'−μ)/s² · ∂μ/∂v / n, ∂μ/∂v = −Δ(1 + η²(1−σ)/(2σ)).
    n = velocity[0].numel()
    dmu_dv = -0.2 * (1 + 0.09 * 0.3 / 1.4)
    expected = (stored.detach() - out.mean.detach()) / out.std**2 * dmu_dv / n
    torch.testing.assert_close(velocity.grad, expected)


def test_sampled_prev_sample_is_reproducible_and_matches_moments():
    velocity, sample = _inputs(9)
    first = flow_sde_step(
        velocity, sample, 0.7, 0.5, eta=0.5, generator=torch.Generator().manual_seed(3)
    )
    second = flow_sde_step(
        velocity, sample, 0.7, 0.5, eta=0.5, generator=torch.Generator().manual_seed(3)
    )
    assert torch.equal(first.prev_sample, second.prev_sample)

    draws = 4000
    big_v = velocity[:1].expand(draws, *SHAPE[1:])
    big_x = sample[:1].expand(draws, *SHAPE[1:])
    out = flow_sde_step(big_v, big_x, 0.7, 0.5, eta=0.5, generator=torch.Generator().manual_seed(4))
    emp_mean = out.prev_sample.mean(dim=0)
    emp_std = out.prev_sample.std(dim=0)
    std = out.std[0].item()
    # Standard error of the mean is std/√4000 ≈ 0.0056; 5 SE bound per element.
    assert (emp_mean - out.mean[0]).abs().max().item() < 5 * std / math.sqrt(draws)
    assert (emp_std / std - 1).abs().max().item() < 0.06


def test_arguments_are_validated():
    velocity, sample = _inputs()
    with pytest.raises(ValueError, match="eta"):
        flow_sde_step(velocity, sample, 0.5, 0.4, eta=-0.1)
    with pytest.raises(ValueError, match="noise_schedule"):
        flow_sde_step(velocity, sample, 0.5, 0.4, eta=0.1, noise_schedule="ddpm")
    with pytest.raises(ValueError, match="sigma_next"):
        flow_sde_step(velocity, sample, 0.5, 0.6, eta=0.1)
    with pytest.raises(ValueError, match="sigma"):
        flow_sde_step(velocity, sample, 0.0, 0.0, eta=0.1)
    with pytest.raises(ValueError, match=r"\[B\]"):
        flow_sde_step(velocity, sample, torch.ones(2), 0.0, eta=0.1)
    with pytest.raises(ValueError, match="reduction"):
        flow_sde_step(velocity, sample, 0.5, 0.4, eta=0.1, reduction="max")
