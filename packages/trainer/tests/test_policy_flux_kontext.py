"""FluxKontextPolicy against diffusers' FluxKontextPipeline on tiny random weights: the source
image's tokens joined to the sequence, its encoding, the embedding cache, log-probs,
gradients, loading and config checks."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import (
    TINY_T5_MAX_LENGTH,
    rollout_trajectory,
    save_pipeline,
    tiny_flux_components,
    tiny_flux_kontext_pipeline,
    tiny_flux_pipeline,
)
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer.config import ConfigError, ModelConfig, config_from_dict
from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy
from dancegrpo_trainer.policies.flux_kontext import FluxKontextConfig, FluxKontextPolicy
from dancegrpo_trainer.policy_factory import build_policy

PROMPTS = ["make the cat red", "add a tree to the street"]
RESOLUTION = 16  # tiny VAE 2x → 8x8 latents → 16 packed tokens
CONDITION = [32, 16]  # → 16x8 latents → 32 packed source tokens (another count on purpose)


def _config(**overrides: Any) -> FluxKontextConfig:
    options = {
        "resolution": RESOLUTION,
        "condition_resolution": CONDITION,
        "device": "cpu",
        "max_sequence_length": TINY_T5_MAX_LENGTH,
    } | overrides
    return FluxKontextConfig(**options)


def _policy(pipe, **overrides: Any) -> FluxKontextPolicy:
    return FluxKontextPolicy.from_pipeline(pipe, _config(**overrides), copy=True)


def _images(seed: int = 0, size: tuple[int, int] = (32, 16)) -> torch.Tensor:
    """Two random ``uint8 [2, H, W, 3]`` source images."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (2, *size, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def pipe():
    return tiny_flux_kontext_pipeline()


def _pipeline_output(pipe, policy: FluxKontextPolicy, images: torch.Tensor, output_type: str):
    """The pipeline on source images already at the condition size (``_auto_resize`` off:
    the adapter trains at one configured source size) with ``max_area`` = the output area
    (else the pipeline rescales ``height``/``width`` to 1024²)."""
    return pipe(
        image=[Image.fromarray(image) for image in images.numpy()],
        prompt=PROMPTS,
        height=RESOLUTION,
        width=RESOLUTION,
        max_area=RESOLUTION * RESOLUTION,
        _auto_resize=False,
        num_inference_steps=4,
        guidance_scale=policy.config.guidance_scale,
        max_sequence_length=TINY_T5_MAX_LENGTH,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    ).images


# ------------------------------------------------------------------ sampling vs diffusers


@pytest.mark.parametrize("dynamic_shift", [True, False], ids=["dynamic", "static"])
def test_eta0_sampling_matches_diffusers_pipeline(dynamic_shift):
    pipe = tiny_flux_kontext_pipeline(dynamic_shift=dynamic_shift)
    policy = _policy(pipe, dynamic_shift=dynamic_shift, shift=3.0)
    images = _images()
    expected = _pipeline_output(pipe, policy, images, "latent")
    expected_images = _pipeline_output(pipe, policy, images, "np")

    cond = policy.encode_prompts(PROMPTS, images)
    assert cond.tensors["image_latents"].shape == (2, 32, 16)
    final = checks.assert_eta0_matches_pipeline(
        policy, cond, pipe.scheduler, expected, expected_images
    )
    assert final.shape == (2, 16, 16)
    assert expected_images.shape == (2, RESOLUTION, RESOLUTION, 3)


def test_source_tokens_join_the_sequence_with_image_ids_one(pipe):
    """One forward over ``L + L_img`` tokens, RoPE ids ``(0, r, c)`` then ``(1, r, c)``,
    output cut to the generated image's ``L`` tokens; the dynamic shift counts ``L``."""
    policy = _policy(pipe)
    cond = policy.encode_prompts(PROMPTS, _images())
    x = policy.initial_noise(2, torch.Generator().manual_seed(1))
    seen: dict[str, torch.Tensor] = {}

    def record(_module, _args, kwargs):
        seen.update(hidden=kwargs["hidden_states"], ids=kwargs["img_ids"])

    hook = policy.transformer.register_forward_pre_hook(record, with_kwargs=True)
    try:
        with torch.no_grad():
            v = policy.predict(x, 500.0, cond)
    finally:
        hook.remove()
    assert seen["hidden"].shape == (2, 16 + 32, 16) and v.shape == x.shape
    torch.testing.assert_close(seen["hidden"][:, 16:], cond.tensors["image_latents"])
    ids = seen["ids"]
    assert torch.all(ids[:16, 0] == 0) and torch.all(ids[16:, 0] == 1)
    assert ids[16:, 1].max() == 7 and ids[16:, 2].max() == 3  # 16x8 latents → 8x4 tokens
    assert policy.image_seq_len == 16 and policy.condition_seq_len == 32


def test_source_image_changes_the_output(pipe):
    policy = _policy(pipe)
    a, b = _images(seed=1), _images(seed=2)
    _, with_a, _ = rollout_trajectory(policy, policy.encode_prompts(PROMPTS, a), 3, 0.0, seed=3)
    _, with_b, _ = rollout_trajectory(policy, policy.encode_prompts(PROMPTS, b), 3, 0.0, seed=3)
    _, again, _ = rollout_trajectory(policy, policy.encode_prompts(PROMPTS, a), 3, 0.0, seed=3)
    assert torch.equal(with_a[-1], again[-1])
    assert (with_a[-1] - with_b[-1]).abs().max() > 1e-3  # random tiny weights: a small effect
    text_only = policy.encode_prompts(PROMPTS)
    assert "image_latents" not in text_only.tensors
    with pytest.raises(ValueError, match="condition_images="):
        policy.predict(with_a[0], 500.0, text_only)


def test_image_latents_are_the_packed_posterior_mode_of_the_resized_image(pipe):
    """Any source size is resized to ``condition_resolution`` with the pipeline's image
    processor (Lanczos), encoded as the pipeline's ``_encode_vae_image`` (argmax = mode,
    ``(z − shift)·scale``) and packed as its ``_pack_latents``."""
    policy = _policy(pipe)
    images = _images(size=(40, 52))
    latents = policy.encode_condition_images(images).tensors["image_latents"]
    assert latents.shape == (2, 32, 16) and latents.dtype == torch.float32
    pils = [Image.fromarray(i) for i in images.numpy()]
    resized = pipe.image_processor.resize(pils, *CONDITION)
    pixels = pipe.image_processor.preprocess(resized, *CONDITION)
    with torch.no_grad():
        encoded = pipe._encode_vae_image(pixels, generator=torch.Generator().manual_seed(5))
    packed = pipe._pack_latents(encoded, 2, 4, *encoded.shape[2:])
    torch.testing.assert_close(latents, packed, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"uint8 \[N, H, W, 3\]"):
        policy.encode_condition_images(images.float())
    with pytest.raises(ValueError, match="1 condition images for 2 prompts"):
        policy.encode_prompts(PROMPTS, images[:1])
    other = _policy(pipe, condition_resolution=16)
    with pytest.raises(ValueError, match="condition_resolution"):
        other.predict(other.initial_noise(2), 500.0, policy.encode_prompts(PROMPTS, images))


def test_cached_text_plus_images_equals_direct_encoding(pipe, tmp_path):
    """What the trainer does with data.embedding_cache: text rows from the cache, source
    latents encoded at rollout time (VAE only), merged."""
    no_text = FluxKontextPolicy(
        transformer=pipe.transformer, vae=pipe.vae, config=_config(load_text_encoders=False)
    )
    cache = checks.assert_cache_matches_encoding(
        _policy(pipe), PROMPTS, tmp_path, images=_images(), image_policy=no_text
    )
    assert set(cache.keys) == {"prompt_embeds", "pooled_prompt_embeds"}


# ------------------------------------------------------------------ log-probs and gradients


@pytest.mark.parametrize("noise_schedule", ["dance", "flow_grpo"])
def test_recomputed_log_probs_give_ratio_one(pipe, noise_schedule):
    policy = _policy(pipe, noise_schedule=noise_schedule)
    cond = policy.encode_prompts(PROMPTS, _images()).select([0, 0, 1, 1])
    checks.assert_recompute_ratio_is_one(policy, cond, eta=0.9)


def _fresh_policy(**overrides: Any) -> FluxKontextPolicy:
    parts = tiny_flux_components()
    parts.pop("scheduler")
    return FluxKontextPolicy(**parts, config=_config(**overrides))


def _grad_step(policy: FluxKontextPolicy, seed: int) -> None:
    checks.grad_step(policy, policy.encode_prompts(PROMPTS, _images()), eta=0.9, seed=seed)


def test_gradients_reach_transformer_only():
    policy = _fresh_policy()
    _grad_step(policy, seed=4)
    parts = ("x_embedder", "guidance_embedder", "context_embedder")
    checks.assert_gradients_reach(policy.trainable_module(), parts)
    checks.assert_frozen(policy.text_encoder, policy.text_encoder_2, policy.vae)


def test_lora_adapter_gets_gradients_and_base_weights_do_not():
    policy = _fresh_policy()
    checks.assert_lora_trains_only_adapters(policy, lambda: _grad_step(policy, seed=5))


def test_gradient_checkpointing_gives_the_same_gradient():
    checks.assert_checkpointing_keeps_gradients(
        _fresh_policy, lambda policy: _grad_step(policy, seed=6), atol=1e-6
    )


# ------------------------------------------------------------------ loading


def test_from_pretrained_loads_a_saved_pipeline(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "kontext")
    loaded = FluxKontextPolicy.from_pretrained(path, _config())
    reference = _policy(pipe)
    assert isinstance(loaded, FluxKontextPolicy)
    images = _images()
    cond = loaded.encode_prompts(PROMPTS, images)
    expected = reference.encode_prompts(PROMPTS, images)
    for key, value in expected.tensors.items():
        torch.testing.assert_close(cond.tensors[key], value, rtol=1e-5, atol=1e-6)
    _, traj_loaded, _ = rollout_trajectory(loaded, cond, 2, eta=0.9, seed=8)
    _, traj_reference, _ = rollout_trajectory(reference, cond, 2, eta=0.9, seed=8)
    torch.testing.assert_close(traj_loaded[-1], traj_reference[-1])
    no_text = FluxKontextPolicy.from_pretrained(path, _config(load_text_encoders=False))
    assert no_text.text_encoder is None and no_text.text_encoder_2 is None
    with pytest.raises(RuntimeError, match="EmbeddingCache"):
        no_text.encode_prompts(PROMPTS, images)


def test_rejects_a_flux_config_and_flux_refuses_source_images():
    with pytest.raises(TypeError, match="FluxKontextConfig"):
        FluxKontextPolicy.from_pipeline(tiny_flux_kontext_pipeline(), FluxConfig())
    flux = FluxPolicy.from_pipeline(tiny_flux_pipeline(), FluxConfig(resolution=16, device="cpu"))
    with pytest.raises(ValueError, match="unset data.embedding_cache"):
        flux.encode_condition_images(_images())


def test_policy_factory_builds_the_adapter(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "kontext")
    cfg = ModelConfig(
        kind="flux_kontext",
        path=str(path),
        height=16,
        width=32,
        guidance_scale=2.5,
        options={"condition_resolution": 16, "max_sequence_length": 8},
    )
    cfg.validate()
    policy = build_policy(cfg, torch.device("cpu"))
    assert isinstance(policy, FluxKontextPolicy)
    assert (policy.height, policy.width, policy.config.guidance_scale) == (16, 32, 2.5)
    cond = policy.encode_prompts(PROMPTS[:1], _images()[:1])
    assert cond.tensors["image_latents"].shape == (1, 16, 16)
    assert policy.initial_noise(1).shape == (1, 32, 16)
    cfg.options = {"condition_resolution": 24}
    with pytest.raises(ConfigError, match="model.options: condition_resolution"):
        build_policy(cfg, torch.device("cpu"))


# ------------------------------------------------------------------ configuration


def test_config_defaults_follow_flow_factory_kontext():
    c = FluxKontextConfig()
    assert (c.resolution, c.condition_resolution, c.num_steps, c.guidance_scale) == (
        384,
        None,
        10,
        2.5,
    )
    assert (c.eta, c.noise_schedule, c.dynamic_shift) == (0.9, "flow_grpo", True)


@pytest.mark.parametrize(
    ("field", "value"),
    [("condition_resolution", 24), ("resolution", 20), ("eta", -1.0), ("max_sequence_length", 0)],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        FluxKontextConfig(**{field: value})


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"train_prompts": ["make it red"]}, "data.train_prompts"),
        ({"train_prompts": "edits.txt"}, "data.train_prompts"),
        ({"train_prompts": "p.jsonl", "eval_prompts": ["make it blue"]}, "data.eval_prompts"),
    ],
)
def test_editing_needs_jsonl_prompt_files_with_source_images(data, field):
    cfg = {
        "model": {"kind": "flux_kontext", "path": "x", "height": 32, "width": 32},
        "rewards": {"endpoints": [{"target": "localhost:1", "reward": "image_similarity"}]},
        "data": data,
    }
    with pytest.raises(ConfigError, match=f"{field}: .*image editing.*jsonl.*condition_image"):
        config_from_dict(cfg)
    config_from_dict(cfg | {"data": {"train_prompts": "p.jsonl", "eval_prompts": "e.jsonl"}})


def test_model_config_checks_kontext_geometry():
    base = {"kind": "flux_kontext", "path": "x", "height": 384, "width": 384}
    ModelConfig(**base).validate()
    with pytest.raises(ConfigError, match="model.width: must be a multiple of 16 for flux_kontext"):
        ModelConfig(**(base | {"width": 390})).validate()


def test_edit_sources_of_different_sizes_are_refused_naming_the_files(tmp_path):
    from dancegrpo_trainer.data import load_condition_images, load_prompts

    rows = []
    for i, size in enumerate([(20, 24), (20, 24), (30, 24)]):
        Image.new("RGB", size[::-1]).save(tmp_path / f"src{i}.png")
        rows.append(json.dumps({"prompt": f"edit {i}", "condition_image": f"src{i}.png"}))
    path = tmp_path / "edits.jsonl"
    path.write_text("\n".join(rows) + "\n")
    records = load_prompts(str(path), "data.train_prompts")
    assert load_condition_images(records[:2]).shape == (2, 20, 24, 3)
    with pytest.raises(ValueError, match=r"src0.png is 24x20, .*src2.png is 24x30; resize"):
        load_condition_images(records)
