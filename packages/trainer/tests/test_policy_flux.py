"""FluxPolicy against diffusers' FluxPipeline on tiny random weights."""

from __future__ import annotations

import math

import pytest
import torch

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import (
    TINY_T5_MAX_LENGTH,
    rollout_trajectory,
    save_pipeline,
    tiny_flux_pipeline,
)
from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy, dynamic_shift_mu
from dancegrpo_trainer.policies.flux_latents import pack_latents, unpack_latents

PROMPTS = ["a photo of a cat", "a red car on the street"]
RESOLUTION = 16  # tiny VAE scale factor 2 → 8×8 latents → 16 packed tokens


def _policy(pipe, **overrides) -> FluxPolicy:
    options = {
        "resolution": RESOLUTION,
        "device": "cpu",
        "max_sequence_length": TINY_T5_MAX_LENGTH,
    } | overrides
    return FluxPolicy.from_pipeline(pipe, FluxConfig(**options), copy=True)


def _pipeline_latents(pipe, num_steps, seed, output_type="latent"):
    return pipe(
        PROMPTS,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=num_steps,
        guidance_scale=3.5,
        max_sequence_length=TINY_T5_MAX_LENGTH,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    ).images


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_pipeline()


@pytest.mark.parametrize("dynamic_shift", [False, True])
def test_eta0_sampling_matches_diffusers_pipeline(dynamic_shift):
    pipe = tiny_flux_pipeline(dynamic_shift=dynamic_shift)
    policy = _policy(pipe, dynamic_shift=dynamic_shift)
    expected = _pipeline_latents(pipe, 4, seed=0)
    expected_images = _pipeline_latents(pipe, 4, seed=0, output_type="np")

    cond = policy.encode_prompts(PROMPTS)
    checks.assert_eta0_matches_pipeline(policy, cond, pipe.scheduler, expected, expected_images)


def test_schedule_shifts_sigmas():
    static = _policy(tiny_flux_pipeline(), shift=3.0).schedule(4)
    # σ' = sσ/(1+(s−1)σ) at σ = 0.5, s = 3 → 0.75
    torch.testing.assert_close(static.sigmas[2], torch.tensor(0.75))
    torch.testing.assert_close(static.timesteps, static.sigmas[:-1] * 1000)
    assert static.sigmas[0] == 1 and static.sigmas[-1] == 0
    dynamic = _policy(tiny_flux_pipeline(), dynamic_shift=True)
    assert dynamic.effective_shift == pytest.approx(math.exp(dynamic_shift_mu(16)))


def test_encoded_prompts_match_pipeline_encode_prompt(pipe):
    cond = _policy(pipe).encode_prompts(PROMPTS)
    embeds, pooled, _ = pipe.encode_prompt(
        PROMPTS, None, device="cpu", max_sequence_length=TINY_T5_MAX_LENGTH
    )
    torch.testing.assert_close(cond.tensors["prompt_embeds"], embeds)
    torch.testing.assert_close(cond.tensors["pooled_prompt_embeds"], pooled)
    assert cond.tensors["prompt_embeds"].shape == (2, TINY_T5_MAX_LENGTH, 32)
    assert cond.tensors["pooled_prompt_embeds"].shape == (2, 32)


def test_pack_unpack_round_trip_and_initial_noise_is_packed(pipe):
    x = torch.randn(2, 4, 8, 6)
    packed = pack_latents(x)
    assert packed.shape == (2, 12, 16)
    torch.testing.assert_close(unpack_latents(packed, 8, 6), x)
    assert _policy(pipe).initial_noise(3).shape == (3, 16, 16)


@pytest.mark.parametrize("noise_schedule", ["dance", "flow_grpo"])
def test_recomputed_log_probs_equal_rollout_log_probs(pipe, noise_schedule):
    policy = _policy(pipe, noise_schedule=noise_schedule)
    checks.assert_recompute_ratio_is_one(policy, policy.encode_prompts(PROMPTS), eta=0.7)


def _grad_step(policy, seed):
    checks.grad_step(policy, policy.encode_prompts(PROMPTS), eta=0.3, seed=seed)


def test_gradients_reach_transformer_only():
    policy = _policy(tiny_flux_pipeline())
    _grad_step(policy, seed=4)
    # The guidance embedder is part of the transformer and trains too.
    checks.assert_gradients_reach(policy.trainable_module(), ("guidance", "transformer_blocks"))
    checks.assert_frozen(policy.text_encoder, policy.text_encoder_2, policy.vae)


def test_lora_adapter_gets_gradients_and_base_weights_do_not():
    policy = _policy(tiny_flux_pipeline())
    checks.assert_lora_trains_only_adapters(policy, lambda: _grad_step(policy, seed=5))


def test_gradient_checkpointing_gives_the_same_gradient():
    checks.assert_checkpointing_keeps_gradients(
        lambda: _policy(tiny_flux_pipeline()), lambda policy: _grad_step(policy, seed=6)
    )


def test_decode_is_uint8_nhwc_and_independent_of_chunk_size(pipe):
    latents = torch.randn(3, 16, 16, generator=torch.Generator().manual_seed(7))
    whole = _policy(pipe, vae_decode_chunk_size=3).decode(latents)
    chunked = _policy(pipe, vae_decode_chunk_size=2).decode(latents)
    assert whole.dtype == torch.uint8 and whole.shape == (3, RESOLUTION, RESOLUTION, 3)
    assert (whole.int() - chunked.int()).abs().max() <= 1


def test_from_pretrained_loads_a_saved_pipeline(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "flux")
    config = FluxConfig(resolution=RESOLUTION, device="cpu", max_sequence_length=TINY_T5_MAX_LENGTH)
    loaded = FluxPolicy.from_pretrained(path, config)
    reference = _policy(pipe)
    cond = loaded.encode_prompts(PROMPTS)
    expected = reference.encode_prompts(PROMPTS)
    for key in ("prompt_embeds", "pooled_prompt_embeds"):
        torch.testing.assert_close(cond.tensors[key], expected.tensors[key])
    _, traj_loaded, _ = rollout_trajectory(loaded, cond, 2, eta=0.3, seed=8)
    _, traj_reference, _ = rollout_trajectory(reference, cond, 2, eta=0.3, seed=8)
    torch.testing.assert_close(traj_loaded[-1], traj_reference[-1])

    no_text = FluxPolicy.from_pretrained(
        path, FluxConfig(resolution=RESOLUTION, device="cpu", load_text_encoders=False)
    )
    assert no_text.text_encoder is None and no_text.text_encoder_2 is None
    with pytest.raises(RuntimeError, match="EmbeddingCache"):
        no_text.encode_prompts(PROMPTS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 24),
        ("eta", -0.1),
        ("shift", 0.0),
        ("noise_schedule", "ddpm"),
        ("max_sequence_length", 1024),
        ("vae_decode_chunk_size", 0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FluxConfig(**{field: value})


def test_bfloat16_weights_keep_float32_latents_and_finite_log_probs():
    from dancegrpo_testing.diffusion_models import tiny_flux_components

    parts = tiny_flux_components()
    parts.pop("scheduler")
    config = FluxConfig(
        resolution=RESOLUTION,
        device="cpu",
        dtype="bfloat16",
        max_sequence_length=TINY_T5_MAX_LENGTH,
    )
    policy = FluxPolicy(**parts, config=config)
    assert policy.transformer.dtype == torch.bfloat16
    cond = policy.encode_prompts(PROMPTS)
    _, trajectory, log_probs = rollout_trajectory(policy, cond, 2, eta=0.3, seed=9)
    assert all(x.dtype == torch.float32 for x in trajectory)
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()
    assert policy.decode(trajectory[-1]).shape == (2, RESOLUTION, RESOLUTION, 3)
