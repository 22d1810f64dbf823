"""The rollout API other code can replay (issue 13): explicit step noise, explicit
schedules, per-row timesteps, latents-only rollouts, and ``from_pipeline`` leaving the
caller's pipeline as it was."""

from __future__ import annotations

import pytest
import torch

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import (
    TINY_T5_MAX_LENGTH,
    tiny_flux_pipeline,
    tiny_stable_diffusion_pipeline,
)
from dancegrpo_trainer.core.schedules import flow_sigmas
from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy
from dancegrpo_trainer.policies.stable_diffusion import StableDiffusionConfig, StableDiffusionPolicy
from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy
from dancegrpo_trainer.rollout import sample_rollout, seeded_generators

PROMPTS = ["a photo of a cat", "a red car", "a small house"]


@pytest.fixture(scope="module")
def flux_pipe():
    return tiny_flux_pipeline()


@pytest.fixture(scope="module")
def flux(flux_pipe) -> FluxPolicy:
    config = FluxConfig(resolution=16, device="cpu", max_sequence_length=TINY_T5_MAX_LENGTH)
    return FluxPolicy.from_pipeline(flux_pipe, config, copy=True)


@pytest.fixture(scope="module")
def sd() -> StableDiffusionPolicy:
    pipe = tiny_stable_diffusion_pipeline()
    return StableDiffusionPolicy.from_pipeline(
        pipe, StableDiffusionConfig(resolution=16, device="cpu", guidance_scale=3.0), copy=True
    )


def _tiny() -> TinyFlowPolicy:
    torch.manual_seed(0)
    return TinyFlowPolicy(8, 8, latent_size=4, channels=8, embed_dim=16, num_blocks=1)


def _rollout(policy, n: int = 3, **kw):
    cond = policy.encode_prompts(PROMPTS[:n])
    noise = policy.initial_noise(n, generator=torch.Generator().manual_seed(0))
    defaults = dict(eta=0.7, row_generators=seeded_generators(range(n), 5), chunk_size=2)
    return sample_rollout(policy, cond, noise, **(defaults | kw)), cond, noise


@pytest.mark.parametrize("which", ["tiny_flow", "flux", "sd"])
def test_a_stored_trajectory_replays_bit_exactly_from_its_recorded_noise(which, flux, sd):
    policy = {"tiny_flow": _tiny(), "flux": flux, "sd": sd}[which]
    eta = 1.0 if which == "sd" else 0.7
    rollout, cond, noise = _rollout(policy, num_steps=3, eta=eta, keep=("log_probs", "noise"))
    assert rollout.noise is not None and rollout.noise.shape[:2] == (3, 3)
    assert (rollout.noise != 0).all()
    # The whole rollout from the recorded noise alone (no generators; same chunking, so
    # the same batched kernels).
    again = sample_rollout(
        policy, cond, noise, num_steps=3, eta=eta, step_noise=rollout.noise, chunk_size=2
    )
    assert torch.equal(again.latents, rollout.latents)
    assert torch.equal(again.log_probs, rollout.log_probs)
    assert torch.equal(again.frames, rollout.frames)
    # Step by step through denoise_step(noise=...), chunk by chunk as sampled.
    with torch.no_grad():
        for a, b in [(0, 2), (2, 3)]:
            x = rollout.latents[a:b, 0]
            for i in range(3):
                out = policy.denoise_step(
                    x,
                    i,
                    rollout.schedule,
                    cond.select(range(a, b)),
                    eta=eta,
                    noise=rollout.noise[a:b, i],
                )
                x = out.prev_sample
                assert torch.equal(x, rollout.latents[a:b, i + 1])
                assert torch.equal(out.log_prob, rollout.log_probs[a:b, i])


def test_noise_prev_sample_and_generator_are_exclusive():
    policy = _tiny()
    cond = policy.encode_prompts(PROMPTS[:1])
    x = policy.initial_noise(1)
    s = policy.schedule(2)
    with pytest.raises(ValueError, match="not several"):
        policy.denoise_step(x, 0, s, cond, eta=0.7, noise=torch.randn_like(x), prev_sample=x)
    with pytest.raises(ValueError, match="noise shape"):
        policy.denoise_step(x, 0, s, cond, eta=0.7, noise=torch.randn(2, *x.shape[1:]))


def test_an_explicit_schedule_replaces_policy_schedule(flux):
    sigmas = flow_sigmas(3, shift=1.7)  # not the policy's shift (3.0)
    schedule = flux.schedule_from_sigmas(sigmas)
    torch.testing.assert_close(schedule.timesteps, sigmas[:-1] * 1000)
    rollout, cond, noise = _rollout(flux, schedule=schedule, eta=0.0)
    assert rollout.schedule is schedule
    x = noise
    with torch.no_grad():
        for i in range(3):
            x = flux.denoise_step(x, i, schedule, cond, eta=0.0).prev_sample
    torch.testing.assert_close(rollout.latents[:, -1], x, rtol=1e-5, atol=1e-5)
    default, _, _ = _rollout(flux, num_steps=3, eta=0.0)
    assert not torch.allclose(default.latents[:, -1], x)


@pytest.mark.parametrize("which", ["tiny_flow", "flux", "sd"])
def test_per_row_timesteps_equal_each_row_at_its_own_step(which, flux, sd):
    policy = {"tiny_flow": _tiny(), "flux": flux, "sd": sd}[which]
    eta = 1.0 if which == "sd" else 0.7
    rollout, cond, _ = _rollout(policy, num_steps=4, eta=eta)
    steps = torch.tensor([2, 0, 3])
    rows = torch.arange(3)
    x, x_next = rollout.latents[rows, steps], rollout.latents[rows, steps + 1]
    with torch.no_grad():
        mixed = policy.denoise_step(x, steps, rollout.schedule, cond, eta=eta, prev_sample=x_next)
        for r in range(3):
            one = policy.denoise_step(
                x[r : r + 1],
                int(steps[r]),
                rollout.schedule,
                cond.select([r]),
                eta=eta,
                prev_sample=x_next[r : r + 1],
            )
            torch.testing.assert_close(mixed.mean[r : r + 1], one.mean, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(
                mixed.log_prob[r : r + 1], one.log_prob, rtol=1e-5, atol=1e-5
            )
    # DDPO-style recompute: the per-row log-probs are the rollout's (ratio 1).
    torch.testing.assert_close(mixed.log_prob, rollout.log_probs[rows, steps], rtol=1e-5, atol=1e-4)


def test_latents_only_rollout_skips_decoding(flux):
    seen = []
    decoded, _, _ = _rollout(flux, num_steps=2)
    latents_only, _, _ = _rollout(
        flux, num_steps=2, decode=False, on_chunk=lambda rows, x: seen.append((rows, x))
    )
    assert latents_only.frames is None and decoded.frames is not None
    assert torch.equal(latents_only.latents, decoded.latents)
    assert [r for r, _ in seen] == [slice(0, 2), slice(2, 3)]
    assert torch.equal(torch.cat([x for _, x in seen]), decoded.latents[:, -1])
    assert latents_only.select(torch.tensor([2, 0])).frames is None


def test_from_pipeline_shares_without_moving_casting_or_freezing():
    pipe = tiny_flux_pipeline()
    pipe.vae.train()  # a caller's own state, which wrapping must keep
    pipe.text_encoder.requires_grad_(True)
    config = FluxConfig(resolution=16, device="cpu", max_sequence_length=TINY_T5_MAX_LENGTH)
    with checks.unchanged_modules(pipe, ("transformer", "vae", "text_encoder")):
        policy = FluxPolicy.from_pipeline(pipe, config)
    assert policy.transformer is pipe.transformer and policy.vae is pipe.vae
    assert policy.text_encoder is pipe.text_encoder and policy.tokenizer is pipe.tokenizer
    # The frozen parts run without gradients anyway.
    cond = policy.encode_prompts(PROMPTS[:1])
    assert not cond.tensors["prompt_embeds"].requires_grad


def test_from_pipeline_refuses_a_silent_cast_and_copies_on_request():
    pipe = tiny_flux_pipeline()
    bf16 = FluxConfig(
        resolution=16, device="cpu", dtype="bfloat16", max_sequence_length=TINY_T5_MAX_LENGTH
    )
    with pytest.raises(ValueError, match="transformer is torch.float32.*copy=True"):
        FluxPolicy.from_pipeline(pipe, bf16)
    with checks.unchanged_modules(pipe, ("transformer", "vae", "text_encoder")):
        policy = FluxPolicy.from_pipeline(pipe, bf16, copy=True)
    assert policy.transformer is not pipe.transformer
    assert policy.transformer.dtype == torch.bfloat16 and pipe.transformer.dtype == torch.float32
    assert not any(p.requires_grad for p in policy.vae.parameters())


def test_sd_from_pipeline_shares_and_builds_its_own_ddim_scheduler():
    pipe = tiny_stable_diffusion_pipeline()
    grads = [p.requires_grad for p in pipe.vae.parameters()]
    policy = StableDiffusionPolicy.from_pipeline(
        pipe, StableDiffusionConfig(resolution=16, device="cpu")
    )
    assert policy.unet is pipe.unet and policy.vae is pipe.vae
    assert policy.scheduler is not pipe.scheduler
    assert [p.requires_grad for p in pipe.vae.parameters()] == grads
    with pytest.raises(ValueError, match="samples with DDIM-eta only"):
        policy.denoise_step(
            policy.initial_noise(1),
            0,
            policy.schedule(2),
            policy.encode_prompts(PROMPTS[:1]),
            eta=1.0,
            sampler="cps",
        )


def test_sd3_from_pipeline_shares_all_three_text_encoders_untouched():
    """Adapters with more components than FLUX (SD3's T5) inherit the same sharing rules
    through ``pipeline_modules`` / ``pipeline_extras``."""
    from dancegrpo_testing.diffusion_models import tiny_sd3_pipeline
    from dancegrpo_trainer.policies.sd3 import StableDiffusion3Config, StableDiffusion3Policy

    pipe = tiny_sd3_pipeline()
    pipe.text_encoder_3.requires_grad_(True)
    names = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    config = StableDiffusion3Config(
        resolution=16, device="cpu", max_sequence_length=TINY_T5_MAX_LENGTH
    )
    with checks.unchanged_modules(pipe, names):
        policy = StableDiffusion3Policy.from_pipeline(pipe, config)
    assert policy.text_encoder_3 is pipe.text_encoder_3
    assert policy.tokenizer_3 is pipe.tokenizer_3
    copied = StableDiffusion3Policy.from_pipeline(pipe, config, copy=True)
    assert copied.text_encoder_3 is not pipe.text_encoder_3
    assert not any(p.requires_grad for p in copied.text_encoder_3.parameters())


def test_wan_from_pipeline_shares_both_experts_untouched_and_reads_the_pipeline():
    """Wan2.2 A14B through the same ``pipeline_modules`` rules: both experts, the VAE and
    UMT5 shared untouched (even the expert that does not train stays as the caller had it,
    and runs without gradients), ``boundary_ratio`` and the scheduler's shift read from the
    pipeline; ``copy=True`` copies and freezes, leaving the pipeline as it was."""
    from dancegrpo_testing.wan_models import TINY_WAN_MAX_LENGTH, tiny_wan22_t2v_pipeline
    from dancegrpo_trainer.policies.wan import WanConfig, WanPolicy

    pipe = tiny_wan22_t2v_pipeline()
    pipe.vae.eval()
    pipe.text_encoder.requires_grad_(True)
    names = ("transformer", "transformer_2", "vae", "text_encoder")
    config = WanConfig(
        resolution=32,
        num_frames=5,
        device="cpu",
        max_sequence_length=TINY_WAN_MAX_LENGTH,
        shift=None,
        train_experts="high_noise",
    )
    with checks.unchanged_modules(pipe, names):
        policy = WanPolicy.from_pipeline(pipe, config)
    assert policy.transformer is pipe.transformer and policy.transformer_2 is pipe.transformer_2
    assert policy.vae is pipe.vae and policy.text_encoder is pipe.text_encoder
    assert policy.tokenizer is pipe.tokenizer
    assert policy.boundary_ratio == pipe.config.boundary_ratio == 0.875
    assert policy.shift == pipe.scheduler.config.flow_shift == 12.0
    assert all(p.requires_grad for p in pipe.transformer_2.parameters())
    cond = policy.encode_prompts(PROMPTS[:1])
    low_noise = policy.denoise_step(policy.initial_noise(1), 3, policy.schedule(4), cond, eta=0.5)
    assert policy.expert_indices(policy.schedule(4).timesteps)[3] == 1
    assert not low_noise.log_prob.requires_grad  # the frozen expert builds no graph

    with checks.unchanged_modules(pipe, names):
        copied = WanPolicy.from_pipeline(pipe, config, copy=True)
    assert copied.transformer_2 is not pipe.transformer_2 and copied.vae is not pipe.vae
    assert not any(p.requires_grad for p in copied.transformer_2.parameters())
    assert all(p.requires_grad for p in copied.transformer.parameters())


def test_wan_i2v_from_pipeline_shares_the_image_encoder_and_refuses_a_silent_cast():
    from dancegrpo_testing.wan_models import tiny_wan22_i2v_pipeline, tiny_wan_i2v_pipeline
    from dancegrpo_trainer.policies.wan import WanConfig
    from dancegrpo_trainer.policies.wan_i2v import WAN21_I2V_TEXT_LENGTH, WanI2VPolicy

    pipe = tiny_wan_i2v_pipeline()
    config = WanConfig(
        resolution=32, num_frames=5, device="cpu", max_sequence_length=WAN21_I2V_TEXT_LENGTH
    )
    with checks.unchanged_modules(pipe, ("image_encoder",)):
        policy = WanI2VPolicy.from_pipeline(pipe, config)
        copied = WanI2VPolicy.from_pipeline(pipe, config, copy=True)
    assert policy.image_encoder is pipe.image_encoder
    assert policy.image_processor is pipe.image_processor
    assert copied.image_encoder is not pipe.image_encoder
    assert not any(p.requires_grad for p in copied.image_encoder.parameters())
    assert copied.image_processor is pipe.image_processor

    two = tiny_wan22_i2v_pipeline()
    two.transformer_2.to(torch.bfloat16)
    config = WanConfig(resolution=32, num_frames=5, device="cpu", max_sequence_length=16)
    with pytest.raises(ValueError, match="transformer_2 is torch.bfloat16.*copy=True"):
        WanI2VPolicy.from_pipeline(two, config)
    copied = WanI2VPolicy.from_pipeline(two, config, copy=True)
    assert copied.image_encoder is None and copied.boundary_ratio == 0.9
    assert copied.transformer_2.patch_embedding.weight.dtype == torch.float32
    assert two.transformer_2.patch_embedding.weight.dtype == torch.bfloat16
