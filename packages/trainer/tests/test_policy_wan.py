"""WanPolicy / WanI2VPolicy against diffusers' WanPipeline and WanImageToVideoPipeline on tiny
random weights (Wan2.1 T2V and I2V, Wan2.2 T2V/I2V-A14B with two experts, Wan2.2 TI2V-5B from
text and from an image), the two-expert routing, log-probabilities, gradients, LoRA,
loading, the embedding cache and the config checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import rollout_trajectory, save_pipeline
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_testing.wan_models import (
    TINY_WAN_LATENT_CHANNELS,
    TINY_WAN_MAX_LENGTH,
    WAN21_I2V_TEXT_LENGTH,
    tiny_wan22_i2v_pipeline,
    tiny_wan22_t2v_pipeline,
    tiny_wan22_ti2v_pipeline,
    tiny_wan_i2v_pipeline,
    tiny_wan_t2v_pipeline,
)
from dancegrpo_trainer.config import ConfigError, ModelConfig, TrainConfig
from dancegrpo_trainer.core.sde import flow_sde_step
from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.wan import (
    WAN_LORA_TARGET_MODULES,
    WanConfig,
    WanExperts,
    WanPolicy,
    clean_prompt,
)
from dancegrpo_trainer.policies.wan_i2v import WanI2VPolicy
from dancegrpo_trainer.policy_factory import build_policy

PROMPTS = ["a photo of a cat", "a red car on the street"]
NUM_FRAMES = 9  # → 3 latent frames
STEPS = 5  # shift 3: t = 1000, 923, 818, 667, 429 → A14B experts 0, 0, 1, 1, 1
SHIFT = 3.0


@dataclasses.dataclass(frozen=True)
class Variant:
    """One released Wan layout: its tiny pipeline, adapter class and test size."""

    build: Callable[[], Any]
    policy_class: type[WanPolicy]
    resolution: int
    image: bool
    two_experts: bool = False
    #: UMT5 tokens: Wan2.1 I2V's transformer needs 512 (see ``WAN21_I2V_TEXT_LENGTH``).
    text_length: int = TINY_WAN_MAX_LENGTH


VARIANTS = {
    "wan21_t2v": Variant(tiny_wan_t2v_pipeline, WanPolicy, 32, False),
    "wan22_t2v_a14b": Variant(tiny_wan22_t2v_pipeline, WanPolicy, 32, False, True),
    "wan22_ti2v_text": Variant(tiny_wan22_ti2v_pipeline, WanPolicy, 64, False),
    "wan21_i2v": Variant(
        tiny_wan_i2v_pipeline, WanI2VPolicy, 32, True, text_length=WAN21_I2V_TEXT_LENGTH
    ),
    "wan22_i2v_a14b": Variant(tiny_wan22_i2v_pipeline, WanI2VPolicy, 32, True, True),
    "wan22_ti2v_image": Variant(
        lambda: tiny_wan22_ti2v_pipeline(image=True), WanI2VPolicy, 64, True
    ),
}


def _config(variant: Variant, **overrides: Any) -> WanConfig:
    options = {
        "resolution": variant.resolution,
        "num_frames": NUM_FRAMES,
        "device": "cpu",
        "max_sequence_length": variant.text_length,
        "shift": SHIFT,
        "guidance_scale": 5.0,
    } | overrides
    return WanConfig(**options)


def _policy(name: str, pipe=None, **overrides: Any) -> WanPolicy:
    """A policy on a copy of ``pipe``'s modules (placed and frozen as the constructor does;
    the pipeline stays as it was, so parity tests can still run it)."""
    variant = VARIANTS[name]
    return variant.policy_class.from_pipeline(
        pipe or variant.build(), _config(variant, **overrides), copy=True
    )


def _images(seed: int = 0, size: tuple[int, int] = (40, 48)) -> torch.Tensor:
    """Two random ``uint8 [2, H, W, 3]`` images, not at the video size (resize exercised)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (2, *size, 3), dtype=np.uint8))


def _cond(policy: WanPolicy, images: torch.Tensor | None) -> Conditioning:
    return (
        policy.encode_prompts(PROMPTS, images)
        if images is not None
        else policy.encode_prompts(PROMPTS)
    )


def _noise(policy: WanPolicy, seeds: list[int]) -> torch.Tensor:
    return torch.cat([policy.initial_noise(1, torch.Generator().manual_seed(s)) for s in seeds])


def _rollout(policy: WanPolicy, cond: Conditioning, x: torch.Tensor, eta: float, seed: int = 0):
    """``(schedule, [x_0 .. x_n], log-probs [N, n])`` of ``STEPS`` steps from ``x``."""
    return rollout_trajectory(policy, cond, STEPS, eta, seed, noise=x)


def _euler_on_flow_sigmas(shift: float):
    """diffusers' ``FlowMatchEulerDiscreteScheduler`` whose ``set_timesteps(n)`` takes
    ``sigmas=linspace(1, 1/n, n)`` (what the FLUX/HunyuanVideo pipelines pass; the Wan
    pipelines take no ``sigmas``), i.e. the flow schedule ``shift(linspace(1, 0, n + 1))``."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    class EulerOnFlowSigmas(FlowMatchEulerDiscreteScheduler):
        def set_timesteps(self, num_inference_steps=None, device=None, **_: Any) -> None:
            n = num_inference_steps
            super().set_timesteps(sigmas=np.linspace(1.0, 1.0 / n, n), device=device)

    return EulerOnFlowSigmas(num_train_timesteps=1000, shift=shift)


def _pipeline(pipe, policy: WanPolicy, images: torch.Tensor | None, output_type: str):
    """The pipeline's output for ``PROMPTS`` (I2V: one call per prompt and image, as the
    pipeline takes one image; seeds 0 and 1, as :func:`_noise`)."""
    c = policy.config
    kwargs = dict(
        height=policy.height,
        width=policy.width,
        num_frames=NUM_FRAMES,
        num_inference_steps=STEPS,
        guidance_scale=c.guidance_scale,
        max_sequence_length=c.max_sequence_length,
        output_type=output_type,
    )
    if policy.boundary_ratio is not None:
        kwargs["guidance_scale_2"] = c.guidance_scales[1]
    if images is None:
        neg = [c.negative_prompt] * len(PROMPTS)
        gen = torch.Generator().manual_seed(0)
        return pipe(PROMPTS, negative_prompt=neg, generator=gen, **kwargs).frames
    outs = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, images.numpy(), strict=True)):
        gen = torch.Generator().manual_seed(i)
        out = pipe(
            Image.fromarray(image),
            [prompt],
            negative_prompt=[c.negative_prompt],
            generator=gen,
            **kwargs,
        ).frames
        outs.append(torch.as_tensor(out) if output_type == "latent" else out)
    return torch.cat(outs) if output_type == "latent" else np.concatenate(outs)


# ------------------------------------------------------------------ sampling vs diffusers


@pytest.mark.parametrize("name", list(VARIANTS))
def test_eta0_sampling_matches_diffusers_pipeline(name):
    """η = 0 is the pipeline run with FlowMatchEuler on the same sigmas: final latents to
    1e-4 (observed ≤ 1.5e-6), decoded frames to one grey level."""
    variant = VARIANTS[name]
    pipe = variant.build()
    overrides = {"negative_prompt": "blurry, static"}
    if variant.two_experts:
        overrides.update(guidance_scale=4.0, guidance_scale_2=3.0)
    policy = _policy(name, pipe, **overrides)
    pipe.scheduler = _euler_on_flow_sigmas(policy.shift)
    images = _images() if variant.image else None
    expected = _pipeline(pipe, policy, images, "latent")
    expected_frames = _pipeline(pipe, policy, images, "np")

    cond = _cond(policy, images)
    x0 = (
        _noise(policy, [0, 1])
        if variant.image
        else policy.initial_noise(2, torch.Generator().manual_seed(0))
    )
    final = checks.assert_eta0_matches_pipeline(
        policy, cond, pipe.scheduler, expected, expected_frames, num_steps=STEPS, noise=x0
    )
    latents = (policy.latent_channels, 3, policy.latent_height, policy.latent_width)
    assert final.shape == (2, *latents)
    assert expected_frames.shape == (2, NUM_FRAMES, variant.resolution, variant.resolution, 3)


def test_schedule_is_the_checkpoints_flow_shift_schedule():
    """``shift: null`` reads the UniPC ``flow_shift`` the checkpoint ships; the flow schedule
    is UniPC's flow sigmas up to its 0.999 start (UniPC: ``1 − linspace(1, 1/1000)``)."""
    from diffusers import UniPCMultistepScheduler

    pipe = tiny_wan22_t2v_pipeline(flow_shift=12.0)
    policy = _policy("wan22_t2v_a14b", pipe, shift=None)
    assert policy.shift == 12.0
    schedule = policy.schedule(8)
    unipc = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    unipc.set_timesteps(8)
    torch.testing.assert_close(schedule.sigmas, unipc.sigmas.float(), atol=2e-3, rtol=0)
    assert _policy("wan22_t2v_a14b", pipe, shift=5.0).shift == 5.0
    with pytest.raises(ValueError, match="shift: null reads"):
        WanPolicy(
            transformer=pipe.transformer,
            vae=pipe.vae,
            config=_config(VARIANTS["wan21_t2v"], shift=None),
        )


def test_ti2v_text_mode_per_row_timestep_equals_the_pipelines_per_token_timesteps():
    """TI2V-5B's pipeline expands ``t`` to every token; one ``t`` per row is the same."""
    policy = _policy("wan22_ti2v_text")
    cond = policy.encode_prompts(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(3))
    tokens = 3 * (policy.latent_height // 2) * (policy.latent_width // 2)
    kwargs = dict(
        hidden_states=x, encoder_hidden_states=cond.tensors["prompt_embeds"], return_dict=False
    )
    with torch.no_grad():
        per_row = policy.transformer(timestep=torch.full((2,), 640.0), **kwargs)[0]
        per_token = policy.transformer(timestep=torch.full((2, tokens), 640.0), **kwargs)[0]
    torch.testing.assert_close(per_row, per_token, atol=1e-6, rtol=0)


def test_ti2v_image_frame_ends_on_the_image_latents_and_stays_noisy_only_with_eta():
    policy = _policy("wan22_ti2v_image")
    cond = policy.encode_prompts(PROMPTS, _images())
    image = cond.tensors["image_latents"]
    assert image.shape == (2, TINY_WAN_LATENT_CHANNELS, 1, 4, 4)  # 64 px / 16
    x0 = _noise(policy, [0, 1])
    _, ode, _ = _rollout(policy, cond, x0, eta=0.0)
    torch.testing.assert_close(ode[-1][:, :, :1], image, atol=1e-5, rtol=0)
    _, sde, _ = _rollout(policy, cond, x0, eta=0.3)
    assert (sde[-1][:, :, :1] - image).abs().max() > 1e-3  # SDE noise, like every frame


# ------------------------------------------------------------------ the two experts


def test_each_step_runs_the_expert_its_timestep_selects_with_its_guidance():
    policy = _policy("wan22_t2v_a14b", guidance_scale=4.0, guidance_scale_2=3.0)
    assert isinstance(policy.experts, WanExperts) and policy.boundary_timestep == 875.0
    schedule = policy.schedule(STEPS)
    assert policy.expert_indices(schedule.timesteps).tolist() == [0, 0, 1, 1, 1]
    calls: list[tuple[int, int]] = []
    for index, module in enumerate((policy.transformer, policy.transformer_2)):
        module.register_forward_pre_hook(
            lambda _m, _a, kw, i=index: calls.append((i, kw["hidden_states"].shape[0])),
            with_kwargs=True,
        )
    cond = policy.encode_prompts(PROMPTS)
    _rollout(policy, cond, policy.initial_noise(2, torch.Generator().manual_seed(1)), eta=0.5)
    # One batched forward (negative + positive rows) per step, by the step's expert.
    assert calls == [(0, 4), (0, 4), (1, 4), (1, 4), (1, 4)]


def test_log_prob_of_each_step_comes_from_the_expert_that_produced_it():
    """Recomputed log-probs equal the flow-SDE log-density under the step's own expert
    (guided by its own scale), and perturbing one expert changes exactly its steps'."""
    policy = _policy("wan22_t2v_a14b", guidance_scale=4.0, guidance_scale_2=2.0)
    cond = policy.encode_prompts(PROMPTS)
    schedule, traj, rollout_lp = _rollout(
        policy, cond, policy.initial_noise(2, torch.Generator().manual_seed(2)), eta=0.6, seed=2
    )
    t = cond.tensors

    def expert_log_prob(module, scale, i):
        x = traj[i]
        ts = schedule.timesteps[i].expand(2)
        with torch.no_grad():
            u = module(
                hidden_states=x,
                timestep=ts,
                encoder_hidden_states=t["negative_prompt_embeds"],
                return_dict=False,
            )[0]
            c = module(
                hidden_states=x,
                timestep=ts,
                encoder_hidden_states=t["prompt_embeds"],
                return_dict=False,
            )[0]
        v = u.float() + scale * (c.float() - u.float())
        return flow_sde_step(
            v,
            x,
            float(schedule.sigmas[i]),
            float(schedule.sigmas[i + 1]),
            eta=0.6,
            prev_sample=traj[i + 1],
        ).log_prob

    for i, expert in enumerate(policy.expert_indices(schedule.timesteps).tolist()):
        module, scale = ((policy.transformer, 4.0), (policy.transformer_2, 2.0))[expert]
        torch.testing.assert_close(
            expert_log_prob(module, scale, i), rollout_lp[:, i], atol=1e-5, rtol=1e-5
        )

    with torch.no_grad():
        for p in policy.transformer_2.parameters():
            p.add_(0.05 * torch.randn_like(p))
    recomputed = checks.recomputed_log_probs(policy, cond, schedule, traj, eta=0.6)
    assert torch.equal(recomputed[:, :2], rollout_lp[:, :2])  # high-noise steps untouched
    assert (recomputed[:, 2:] - rollout_lp[:, 2:]).abs().min() > 0


def test_rows_at_different_timesteps_go_to_different_experts():
    """Per-row timesteps (a row above and a row below the boundary) in one call equal each
    row predicted alone."""
    policy = _policy("wan22_t2v_a14b", guidance_scale=4.0, guidance_scale_2=3.0)
    cond = policy.encode_prompts(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(5))
    with torch.no_grad():
        mixed = policy.predict(x, torch.tensor([950.0, 500.0]), cond)
        first = policy.predict(x[:1], 950.0, cond.select([0]))
        second = policy.predict(x[1:], 500.0, cond.select([1]))
    torch.testing.assert_close(mixed, torch.cat([first, second]), atol=1e-6, rtol=0)


def test_step_groups_follow_the_trained_experts():
    schedule = _policy("wan22_t2v_a14b").schedule(STEPS)
    assert _policy("wan21_t2v").step_groups(schedule) is None
    assert _policy("wan22_t2v_a14b").step_groups(schedule) == [[0, 1], [2, 3, 4]]
    high = _policy("wan22_t2v_a14b", train_experts="high_noise")
    low = _policy("wan22_t2v_a14b", train_experts="low_noise")
    assert high.step_groups(schedule) == [[0, 1]]
    assert low.step_groups(schedule) == [[2, 3, 4]]
    assert high.trainable_module() is high.transformer
    assert low.trainable_module() is low.transformer_2
    assert all(not p.requires_grad for p in low.transformer.parameters())
    with pytest.raises(ValueError, match="train_experts='low_noise': none of the 1 steps"):
        low.step_groups(low.schedule(1))  # t = 1000 only: the high-noise expert's
    with pytest.raises(ValueError, match="needs a two-expert model"):
        _policy("wan21_t2v", train_experts="low_noise")


def _update_recording_steps(policy: WanPolicy, fraction: float) -> list[list[int]]:
    """One ``grpo_update`` on 4 rollouts (micro-batches of 2); the steps each micro-batch
    recomputed, in order."""
    from dancegrpo_trainer.rollout import sample_rollout
    from dancegrpo_trainer.update import GradNormMonitor, grpo_update

    cond = policy.encode_prompts(PROMPTS).select([0, 0, 1, 1])
    rollout = sample_rollout(
        policy,
        cond,
        policy.initial_noise(4, torch.Generator().manual_seed(0)),
        num_steps=STEPS,
        eta=0.7,
        generator=torch.Generator().manual_seed(1),
        chunk_size=4,
    )
    optimizer = torch.optim.AdamW(policy.trainable_module().parameters(), lr=1e-3)
    seen: list[tuple[int, int]] = []
    original = policy.denoise_step

    def recording(x, i, *args, **kwargs):
        seen.append((x.shape[0], i))
        return original(x, i, *args, **kwargs)

    policy.denoise_step = recording  # type: ignore[method-assign]
    cfg = TrainConfig(timestep_fraction=fraction, micro_batch_size=2, clip_range=10.0)
    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    grpo_update(
        policy,
        optimizer,
        rollout,
        advantages,
        cfg=cfg,
        eta=0.7,
        timestep_generator=lambda k: torch.Generator().manual_seed(10 + k),
        grad_monitor=GradNormMonitor(5, 0),
    )
    per_batch = len(seen) // 2
    return [[i for _, i in seen[:per_batch]], [i for _, i in seen[per_batch:]]]


def test_every_micro_batch_trains_each_expert_in_the_same_order():
    """Both experts trained: each micro-batch draws from the high-noise steps, then from the
    low-noise ones (fraction 0.5: 1 of 2, then 1 of 3), whatever its random subset."""
    policy = _policy("wan22_t2v_a14b", guidance_scale=1.0)
    batches = _update_recording_steps(policy, 0.5)
    for steps in batches:
        assert len(steps) == 2 and steps[0] in (0, 1) and steps[1] in (2, 3, 4)
    assert [
        policy.expert_indices(policy.schedule(STEPS).timesteps[b]).tolist() for b in batches
    ] == [[0, 1]] * 2


def test_training_one_expert_updates_only_it_on_its_own_steps():
    """``grpo_update`` with ``train_experts: low_noise``: every trained timestep is one of
    the low-noise expert's, its weights move, the high-noise expert's do not."""
    policy = _policy("wan22_t2v_a14b", train_experts="low_noise", guidance_scale=1.0)
    high = [p.detach().clone() for p in policy.transformer.parameters()]
    low = [p.detach().clone() for p in policy.transformer_2.parameters()]
    batches = _update_recording_steps(policy, 0.7)
    assert [len(b) for b in batches] == [2, 2]  # floor(0.7 · 3) of the low-noise steps
    assert set(batches[0] + batches[1]) <= {2, 3, 4}
    assert all(
        torch.equal(a, b) for a, b in zip(high, policy.transformer.parameters(), strict=True)
    )
    assert any(
        not torch.equal(a, b) for a, b in zip(low, policy.transformer_2.parameters(), strict=True)
    )


def _stub_rollout(policy: WanPolicy, stochastic: list[bool] | None):
    """A one-row rollout carrying only what ``GRPO.terms`` reads (schedule, window)."""
    from dancegrpo_trainer.rollout import Rollout

    n = len(stochastic) if stochastic is not None else STEPS
    return Rollout(
        latents=torch.zeros(1, n + 1, 1),
        log_probs=torch.zeros(1, n),
        frames=None,
        cond=Conditioning({"prompt_embeds": torch.zeros(1, 1)}),
        schedule=policy.schedule(n),
        stochastic=torch.tensor(stochastic) if stochastic is not None else None,
    )


@pytest.mark.parametrize(
    ("experts", "expected"), [("all", [1, 2, 3]), ("low_noise", [2, 3]), ("high_noise", [1])]
)
def test_grpo_under_an_sde_window_trains_the_recorded_steps_of_trained_experts(experts, expected):
    """Steps 1-3 recorded (experts 0, 1, 1): GRPO trains those of the trained experts, in
    group order; a window holding none of them is refused, naming what to change."""
    from dancegrpo_trainer.algorithms.grpo import GRPO

    policy = _policy("wan22_t2v_a14b", train_experts=experts)
    grpo = GRPO(TrainConfig(), policy, eta=0.7)
    window = [False, True, True, True, False]
    assert grpo.terms(_stub_rollout(policy, window), torch.Generator()) == expected
    if experts == "high_noise":
        with pytest.raises(ValueError, match="none of which the policy trains.*train_experts"):
            grpo.terms(_stub_rollout(policy, [False, False, True, True, False]), None)


def test_grpo_draws_per_expert_without_the_skipped_last_step():
    """Every step recorded, ``skip_last_timestep``: the last (low-noise) step is never
    drawn; both experts get ``timestep_fraction`` of their steps, high noise first."""
    from dancegrpo_trainer.algorithms.grpo import GRPO

    policy = _policy("wan22_t2v_a14b")
    grpo = GRPO(TrainConfig(timestep_fraction=1.0, skip_last_timestep=True), policy, eta=0.7)
    for seed in range(5):
        steps = grpo.terms(_stub_rollout(policy, None), torch.Generator().manual_seed(seed))
        assert sorted(steps[:2]) == [0, 1] and sorted(steps[2:]) == [2, 3]
    low = _policy("wan22_t2v_a14b", train_experts="low_noise")
    grpo = GRPO(TrainConfig(timestep_fraction=0.1, skip_last_timestep=True), low, eta=0.7)
    assert grpo.terms(_stub_rollout(low, None), torch.Generator()) in ([2], [3])


# ------------------------------------------------------------------ log-probs and gradients


@pytest.mark.parametrize("name", ["wan21_t2v", "wan22_t2v_a14b", "wan21_i2v", "wan22_ti2v_image"])
def test_recomputed_log_probs_give_ratio_one(name):
    policy = _policy(name)
    images = _images() if VARIANTS[name].image else None
    cond = _cond(policy, images).select([0, 0, 1, 1])  # as the trainer: rows per group member
    checks.assert_recompute_ratio_is_one(policy, cond, eta=0.7, num_steps=STEPS)


def _grad_step(policy: WanPolicy, step: int, images: torch.Tensor | None = None) -> None:
    checks.grad_step(policy, _cond(policy, images), eta=0.3, seed=4, step=step, num_steps=STEPS)


def _has_grad(module: torch.nn.Module) -> bool:
    return any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in module.parameters())


def test_gradients_reach_the_transformer_only():
    policy = _policy("wan21_i2v")
    _grad_step(policy, 1, _images())
    parts = (
        "patch_embedding",
        "condition_embedder.text_embedder",
        "condition_embedder.image_embedder",
        "blocks.1.attn2.add_k_proj",
    )
    checks.assert_gradients_reach(policy.trainable_module(), parts)
    # The image and mask input channels of the patch embedding train too.
    proj = policy.transformer.patch_embedding.weight.grad
    assert float(proj[:, TINY_WAN_LATENT_CHANNELS:].abs().sum()) > 0
    checks.assert_frozen(policy.text_encoder, policy.vae, policy.image_encoder)


def test_a_step_trains_only_its_own_expert():
    both = _policy("wan22_t2v_a14b")
    assert both.trainable_module() is both.experts
    _grad_step(both, 0)  # high noise
    assert _has_grad(both.transformer) and all(
        p.grad is None for p in both.transformer_2.parameters()
    )
    low = _policy("wan22_t2v_a14b", train_experts="low_noise")
    _grad_step(low, 3)
    assert _has_grad(low.transformer_2) and all(
        p.grad is None for p in low.transformer.parameters()
    )


def test_ti2v_image_frame_carries_no_gradient():
    policy = _policy("wan22_ti2v_image")
    cond = policy.encode_prompts(PROMPTS, _images())
    x = policy.initial_noise(2, torch.Generator().manual_seed(6))
    velocity = policy.predict(x, 700.0, cond)
    velocity[:, :, :1].sum().backward()
    assert all(p.grad is None or not p.grad.any() for p in policy.transformer.parameters())
    policy.transformer.zero_grad()
    policy.predict(x, 700.0, cond)[:, :, 1:].sum().backward()
    assert _has_grad(policy.transformer)


def test_lora_on_both_experts_trains_the_steps_expert():
    from dancegrpo_trainer.config import LoraConfig
    from dancegrpo_trainer.weights import apply_lora

    policy = _policy("wan22_t2v_a14b")
    module = policy.trainable_module()
    apply_lora(module, LoraConfig(rank=4), policy.lora_target_modules)
    lora = {n: p for n, p in module.named_parameters() if "lora_" in n}
    for expert in ("transformer.", "transformer_2."):
        for target in WAN_LORA_TARGET_MODULES:
            assert any(n.startswith(expert) and f"{target}.lora_A" in n for n in lora), (
                expert,
                target,
            )
    _grad_step(policy, 4)  # low noise
    low_b = [p for n, p in lora.items() if n.startswith("transformer_2.") and "lora_B" in n]
    high = [p for n, p in lora.items() if n.startswith("transformer.")]
    assert any(float(p.grad.abs().sum()) > 0 for p in low_b)
    assert all(p.grad is None for p in high)
    assert all(p.grad is None for n, p in module.named_parameters() if "lora_" not in n)


def test_gradient_checkpointing_gives_the_same_gradient():
    checkpointed = checks.assert_checkpointing_keeps_gradients(
        lambda: _policy("wan22_t2v_a14b", train_experts="low_noise"),
        lambda policy: _grad_step(policy, 2),
        atol=1e-6,
    )
    assert checkpointed.trainable_module() is checkpointed.transformer_2
    assert not checkpointed.transformer.gradient_checkpointing  # frozen: not trained


def test_fsdp_blocks_are_the_wan_transformer_blocks():
    from diffusers.models.transformers.transformer_wan import WanTransformerBlock

    policy = _policy("wan22_t2v_a14b")
    assert policy.fsdp_block_types() == (WanTransformerBlock,)
    blocks = [m for m in policy.trainable_module().modules() if isinstance(m, WanTransformerBlock)]
    assert len(blocks) == 4  # 2 per expert


# ------------------------------------------------------------------ conditioning


def test_prompt_embeddings_are_the_pipelines():
    pipe = tiny_wan_t2v_pipeline()
    policy = _policy("wan21_t2v", pipe, negative_prompt="low quality")
    prompts = ["  a  cat &amp;amp; a\tdog ", "a red car on the street"]
    cond = policy.encode_prompts(prompts)
    with torch.no_grad():  # as the pipeline's __call__ runs it
        expected, negative = pipe.encode_prompt(
            prompts, negative_prompt=["low quality"] * 2, max_sequence_length=TINY_WAN_MAX_LENGTH
        )
    torch.testing.assert_close(cond.tensors["prompt_embeds"], expected, rtol=0, atol=0)
    torch.testing.assert_close(cond.tensors["negative_prompt_embeds"], negative, rtol=0, atol=0)
    assert float(cond.tensors["prompt_embeds"][0, -1].abs().sum()) == 0  # padding zeroed
    no_cfg = _policy("wan21_t2v", pipe, guidance_scale=1.0).encode_prompts(prompts)
    assert set(no_cfg.tensors) == {"prompt_embeds"}


def test_clean_prompt_matches_diffusers():
    from diffusers.pipelines.wan.pipeline_wan import prompt_clean

    for text in ["  a  cat &amp;amp; a\tdog \n", "plain", "&lt;b&gt; x\u3000y", ""]:
        assert clean_prompt(text) == prompt_clean(text)


def test_i2v_image_conditioning_is_the_pipelines():
    """The normalised latents of the image + black frames (posterior mean) and the CLIP
    penultimate tokens, as ``WanImageToVideoPipeline`` computes them for one image."""
    pipe = tiny_wan_i2v_pipeline()
    policy = _policy("wan21_i2v", pipe)
    images = _images()
    cond = policy.encode_condition_images(images)
    assert cond.tensors["image_latents"].shape == (2, TINY_WAN_LATENT_CHANNELS, 3, 4, 4)
    pil = Image.fromarray(images[1].numpy())
    pixels = pipe.video_processor.preprocess(pil, height=32, width=32).float()
    _, condition = pipe.prepare_latents(
        pixels, 1, TINY_WAN_LATENT_CHANNELS, 32, 32, NUM_FRAMES, torch.float32, torch.device("cpu")
    )
    torch.testing.assert_close(
        cond.tensors["image_latents"][1:], condition[:, 4:], atol=1e-6, rtol=0
    )
    with torch.no_grad():
        embeds = pipe.encode_image(pil, torch.device("cpu"))
    torch.testing.assert_close(cond.tensors["image_embeds"][1:], embeds, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        policy.encode_condition_images(images.float())
    with pytest.raises(ValueError, match="1 condition images for 2 prompts"):
        policy.encode_prompts(PROMPTS, images[:1])
    with pytest.raises(ValueError, match="needs the conditioning image"):
        policy.predict(policy.initial_noise(2), 500.0, policy.encode_prompts(PROMPTS))


def test_condition_image_changes_the_output():
    policy = _policy("wan22_i2v_a14b")
    a, b = _images(seed=1), _images(seed=2)
    x0 = policy.initial_noise(2, torch.Generator().manual_seed(3))
    _, with_a, _ = _rollout(policy, policy.encode_prompts(PROMPTS, a), x0, 0.0)
    _, with_b, _ = _rollout(policy, policy.encode_prompts(PROMPTS, b), x0, 0.0)
    assert (with_a[-1] - with_b[-1]).abs().max() > 1e-2


@pytest.mark.parametrize("name", ["wan21_i2v", "wan22_ti2v_image"])
def test_cached_text_plus_images_equals_direct_encoding(name, tmp_path):
    """What the trainer does with data.embedding_cache: text rows from the cache (prompt and
    negative prompt), image conditioning encoded at rollout, merged."""
    pipe = VARIANTS[name].build()
    no_text = WanI2VPolicy.from_pipeline(pipe, _config(VARIANTS[name], load_text_encoders=False))
    cache = checks.assert_cache_matches_encoding(
        _policy(name, pipe), PROMPTS, tmp_path, images=_images(), image_policy=no_text
    )
    assert set(cache.keys) == {"prompt_embeds", "negative_prompt_embeds"}


def test_text_to_video_policy_refuses_images_and_i2v_checkpoints():
    with pytest.raises(ValueError, match="text-to-video; condition_images must be None"):
        _policy("wan21_t2v").encode_prompts(PROMPTS, _images())
    with pytest.raises(ValueError, match="image-to-video checkpoint"):
        WanPolicy.from_pipeline(tiny_wan_i2v_pipeline(), _config(VARIANTS["wan21_i2v"]))
    with pytest.raises(ValueError, match="not a Wan image-to-video transformer"):
        WanI2VPolicy.from_pipeline(tiny_wan_t2v_pipeline(), _config(VARIANTS["wan21_t2v"]))


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("name", list(VARIANTS))
def test_from_pretrained_loads_a_saved_pipeline(name, tmp_path):
    variant = VARIANTS[name]
    pipe = variant.build()
    path = save_pipeline(pipe, tmp_path / name)
    loaded = variant.policy_class.from_pretrained(path, _config(variant, shift=None))
    reference = _policy(name, pipe, shift=None)
    assert loaded.shift == reference.shift == pipe.scheduler.config.flow_shift
    assert (loaded.boundary_ratio, loaded.expand_timesteps) == (
        reference.boundary_ratio,
        reference.expand_timesteps,
    )
    assert (loaded.transformer_2 is not None) == variant.two_experts
    images = _images() if variant.image else None
    cond = _cond(loaded, images)
    for key, value in _cond(reference, images).tensors.items():
        torch.testing.assert_close(cond.tensors[key], value, rtol=0, atol=0)
    x0 = reference.initial_noise(2, torch.Generator().manual_seed(8))
    _, ours, _ = _rollout(loaded, cond, x0, eta=0.3, seed=8)
    _, theirs, _ = _rollout(reference, cond, x0, eta=0.3, seed=8)
    torch.testing.assert_close(ours[-1], theirs[-1])

    no_text = variant.policy_class.from_pretrained(path, _config(variant, load_text_encoders=False))
    assert no_text.text_encoder is None and no_text.tokenizer is None
    if name == "wan21_i2v":
        assert no_text.image_encoder is not None  # images are encoded at rollout
    with pytest.raises(RuntimeError, match="EmbeddingCache"):
        no_text.encode_prompts(PROMPTS)


def test_from_pretrained_needs_a_wan_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json and transformer/"):
        WanPolicy.from_pretrained(tmp_path, _config(VARIANTS["wan21_t2v"]))


@pytest.mark.parametrize(
    ("kind", "name", "cls", "size"),
    [
        ("wan_t2v", "wan22_t2v_a14b", WanPolicy, (32, 48)),
        ("wan_i2v", "wan21_i2v", WanI2VPolicy, (16, 32)),
        ("wan_ti2v", "wan22_ti2v_text", WanI2VPolicy, (32, 64)),
    ],
)
def test_policy_factory_builds_each_kind(kind, name, cls, size, tmp_path):
    path = save_pipeline(VARIANTS[name].build(), tmp_path / name)
    options: dict[str, Any] = {"max_sequence_length": VARIANTS[name].text_length}
    if kind == "wan_t2v":
        options["guidance_scale_2"] = 2.0
    cfg = ModelConfig(
        kind=kind,
        path=str(path),
        height=size[0],
        width=size[1],
        num_frames=5,
        guidance_scale=4.0,
        options=options,
    )
    cfg.validate()
    policy = build_policy(cfg, torch.device("cpu"))
    assert type(policy) is cls and policy.modality == "video"
    assert (policy.num_frames, policy.height, policy.width) == (5, *size)
    assert policy.config.guidance_scale == 4.0
    assert policy.initial_noise(1).shape[2] == 2
    if kind == "wan_t2v":
        assert policy.config.guidance_scales == (4.0, 2.0) and policy.boundary_ratio == 0.875
    if kind == "wan_ti2v":  # text alone, or with an image
        text = policy.encode_prompts(PROMPTS[:1])
        assert (
            policy.predict(policy.initial_noise(1), 900.0, text).shape
            == policy.initial_noise(1).shape
        )
        assert "image_latents" in policy.encode_prompts(PROMPTS[:1], _images()[:1]).tensors
    if kind == "wan_i2v":
        cfg.options = {"max_sequence_length": 8}
        with pytest.raises(ValueError, match="max_sequence_length must be 512 for Wan2.1 I2V"):
            build_policy(cfg, torch.device("cpu"))
    cfg.options = {"train_experts": "both"}
    with pytest.raises(ConfigError, match="model.options: train_experts"):
        build_policy(cfg, torch.device("cpu"))


def test_policy_factory_checks_the_kind_against_the_checkpoint(tmp_path):
    t2v = save_pipeline(tiny_wan_t2v_pipeline(), tmp_path / "t2v")
    ti2v = save_pipeline(tiny_wan22_ti2v_pipeline(), tmp_path / "ti2v")
    with pytest.raises(ConfigError, match="not a Wan2.2 TI2V-5B checkpoint"):
        build_policy(
            ModelConfig(kind="wan_ti2v", path=str(t2v), height=32, width=32, num_frames=5),
            torch.device("cpu"),
        )
    with pytest.raises(ConfigError, match="use wan_ti2v"):
        build_policy(
            ModelConfig(kind="wan_i2v", path=str(ti2v), height=32, width=32, num_frames=5),
            torch.device("cpu"),
        )


# ------------------------------------------------------------------ configuration


def test_config_defaults_follow_dancegrpo_wan_script():
    c = WanConfig()
    assert (c.num_steps, c.eta, c.guidance_scale, c.negative_prompt) == (20, 0.3, 5.0, "")
    assert (c.resolution, c.num_frames, c.shift, c.max_sequence_length) == (
        [480, 832],
        81,
        None,
        512,
    )
    assert c.do_cfg and not WanConfig(guidance_scale=1.0).do_cfg
    assert WanConfig(guidance_scale=1.0, guidance_scale_2=3.0).do_cfg
    assert WanConfig(guidance_scale=4.0).guidance_scales == (4.0, 4.0)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 24),
        ("num_frames", 80),
        ("guidance_scale", -1.0),
        ("guidance_scale_2", -1.0),
        ("boundary_ratio", 1.5),
        ("train_experts", "both"),
        ("max_sequence_length", 0),
        ("shift", 0.0),
        ("eta", -0.1),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        WanConfig(**{field: value})


@pytest.mark.parametrize(
    ("kind", "changes", "field", "hint"),
    [
        ("wan_t2v", {"num_frames": 80}, "model.num_frames", "4k \\+ 1 for wan_t2v"),
        ("wan_i2v", {"height": 470}, "model.height", "multiple of 16 for wan_i2v.*try 464"),
        ("wan_ti2v", {"width": 840}, "model.width", "multiple of 32 for wan_ti2v.*try 832"),
    ],
)
def test_model_config_checks_wan_geometry(kind, changes, field, hint):
    base = {"kind": kind, "path": "x", "height": 704, "width": 1280, "num_frames": 81}
    ModelConfig(**base).validate()
    with pytest.raises(ConfigError, match=f"{field}: .*{hint}"):
        ModelConfig(**(base | changes)).validate()
