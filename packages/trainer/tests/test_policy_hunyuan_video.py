"""HunyuanVideoPolicy against diffusers' HunyuanVideoPipeline on tiny random weights, its
config checks, and the HunyuanVideo + VideoAlign recipe through the real trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import rollout_trajectory, save_pipeline
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_testing.video_models import (
    TINY_LATENT_CHANNELS,
    TINY_LLAMA_HIDDEN,
    TINY_LLAMA_MAX_LENGTH,
    tiny_hunyuan_video_components,
    tiny_hunyuan_video_pipeline,
)
from dancegrpo_trainer.config import ConfigError, ModelConfig, load_config
from dancegrpo_trainer.policies.hunyuan_video import (
    DEFAULT_CROP_START,
    DEFAULT_PROMPT_TEMPLATE,
    HunyuanVideoConfig,
    HunyuanVideoPolicy,
)
from dancegrpo_trainer.policy_factory import build_policy

PROMPTS = ["a photo of a cat", "a red car on the street"]
RESOLUTION = 32  # VAE 8x, patch 2 → 4x4 latents, 2x2 tokens per latent frame
NUM_FRAMES = 9  # → 3 latent frames
ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "configs" / "hunyuan_video_videoalign.yaml"


def _config(**overrides: Any) -> HunyuanVideoConfig:
    options = {
        "resolution": RESOLUTION,
        "num_frames": NUM_FRAMES,
        "device": "cpu",
        "max_sequence_length": TINY_LLAMA_MAX_LENGTH,
        "crop_start": None,  # count the template's tokens with the tiny tokenizer
        "shift": 7.0,  # the diffusers checkpoints' scheduler, so the pipeline agrees
    } | overrides
    return HunyuanVideoConfig(**options)


def _policy(pipe, **overrides: Any) -> HunyuanVideoPolicy:
    return HunyuanVideoPolicy.from_pipeline(pipe, _config(**overrides), copy=True)


def _pipeline_output(pipe, policy: HunyuanVideoPolicy, num_steps: int, seed: int, output_type):
    template = {"template": policy.config.prompt_template, "crop_start": policy.crop_start}
    return pipe(
        PROMPTS,
        height=RESOLUTION,
        width=RESOLUTION,
        num_frames=NUM_FRAMES,
        num_inference_steps=num_steps,
        guidance_scale=policy.config.guidance_scale,
        prompt_template=template,
        max_sequence_length=TINY_LLAMA_MAX_LENGTH,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
    ).frames


@pytest.fixture(scope="module")
def pipe():
    return tiny_hunyuan_video_pipeline()


# ------------------------------------------------------------------ sampling vs diffusers


def test_eta0_sampling_matches_diffusers_pipeline(pipe):
    policy = _policy(pipe)
    expected = _pipeline_output(pipe, policy, 4, seed=0, output_type="latent")
    expected_frames = _pipeline_output(pipe, policy, 4, seed=0, output_type="np")

    cond = policy.encode_prompts(PROMPTS)
    checks.assert_eta0_matches_pipeline(policy, cond, pipe.scheduler, expected, expected_frames)
    assert expected_frames.shape == (2, NUM_FRAMES, RESOLUTION, RESOLUTION, 3)


def test_encoded_prompts_match_pipeline_encode_prompt(pipe):
    policy = _policy(pipe)
    cond = policy.encode_prompts(PROMPTS)
    template = {"template": policy.config.prompt_template, "crop_start": policy.crop_start}
    embeds, pooled, mask = pipe.encode_prompt(
        PROMPTS, None, template, device="cpu", max_sequence_length=TINY_LLAMA_MAX_LENGTH
    )
    torch.testing.assert_close(cond.tensors["prompt_embeds"], embeds)
    torch.testing.assert_close(cond.tensors["pooled_prompt_embeds"], pooled)
    assert torch.equal(cond.tensors["prompt_attention_mask"], mask.long())
    assert cond.tensors["prompt_embeds"].shape == (2, TINY_LLAMA_MAX_LENGTH, TINY_LLAMA_HIDDEN)
    assert cond.tensors["prompt_attention_mask"].dtype == torch.int64


def test_template_is_diffusers_and_counted_crop_start_lands_on_the_prompt(pipe):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import (
        DEFAULT_PROMPT_TEMPLATE as DIFFUSERS_TEMPLATE,
    )

    assert DIFFUSERS_TEMPLATE["template"] == DEFAULT_PROMPT_TEMPLATE
    assert DIFFUSERS_TEMPLATE["crop_start"] == DEFAULT_CROP_START
    policy = _policy(pipe)
    tokenizer = pipe.tokenizer
    for prompt in PROMPTS:
        full = tokenizer(DEFAULT_PROMPT_TEMPLATE.format(prompt)).input_ids
        alone = tokenizer(prompt, add_special_tokens=False).input_ids
        # The first kept position is the prompt's first token: nothing of the template
        # survives the crop and nothing of the prompt is cut.
        assert full[policy.crop_start : policy.crop_start + len(alone)] == alone
    assert _policy(pipe, crop_start=7).crop_start == 7


def test_schedule_shifts_sigmas_and_noise_has_video_latent_shape(pipe):
    schedule = _policy(pipe, shift=5.0).schedule(4)
    # σ' = sσ/(1+(s−1)σ) at σ = 0.5, s = 5 → 5/6
    torch.testing.assert_close(schedule.sigmas[2], torch.tensor(5 / 6))
    torch.testing.assert_close(schedule.timesteps, schedule.sigmas[:-1] * 1000)
    assert schedule.sigmas[0] == 1 and schedule.sigmas[-1] == 0
    policy = _policy(pipe, num_frames=13, resolution=[16, 48])
    # (13 − 1)/4 + 1 = 4 latent frames; 16/8 x 48/8 latents; no packing.
    assert policy.initial_noise(3).shape == (3, TINY_LATENT_CHANNELS, 4, 2, 6)
    assert policy.schedule().num_steps == 16  # DanceGRPO's step count by default


# ------------------------------------------------------------------ log-probs and gradients


@pytest.mark.parametrize("noise_schedule", ["dance", "flow_grpo"])
def test_recomputed_log_probs_equal_rollout_log_probs(pipe, noise_schedule):
    policy = _policy(pipe, noise_schedule=noise_schedule)
    checks.assert_recompute_ratio_is_one(policy, policy.encode_prompts(PROMPTS), eta=0.7)


def _grad_step(policy: HunyuanVideoPolicy, seed: int) -> None:
    checks.grad_step(policy, policy.encode_prompts(PROMPTS), eta=0.3, seed=seed)


def _fresh_policy() -> HunyuanVideoPolicy:
    return _policy(tiny_hunyuan_video_pipeline())


def test_gradients_reach_transformer_only():
    policy = _fresh_policy()
    _grad_step(policy, seed=4)
    # The guidance embedder and the token refiner are part of the transformer and train too.
    checks.assert_gradients_reach(
        policy.trainable_module(), ("guidance_embedder", "context_embedder")
    )
    checks.assert_frozen(policy.text_encoder, policy.text_encoder_2, policy.vae)


def test_lora_adapter_gets_gradients_and_base_weights_do_not():
    policy = _fresh_policy()
    checks.assert_lora_trains_only_adapters(policy, lambda: _grad_step(policy, seed=5))


def test_gradient_checkpointing_gives_the_same_gradient():
    checks.assert_checkpointing_keeps_gradients(
        _fresh_policy, lambda policy: _grad_step(policy, seed=6)
    )


# ------------------------------------------------------------------ decoding and loading


def test_decode_is_uint8_ntwhc_and_independent_of_chunk_size(pipe):
    latents = torch.randn(
        3, TINY_LATENT_CHANNELS, 3, 4, 4, generator=torch.Generator().manual_seed(7)
    )
    whole = _policy(pipe, vae_decode_chunk_size=3).decode(latents)
    chunked = _policy(pipe, vae_decode_chunk_size=2).decode(latents)
    assert whole.dtype == torch.uint8
    assert whole.shape == (3, NUM_FRAMES, RESOLUTION, RESOLUTION, 3)
    assert (whole.int() - chunked.int()).abs().max() <= 1
    # Sample-major: sample 1 decoded alone gives the same frames as in the batch.
    alone = _policy(pipe, vae_decode_chunk_size=1).decode(latents[1:2])
    assert (alone[0].int() - whole[1].int()).abs().max() <= 1


def test_long_clip_decodes_every_frame_with_tiling_switchable():
    # 17 frames → 5 latent frames: past diffusers' framewise-decoding threshold (16 / 4).
    tiled = _policy(tiny_hunyuan_video_pipeline(), num_frames=17)
    plain = _policy(tiny_hunyuan_video_pipeline(), num_frames=17, vae_tiling=False)
    assert tiled.vae.use_tiling and not plain.vae.use_tiling
    latents = tiled.initial_noise(1, torch.Generator().manual_seed(10))
    assert latents.shape[2] == 5
    frames = tiled.decode(latents)
    assert frames.shape == (1, 17, RESOLUTION, RESOLUTION, 3)
    # Frames below the spatial tile size: tiling changes nothing.
    assert torch.equal(frames, plain.decode(latents))


def test_from_pretrained_loads_a_saved_pipeline(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "hunyuan")
    loaded = HunyuanVideoPolicy.from_pretrained(path, _config())
    reference = _policy(pipe)
    assert loaded.crop_start == reference.crop_start
    cond = loaded.encode_prompts(PROMPTS)
    expected = reference.encode_prompts(PROMPTS)
    for key, value in expected.tensors.items():
        torch.testing.assert_close(cond.tensors[key], value, rtol=0, atol=0)
    _, traj_loaded, _ = rollout_trajectory(loaded, cond, 2, eta=0.3, seed=8)
    _, traj_reference, _ = rollout_trajectory(reference, cond, 2, eta=0.3, seed=8)
    torch.testing.assert_close(traj_loaded[-1], traj_reference[-1])

    no_text = HunyuanVideoPolicy.from_pretrained(
        path, _config(load_text_encoders=False, crop_start=DEFAULT_CROP_START)
    )
    assert no_text.text_encoder is None and no_text.text_encoder_2 is None
    with pytest.raises(RuntimeError, match="EmbeddingCache"):
        no_text.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="crop_start"):
        HunyuanVideoPolicy.from_pretrained(path, _config(load_text_encoders=False))
    with pytest.raises(FileNotFoundError, match="transformer/"):
        HunyuanVideoPolicy.from_pretrained(tmp_path, _config())


def test_bfloat16_weights_keep_float32_latents_and_finite_log_probs():
    parts = tiny_hunyuan_video_components()
    parts.pop("scheduler")
    policy = HunyuanVideoPolicy(**parts, config=_config(dtype="bfloat16", num_frames=5))
    assert policy.transformer.dtype == torch.bfloat16 and policy.vae.dtype == torch.bfloat16
    cond = policy.encode_prompts(PROMPTS)
    _, trajectory, log_probs = rollout_trajectory(policy, cond, 2, eta=0.3, seed=9)
    assert all(x.dtype == torch.float32 for x in trajectory)
    assert log_probs.dtype == torch.float32 and torch.isfinite(log_probs).all()
    assert policy.decode(trajectory[-1]).shape == (2, 5, RESOLUTION, RESOLUTION, 3)


# ------------------------------------------------------------------ configuration


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("resolution", 24),
        ("num_frames", 52),
        ("num_frames", 0),
        ("guidance_scale", -1.0),
        ("eta", -0.1),
        ("shift", 0.0),
        ("noise_schedule", "ddpm"),
        ("max_sequence_length", 0),
        ("prompt_template", "no placeholder"),
        ("crop_start", -1),
        ("vae_decode_chunk_size", 0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        HunyuanVideoConfig(**{field: value})


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"num_frames": 52}, "model.num_frames", "4k \\+ 1"),
        ({"height": 24}, "model.height", "multiple of 16.*try 32"),
        ({"width": 850}, "model.width", "try 848"),
    ],
)
def test_model_config_checks_hunyuan_video_geometry(changes, field, hint):
    base = {"kind": "hunyuan_video", "path": "x", "height": 480, "width": 480, "num_frames": 53}
    ModelConfig(**base).validate()
    with pytest.raises(ConfigError, match=f"{field}: .*{hint}"):
        ModelConfig(**(base | changes)).validate()


def test_policy_factory_builds_the_adapter_with_model_num_frames(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "hunyuan")
    cfg = ModelConfig(
        kind="hunyuan_video",
        path=str(path),
        height=16,
        width=48,
        num_frames=5,
        guidance_scale=4.0,
        options={"shift": 3.0, "crop_start": None, "max_sequence_length": 8},
    )
    policy = build_policy(cfg, torch.device("cpu"), load_text_encoders=True)
    assert isinstance(policy, HunyuanVideoPolicy) and policy.modality == "video"
    assert (policy.num_frames, policy.height, policy.width) == (5, 16, 48)
    assert policy.config.guidance_scale == 4.0 and policy.config.shift == 3.0
    assert policy.encode_prompts(PROMPTS[:1]).tensors["prompt_embeds"].shape[1] == 8
    cfg.options = {"num_frames": 9}
    with pytest.raises(ConfigError, match="model.num_frames"):
        build_policy(cfg, torch.device("cpu"))


# ------------------------------------------------------------------ the recipe


def test_recipe_values_follow_the_paper_release():
    """DanceGRPO's released HunyuanVideo script (finetune_hunyuan_grpo.sh) and the joint
    VQ + MQ advantage sum the authors describe (DanceGRPO issue #92)."""
    cfg = load_config(RECIPE, ["model.path=x", "data.train_prompts=[p]", "data.eval_prompts=[]"])
    m, s, t, r = cfg.model, cfg.sampling, cfg.train, cfg.rewards
    assert (m.kind, m.height, m.width, m.num_frames, m.guidance_scale) == (
        "hunyuan_video",
        480,
        480,
        53,
        6.0,
    )
    assert m.options == {"shift": 5.0, "eta": 0.25}
    assert (s.num_steps, s.eta, s.group_size, s.shared_noise) == (16, 0.25, 24, True)
    assert (r.best_of_n.top_k, r.best_of_n.bottom_k, r.advantage) == (4, 4, "group")
    assert [(ep.reward, ep.output, ep.weight) for ep in r.endpoints] == [
        ("videoalign", "vq", 1.0),
        ("videoalign", "mq", 1.0),
    ]
    assert (t.learning_rate, t.weight_decay, t.timestep_fraction, t.max_grad_norm) == (
        1e-5,
        1e-4,
        0.6,
        1.0,
    )
    assert (t.clip_range, t.adv_clip_max, t.skip_last_timestep) == (1e-4, 5.0, True)
