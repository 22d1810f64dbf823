"""SkyReelsI2VPolicy against diffusers' HunyuanSkyreelsImageToVideoPipeline on tiny random
weights, its conditioning (reference image, true CFG, embedding cache), gradients, loading,
config checks and the recipe's values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import rollout_trajectory, save_pipeline
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_testing.video_models import (
    TINY_LATENT_CHANNELS,
    TINY_LLAMA_MAX_LENGTH,
    tiny_hunyuan_video_components,
    tiny_hunyuan_video_pipeline,
    tiny_skyreels_i2v_pipeline,
)
from dancegrpo_trainer.config import ConfigError, ModelConfig, config_from_dict, load_config
from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.hunyuan_video import (
    DEFAULT_CROP_START,
    HunyuanVideoConfig,
    HunyuanVideoPolicy,
)
from dancegrpo_trainer.policies.skyreels_i2v import SkyReelsI2VConfig, SkyReelsI2VPolicy
from dancegrpo_trainer.policy_factory import build_policy

PROMPTS = ["a photo of a cat", "a red car on the street"]
RESOLUTION = 32  # VAE 8x, patch 2 → 4x4 latents
NUM_FRAMES = 9  # → 3 latent frames: the image latents fill frame 0, zeros the other two
ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "configs" / "skyreels_i2v_videoalign.yaml"


def _config(**overrides: Any) -> SkyReelsI2VConfig:
    options = {
        "resolution": RESOLUTION,
        "num_frames": NUM_FRAMES,
        "device": "cpu",
        "max_sequence_length": TINY_LLAMA_MAX_LENGTH,
        "crop_start": None,  # count the template's tokens with the tiny tokenizer
        "true_cfg_scale": 3.0,
    } | overrides
    return SkyReelsI2VConfig(**options)


def _policy(pipe, **overrides: Any) -> SkyReelsI2VPolicy:
    return SkyReelsI2VPolicy.from_pipeline(pipe, _config(**overrides), copy=True)


def _images(seed: int = 0, size: tuple[int, int] = (40, 48)) -> torch.Tensor:
    """Two random ``uint8 [2, H, W, 3]`` reference images, not at the output size (so the
    resize to 32x32 is exercised)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (2, *size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    return tiny_skyreels_i2v_pipeline()


@pytest.fixture
def posterior_mean_pipeline(monkeypatch: pytest.MonkeyPatch):
    """The pipeline's image encoding switched from a posterior sample (drawn with its
    generator) to the posterior mean, which the adapter uses; the noise draw is then the
    generator's first, as in the adapter."""
    from diffusers.pipelines.hunyuan_video import pipeline_hunyuan_skyreels_image2video as module

    original = module.retrieve_latents

    def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
        return original(encoder_output, generator, sample_mode="argmax")

    monkeypatch.setattr(module, "retrieve_latents", posterior_mean)


def _pipeline_output(pipe, policy: SkyReelsI2VPolicy, images: torch.Tensor, output_type: str):
    template = {"template": policy.config.prompt_template, "crop_start": policy.crop_start}
    return pipe(
        [Image.fromarray(image) for image in images.numpy()],
        PROMPTS,
        negative_prompt=[policy.config.negative_prompt] * len(PROMPTS),
        height=RESOLUTION,
        width=RESOLUTION,
        num_frames=NUM_FRAMES,
        num_inference_steps=4,
        true_cfg_scale=policy.config.true_cfg_scale,
        guidance_scale=policy.config.guidance_scale,
        prompt_template=template,
        max_sequence_length=TINY_LLAMA_MAX_LENGTH,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    ).frames


# ------------------------------------------------------------------ sampling vs diffusers


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_eta0_sampling_matches_diffusers_pipeline(pipe, posterior_mean_pipeline, true_cfg_scale):
    policy = _policy(pipe, true_cfg_scale=true_cfg_scale, negative_prompt="blurry")
    images = _images()
    expected = _pipeline_output(pipe, policy, images, "latent")
    expected_frames = _pipeline_output(pipe, policy, images, "np")

    cond = policy.encode_prompts(PROMPTS, images)
    assert ("negative_prompt_embeds" in cond.tensors) == (true_cfg_scale > 1)
    final = checks.assert_eta0_matches_pipeline(
        policy, cond, pipe.scheduler, expected, expected_frames
    )
    assert final.shape == (2, TINY_LATENT_CHANNELS, 3, 4, 4)
    assert expected_frames.shape == (2, NUM_FRAMES, RESOLUTION, RESOLUTION, 3)


def test_true_cfg_is_one_batched_forward_and_the_guidance_formula(pipe):
    policy = _policy(pipe, true_cfg_scale=4.0)
    cond = policy.encode_prompts(PROMPTS, _images())
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
    negative = {
        k: t[f"negative_{k}"]
        for k in ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
    }
    plain = _policy(pipe, true_cfg_scale=1.0)
    with torch.no_grad():
        v_c = plain.predict(x, 500.0, cond)
        v_u = plain.predict(x, 500.0, Conditioning({**t, **negative}))
    torch.testing.assert_close(guided, v_u + 4.0 * (v_c - v_u), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ the conditioning image


def test_condition_image_changes_the_output(pipe):
    policy = _policy(pipe)
    a, b = _images(seed=1), _images(seed=2)
    _, with_a, _ = rollout_trajectory(policy, policy.encode_prompts(PROMPTS, a), 3, 0.0, seed=3)
    _, with_b, _ = rollout_trajectory(policy, policy.encode_prompts(PROMPTS, b), 3, 0.0, seed=3)
    _, again_a, _ = rollout_trajectory(policy, policy.encode_prompts(PROMPTS, a), 3, 0.0, seed=3)
    assert torch.equal(with_a[-1], again_a[-1])
    assert (with_a[-1] - with_b[-1]).abs().max() > 1e-2
    text_only = policy.encode_prompts(PROMPTS)
    assert "image_latents" not in text_only.tensors
    with pytest.raises(ValueError, match="condition_images="):
        policy.predict(with_a[0], 500.0, text_only)


def test_image_latents_are_the_scaled_posterior_mean_of_the_resized_image(pipe):
    policy = _policy(pipe)
    images = _images()
    latents = policy.encode_condition_images(images).tensors["image_latents"]
    assert latents.shape == (2, TINY_LATENT_CHANNELS, 1, 4, 4) and latents.dtype == torch.float32
    pixels = pipe.video_processor.preprocess(
        [Image.fromarray(i) for i in images.numpy()], height=RESOLUTION, width=RESOLUTION
    )
    with torch.no_grad():
        mean = pipe.vae.encode(pixels[:, :, None]).latent_dist.mode()
    torch.testing.assert_close(latents, mean * pipe.vae.config.scaling_factor)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        policy.encode_condition_images(images.float())
    with pytest.raises(ValueError, match="1 condition images for 2 prompts"):
        policy.encode_prompts(PROMPTS, images[:1])


def test_cached_text_plus_images_equals_direct_encoding(pipe, tmp_path):
    """What the trainer does with data.embedding_cache: text rows from the cache (prompt and
    negative prompt), image latents encoded at rollout time, merged."""
    no_text = SkyReelsI2VPolicy(
        transformer=pipe.transformer,
        vae=pipe.vae,
        config=_config(load_text_encoders=False, crop_start=DEFAULT_CROP_START),
    )
    cache = checks.assert_cache_matches_encoding(
        _policy(pipe), PROMPTS, tmp_path, images=_images(), image_policy=no_text
    )
    assert set(cache.keys) == {
        "prompt_embeds",
        "prompt_attention_mask",
        "pooled_prompt_embeds",
        "negative_prompt_embeds",
        "negative_prompt_attention_mask",
        "negative_pooled_prompt_embeds",
    }


def test_text_to_video_policies_refuse_separate_image_encoding():
    parts = tiny_hunyuan_video_components()
    parts.pop("scheduler")
    t2v = HunyuanVideoPolicy(
        **parts, config=HunyuanVideoConfig(resolution=RESOLUTION, num_frames=5, device="cpu")
    )
    with pytest.raises(ValueError, match="unset data.embedding_cache"):
        t2v.encode_condition_images(_images())


# ------------------------------------------------------------------ log-probs and gradients


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_recomputed_log_probs_give_ratio_one(pipe, true_cfg_scale):
    policy = _policy(pipe, true_cfg_scale=true_cfg_scale)
    # As the trainer: encode each prompt/image once, repeat the rows per group member.
    cond = policy.encode_prompts(PROMPTS, _images()).select([0, 0, 1, 1])
    checks.assert_recompute_ratio_is_one(policy, cond, eta=0.7)


def _grad_step(policy: SkyReelsI2VPolicy, seed: int) -> None:
    checks.grad_step(policy, policy.encode_prompts(PROMPTS, _images()), eta=0.3, seed=seed)


def test_gradients_reach_transformer_only():
    policy = _policy(tiny_skyreels_i2v_pipeline())
    _grad_step(policy, seed=4)
    parts = ("x_embedder", "guidance_embedder", "context_embedder")
    checks.assert_gradients_reach(policy.trainable_module(), parts)
    # The patch embedding's image-latent input channels (the second half) train too.
    proj = policy.transformer.x_embedder.proj.weight.grad
    assert float(proj[:, TINY_LATENT_CHANNELS:].abs().sum()) > 0
    checks.assert_frozen(policy.text_encoder, policy.text_encoder_2, policy.vae)


def test_lora_adapter_gets_gradients_and_base_weights_do_not():
    policy = _policy(tiny_skyreels_i2v_pipeline())
    checks.assert_lora_trains_only_adapters(policy, lambda: _grad_step(policy, seed=5))


def test_gradient_checkpointing_gives_the_same_gradient():
    checks.assert_checkpointing_keeps_gradients(
        lambda: _policy(tiny_skyreels_i2v_pipeline()), lambda policy: _grad_step(policy, seed=6)
    )


# ------------------------------------------------------------------ loading


def test_from_pretrained_loads_a_saved_pipeline(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "skyreels")
    loaded = SkyReelsI2VPolicy.from_pretrained(path, _config())
    reference = _policy(pipe)
    assert isinstance(loaded, SkyReelsI2VPolicy) and loaded.modality == "video"
    assert loaded.latent_channels == TINY_LATENT_CHANNELS
    images = _images()
    cond = loaded.encode_prompts(PROMPTS, images)
    expected = reference.encode_prompts(PROMPTS, images)
    for key, value in expected.tensors.items():
        torch.testing.assert_close(cond.tensors[key], value, rtol=0, atol=0)
    _, traj_loaded, _ = rollout_trajectory(loaded, cond, 2, eta=0.3, seed=8)
    _, traj_reference, _ = rollout_trajectory(reference, cond, 2, eta=0.3, seed=8)
    torch.testing.assert_close(traj_loaded[-1], traj_reference[-1])

    no_text = SkyReelsI2VPolicy.from_pretrained(
        path, _config(load_text_encoders=False, crop_start=DEFAULT_CROP_START)
    )
    assert no_text.text_encoder is None and no_text.text_encoder_2 is None
    with pytest.raises(RuntimeError, match="EmbeddingCache"):
        no_text.encode_prompts(PROMPTS, images)
    with pytest.raises(FileNotFoundError, match="transformer/"):
        SkyReelsI2VPolicy.from_pretrained(tmp_path, _config())


def test_rejects_a_text_to_video_transformer_and_a_t2v_config():
    t2v = tiny_hunyuan_video_pipeline()
    with pytest.raises(ValueError, match="not a SkyReels I2V transformer.*in_channels=4"):
        SkyReelsI2VPolicy.from_pipeline(t2v, _config())
    with pytest.raises(TypeError, match="SkyReelsI2VConfig"):
        SkyReelsI2VPolicy.from_pipeline(tiny_skyreels_i2v_pipeline(), HunyuanVideoConfig())


def test_policy_factory_builds_the_adapter(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "skyreels")
    cfg = ModelConfig(
        kind="skyreels_i2v",
        path=str(path),
        height=16,
        width=48,
        num_frames=5,
        guidance_scale=1.0,
        options={
            "true_cfg_scale": 6.0,
            "negative_prompt": "blurry",
            "crop_start": None,
            "max_sequence_length": 8,
        },
    )
    policy = build_policy(cfg, torch.device("cpu"))
    assert isinstance(policy, SkyReelsI2VPolicy)
    assert (policy.num_frames, policy.height, policy.width) == (5, 16, 48)
    c = policy.config
    assert (c.true_cfg_scale, c.negative_prompt, c.guidance_scale) == (6.0, "blurry", 1.0)
    cond = policy.encode_prompts(PROMPTS[:1], _images()[:1])
    assert cond.tensors["image_latents"].shape == (1, TINY_LATENT_CHANNELS, 1, 2, 6)
    assert policy.initial_noise(1).shape == (1, TINY_LATENT_CHANNELS, 2, 2, 6)
    cfg.options = {"true_cfg_scale": -1.0}
    with pytest.raises(ConfigError, match="model.options: true_cfg_scale"):
        build_policy(cfg, torch.device("cpu"))


# ------------------------------------------------------------------ configuration


def test_config_defaults_follow_dancegrpo_skyreels_script():
    c = SkyReelsI2VConfig()
    assert (c.resolution, c.num_frames, c.num_steps, c.eta, c.shift) == ([400, 640], 53, 16, 0.3, 7)
    assert (c.true_cfg_scale, c.negative_prompt, c.guidance_scale) == (5.0, "", 1.0)
    assert c.do_true_cfg and not SkyReelsI2VConfig(true_cfg_scale=1.0).do_true_cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("true_cfg_scale", -0.5),
        ("resolution", 24),
        ("num_frames", 52),
        ("guidance_scale", -1.0),
        ("eta", -0.1),
        ("shift", 0.0),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SkyReelsI2VConfig(**{field: value})


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"num_frames": 96}, "model.num_frames", "4k \\+ 1 for skyreels_i2v"),
        ({"height": 540}, "model.height", "multiple of 16 for skyreels_i2v.*try 544"),
        ({"width": 950}, "model.width", "try 944"),
    ],
)
def test_model_config_checks_skyreels_geometry(changes, field, hint):
    base = {"kind": "skyreels_i2v", "path": "x", "height": 544, "width": 960, "num_frames": 97}
    ModelConfig(**base).validate()
    with pytest.raises(ConfigError, match=f"{field}: .*{hint}"):
        ModelConfig(**(base | changes)).validate()


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train_prompts": ["a cat"]}, "data.train_prompts"),
        ({"train_prompts": "prompts.txt"}, "data.train_prompts"),
        ({"train_prompts": "p.jsonl", "eval_prompts": ["a dog"]}, "data.eval_prompts"),
    ],
)
def test_i2v_needs_jsonl_prompt_files_with_images(data, field):
    cfg = {
        "model": {"kind": "skyreels_i2v", "path": "x", "height": 32, "width": 32, "num_frames": 5},
        "rewards": {"endpoints": [{"target": "localhost:1", "reward": "videoalign"}]},
        "data": data,
    }
    with pytest.raises(ConfigError, match=f"{field}: .*jsonl.*condition_image"):
        config_from_dict(cfg)
    config_from_dict(cfg | {"data": {"train_prompts": "p.jsonl", "eval_prompts": "e.jsonl"}})


def test_recipe_values_follow_the_dancegrpo_skyreels_script():
    """DanceGRPO's finetune_skyreels_i2v.sh / train_grpo_skyreels_i2v.py (VideoAlign MQ)."""
    cfg = load_config(
        RECIPE, ["model.path=x", "data.train_prompts=p.jsonl", "data.eval_prompts=[]"]
    )
    m, s, t, r = cfg.model, cfg.sampling, cfg.train, cfg.rewards
    assert (m.kind, m.height, m.width, m.num_frames, m.guidance_scale) == (
        "skyreels_i2v",
        400,
        640,
        53,
        1.0,
    )
    assert m.options == {"shift": 7.0, "eta": 0.3, "true_cfg_scale": 5.0, "negative_prompt": ""}
    assert (s.num_steps, s.eta, s.group_size, s.shared_noise) == (16, 0.3, 8, True)
    assert not r.best_of_n.enabled and r.advantage == "group"
    assert [(ep.reward, ep.output, ep.weight) for ep in r.endpoints] == [("videoalign", "mq", 1.0)]
    assert (t.learning_rate, t.weight_decay, t.timestep_fraction, t.max_grad_norm) == (
        1e-5,
        1e-4,
        0.6,
        1.0,
    )
    assert (t.clip_range, t.adv_clip_max, t.skip_last_timestep) == (1e-4, 5.0, True)
    assert cfg.run.max_steps == 121
