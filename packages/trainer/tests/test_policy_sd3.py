"""StableDiffusion3Policy against diffusers' StableDiffusion3Pipeline on tiny random weights
(SD3.5's MMDiT-X form), its conditioning (three text encoders, CFG, embedding cache),
schedule, log-probs, gradients, loading and config checks."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import (
    TINY_SD3_T5_DIM,
    TINY_T5_MAX_LENGTH,
    rollout_trajectory,
    save_pipeline,
    tiny_sd3_components,
    tiny_sd3_pipeline,
)
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer.config import ConfigError, ModelConfig
from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.sd3 import (
    StableDiffusion3Config,
    StableDiffusion3Policy,
    sd3_sigmas,
)
from dancegrpo_trainer.policy_factory import build_policy

PROMPTS = ["a photo of a cat", "a red car on the street"]
RESOLUTION = 16  # tiny VAE 2x → 8x8 latents → 4x4 patches of 2x2
CHANNELS = 4


def _config(**overrides: Any) -> StableDiffusion3Config:
    options = {
        "resolution": RESOLUTION,
        "device": "cpu",
        "max_sequence_length": TINY_T5_MAX_LENGTH,
        "negative_prompt": "blurry",
    } | overrides
    return StableDiffusion3Config(**options)


def _policy(pipe, **overrides: Any) -> StableDiffusion3Policy:
    return StableDiffusion3Policy.from_pipeline(pipe, _config(**overrides), copy=True)


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd3_pipeline()


def _pipeline_output(pipe, policy: StableDiffusion3Policy, num_steps: int, output_type: str):
    c = policy.config
    return pipe(
        PROMPTS,
        negative_prompt=[c.negative_prompt] * len(PROMPTS),
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=num_steps,
        guidance_scale=c.guidance_scale,
        max_sequence_length=TINY_T5_MAX_LENGTH,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    ).images


# ------------------------------------------------------------------ sampling vs diffusers


@pytest.mark.parametrize("guidance_scale", [1.0, 4.5], ids=["no_cfg", "cfg"])
def test_eta0_sampling_matches_diffusers_pipeline(pipe, guidance_scale):
    policy = _policy(pipe, guidance_scale=guidance_scale)
    expected = _pipeline_output(pipe, policy, 4, "latent")
    expected_images = _pipeline_output(pipe, policy, 4, "np")

    cond = policy.encode_prompts(PROMPTS)
    assert ("negative_prompt_embeds" in cond.tensors) == (guidance_scale > 1)
    final = checks.assert_eta0_matches_pipeline(
        policy, cond, pipe.scheduler, expected, expected_images, sigma_atol=0, timestep_atol=0
    )
    assert final.shape == (2, CHANNELS, 8, 8)
    assert expected_images.shape == (2, RESOLUTION, RESOLUTION, 3)


@pytest.mark.parametrize("num_steps", [1, 10, 40])
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_schedule_equals_the_schedulers_default_timesteps(num_steps, shift):
    """``sd3_sigmas`` is what ``StableDiffusion3Pipeline`` (and Flow-GRPO) get from
    ``scheduler.set_timesteps(n)``: the doubly shifted end of the training grid, then 0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    scheduler.set_timesteps(num_steps)
    sigmas = sd3_sigmas(num_steps, shift)
    torch.testing.assert_close(sigmas, scheduler.sigmas, atol=0, rtol=0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and torch.all(sigmas[1:] < sigmas[:-1])


def test_encoded_prompts_match_pipeline_encode_prompt(pipe):
    # Shared modules (no copy): the comparison is bit-exact on the very same weights. The
    # pipeline encodes under no_grad in its __call__; do the same here (with gradients
    # enabled CPU attention takes another kernel, ~1e-6 apart).
    policy = StableDiffusion3Policy.from_pipeline(pipe, _config(guidance_scale=4.5))
    cond = policy.encode_prompts(PROMPTS).tensors
    with torch.no_grad():
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS,
            None,
            None,
            device="cpu",
            negative_prompt=["blurry"] * 2,
            max_sequence_length=TINY_T5_MAX_LENGTH,
        )
    torch.testing.assert_close(cond["prompt_embeds"], embeds, atol=0, rtol=0)
    torch.testing.assert_close(cond["pooled_prompt_embeds"], pooled, atol=0, rtol=0)
    torch.testing.assert_close(cond["negative_prompt_embeds"], negative, atol=0, rtol=0)
    torch.testing.assert_close(cond["negative_pooled_prompt_embeds"], negative_pooled)
    # 77 CLIP positions (CLIP-L ‖ CLIP-G, zero-padded to the T5 width), then the T5 tokens.
    assert cond["prompt_embeds"].shape == (2, 77 + TINY_T5_MAX_LENGTH, TINY_SD3_T5_DIM)
    assert torch.all(cond["prompt_embeds"][:, :77, 64:] == 0)
    assert cond["pooled_prompt_embeds"].shape == (2, 64)


def test_cfg_is_one_batched_forward_and_the_guidance_formula(pipe):
    policy = _policy(pipe, guidance_scale=4.0)
    cond = policy.encode_prompts(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(1))
    batches: list[int] = []
    hook = policy.transformer.register_forward_pre_hook(
        lambda _m, _a, kw: batches.append(kw["hidden_states"].shape[0]), with_kwargs=True
    )
    try:
        with torch.no_grad():
            guided = policy.predict(x, 500.0, cond)
    finally:
        hook.remove()
    assert batches == [4]  # negative and positive rows of both samples, one forward
    t = cond.tensors
    negative = {k: t[f"negative_{k}"] for k in ("prompt_embeds", "pooled_prompt_embeds")}
    plain = _policy(pipe, guidance_scale=1.0)
    with torch.no_grad():
        v_c = plain.predict(x, 500.0, cond)
        v_u = plain.predict(x, 500.0, Conditioning({**t, **negative}))
    torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="negative_prompt_embeds"):
        policy.predict(x, 500.0, plain.encode_prompts(PROMPTS))


def test_per_row_timesteps_equal_one_shared_timestep(pipe):
    """A ``[B]`` timestep (one per row, as per-row samplers pass) gives each row what the
    same scalar timestep gives it."""
    policy = _policy(pipe, guidance_scale=4.5)
    cond = policy.encode_prompts(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        rows = policy.predict(x, torch.tensor([900.0, 300.0]), cond)
        first = policy.predict(x, 900.0, cond)
        second = policy.predict(x, 300.0, cond)
    torch.testing.assert_close(rows[0], first[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(rows[1], second[1], atol=1e-6, rtol=0)


# ------------------------------------------------------------------ log-probs and gradients


@pytest.mark.parametrize("noise_schedule", ["dance", "flow_grpo"])
def test_recomputed_log_probs_give_ratio_one(pipe, noise_schedule):
    policy = _policy(pipe, noise_schedule=noise_schedule)
    cond = policy.encode_prompts(PROMPTS).select([0, 0, 1, 1])
    checks.assert_recompute_ratio_is_one(policy, cond, eta=0.7)


def _grad_step(policy: StableDiffusion3Policy, seed: int) -> None:
    checks.grad_step(policy, policy.encode_prompts(PROMPTS), eta=0.7, seed=seed)


def _fresh_policy(**overrides: Any) -> StableDiffusion3Policy:
    parts = tiny_sd3_components()
    parts.pop("scheduler")
    return StableDiffusion3Policy(**parts, config=_config(**overrides))


def test_gradients_reach_transformer_only():
    policy = _fresh_policy()
    _grad_step(policy, seed=4)
    parts = ("pos_embed", "context_embedder", "time_text_embed", "attn2")
    checks.assert_gradients_reach(policy.trainable_module(), parts)
    checks.assert_frozen(
        policy.text_encoder, policy.text_encoder_2, policy.text_encoder_3, policy.vae
    )


def test_lora_adapter_gets_gradients_and_base_weights_do_not():
    policy = _fresh_policy()
    checks.assert_lora_trains_only_adapters(policy, lambda: _grad_step(policy, seed=5))


def test_gradient_checkpointing_gives_the_same_gradient():
    checks.assert_checkpointing_keeps_gradients(
        _fresh_policy, lambda policy: _grad_step(policy, seed=6), atol=1e-6
    )


def test_fsdp_blocks_are_the_joint_transformer_blocks(pipe):
    policy = _policy(pipe)
    (block_type,) = policy.fsdp_block_types()
    blocks = [m for m in policy.transformer.modules() if isinstance(m, block_type)]
    assert len(blocks) == len(policy.transformer.transformer_blocks) == 2


# ------------------------------------------------------------------ loading and caching


def test_from_pretrained_loads_a_saved_pipeline(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "sd35")
    loaded = StableDiffusion3Policy.from_pretrained(path, _config(guidance_scale=4.5))
    reference = _policy(pipe, guidance_scale=4.5)
    cond = loaded.encode_prompts(PROMPTS)
    expected = reference.encode_prompts(PROMPTS)
    for key, value in expected.tensors.items():
        # Loaded transformers models may pick another attention kernel: float32 rounding.
        torch.testing.assert_close(cond.tensors[key], value, rtol=1e-5, atol=1e-6)
    _, traj_loaded, _ = rollout_trajectory(loaded, cond, 2, eta=0.7, seed=8)
    _, traj_reference, _ = rollout_trajectory(reference, cond, 2, eta=0.7, seed=8)
    torch.testing.assert_close(traj_loaded[-1], traj_reference[-1])

    no_text = StableDiffusion3Policy.from_pretrained(path, _config(load_text_encoders=False))
    assert no_text.text_encoder is None and no_text.text_encoder_3 is None
    with pytest.raises(RuntimeError, match="EmbeddingCache"):
        no_text.encode_prompts(PROMPTS)
    with pytest.raises(FileNotFoundError, match="transformer/"):
        StableDiffusion3Policy.from_pretrained(tmp_path, _config())


def test_cached_embeddings_equal_direct_encoding_and_encoders_release(pipe, tmp_path):
    policy = _policy(pipe, guidance_scale=4.5)
    cache = checks.assert_cache_matches_encoding(policy, PROMPTS, tmp_path)
    assert len(cache.keys) == 4  # the prompt's and the negative prompt's, pooled and not
    policy.release_text_encoders()
    assert policy.text_encoder_3 is None and policy.tokenizer_3 is None


def test_text_encoders_come_as_a_set():
    parts = tiny_sd3_components()
    parts.pop("scheduler")
    parts.pop("text_encoder_3")
    with pytest.raises(ValueError, match="three text encoders"):
        StableDiffusion3Policy(**parts, config=_config())


def test_policy_factory_builds_the_adapter(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "sd35")
    cfg = ModelConfig(
        kind="sd3",
        path=str(path),
        height=16,
        width=32,
        guidance_scale=4.5,
        options={"negative_prompt": "blurry", "max_sequence_length": 8, "shift": 2.0},
    )
    cfg.validate()
    policy = build_policy(cfg, torch.device("cpu"))
    assert isinstance(policy, StableDiffusion3Policy)
    c = policy.config
    assert (c.guidance_scale, c.negative_prompt, c.shift) == (4.5, "blurry", 2.0)
    assert policy.initial_noise(1).shape == (1, CHANNELS, 8, 16)
    assert policy.encode_prompts(PROMPTS[:1]).tensors["prompt_embeds"].shape == (1, 77 + 8, 64)
    cfg.options = {"max_sequence_length": 1000}
    with pytest.raises(ConfigError, match="model.options: max_sequence_length"):
        build_policy(cfg, torch.device("cpu"))


# ------------------------------------------------------------------ configuration


def test_config_defaults_follow_flow_grpo_sd35():
    c = StableDiffusion3Config()
    assert (c.resolution, c.num_steps, c.guidance_scale, c.negative_prompt) == (512, 10, 4.5, "")
    assert (c.eta, c.noise_schedule, c.shift, c.max_sequence_length) == (0.7, "flow_grpo", 3, 128)
    assert c.do_cfg and not StableDiffusion3Config(guidance_scale=1.0).do_cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 520),
        ("guidance_scale", -1.0),
        ("max_sequence_length", 513),
        ("eta", -0.1),
        ("shift", 0.0),
        ("noise_schedule", "ddpm"),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        StableDiffusion3Config(**{field: value})


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"height": 520}, "model.height", "multiple of 16 for sd3.*try 512"),
        ({"width": 500}, "model.width", "try 496"),
        ({"num_frames": 5}, "model.num_frames", "must be 1 for sd3"),
    ],
)
def test_model_config_checks_sd3_geometry(changes, field, hint):
    base = {"kind": "sd3", "path": "x", "height": 512, "width": 512}
    ModelConfig(**base).validate()
    with pytest.raises(ConfigError, match=f"{field}: .*{hint}"):
        ModelConfig(**(base | changes)).validate()


def test_bfloat16_weights_keep_float32_latents_and_finite_log_probs():
    policy = _fresh_policy(dtype="bfloat16", guidance_scale=4.5)
    assert policy.transformer.dtype == torch.bfloat16
    cond = policy.encode_prompts(PROMPTS)
    _, trajectory, log_probs = rollout_trajectory(policy, cond, 2, eta=0.7, seed=9)
    assert all(x.dtype == torch.float32 for x in trajectory)
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()
    assert policy.decode(trajectory[-1]).shape == (2, RESOLUTION, RESOLUTION, 3)
