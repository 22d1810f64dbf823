"""StableDiffusionPolicy against diffusers' StableDiffusionPipeline on tiny random weights."""

from __future__ import annotations

import pytest
import torch

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import (
    rollout_trajectory,
    save_pipeline,
    tiny_stable_diffusion_pipeline,
)
from dancegrpo_trainer.policies.stable_diffusion import (
    StableDiffusionConfig,
    StableDiffusionPolicy,
)

PROMPTS = ["a photo of a cat", "a red car on the street"]
RESOLUTION = 16  # tiny VAE has scale factor 2 → 8×8 latents, the UNet's sample_size


def _policy(pipe, **overrides) -> StableDiffusionPolicy:
    options = {"resolution": RESOLUTION, "guidance_scale": 5.0, "device": "cpu"} | overrides
    return StableDiffusionPolicy.from_pipeline(pipe, StableDiffusionConfig(**options), copy=True)


@pytest.fixture(scope="module")
def pipe():
    return tiny_stable_diffusion_pipeline()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_eta0_sampling_matches_diffusers_pipeline(prediction_type):
    pipe = tiny_stable_diffusion_pipeline(prediction_type=prediction_type)
    policy = _policy(pipe)
    kwargs = {"num_inference_steps": 3, "guidance_scale": 5.0, "eta": 0.0}
    kwargs |= {"height": RESOLUTION, "width": RESOLUTION}
    expected = pipe(
        PROMPTS, generator=torch.Generator().manual_seed(0), output_type="latent", **kwargs
    ).images
    expected_images = pipe(
        PROMPTS, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs
    ).images

    cond = policy.encode_prompts(PROMPTS)
    # DDIM: the schedule has no sigmas to compare, the scheduler owns its alphas.
    checks.assert_eta0_matches_pipeline(policy, cond, None, expected, expected_images, num_steps=3)


def test_encoded_prompts_match_pipeline_encode_prompt(pipe):
    policy = _policy(pipe)
    cond = policy.encode_prompts(PROMPTS)
    positive, negative = pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    torch.testing.assert_close(cond.tensors["prompt_embeds"], positive)
    torch.testing.assert_close(cond.tensors["negative_prompt_embeds"], negative)
    assert cond.tensors["prompt_embeds"].shape == (2, 77, 32)


def test_without_cfg_no_negative_embeddings_and_single_unet_pass(pipe):
    policy = _policy(pipe, guidance_scale=1.0)
    cond = policy.encode_prompts(PROMPTS)
    assert set(cond.tensors) == {"prompt_embeds"}
    expected = pipe(
        PROMPTS,
        num_inference_steps=2,
        guidance_scale=1.0,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
    ).images
    _, trajectory, _ = rollout_trajectory(policy, cond, 2, eta=0.0, seed=1)
    torch.testing.assert_close(trajectory[-1], expected, atol=1e-4, rtol=1e-4)


def test_recomputed_log_probs_equal_rollout_log_probs(pipe):
    policy = _policy(pipe)
    checks.assert_recompute_ratio_is_one(policy, policy.encode_prompts(PROMPTS), eta=1.0)


def _fresh_policy() -> StableDiffusionPolicy:
    return _policy(tiny_stable_diffusion_pipeline())


def test_gradients_reach_unet_only():
    policy = _fresh_policy()
    cond = policy.encode_prompts(PROMPTS)
    checks.grad_step(policy, cond, eta=1.0, seed=4)
    unet_grads = [p.grad for p in policy.trainable_module().parameters()]
    assert all(g is not None for g in unet_grads)
    assert sum(float(g.abs().sum()) for g in unet_grads) > 0
    checks.assert_frozen(policy.text_encoder, policy.vae)
    assert not cond.tensors["prompt_embeds"].requires_grad


def test_lora_adapter_gets_gradients_and_base_weights_do_not():
    policy = _fresh_policy()
    checks.assert_lora_trains_only_adapters(
        policy, lambda: checks.grad_step(policy, policy.encode_prompts(PROMPTS), eta=1.0, seed=5)
    )


def test_gradient_checkpointing_gives_the_same_gradients():
    checks.assert_checkpointing_keeps_gradients(
        _fresh_policy,
        lambda policy: checks.grad_step(
            policy, policy.encode_prompts(PROMPTS[:1]), eta=1.0, seed=6
        ),
        atol=1e-6,
        rtol=1e-4,
    )


def test_decode_is_uint8_nhwc_and_independent_of_chunk_size(pipe):
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    whole = _policy(pipe, vae_decode_chunk_size=3).decode(latents)
    chunked = _policy(pipe, vae_decode_chunk_size=1).decode(latents)
    assert whole.dtype == torch.uint8 and whole.shape == (3, RESOLUTION, RESOLUTION, 3)
    assert (whole.int() - chunked.int()).abs().max() <= 1


def test_from_pretrained_loads_a_saved_pipeline(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "sd")
    config = StableDiffusionConfig(resolution=RESOLUTION, device="cpu")
    loaded = StableDiffusionPolicy.from_pretrained(path, config)
    reference = _policy(pipe)
    cond = loaded.encode_prompts(PROMPTS)
    torch.testing.assert_close(
        cond.tensors["prompt_embeds"], reference.encode_prompts(PROMPTS).tensors["prompt_embeds"]
    )
    _, traj_loaded, _ = rollout_trajectory(loaded, cond, 2, eta=1.0, seed=8)
    _, traj_reference, _ = rollout_trajectory(reference, cond, 2, eta=1.0, seed=8)
    torch.testing.assert_close(traj_loaded[-1], traj_reference[-1])

    no_text = StableDiffusionPolicy.from_pretrained(
        path, StableDiffusionConfig(resolution=RESOLUTION, device="cpu", load_text_encoders=False)
    )
    assert no_text.text_encoder is None
    with pytest.raises(RuntimeError, match="EmbeddingCache"):
        no_text.encode_prompts(PROMPTS)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 20),
        ("eta", 1.5),
        ("num_steps", 0),
        ("dtype", "int8"),
        ("guidance_scale", -1.0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        StableDiffusionConfig(**{field: value})


def test_bfloat16_weights_keep_float32_latents_and_finite_log_probs(pipe):
    from dancegrpo_testing.diffusion_models import tiny_stable_diffusion_components

    parts = tiny_stable_diffusion_components()
    config = StableDiffusionConfig(resolution=RESOLUTION, device="cpu", dtype="bfloat16")
    policy = StableDiffusionPolicy(**parts, config=config)
    assert policy.unet.dtype == torch.bfloat16 and policy.text_encoder.dtype == torch.bfloat16
    cond = policy.encode_prompts(PROMPTS)
    _, trajectory, log_probs = rollout_trajectory(policy, cond, 2, eta=1.0, seed=9)
    assert all(x.dtype == torch.float32 for x in trajectory)
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()
    assert policy.decode(trajectory[-1]).dtype == torch.uint8


def test_from_pipeline_rebuilds_a_non_ddim_scheduler_as_ddim_with_the_same_betas():
    from diffusers import DDIMScheduler, PNDMScheduler

    pipe = tiny_stable_diffusion_pipeline()
    pipe.scheduler = PNDMScheduler.from_config(pipe.scheduler.config)
    policy = StableDiffusionPolicy.from_pipeline(pipe, StableDiffusionConfig(resolution=16))
    assert isinstance(policy.scheduler, DDIMScheduler)
    torch.testing.assert_close(policy.scheduler.alphas_cumprod, pipe.scheduler.alphas_cumprod)
