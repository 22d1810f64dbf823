"""GRPO-Guard (``train.algorithm: grpo_guard``): the regulated ratio's math, exactly, and the
algorithm on every flow policy, LoRA and full fine-tune, resumed bit for bit.

The reference semantics are the authors' code, Flow-GRPO's ``scripts/train_sd3_GRPO_Guard.py``
(``config.rationorm``), which cannot be imported (a training script): its formula is
restated below on Flow-GRPO's own quantities (``std_dev_t = η·√(σ/(1−σ))``, ``sqrt_dt =
√(σ − σ_next)``) and compared with ours.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from dancegrpo_testing.flow_policies import FLOW_KINDS
from dancegrpo_testing.scorers import RednessScorer
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_testing.trainer_runs import trainable_state
from dancegrpo_trainer.algorithms import algorithm_class
from dancegrpo_trainer.algorithms.grpo import GRPO
from dancegrpo_trainer.algorithms.grpo_guard import GRPOGuard
from dancegrpo_trainer.config import ConfigError, TrainConfig, config_from_dict
from dancegrpo_trainer.core import flow_sde_step, gaussian_log_prob, grpo_loss
from dancegrpo_trainer.core.guard import grpo_guard_loss, regulated_log_ratio
from dancegrpo_trainer.rollout import RolloutPlan, sample_rollout, seeded_generators
from dancegrpo_trainer.trainer import Trainer

PROMPTS = ["a red square", "a blue square", "a green square"]


# ------------------------------------------------------------------------- the formula


def test_regulated_ratio_of_a_hand_computed_step():
    # One sample, two latent entries: s = 0.5, μ_old = (0, 0), μθ = (0.1, −0.2), ε = (1, 2),
    # so x' = μ_old + s·ε = (0.5, 1.0).
    s, old_mean = torch.tensor([0.5]), torch.zeros(1, 2)
    mean = torch.tensor([[0.1, -0.2]])
    x_next = torch.tensor([[0.5, 1.0]])
    lp_new = gaussian_log_prob(x_next, mean, s.view(1, 1))
    lp_old = gaussian_log_prob(x_next, old_mean, s.view(1, 1))
    # GRPO: log r = mean((0.25 − 0.16)/0.5, (1 − 1.44)/0.5) = mean(0.18, −0.88) = −0.35.
    torch.testing.assert_close(lp_new - lp_old, torch.tensor([-0.35]), rtol=0, atol=1e-6)
    # b = mean(0.01, 0.04)/(2·0.25) = 0.05; log r̂ = 0.5·(−0.35 + 0.05) = −0.15
    # (= mean(ε·Δμ) = mean(0.1, −0.4)).
    log_r, bias = regulated_log_ratio(lp_new, lp_old, mean, old_mean, s)
    torch.testing.assert_close(bias, torch.tensor([0.05]), rtol=0, atol=1e-7)
    torch.testing.assert_close(log_r, torch.tensor([-0.15]), rtol=0, atol=1e-6)
    # A = 1, ε_clip = 0.2: r̂ = e^−0.15 = 0.8607 lies inside [0.8, 1.2], so the policy loss
    # is −r̂, divided by Δ = 0.25 (gradient reweighting).
    out = grpo_guard_loss(
        lp_new, lp_old, mean, old_mean, s, torch.ones(1), delta=0.25, clip_range=0.2
    )
    assert out.policy_loss.item() == pytest.approx(-math.exp(-0.15) / 0.25, rel=1e-6)
    assert out.ratio_mean.item() == pytest.approx(math.exp(-0.15), rel=1e-6)
    assert out.mean_shift.item() == pytest.approx(0.05, rel=1e-5)
    assert out.approx_kl.item() == pytest.approx(0.5 * 0.35**2, rel=1e-5)  # raw log-ratio
    # A = −1 and ε_clip = 0.1: r̂ < 0.9 is clipped, −A·clip = 0.9 wins the max.
    clipped = grpo_guard_loss(
        lp_new, lp_old, mean, old_mean, s, -torch.ones(1), delta=None, clip_range=0.1
    )
    assert clipped.policy_loss.item() == pytest.approx(0.9, rel=1e-6)
    assert clipped.clip_fraction.item() == 1.0


def test_regulated_log_ratio_is_the_noise_projected_mean_shift_at_every_noise_scale():
    """``log r̂ = mean_d(ε·(μθ − μ_old))`` whatever ``s``: GRPO's log-ratio scales with
    ``1/s`` and is shifted by ``−b``; the regulated one is neither."""
    g = torch.Generator().manual_seed(0)
    old_mean = torch.randn(4, 3, 5, generator=g)
    mean = old_mean + 0.05 * torch.randn(4, 3, 5, generator=g)
    eps = torch.randn(4, 3, 5, generator=g)
    expected = (eps * (mean - old_mean)).mean(dim=(1, 2))
    raw = []
    for scale in (1e-2, 0.3, 2.0):
        s = torch.full((4,), scale)
        x_next = old_mean + scale * eps
        lp_new = gaussian_log_prob(x_next, mean, s.view(4, 1, 1))
        lp_old = gaussian_log_prob(x_next, old_mean, s.view(4, 1, 1))
        log_r, bias = regulated_log_ratio(lp_new, lp_old, mean, old_mean, s)
        torch.testing.assert_close(log_r, expected, rtol=1e-4, atol=1e-6)
        # GRPO's: mean(ε·Δμ)/s − b, left-shifted by b > 0.
        torch.testing.assert_close(lp_new - lp_old, expected / scale - bias, rtol=1e-4, atol=1e-5)
        raw.append((lp_new - lp_old).abs().mean().item())
    assert raw[0] > 10 * raw[1] > 10 * raw[2]  # GRPO's spread: 1/s


def test_ratio_is_exactly_one_on_policy_and_deterministic_rows_give_one():
    g = torch.Generator().manual_seed(1)
    mean = torch.randn(3, 2, 4, generator=g)
    lp = torch.randn(3, generator=g)
    s = torch.tensor([0.3, 0.0, 0.7])  # row 1: a deterministic step (s = 0)
    log_r, _ = regulated_log_ratio(lp, lp.clone(), mean, mean.clone(), s)
    assert torch.equal(log_r, torch.zeros(3))
    other = mean + 1.0
    log_r, bias = regulated_log_ratio(lp + 1, lp, other, mean, s)
    assert log_r[1] == 0 and bias[1] == 0 and torch.isfinite(log_r).all()


def test_gradients_reach_the_policy_through_its_mean_only():
    """The stored mean, std and old log-prob are constants; the gradient w.r.t. the
    current mean is ``−A·r̂·ε/(D·B·Δ)`` (unclipped branch)."""
    g = torch.Generator().manual_seed(2)
    b, d, delta = 2, 6, 0.125
    old_mean = torch.randn(b, d, generator=g).requires_grad_()
    mean = (old_mean.detach() + 0.01 * torch.randn(b, d, generator=g)).requires_grad_()
    s = torch.tensor([0.2, 0.4]).requires_grad_()
    eps = torch.randn(b, d, generator=g)
    x_next = old_mean.detach() + s.detach()[:, None] * eps
    old_lp = gaussian_log_prob(x_next, old_mean.detach(), s.detach()[:, None]).requires_grad_()
    lp = gaussian_log_prob(x_next, mean, s.detach()[:, None])
    adv = torch.tensor([1.5, -0.5])
    out = grpo_guard_loss(lp, old_lp, mean, old_mean, s, adv, delta=delta, clip_range=10.0)
    out.loss.backward()
    assert old_mean.grad is None and s.grad is None and old_lp.grad is None
    ratio = torch.exp((eps * (mean - old_mean)).mean(dim=1)).detach()
    expected = -(adv * ratio)[:, None] * eps / (d * b * delta)
    torch.testing.assert_close(mean.grad, expected, rtol=1e-4, atol=1e-7)


def _linear_step(weight: torch.Tensor, x: torch.Tensor, sigma: float, sigma_next: float, **kw):
    return flow_sde_step(x @ weight, x, sigma, sigma_next, eta=0.7, **kw)


def test_on_policy_gradient_is_grpos_scaled_by_the_step_std_over_delta():
    """Where GRPO-Guard reduces to GRPO: on-policy (``μθ = μ_old``) both ratios are 1, the
    mean-shift term's gradient vanishes, and ``∇ log r̂ = s·∇ log r``: the update is
    GRPO's scaled by ``s/Δ`` per step (``s`` without the reweighting)."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(4, 5, generator=g)
    weight = (0.3 * torch.randn(5, 5, generator=g)).requires_grad_()
    sigma, sigma_next = 0.6, 0.45
    with torch.no_grad():
        old = _linear_step(weight, x, sigma, sigma_next, generator=g)
    adv = torch.tensor([1.0, -0.3, 0.7, -1.4])

    def grad(loss_fn) -> torch.Tensor:
        weight.grad = None
        out = _linear_step(weight, x, sigma, sigma_next, prev_sample=old.prev_sample)
        loss_fn(out).backward()
        return weight.grad.clone()

    g_grpo = grad(lambda o: grpo_loss(o.log_prob, old.log_prob, adv).loss)
    s = old.std.reshape(4)
    delta = sigma - sigma_next
    for reweight in (delta, None):
        g_guard = grad(
            lambda o, w=reweight: (
                grpo_guard_loss(o.log_prob, old.log_prob, o.mean, old.mean, s, adv, delta=w).loss
            )
        )
        factor = float(s[0]) / (reweight or 1.0)
        torch.testing.assert_close(g_guard, factor * g_grpo, rtol=1e-4, atol=1e-7)
    assert g_grpo.abs().max() > 0
    # With a unit step std the regulated log-ratio is GRPO's plus exactly the mean shift b.
    one = torch.ones(4)
    mean = old.mean + 0.1
    lp_new = gaussian_log_prob(old.prev_sample, mean, one[:, None])
    lp_old = gaussian_log_prob(old.prev_sample, old.mean, one[:, None])
    log_r, bias = regulated_log_ratio(lp_new, lp_old, mean, old.mean, one)
    torch.testing.assert_close(log_r, lp_new - lp_old + bias, rtol=0, atol=1e-6)
    torch.testing.assert_close(bias, torch.full((4,), 0.005), rtol=1e-5, atol=0)


# ------------------------------------------------------------- the algorithm on policies


def _train_cfg(**overrides) -> TrainConfig:
    cfg = TrainConfig(**{"algorithm": "grpo_guard", "clip_range": 1e-4, **overrides})
    cfg.validate()
    return cfg


def _rollout(policy, kind: str, *, sampler: str = "dancegrpo", eta: float = 0.7, steps: int = 3):
    from dancegrpo_testing.flow_policies import condition_images

    images = condition_images(kind, 1)
    cond = policy.encode_prompts(PROMPTS[:1], images).select([0, 0, 0])
    noise = policy.initial_noise(3, generator=torch.Generator().manual_seed(0))

    return sample_rollout(
        policy,
        cond,
        noise,
        plan=RolloutPlan(policy.schedule(steps), sampler=sampler),
        eta=eta,
        row_generators=seeded_generators(range(3), 0, "guard"),
        chunk_size=3,
        keep=("log_probs", "means", "stds"),
        decode=False,
    )


def test_the_registry_builds_it_and_the_rollout_keeps_what_it_needs():
    from dancegrpo_testing.flow_policies import tiny_flow_policy

    assert algorithm_class("grpo_guard") is GRPOGuard
    spec = GRPOGuard(_train_cfg(), tiny_flow_policy("tiny_flow")).rollout_spec()
    assert spec.stochastic == "window" and set(spec.keep) == {"log_probs", "means", "stds"}


@pytest.fixture(scope="module")
def flow_policies():
    from dancegrpo_testing.flow_policies import FLOW_KINDS, tiny_flow_policy

    return {kind: tiny_flow_policy(kind) for kind in FLOW_KINDS}


@pytest.mark.parametrize("sampler", ["dancegrpo", "flow_grpo", "cps"])
@pytest.mark.parametrize("kind", FLOW_KINDS)
def test_every_flow_policy_recomputes_ratio_one_and_trains_through_its_mean(
    flow_policies, kind, sampler
):
    policy = flow_policies[kind]
    rollout = _rollout(policy, kind, sampler=sampler)
    algo = GRPOGuard(_train_cfg(), policy)
    module = policy.trainable_module()
    module.zero_grad(set_to_none=True)
    adv = torch.tensor([1.0, -0.5, -0.5])
    res = algo.loss(rollout, adv, 1)
    # On-policy: the same batch recomputes the same means and log-probs.
    assert res.metrics["ratio_min"] == pytest.approx(1.0, abs=2e-6)
    assert res.metrics["ratio_max"] == pytest.approx(1.0, abs=2e-6)
    assert res.metrics["mean_shift"] == pytest.approx(0.0, abs=1e-8)
    res.loss.backward()
    grads = [p.grad for p in module.parameters() if p.requires_grad and p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert max(float(gr.abs().max()) for gr in grads) > 0
    # Reference: Flow-GRPO's GRPO-Guard formula on Flow-GRPO's own step quantities.
    sig = rollout.schedule.sigmas
    sigma, sigma_next = float(sig[1]), float(sig[2])
    sqrt_dt = math.sqrt(sigma - sigma_next)
    std_dev_t = {
        "dancegrpo": 0.7,
        "flow_grpo": 0.7 * math.sqrt(sigma / (1 - sigma)),
        "cps": sigma_next * math.sin(0.7 * math.pi / 2) / sqrt_dt,  # σ̃ = std_dev_t·sqrt_dt
    }[sampler]
    torch.testing.assert_close(
        rollout.stds[:, 1], torch.full((3,), std_dev_t * sqrt_dt), rtol=1e-5, atol=0
    )
    assert res.metrics["policy_loss"] == pytest.approx(-adv.mean().item() / sqrt_dt**2, rel=1e-4)


@pytest.mark.parametrize("window", [None, (1, 3)], ids=["every_step", "sde_window"])
def test_terms_stay_on_one_side_of_wan22s_expert_boundary_as_grpos(window):
    """Wan2.2 A14B (two experts, ``Policy.step_groups``): GRPO-Guard trains GRPO's terms,
    drawn per expert (``GRPO.terms``), so every micro-batch runs the experts in the same
    order; with an SDE window, the recorded steps of each expert in turn."""
    from dancegrpo_testing.flow_policies import TWO_EXPERT_WAN, tiny_flow_policy

    policy = tiny_flow_policy(TWO_EXPERT_WAN, guidance_scale=1.0)
    steps = 5  # shift 3: t = 1000, 923, 818, 667, 429 → experts 0, 0, 1, 1, 1
    cond = policy.encode_prompts(PROMPTS[:1]).select([0, 0])
    stochastic = None if window is None else [window[0] <= i < window[1] for i in range(steps)]
    rollout = sample_rollout(
        policy,
        cond,
        policy.initial_noise(2, generator=torch.Generator().manual_seed(0)),
        plan=RolloutPlan(policy.schedule(steps), stochastic=stochastic),
        eta=0.7,
        row_generators=seeded_generators(range(2), 0, "guard"),
        chunk_size=2,
        keep=("log_probs", "means", "stds"),
        decode=False,
    )
    groups = policy.step_groups(rollout.schedule)
    assert groups == [[0, 1], [2, 3, 4]]
    cfg = _train_cfg(timestep_fraction=0.5)
    guard, grpo = GRPOGuard(cfg, policy), GRPO(cfg, policy)
    for seed in range(5):
        terms = guard.terms(rollout, torch.Generator().manual_seed(seed))
        assert terms == grpo.terms(rollout, torch.Generator().manual_seed(seed))
        experts = [0 if t in groups[0] else 1 for t in terms]
        assert experts == sorted(experts)  # the high-noise expert's steps first
        if window is None:
            assert experts == [0, 1]  # timestep_fraction 0.5: one of 2, one of 3
        else:
            assert terms == [1, 2]
    res = guard.loss(rollout, torch.tensor([1.0, -1.0]), terms[-1])
    assert res.metrics["ratio_max"] == pytest.approx(1.0, abs=2e-6)


def test_official_formula_off_policy_equals_ours():
    """After an optimiser step (θ ≠ θ_old): ``exp((lp − old_lp + mean((μ − μ_old)²) /
    (2(sqrt_dt·std_dev_t)²))·(sqrt_dt·std_dev_t))``, loss ``/ sqrt_dt²``, as
    ``train_sd3_GRPO_Guard.py`` computes it, with Flow-GRPO's SDE (``flow_grpo`` sampler)."""
    from dancegrpo_testing.flow_policies import tiny_flow_policy

    policy = tiny_flow_policy("tiny_flow")
    rollout = _rollout(policy, "tiny_flow", sampler="flow_grpo", steps=4)
    with torch.no_grad():
        for p in policy.trainable_module().parameters():
            p.add_(0.02 * torch.randn_like(p))
    algo = GRPOGuard(_train_cfg(clip_range=0.05), policy)
    adv = torch.tensor([1.2, -0.4, -0.8])
    i = 2
    res = algo.loss(rollout, adv, i)
    with torch.no_grad():
        out = policy.denoise_step(
            rollout.latents[:, i],
            i,
            rollout.schedule,
            rollout.cond,
            eta=0.7,
            prev_sample=rollout.latents[:, i + 1],
            sampler="flow_grpo",
        )
    sigma, sigma_next = (float(v) for v in rollout.schedule.sigmas[i : i + 2])
    sqrt_dt = math.sqrt(sigma - sigma_next)
    sigma_t = 0.7 * math.sqrt(sigma / (1 - sigma))
    bias = (out.mean - rollout.means[:, i]).pow(2).mean(dim=(1, 2, 3))
    bias = bias / (2 * (sqrt_dt * sigma_t) ** 2)
    ratio = torch.exp((out.log_prob - rollout.log_probs[:, i] + bias) * (sqrt_dt * sigma_t))
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1.0 - 0.05, 1.0 + 0.05)
    official = torch.mean(torch.maximum(unclipped, clipped)) / sqrt_dt**2
    assert abs(ratio.mean().item() - 1) > 1e-4  # genuinely off-policy
    assert res.metrics["policy_loss"] == pytest.approx(official.item(), rel=1e-5)
    assert res.metrics["ratio_mean"] == pytest.approx(ratio.mean().item(), rel=1e-6)


def test_reweighting_can_be_turned_off_and_options_are_checked():
    from dancegrpo_testing.flow_policies import tiny_flow_policy

    policy = tiny_flow_policy("tiny_flow")
    rollout = _rollout(policy, "tiny_flow")
    adv = torch.tensor([1.0, -0.5, -0.5])
    on = GRPOGuard(_train_cfg(), policy).loss(rollout, adv, 0).metrics["policy_loss"]
    off_cfg = _train_cfg(algorithm_options={"reweight": False})
    off = GRPOGuard(off_cfg, policy).loss(rollout, adv, 0).metrics["policy_loss"]
    delta = float(rollout.schedule.sigmas[0] - rollout.schedule.sigmas[1])
    assert on == pytest.approx(off / delta, rel=1e-6)
    with pytest.raises(ConfigError, match=r"train.algorithm_options: unknown \['rationorm'\]"):
        _config(Path("unused"), algorithm_options={"rationorm": True})
    with pytest.raises(ConfigError, match="grpo_guard .* stable_diffusion"):
        config_from_dict(
            {
                "model": {"kind": "stable_diffusion", "path": "x"},
                "rewards": {"endpoints": [{"target": "x:1", "reward": "r"}]},
                "train": {"algorithm": "grpo_guard"},
                "data": {"train_prompts": ["a"]},
            }
        )


# ---------------------------------------------------------------------------- training


def _config(out: Path, max_steps: int = 2, lora: bool = False, **train):
    return config_from_dict(
        {
            "model": {
                "kind": "tiny_flow",
                "options": {"latent_size": 4, "channels": 8, "embed_dim": 16, "num_blocks": 1},
            },
            "rewards": {"endpoints": [{"target": "x:1", "reward": "r"}]},
            "sampling": {
                "num_steps": 4,
                "eta": 0.7,
                "group_size": 4,
                "prompts_per_step": 2,
                "rollout_batch_size": 3,
            },
            "train": {
                "algorithm": "grpo_guard",
                "learning_rate": 1e-2 if lora else 1e-3,
                "micro_batch_size": 3,
                "timestep_fraction": 0.5,
                "clip_range": 1e-3,
                "kl_coef": 0.01,
                **({"lora": {"rank": 2}} if lora else {}),
                **train,
            },
            "data": {"train_prompts": PROMPTS},
            "run": {
                "output_dir": str(out),
                "progress": False,
                "sample_grid_every": 0,
                "max_steps": max_steps,
                "checkpoint_every": 1,
            },
        }
    )


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_trainer_trains_grpo_guard_and_resumes_bit_exactly(tmp_path: Path, lora: bool):
    full = Trainer(_config(tmp_path / "full", lora=lora), scorer=RednessScorer())
    assert isinstance(full.algorithm, GRPOGuard) and full.spec.keep == (
        "log_probs",
        "means",
        "stds",
    )
    before = trainable_state(full)
    full.train()
    full.close()
    after = trainable_state(full)
    assert sum(int((after[k] != v).sum()) for k, v in before.items()) > 0
    half = Trainer(_config(tmp_path / "resumed", max_steps=1, lora=lora), scorer=RednessScorer())
    half.train()
    half.close()
    resumed = Trainer(_config(tmp_path / "resumed", lora=lora), scorer=RednessScorer())
    assert resumed.step == 1
    resumed.train()
    resumed.close()
    for k, v in trainable_state(resumed).items():
        assert torch.equal(v, after[k]), k


def test_trainer_logs_the_regulated_ratio_and_it_differs_from_grpo(tmp_path: Path):
    guard = Trainer(_config(tmp_path / "guard", max_steps=1), scorer=RednessScorer())
    record = guard.train_step()
    guard.close()
    assert {"mean_shift", "ratio_mean", "clip_fraction", "kl"} <= set(record)
    assert record["ratio_mean"] == pytest.approx(1.0, abs=1e-5)  # one update: on-policy
    plain = Trainer(
        _config(tmp_path / "grpo", max_steps=1, algorithm="grpo"), scorer=RednessScorer()
    )
    assert isinstance(plain.algorithm, GRPO) and not isinstance(plain.algorithm, GRPOGuard)
    grpo_record = plain.train_step()
    plain.close()
    assert "mean_shift" not in grpo_record
    # Same rollout and rewards; GRPO-Guard's gradient is GRPO's scaled per step by s/Δ.
    assert grpo_record["reward_mean"] == record["reward_mean"]
    assert grpo_record["grad_norm"] != pytest.approx(record["grad_norm"], rel=1e-3)
