"""DiffusionNFT (``train.algorithm: nft``): the loss, its β limits, the old policy, and the
algorithm through the trainer on every flow policy, LoRA and full fine-tuning, resumed and
on two ranks.

References: the official code (github.com/NVlabs/DiffusionNFT) is a training script that
cannot be imported here (its loss is written inline in ``scripts/train_nft_sd3.py``'s
``main``, next to wandb/absl/ml_collections imports), so the reference functions below
restate its training-step expressions and its ``dpm2`` sampler (``flow_grpo/
diffusers_patch/solver.py``) in their original form, read from that code.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from dancegrpo_testing.scorers import RednessScorer
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer import trainer as trainer_module
from dancegrpo_trainer.algorithms import algorithm_class
from dancegrpo_trainer.algorithms.nft import DiffusionNFT, nft_loss, old_policy_decay
from dancegrpo_trainer.config import ConfigError, TrainConfig, config_from_dict, load_config
from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy
from dancegrpo_trainer.rollout import sample_rollout
from dancegrpo_trainer.trainer import Trainer
from dancegrpo_trainer.weights import ReferencePolicy, apply_lora
from dancegrpo_trainer.windows import rollout_plan

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = ["a red square", "a blue square", "a green square"]


# ------------------------------------------------------------------ references


def official_nft_loss(forward_prediction, old_prediction, xt, x0, t, advantages, beta, clip):
    """``train_nft_sd3.py``'s training step (adv_mode "all"), its expressions in order."""
    advantages_clip = torch.clamp(advantages, -clip, clip)
    normalized_advantages_clip = (advantages_clip / clip) / 2.0 + 0.5
    r = torch.clamp(normalized_advantages_clip, 0, 1)
    t_expanded = t.view(-1, *([1] * (len(x0.shape) - 1)))
    positive_prediction = beta * forward_prediction + (1 - beta) * old_prediction.detach()
    implicit_negative_prediction = (
        1.0 + beta
    ) * old_prediction.detach() - beta * forward_prediction
    dims = tuple(range(1, x0.ndim))
    x0_prediction = xt - t_expanded * positive_prediction
    with torch.no_grad():
        weight_factor = (
            torch.abs(x0_prediction.double() - x0.double()).mean(dim=dims, keepdim=True)
        ).clip(min=0.00001)
    positive_loss = ((x0_prediction - x0) ** 2 / weight_factor).mean(dim=dims)
    negative_x0_prediction = xt - t_expanded * implicit_negative_prediction
    with torch.no_grad():
        negative_weight_factor = (
            torch.abs(negative_x0_prediction.double() - x0.double()).mean(dim=dims, keepdim=True)
        ).clip(min=0.00001)
    negative_loss = ((negative_x0_prediction - x0) ** 2 / negative_weight_factor).mean(dim=dims)
    ori_policy_loss = r * positive_loss / beta + (1.0 - r) * negative_loss / beta
    return (ori_policy_loss * clip).mean()


def official_return_decay(step: int, decay_type: int) -> float:
    """``train_nft_sd3.py``'s ``return_decay``."""
    flat, uprate, uphold = {0: (0, 0.0, 0.0), 1: (0, 0.001, 0.5), 2: (75, 0.0075, 0.999)}[
        decay_type
    ]
    if step < flat:
        return 0.0
    return min((step - flat) * uprate, uphold)


def official_dpm2(v_pred, z, sigmas):
    """``solver.run_sampling(solver="dpm2", determistic=True)``: DDIM (η 0) at the first and
    the last step, multistep DPM-Solver++ second order between; sigmas in float64."""
    sigmas = sigmas.to(torch.float64)
    lam = lambda s: torch.log(1 - s) - torch.log(s)  # noqa: E731
    outputs, n = [], len(sigmas) - 1
    for i in range(n):
        x0 = z - sigmas[i] * v_pred(z, i)  # convert_model_output
        outputs.append(x0)
        s, t = sigmas[i], sigmas[i + 1]
        if i == 0 or i == n - 1:  # ddim_update(..., eta=0.0)
            noise_pred = (z - (1 - s) * x0) / s
            z = (1 - t) * x0 + t * noise_pred
        else:  # multistep_dpm_solver_second_order_update
            h, h_0 = lam(t) - lam(s), lam(s) - lam(sigmas[i - 1])
            d0, d1 = x0, (1.0 / (h_0 / h)) * (x0 - outputs[-2])
            z = (t / s) * z - ((1 - t) * (torch.exp(-h) - 1.0)) * d0
            z = z - 0.5 * ((1 - t) * (torch.exp(-h) - 1.0)) * d1
        z = z.float()
    return z


# ------------------------------------------------------------------ the loss


def _hand_case(beta: float):
    """Two samples of 2 elements. Row 0: x0 = (1, −1), x_t = (.5, .5), t = .5, v_θ = (0, 2),
    v_old = 0, A = 2.5 → r = .75. Row 1: x0 = 0, x_t = (1, −1), t = 1, v_θ = v_old =
    (1, −1) (x̂0 = x0 exactly: the weight floors at 1e-5), A = −10 → clipped → r = 0."""
    v_theta = torch.tensor([[0.0, 2.0], [1.0, -1.0]], requires_grad=True)
    v_old = torch.tensor([[0.0, 0.0], [1.0, -1.0]], requires_grad=True)
    x_t = torch.tensor([[0.5, 0.5], [1.0, -1.0]])
    x0 = torch.tensor([[1.0, -1.0], [0.0, 0.0]])
    t, adv = torch.tensor([0.5, 1.0]), torch.tensor([2.5, -10.0])
    out = nft_loss(v_theta, v_old, x_t, x0, t, adv, beta=beta, adv_clip_max=5.0)
    return out, v_theta, v_old


def test_nft_loss_on_a_hand_computed_case():
    # β = 1: v⁺ = v_θ = (0, 2), v⁻ = 2·v_old − v_θ = (0, −2).
    # x̂0⁺ = (.5, −.5): error (−.5, .5), w⁺ = .5, L⁺ = mean(.25, .25)/.5 = .5.
    # x̂0⁻ = (.5, 1.5): error (−.5, 2.5), w⁻ = 1.5, L⁻ = mean(.25, 6.25)/1.5 = 13/6.
    # Row 0: 5·(.75·.5 + .25·13/6)/1 = 55/12; row 1: 0. Mean: 55/24.
    out, v_theta, v_old = _hand_case(beta=1.0)
    assert out.loss.item() == pytest.approx(55 / 24, rel=1e-6)
    assert out.r.tolist() == [0.75, 0.0]
    out.loss.backward()
    # d loss/d v_θ = 2·c·t/(B·D)·(−r·e⁺/w⁺ + (1−r)·e⁻/w⁻) = 1.25·(−.75·(−1, 1) + .25·(−1/3, 5/3))
    torch.testing.assert_close(
        v_theta.grad, torch.tensor([[1.25 * 2 / 3, -1.25 / 3], [0.0, 0.0]]), rtol=1e-6, atol=0
    )
    assert v_old.grad is None  # the old policy's velocity gets no gradient

    # β = .5: v⁺ = (0, 1), v⁻ = 1.5·v_old − .5·v_θ = (0, −1); x̂0⁺ = (.5, 0): e (−.5, 1),
    # w⁺ = .75, L⁺ = .625/.75; x̂0⁻ = (.5, 1): e (−.5, 2), w⁻ = 1.25, L⁻ = 2.125/1.25 = 1.7;
    # row 0: 5·(.75·5/6 + .25·1.7)/.5 = 10.5; mean 5.25.
    out, _, _ = _hand_case(beta=0.5)
    assert out.loss.item() == pytest.approx(5.25, rel=1e-6)


@pytest.mark.parametrize("beta", [1.0, 0.1, 2.5])
def test_nft_loss_and_gradient_equal_the_official_training_step(beta):
    g = torch.Generator().manual_seed(0)
    shape = (5, 3, 4, 4)
    x0, eps = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.rand(5, generator=g)
    x_t = (1 - t.view(-1, 1, 1, 1)) * x0 + t.view(-1, 1, 1, 1) * eps
    v_old = eps - x0 + 0.3 * torch.randn(shape, generator=g)
    v_ours = (v_old + 0.2 * torch.randn(shape, generator=g)).requires_grad_()
    v_ref = v_ours.detach().clone().requires_grad_()
    adv = torch.tensor([-7.0, -1.3, 0.0, 0.4, 6.0])  # both clips, and r = ½
    ours = nft_loss(v_ours, v_old, x_t, x0, t, adv, beta=beta, adv_clip_max=5.0)
    ref = official_nft_loss(v_ref, v_old, x_t, x0, t, adv, beta, 5.0)
    torch.testing.assert_close(ours.loss, ref, rtol=1e-6, atol=0)
    ours.loss.backward()
    ref.backward()
    torch.testing.assert_close(v_ours.grad, v_ref.grad, rtol=1e-5, atol=1e-9)


def test_beta_limits():
    g = torch.Generator().manual_seed(1)
    shape = (4, 2, 3, 3)
    x0, x_t = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    t = torch.tensor([0.2, 0.5, 0.7, 1.0])
    v_old = torch.randn(shape, generator=g)
    v_theta = v_old + 0.1 * torch.randn(shape, generator=g)
    adv = torch.tensor([-2.0, 0.5, 3.0, 5.0])
    r = adv / 10 + 0.5
    dims = (1, 2, 3)
    b_t = t.view(-1, 1, 1, 1)

    def weighted(v):
        e = x_t - b_t * v - x0
        return (e**2 / e.abs().mean(dim=dims, keepdim=True)).mean(dim=dims)

    # β = 1: v⁺ is v_θ itself, and at r = 1 the loss is c·(the adaptively weighted x0
    # flow-matching loss of v_θ), whatever the old policy says.
    one = nft_loss(v_theta, v_old, x_t, x0, t, adv, beta=1.0, adv_clip_max=5.0)
    expected = (5 * (r * weighted(v_theta) + (1 - r) * weighted(2 * v_old - v_theta))).mean()
    torch.testing.assert_close(one.loss.float(), expected, rtol=1e-5, atol=0)
    ones = torch.full((4,), 5.0)
    for other_old in (v_old, torch.zeros(shape)):
        value = nft_loss(v_theta, other_old, x_t, x0, t, ones, beta=1.0, adv_clip_max=5.0)
        torch.testing.assert_close(value.loss.float(), (5 * weighted(v_theta)).mean())

    # v_θ = v_old: both mixtures equal v_old, the loss is c·L(v_old)/β for every reward.
    for beta in (1.0, 0.3):
        same = nft_loss(v_old, v_old, x_t, x0, t, adv, beta=beta, adv_clip_max=5.0)
        torch.testing.assert_close(same.loss.float(), (5 * weighted(v_old) / beta).mean())

    # β → 0: the gradient tends to c·(2r − 1)·∂L(v)/∂v at v_old, a reward-signed flow-matching
    # gradient: (2·c·t/(B·D))·(1 − 2r)·e_old/w_old.
    e_old = x_t - b_t * v_old - x0
    w_old = e_old.abs().mean(dim=dims, keepdim=True)
    d = e_old[0].numel()
    limit = 2 * 5 * b_t / (4 * d) * (1 - 2 * r).view(-1, 1, 1, 1) * e_old / w_old
    errors = []
    for beta in (1e-1, 1e-2, 1e-3):
        v = v_theta.clone().requires_grad_()
        nft_loss(v, v_old, x_t, x0, t, adv, beta=beta, adv_clip_max=5.0).loss.backward()
        errors.append(float((v.grad - limit).abs().max()))
    assert errors[0] > errors[1] > errors[2] and errors[2] < 1e-3 * float(limit.abs().max())


# ------------------------------------------------------------------ the old policy


def test_old_policy_decay_follows_return_decay():
    for decay_type, (flat, rate, cap) in {
        0: (0, 0.0, 0.0),
        1: (0, 0.001, 0.5),
        2: (75, 0.0075, 0.999),
    }.items():
        for step in (1, 2, 74, 75, 76, 200, 499, 500, 501, 5000):
            ours = old_policy_decay(step, flat=flat, rate=rate, max_decay=cap)
            assert ours == official_return_decay(step, decay_type), (decay_type, step)
    assert old_policy_decay(1, flat=0, rate=0.001, max_decay=0.5) == 0.001
    assert old_policy_decay(76, flat=75, rate=0.0075, max_decay=0.999) == 0.0075


def _tiny() -> TinyFlowPolicy:
    torch.manual_seed(0)
    return TinyFlowPolicy(8, 8, latent_size=4, channels=8, embed_dim=16, num_blocks=1)


def _algorithm(policy, **train: Any) -> DiffusionNFT:
    cfg = TrainConfig(algorithm="nft", **train)
    algo = algorithm_class("nft")(cfg, policy)
    assert isinstance(algo, DiffusionNFT)
    return algo


def test_old_policy_is_an_ema_of_the_trained_weights_with_the_official_schedule():
    policy = _tiny()
    options = {"decay_flat": 1, "decay_rate": 0.25, "decay_max": 0.6}
    algo = _algorithm(policy, algorithm_options=options)
    params = algo.params
    assert [n for n, _ in policy.net.named_parameters()] == algo.names
    assert all(torch.equal(o, p) for o, p in zip(algo.old, params, strict=True))
    old = [o.clone() for o in algo.old]
    for step in range(1, 6):
        with torch.no_grad():
            for p in params:
                p.add_(torch.randn_like(p))
        d = old_policy_decay(step, flat=1, rate=0.25, max_decay=0.6)
        old = [o * d + p.detach() * (1.0 - d) for o, p in zip(old, params, strict=True)]
        algo.after_optimizer_step(skipped=step == 3)  # a skipped step blends too
        assert int(algo.steps_taken) == step
        for a, b in zip(algo.old, old, strict=True):
            assert torch.equal(a, b)
    assert [old_policy_decay(s, flat=1, rate=0.25, max_decay=0.6) for s in range(1, 6)] == [
        0.0,
        0.25,
        0.5,
        0.6,
        0.6,
    ]
    # The live weights are untouched by the swap-in of the old ones.
    live = [p.detach().clone() for p in params]
    with algo.old_policy():
        assert all(torch.equal(p, o) for p, o in zip(params, algo.old, strict=True))
    assert all(torch.equal(p, q) for p, q in zip(params, live, strict=True))


def test_an_old_policy_equal_to_the_live_one_costs_no_second_forward(monkeypatch):
    """Decay 0 (on-policy, or before ``decay_flat``) leaves ``old == θ`` exactly; the term
    then reuses ``v_θ`` as ``v_old`` and equals the two-forward computation."""
    policy = _tiny()
    algo = _algorithm(policy, algorithm_options={"decay_flat": 2}, timestep_fraction=1.0)
    with torch.no_grad():
        for p in algo.params:
            p.add_(0.1 * torch.randn_like(p))
    algo.after_optimizer_step(False)  # step 1 < flat: old ← θ
    assert algo.old_is_live()
    assert all(torch.equal(o, p) for o, p in zip(algo.old, algo.params, strict=True))
    sampling = config_from_dict(_sections(num_steps=4)).sampling
    plan = rollout_plan(policy, sampling, step=0, seed=0, stochastic="none")
    cond = policy.encode_prompts(PROMPTS)
    noise = policy.initial_noise(3, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(policy, cond, noise, plan=plan, eta=0.0, chunk_size=3, keep=())
    adv, term = torch.tensor([1.0, -0.5, 0.2]), algo.terms(r, torch.Generator())[0]
    calls = []
    original = TinyFlowPolicy.predict
    monkeypatch.setattr(
        TinyFlowPolicy, "predict", lambda self, *a: calls.append(1) or original(self, *a)
    )
    one = algo.loss(r, adv, term).loss
    assert len(calls) == 1
    monkeypatch.setattr(DiffusionNFT, "old_is_live", lambda self: False)
    two = algo.loss(r, adv, term).loss
    assert len(calls) == 3
    torch.testing.assert_close(one, two, rtol=1e-6, atol=0)
    monkeypatch.undo()
    algo.after_optimizer_step(False)  # step 2 = flat: decay 0 still
    assert algo.old_is_live()
    algo.after_optimizer_step(False)  # step 3: decay 0.001
    assert not algo.old_is_live()


def test_kl_penalty_is_the_mean_squared_velocity_gap_to_the_reference():
    """``train.kl_coef``: ``loss = policy_loss + kl_coef·mean_b mean((v_θ − v_ref)²)`` at the
    term's own noised inputs, with ``v_ref`` from the reference weights."""
    policy = _tiny()
    reference = ReferencePolicy(policy.trainable_module(), lora=False)
    cfg = TrainConfig(algorithm="nft", kl_coef=0.3, timestep_fraction=1.0)
    algo = algorithm_class("nft")(cfg, policy, reference=reference)
    with torch.no_grad():
        for p in algo.params:
            p.add_(0.1 * torch.randn_like(p))
    sampling = config_from_dict(_sections(num_steps=4)).sampling
    plan = rollout_plan(policy, sampling, step=0, seed=0, stochastic="none")
    cond = policy.encode_prompts(PROMPTS)
    noise = policy.initial_noise(3, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(policy, cond, noise, plan=plan, eta=0.0, chunk_size=3, keep=())
    adv, term = torch.tensor([1.0, -0.5, 0.2]), algo.terms(r, torch.Generator())[0]
    res = algo.loss(r, adv, term)
    idx, eps = algo.draws(r, term)
    x0 = r.latents[:, -1]
    t = r.schedule.sigmas[idx].reshape(-1, 1, 1, 1)
    x_t = (1 - t) * x0 + t * eps
    timesteps = r.schedule.timesteps[idx]
    with torch.no_grad():
        v_theta = policy.predict(x_t, timesteps, r.cond)
        with reference.active():
            v_ref = policy.predict(x_t, timesteps, r.cond)
    kl = ((v_theta - v_ref) ** 2).mean(dim=(1, 2, 3)).mean()
    assert float(kl) > 0
    torch.testing.assert_close(res.metrics["kl"], float(kl), rtol=1e-6, atol=0)
    expected = res.metrics["policy_loss"] + 0.3 * res.metrics["kl"]
    torch.testing.assert_close(float(res.loss.detach()), expected, rtol=1e-6, atol=0)


def test_old_policy_state_round_trips_and_refuses_a_checkpoint_without_it():
    policy = _tiny()
    algo = _algorithm(policy)
    with torch.no_grad():
        for p in algo.params:
            p.mul_(2)
    algo.after_optimizer_step(False)
    state = {k: v.clone() for k, v in algo.state_dict().items()}
    assert int(state["nft.steps_taken"]) == 1
    assert {k for k in state if k.startswith("nft.old.")} == {f"nft.old.{n}" for n in algo.names}
    other = _algorithm(_tiny())
    other.load_state_dict(state)
    assert int(other.steps_taken) == 1
    assert all(torch.equal(a, b) for a, b in zip(other.old, algo.old, strict=True))
    with pytest.raises(ValueError, match="no DiffusionNFT state"):
        other.load_state_dict({"ema.x": torch.zeros(1)})


# ------------------------------------------------------------------ rollouts and draws


def test_ode_rollouts_use_dpm_solver_2m_as_the_official_dpm2_sampler():
    policy = _tiny()
    algo = _algorithm(policy)
    spec = algo.rollout_spec()
    assert (spec.stochastic, spec.keep, spec.ode_solver) == ("none", (), "dpm2")
    sampling = config_from_dict(_sections(num_steps=6)).sampling
    plan = rollout_plan(policy, sampling, step=0, seed=0, stochastic="none", ode_solver="dpm2")
    assert plan.dpm_from == 0 and not plan.stochastic.any()
    cond = policy.encode_prompts(PROMPTS)
    noise = policy.initial_noise(3, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(policy, cond, noise, plan=plan, eta=0.7, chunk_size=3, keep=())
    assert (r.log_probs == 0).all() and r.recorded_steps == []
    with torch.no_grad():
        ref = official_dpm2(
            lambda z, i: policy.predict(z, plan.schedule.timesteps[i], cond),
            noise,
            plan.schedule.sigmas,
        )
    torch.testing.assert_close(r.latents[:, -1], ref, rtol=0, atol=1e-5)
    euler = rollout_plan(policy, sampling, step=0, seed=0, stochastic="none")
    assert euler.dpm_from is None


def test_each_sample_trains_its_own_noise_levels_whatever_the_batching():
    policy = _tiny()
    algo = _algorithm(policy, timestep_fraction=0.99)  # K = ⌊0.99·6⌋ = 5 of the 6 sigmas
    sampling = config_from_dict(_sections(num_steps=6)).sampling
    plan = rollout_plan(policy, sampling, step=0, seed=0, stochastic="none")
    cond = policy.encode_prompts(PROMPTS * 2)
    noise = policy.initial_noise(6, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(policy, cond, noise, plan=plan, eta=0.0, chunk_size=6, keep=())
    terms = algo.terms(r, torch.Generator().manual_seed(3))
    assert len(terms) == 5
    whole = [algo.draws(r, term) for term in terms]
    levels = torch.stack([idx for idx, _ in whole], dim=1)  # [6 rows, 5 terms]
    for row in levels:
        assert len(set(row.tolist())) == 5 and row.max() < 6  # distinct, without replacement
    assert len({tuple(row.tolist()) for row in levels}) > 1  # rows draw their own
    for term, (idx, eps) in zip(terms, whole, strict=True):
        parts = [algo.draws(r.rows(0, 2), term), algo.draws(r.rows(2, 6), term)]
        assert torch.equal(torch.cat([p[0] for p in parts]), idx)
        assert torch.equal(torch.cat([p[1] for p in parts]), eps)
    assert not torch.equal(whole[0][1], whole[1][1])  # fresh noise per level


class _TwoExpertTiny(TinyFlowPolicy):
    """A tiny policy whose steps belong to two sub-networks (as Wan2.2's experts), the
    second one frozen after step 4: ``step_groups`` ``[[0, 1, 2], [3, 4]]`` of 6 steps."""

    def step_groups(self, schedule: Any) -> list[list[int]]:
        return [[0, 1, 2], [3, 4]]


def test_terms_stay_within_one_step_group_and_visit_the_groups_in_order():
    torch.manual_seed(0)
    policy = _TwoExpertTiny(8, 8, latent_size=4, channels=8, embed_dim=16, num_blocks=1)
    algo = _algorithm(policy, timestep_fraction=0.7)  # ⌊0.7·3⌋ = 2, then ⌊0.7·2⌋ = 1
    sampling = config_from_dict(_sections(num_steps=6)).sampling
    plan = rollout_plan(policy, sampling, step=0, seed=0, stochastic="none")
    cond = policy.encode_prompts(PROMPTS * 3)
    noise = policy.initial_noise(9, generator=torch.Generator().manual_seed(0))
    r = sample_rollout(policy, cond, noise, plan=plan, eta=0.0, chunk_size=9, keep=())
    assert algo.term_plan(r.schedule) == [(0, 0), (0, 1), (1, 0)]
    for seed in range(3):
        terms = algo.terms(r, torch.Generator().manual_seed(seed))
        first, second, third = (algo.draws(r, term)[0] for term in terms)
        assert set(first.tolist()) | set(second.tolist()) <= {0, 1, 2}
        assert (first != second).all()  # without replacement within the group
        assert set(third.tolist()) <= {3, 4}  # never the frozen step 5
        assert len(set(first.tolist())) > 1  # rows draw their own levels


def _sections(**sampling: Any) -> dict[str, Any]:
    return {
        "model": {"kind": "tiny_flow"},
        "rewards": {"endpoints": [{"target": "x:1", "reward": "r"}]},
        "sampling": {"shared_noise": False, **sampling},
        "train": {"algorithm": "nft"},
        "data": {"train_prompts": ["p"]},
    }


# ------------------------------------------------------------------ every flow policy


def _flow_policies() -> dict[str, Any]:
    from dancegrpo_testing.diffusion_models import (
        TINY_T5_MAX_LENGTH,
        tiny_flux_kontext_pipeline,
        tiny_flux_pipeline,
        tiny_sd3_pipeline,
    )
    from dancegrpo_testing.video_models import (
        TINY_LLAMA_MAX_LENGTH,
        tiny_hunyuan_video_pipeline,
        tiny_skyreels_i2v_pipeline,
    )
    from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy
    from dancegrpo_trainer.policies.flux_kontext import FluxKontextConfig, FluxKontextPolicy
    from dancegrpo_trainer.policies.hunyuan_video import HunyuanVideoConfig, HunyuanVideoPolicy
    from dancegrpo_trainer.policies.sd3 import StableDiffusion3Config, StableDiffusion3Policy
    from dancegrpo_trainer.policies.skyreels_i2v import SkyReelsI2VConfig, SkyReelsI2VPolicy

    t5, video = {"max_sequence_length": TINY_T5_MAX_LENGTH}, {"num_frames": 5, "crop_start": None}
    return {
        "tiny_flow": lambda: _tiny(),
        "flux": lambda: FluxPolicy.from_pipeline(
            tiny_flux_pipeline(), FluxConfig(resolution=16, device="cpu", **t5), copy=True
        ),
        "sd3": lambda: StableDiffusion3Policy.from_pipeline(
            tiny_sd3_pipeline(),
            StableDiffusion3Config(resolution=16, device="cpu", guidance_scale=1.0, **t5),
            copy=True,
        ),
        "flux_kontext": lambda: FluxKontextPolicy.from_pipeline(
            tiny_flux_kontext_pipeline(),
            FluxKontextConfig(resolution=16, condition_resolution=[16, 16], device="cpu", **t5),
            copy=True,
        ),
        "hunyuan_video": lambda: HunyuanVideoPolicy.from_pipeline(
            tiny_hunyuan_video_pipeline(),
            HunyuanVideoConfig(
                resolution=16, device="cpu", max_sequence_length=TINY_LLAMA_MAX_LENGTH, **video
            ),
            copy=True,
        ),
        "skyreels_i2v": lambda: SkyReelsI2VPolicy.from_pipeline(
            tiny_skyreels_i2v_pipeline(),
            SkyReelsI2VConfig(
                resolution=16, device="cpu", max_sequence_length=16, true_cfg_scale=1.0, **video
            ),
            copy=True,
        ),
    }


FLOW_POLICIES = ["tiny_flow", "flux", "sd3", "flux_kontext", "hunyuan_video", "skyreels_i2v"]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("which", FLOW_POLICIES)
def test_every_flow_policy_trains_only_v_theta_against_its_old_weights(which, lora):
    """One ODE rollout (DPM-Solver++ 2M under the old weights) and one loss term: the term
    equals :func:`nft_loss` with ``v_old`` from the old weights *loaded* into the module
    (not swapped), gradients reach every trainable tensor and nothing else."""
    from dancegrpo_trainer.config import LoraConfig

    policy = _flow_policies()[which]()
    module = policy.trainable_module()
    if lora:
        apply_lora(module, LoraConfig(rank=2, alpha=2), policy.lora_target_modules)
    else:
        for p in module.parameters():
            p.requires_grad_(True)
    options = {"decay_rate": 0.5, "decay_max": 0.5}
    algo = _algorithm(policy, timestep_fraction=1.0, algorithm_options=options)
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert set(algo.names) == trainable
    if lora:
        assert all("lora_" in n for n in algo.names)
    # An optimiser step moves the live weights; the old ones follow half-way.
    with torch.no_grad():
        for p in algo.params:
            p.add_(0.05 * torch.randn_like(p))
    algo.after_optimizer_step(False)
    assert not algo.old_is_live()

    images = None
    if which in ("skyreels_i2v", "flux_kontext"):
        images = torch.randint(0, 255, (1, 16, 16, 3), dtype=torch.uint8)
    cond = policy.encode_prompts(PROMPTS[:1], images).select([0, 0])
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))
    sampling = config_from_dict(_sections(num_steps=3)).sampling
    plan = rollout_plan(policy, sampling, step=0, seed=0, stochastic="none", ode_solver="dpm2")
    with algo.rollout_weights():
        r = sample_rollout(policy, cond, noise, plan=plan, eta=0.0, chunk_size=2, decode=False)
    with torch.no_grad():
        live_rollout = sample_rollout(
            policy, cond, noise, plan=plan, eta=0.0, chunk_size=2, decode=False
        )
    assert not torch.equal(r.latents[:, -1], live_rollout.latents[:, -1])  # sampled with old
    assert torch.isfinite(r.latents).all()

    adv = torch.tensor([1.5, -0.7])
    (term,) = algo.terms(r, torch.Generator().manual_seed(1))[:1]
    module.zero_grad(set_to_none=True)
    res = algo.loss(r, adv, term)
    res.loss.backward()
    grads = {n: p.grad for n, p in module.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert sum(float(g.abs().sum()) for g in grads.values()) > 0
    assert all(p.grad is None for p in module.parameters() if not p.requires_grad)
    assert all(o.grad is None for o in algo.old)

    # Reference: v_old with the old weights copied into the module, then the live ones back.
    idx, eps = algo.draws(r, term)
    x0 = r.latents[:, -1]
    t = r.schedule.sigmas[idx]
    x_t = (1 - t.view(-1, *[1] * (x0.ndim - 1))) * x0 + t.view(-1, *[1] * (x0.ndim - 1)) * eps
    ts = r.schedule.timesteps[idx]
    live = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
    with torch.no_grad():
        for p, o in zip(algo.params, algo.old, strict=True):
            p.copy_(o)
        v_old = policy.predict(x_t, ts, r.cond)
        for n, p in module.named_parameters():
            if n in live:
                p.copy_(live[n])
    v_theta = policy.predict(x_t, ts, r.cond)
    ref = nft_loss(v_theta, v_old, x_t, x0, t, adv, beta=1.0, adv_clip_max=5.0)
    torch.testing.assert_close(res.loss.detach(), ref.loss.detach(), rtol=1e-5, atol=1e-7)
    assert not torch.equal(v_old, v_theta.detach())
    assert res.metrics["old_deviate"] > 0


def test_config_rejects_what_nft_cannot_train():
    def cfg(**changes: Any) -> Any:
        data = _sections()
        for key, value in changes.items():
            section, name = key.split("__")
            data.setdefault(section, {})[name] = value
        return config_from_dict(data)

    cfg()  # the base is valid
    with pytest.raises(ConfigError, match="model.kind: train.algorithm nft"):
        cfg(model__kind="stable_diffusion", model__path="x", sampling__sampler=None)
    with pytest.raises(ConfigError, match="model.guidance_scale: .*CFG-free.*set it to 1"):
        cfg(model__kind="sd3", model__path="x", model__height=16, model__width=16,
            model__guidance_scale=4.5)  # fmt: skip
    with pytest.raises(ConfigError, match=r"model.options.true_cfg_scale: .*CFG-free.*got 5.0"):
        cfg(model__kind="skyreels_i2v", model__path="x", model__height=16, model__width=16,
            data__train_prompts="a.jsonl")  # fmt: skip
    with pytest.raises(ConfigError, match="train.algorithm_options.betta: not an option"):
        cfg(train__algorithm_options={"betta": 1})
    with pytest.raises(ConfigError, match="train.algorithm_options.beta: must be > 0"):
        cfg(train__algorithm_options={"beta": 0})
    with pytest.raises(ConfigError, match="train.algorithm_options.decay_max"):
        cfg(train__algorithm_options={"decay_max": 1.0})


# ------------------------------------------------------------------ through the trainer


def _trainer(out: Path, max_steps: int, *overrides: str) -> Trainer:
    cfg = load_config(
        ROOT / "configs/demo_grpo.yaml",
        [
            "rewards.endpoints.0.target=x:1",
            "rewards.endpoints.0.reward=r",
            f"run.output_dir={out}",
            "run.progress=false",
            "run.sample_grid_every=0",
            f"run.max_steps={max_steps}",
            "run.checkpoint_every=1",
            "run.keep_checkpoints=4",
            "data.eval_prompts=[]",
            "sampling.prompts_per_step=2",
            "sampling.group_size=3",
            "sampling.num_steps=4",
            "sampling.shared_noise=false",
            "sampling.rollout_batch_size=4",
            "train.micro_batch_size=4",
            "train.algorithm=nft",
            "train.algorithm_options={decay_rate: 0.3, decay_max: 0.6}",
            "model.options.channels=8",
            "model.options.embed_dim=16",
            "model.options.num_blocks=1",
            *overrides,
        ],
    )
    return Trainer(cfg, scorer=RednessScorer())


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    module = trainer.policy.trainable_module()
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_samples_with_the_old_policy_and_resumes_exactly(tmp_path, monkeypatch, lora):
    extra = ["train.lora.rank=2"] if lora else []
    sampled_with: list[list[torch.Tensor]] = []
    original = trainer_module.sample_rollout

    def recording(policy, *args: Any, **kwargs: Any):
        params = [p for p in policy.trainable_module().parameters() if p.requires_grad]
        sampled_with.append([p.detach().clone() for p in params])
        return original(policy, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "sample_rollout", recording)
    full = _trainer(tmp_path / "full", 3, *extra)
    olds: list[list[torch.Tensor]] = []
    initial = _state(full)
    for _ in range(3):
        olds.append([o.clone() for o in full.algorithm.old])
        record = full.train_step()
        assert record["grad_norm"] > 0 and "policy_loss" in record and "ratio_min" not in record
    full.save()
    full.close()
    # Every rollout sampled with the old policy of its step (which lags the live weights).
    assert len(sampled_with) == 3
    for used, old in zip(sampled_with, olds, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(used, old, strict=True))
    live = [p.detach() for p in full.algorithm.params]
    assert not all(torch.equal(a, b) for a, b in zip(olds[-1], live, strict=True))
    final = _state(full)
    if lora:  # only the adapters train; the EMA holds the adapters only
        assert all("lora_" in n for n in full.algorithm.names)
        base = [k for k in final if "lora_" not in k]
        assert base and all(torch.equal(final[k], initial[k]) for k in base)
    assert any(not torch.equal(final[k], initial[k]) for k in final)
    saved = load_file(str(tmp_path / "full/checkpoints/step_000003/model.safetensors"))
    for name, old in zip(full.algorithm.names, full.algorithm.old, strict=True):
        assert torch.equal(saved[f"nft.old.{name}"], old)
    assert int(saved["nft.steps_taken"]) == 3

    half = _trainer(tmp_path / "resumed", 2, *extra)
    half.train()
    half.close()
    resumed = _trainer(tmp_path / "resumed", 3, *extra)
    assert resumed.step == 2 and int(resumed.algorithm.steps_taken) == 2
    resumed.train()
    resumed.close()
    after = _state(resumed)
    assert all(torch.equal(after[k], final[k]) for k in final)
    for a, b in zip(resumed.algorithm.old, full.algorithm.old, strict=True):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_two_gloo_ranks_match_one_process(tmp_path: Path):
    """``test_trainer_distributed.py``'s check with ``train.algorithm=nft``: torchrun 2 × 2
    prompts equals 1 × 4 prompts, micro-batches and chunks of 3 straddling the ranks; the
    old policy in the final checkpoint agrees too."""
    from dancegrpo_testing.servers import running_reward_server

    sys.path.insert(0, str(Path(__file__).parent))
    import test_trainer_distributed as dist_test

    nft = ["train.algorithm=nft", "sampling.shared_noise=false", "train.timestep_fraction=0.75"]
    script = str(Path(dist_test.__file__).resolve())
    one, two = tmp_path / "one", tmp_path / "two"
    with running_reward_server(ROOT / "services/demo.yaml", metrics=False) as server:
        dist_test._run(
            [sys.executable, script, str(one)] + dist_test._overrides(server.target, one, 4) + nft
        )
        dist_test._run(
            dist_test._launcher("torchrun")
            + [script, str(two)]
            + dist_test._overrides(server.target, two, 2)
            + nft
        )
    dist_test._check_matches_single_process(two, one)
    ckpt = f"checkpoints/step_{dist_test.STEPS:06d}/model.safetensors"
    a, b = load_file(str(one / ckpt)), load_file(str(two / ckpt))
    old = [k for k in a if k.startswith("nft.old.")]
    assert old and int(a["nft.steps_taken"]) == int(b["nft.steps_taken"]) == dist_test.STEPS
    for key in old:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=dist_test.ATOL, msg=key)
    for a_rec, b_rec in zip(dist_test._records(two), dist_test._records(one), strict=True):
        for key in ("policy_loss", "old_deviate", "r_mean"):
            if a_rec["split"] == "train":
                assert math.isfinite(a_rec[key])
                assert a_rec[key] == pytest.approx(b_rec[key], rel=1e-4, abs=1e-7), key
