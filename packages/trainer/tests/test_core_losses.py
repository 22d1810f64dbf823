"""The clipped GRPO loss: on-policy gradient, clipping boundaries, KL term, diagnostics."""

import math

import pytest
import torch
from torch import nn

from dancegrpo_trainer import flow_sde_step, gaussian_mean_kl, grpo_loss

SHAPE = (4, 3, 2, 2)


def _velocity_model() -> nn.Module:
    """A tiny linear "model": velocity = 1×1 conv over channels."""
    torch.manual_seed(0)
    return nn.Conv2d(3, 3, kernel_size=1)


def _grads(model: nn.Module, scalar: torch.Tensor) -> list[torch.Tensor]:
    return list(torch.autograd.grad(scalar, list(model.parameters()), retain_graph=True))


def test_on_policy_ratio_is_exactly_one_and_gradient_is_minus_advantage_grad_log_prob():
    model = _velocity_model()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(SHAPE, generator=g)
    sigmas = [(0.9, 0.7), (0.7, 0.4)]
    advantages = torch.tensor([1.5, -0.5, 0.25, -2.0])

    with torch.no_grad():  # rollout
        rollout = [flow_sde_step(model(x), x, s, sn, eta=0.3, generator=g) for s, sn in sigmas]
    old = torch.stack([o.log_prob for o in rollout], dim=1)  # [B, T]

    new = torch.stack(
        [
            flow_sde_step(model(x), x, s, sn, eta=0.3, prev_sample=o.prev_sample).log_prob
            for (s, sn), o in zip(sigmas, rollout, strict=True)
        ],
        dim=1,
    )
    out = grpo_loss(new, old, advantages, clip_range=1e-4)

    assert torch.equal(new.detach(), old)
    assert out.ratio_min.item() == 1.0 and out.ratio_max.item() == 1.0
    assert out.clip_fraction.item() == 0.0 and out.approx_kl.item() == 0.0
    torch.testing.assert_close(out.policy_loss, -(advantages[:, None] * torch.ones(4, 2)).mean())

    expected = _grads(model, -(advantages[:, None] * new).mean())
    actual = _grads(model, out.loss)
    for a, e in zip(actual, expected, strict=True):
        assert e.abs().sum() > 0
        torch.testing.assert_close(a, e)


def _grad_at_ratio(ratio: float, advantage: float, clip_range: float = 1e-4) -> tuple[float, float]:
    log_prob = torch.tensor([math.log(ratio)], dtype=torch.float32, requires_grad=True)
    out = grpo_loss(log_prob, torch.zeros(1), torch.tensor([advantage]), clip_range=clip_range)
    (grad,) = torch.autograd.grad(out.loss, log_prob)
    return grad.item(), out.clip_fraction.item()


@pytest.mark.parametrize(
    ("ratio", "advantage", "clipped"),
    [
        (1 + 0.8e-4, 1.0, False),  # just inside 1+ε: still pushed up
        (1 + 1.2e-4, 1.0, True),  # just outside 1+ε with A > 0: no gradient
        (1 - 0.8e-4, -1.0, False),  # just inside 1−ε: still pushed down
        (1 - 1.2e-4, -1.0, True),  # just outside 1−ε with A < 0: no gradient
        (1 + 1.2e-4, -1.0, False),  # outside, but the unclipped term is the pessimistic one
        (1 - 1.2e-4, 1.0, False),
    ],
)
def test_clipping_at_the_boundaries(ratio, advantage, clipped):
    grad, clip_fraction = _grad_at_ratio(ratio, advantage)
    assert clip_fraction == (0.0 if abs(ratio - 1) < 1e-4 else 1.0)
    if clipped:
        assert grad == 0.0
    else:
        # d/dlogp (−A·ratio) = −A·ratio
        assert grad == pytest.approx(-advantage * ratio, rel=1e-6)


def test_advantages_beyond_adv_clip_max_are_clamped():
    zeros = torch.zeros(3)
    out = grpo_loss(zeros, zeros, torch.tensor([10.0, -7.0, 2.0]), adv_clip_max=5.0)
    # ratio 1: loss = mean(−clamp(A)) = −(5 − 5 + 2)/3
    torch.testing.assert_close(out.policy_loss, torch.tensor(-2.0 / 3.0))


def test_diagnostics_values():
    log_prob = torch.log(torch.tensor([[1.0, 2.0], [0.5, 1.0]]))
    out = grpo_loss(log_prob, torch.zeros(2, 2), torch.tensor([1.0, -1.0]), clip_range=0.2)
    torch.testing.assert_close(out.ratio_mean, torch.tensor(1.125))
    assert out.ratio_min.item() == pytest.approx(0.5) and out.ratio_max.item() == pytest.approx(2.0)
    assert out.clip_fraction.item() == 0.5
    torch.testing.assert_close(out.approx_kl, 0.5 * (log_prob**2).mean())
    # Row 0 (A=1): max(−1, −1), max(−2, −1.2) → −1, −1.2; row 1 (A=−1): max(0.5, 0.8), 1 → 0.8, 1.
    torch.testing.assert_close(out.policy_loss, torch.tensor((-1 - 1.2 + 0.8 + 1) / 4))
    assert set(out.metrics()) == {
        "loss",
        "policy_loss",
        "kl",
        "clip_fraction",
        "approx_kl",
        "ratio_mean",
        "ratio_min",
        "ratio_max",
    }


def test_kl_term_equals_gaussian_kl_and_enters_the_loss_with_beta():
    g = torch.Generator().manual_seed(2)
    mean = torch.randn(SHAPE, generator=g).requires_grad_(True)
    ref = torch.randn(SHAPE, generator=g)
    std = torch.tensor([0.1, 0.2, 0.3, 0.4]).reshape(4, 1, 1, 1)
    kl = gaussian_mean_kl(mean, ref, std)
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand(SHAPE)),
        torch.distributions.Normal(ref, std.expand(SHAPE)),
    ).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl, expected)

    zeros = torch.zeros(4)
    out = grpo_loss(zeros, zeros, torch.ones(4), kl=kl, kl_coef=0.04)
    torch.testing.assert_close(out.loss, out.policy_loss + 0.04 * kl.mean())
    torch.testing.assert_close(out.kl, kl.mean())
    (grad,) = torch.autograd.grad(out.loss, mean)
    n = mean[0].numel()
    torch.testing.assert_close(grad, 0.04 / 4 * (mean - ref).detach() / std**2 / n)


def test_kl_is_zero_for_zero_std_steps():
    kl = gaussian_mean_kl(torch.ones(2, 3), torch.zeros(2, 3), torch.tensor([[0.0], [1.0]]))
    torch.testing.assert_close(kl, torch.tensor([0.0, 0.5]))


def test_loss_arguments_are_validated():
    z = torch.zeros(2)
    with pytest.raises(ValueError, match="clip_range"):
        grpo_loss(z, z, z, clip_range=0.0)
    with pytest.raises(ValueError, match="adv_clip_max"):
        grpo_loss(z, z, z, adv_clip_max=-1.0)
    with pytest.raises(ValueError, match="kl_coef"):
        grpo_loss(z, z, z, kl_coef=0.1)
    with pytest.raises(ValueError, match="advantages"):
        grpo_loss(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3))
