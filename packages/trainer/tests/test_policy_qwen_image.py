"""QwenImagePolicy against diffusers' QwenImagePipeline on tiny random weights: sampling at
η = 0, the schedule, the prompt encoding, true CFG with the norm rescale, the embedding
cache, log-probs and gradients, loading, config checks and the recipe's values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import rollout_trajectory, save_pipeline
from dancegrpo_testing.qwen_image_models import (
    QWEN_IMAGE_SCHEDULER_CONFIG,
    TINY_Z_DIM,
    tiny_qwen_image_pipeline,
)
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer.config import ConfigError, ModelConfig, config_from_dict, load_config
from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.qwen_image import (
    QWEN_IMAGE_LORA_TARGET_MODULES,
    QwenImageConfig,
    QwenImagePolicy,
    qwen_image_sigmas,
    true_cfg_velocity,
)
from dancegrpo_trainer.policy_factory import build_policy

# Different lengths: the batch is padded and the mask reaches the transformer.
PROMPTS = ["a photo of a cat", "a red car on the street with a large green tree"]
RESOLUTION = 32  # VAE 8x → 4x4 latents → 2x2 = 4 packed tokens
MAX_SEQ = 48
ROOT = Path(__file__).resolve().parents[3]
RECIPE = ROOT / "configs" / "qwen_image_clip_pickscore.yaml"


@pytest.fixture(scope="module")
def pipe():
    return tiny_qwen_image_pipeline()


def _config(**overrides: Any) -> QwenImageConfig:
    options = {
        "resolution": RESOLUTION,
        "device": "cpu",
        "max_sequence_length": MAX_SEQ,
        "prompt_template_encode_start_idx": None,  # count with the tiny tokenizer
        "true_cfg_scale": 3.0,
        "negative_prompt": "blurry",
    } | overrides
    return QwenImageConfig(**options)


def _policy(pipe, **overrides: Any) -> QwenImagePolicy:
    return QwenImagePolicy.from_pipeline(pipe, _config(**overrides))


def _owned_policy(**overrides: Any) -> QwenImagePolicy:
    """A policy on a fresh pipeline's parts through the constructor, which places and
    freezes the text encoder and VAE (``from_pipeline`` may leave shared modules as they
    are)."""
    pipe = tiny_qwen_image_pipeline()
    parts = {k: getattr(pipe, k) for k in ("transformer", "vae", "text_encoder", "tokenizer")}
    return QwenImagePolicy(**parts, config=_config(**overrides))


def _pipeline_output(pipe, policy: QwenImagePolicy, output_type: str, steps: int = 4):
    c = policy.config
    return pipe(
        PROMPTS,
        negative_prompt=[c.negative_prompt] * len(PROMPTS) if c.do_true_cfg else None,
        true_cfg_scale=c.true_cfg_scale,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=steps,
        max_sequence_length=MAX_SEQ,
        generator=torch.Generator().manual_seed(0),
        output_type=output_type,
    ).images


# ------------------------------------------------------------------ sampling vs diffusers


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_eta0_sampling_matches_diffusers_pipeline(pipe, true_cfg_scale):
    policy = _policy(pipe, true_cfg_scale=true_cfg_scale)
    expected = _pipeline_output(pipe, policy, "latent")
    expected_images = _pipeline_output(pipe, policy, "np")

    cond = policy.encode_prompts(PROMPTS)
    assert ("negative_prompt_embeds" in cond.tensors) == (true_cfg_scale > 1)
    final = checks.assert_eta0_matches_pipeline(
        policy, cond, pipe.scheduler, expected, expected_images, timestep_atol=1e-3
    )
    assert final.shape == (2, 4, 4 * TINY_Z_DIM)
    assert expected_images.shape == (2, RESOLUTION, RESOLUTION, 3)


@pytest.mark.parametrize("steps", [2, 4, 10, 28])
@pytest.mark.parametrize("tokens", [4, 1024, 4096, 9000])
def test_schedule_matches_the_qwen_image_scheduler(steps, tokens):
    """diffusers' ``QwenImagePipeline`` schedule: ``linspace(1, 1/n, n)``, dynamic
    exponential shift with Qwen-Image's ``μ`` line, stretched to ``shift_terminal``."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.qwenimage.pipeline_qwenimage import calculate_shift

    scheduler = FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)
    mu = calculate_shift(tokens, 256, 8192, 0.5, 0.9)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    sigmas = qwen_image_sigmas(steps, float(np.exp(mu)), 0.02)
    torch.testing.assert_close(sigmas, scheduler.sigmas, atol=1e-6, rtol=0)
    assert float(sigmas[-2]) == pytest.approx(0.02, abs=1e-6) and float(sigmas[-1]) == 0
    # Without shift_terminal: the plain shifted ladder (the static shift at s = e^mu).
    plain = qwen_image_sigmas(steps, 3.0, None)
    expected = (
        3.0
        * plain.new_tensor(np.linspace(1, 1 / steps, steps))
        / (1 + 2.0 * plain.new_tensor(np.linspace(1, 1 / steps, steps)))
    )
    torch.testing.assert_close(plain[:-1], expected, atol=1e-6, rtol=0)
    # One step: [1, 0] (diffusers' stretch divides by zero there and returns NaN).
    assert qwen_image_sigmas(1, float(np.exp(mu)), 0.02).tolist() == [1.0, 0.0]


def test_policy_schedule_uses_the_token_count_and_static_shift(pipe):
    policy = _policy(pipe, resolution=[64, 96])
    assert policy.image_seq_len == (64 // 16) * (96 // 16)
    mu = (0.9 - 0.5) / (8192 - 256) * (policy.image_seq_len - 256) + 0.5
    assert policy.effective_shift == pytest.approx(np.exp(mu))
    static = _policy(pipe, dynamic_shift=False, shift=3.0, shift_terminal=None)
    torch.testing.assert_close(static.schedule(5).sigmas, qwen_image_sigmas(5, 3.0, None))
    assert static.schedule_shift == 3.0


# ------------------------------------------------------------------ prompt encoding


def test_prompt_embeddings_equal_the_pipelines_padded_to_max_sequence_length(pipe):
    policy = _policy(pipe)
    cond = policy.encode_prompts(PROMPTS).tensors
    embeds, mask = pipe.encode_prompt(PROMPTS, device="cpu", max_sequence_length=MAX_SEQ)
    length = embeds.shape[1]
    assert cond["prompt_embeds"].shape == (2, MAX_SEQ, embeds.shape[2])
    assert cond["prompt_embeds_mask"].dtype == torch.long
    torch.testing.assert_close(cond["prompt_embeds"][:, :length], embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cond["prompt_embeds_mask"][:, :length], mask.long())
    assert (cond["prompt_embeds"][:, length:] == 0).all()
    assert (cond["prompt_embeds_mask"][:, length:] == 0).all()
    assert cond["prompt_embeds_mask"][0].sum() < cond["prompt_embeds_mask"][1].sum()
    # The negative prompt: encoded once, one row per prompt.
    neg, neg_mask = pipe.encode_prompt(["blurry"], device="cpu", max_sequence_length=MAX_SEQ)
    for row in range(2):
        n = neg.shape[1]
        torch.testing.assert_close(
            cond["negative_prompt_embeds"][row, :n], neg[0], rtol=1e-5, atol=1e-6
        )
    assert neg_mask is None  # one row, no padding: the pipeline drops the mask
    # Long prompts are cut at max_sequence_length, as the pipeline does.
    long = " ".join(["a red car"] * 40)
    short = _policy(pipe, max_sequence_length=8).encode_prompts([long]).tensors
    cut, _ = pipe.encode_prompt([long], device="cpu", max_sequence_length=8)
    assert short["prompt_embeds"].shape[1] == 8 and short["prompt_embeds_mask"].all()
    torch.testing.assert_close(short["prompt_embeds"], cut, rtol=1e-5, atol=1e-6)


def test_template_drop_count_defaults_to_diffusers_and_null_counts_it(pipe):
    assert QwenImageConfig().prompt_template_encode_start_idx == 34
    policy = _policy(pipe)
    assert policy.template_drop == pipe.prompt_template_encode_start_idx
    explicit = _policy(pipe, prompt_template_encode_start_idx=3)
    assert explicit.template_drop == 3
    a = explicit.encode_prompts(PROMPTS[:1]).tensors["prompt_embeds_mask"].sum()
    b = policy.encode_prompts(PROMPTS[:1]).tensors["prompt_embeds_mask"].sum()
    assert int(a) == int(b) + policy.template_drop - 3


def test_refuses_condition_images_and_missing_text_encoders(pipe):
    policy = _policy(pipe)
    with pytest.raises(ValueError, match="text-to-image"):
        policy.encode_prompts(PROMPTS, torch.zeros(2, 8, 8, 3, dtype=torch.uint8))
    no_text = QwenImagePolicy(
        transformer=pipe.transformer,
        vae=pipe.vae,
        config=_config(load_text_encoders=False, prompt_template_encode_start_idx=34),
    )
    with pytest.raises(RuntimeError, match="EmbeddingCache"):
        no_text.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="prompt_template_encode_start_idx: null needs"):
        QwenImagePolicy(transformer=pipe.transformer, vae=pipe.vae, config=_config())
    with pytest.raises(ValueError, match="one text encoder"):
        QwenImagePolicy(
            transformer=pipe.transformer,
            vae=pipe.vae,
            config=_config(),
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_encoder_2=pipe.text_encoder,
        )
    with pytest.raises(TypeError, match="QwenImageConfig"):
        QwenImagePolicy.from_pipeline(pipe, object())


# ------------------------------------------------------------------ true CFG


def test_true_cfg_is_one_batched_forward_with_the_norm_rescale(pipe):
    policy = _policy(pipe, true_cfg_scale=4.0)
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
    negative = {k: t[f"negative_{k}"] for k in ("prompt_embeds", "prompt_embeds_mask")}
    plain = _policy(pipe, true_cfg_scale=1.0)
    with torch.no_grad():
        v_c = plain.predict(x, 500.0, cond)
        v_u = plain.predict(x, 500.0, Conditioning({**t, **negative}))
    combined = v_u + 4.0 * (v_c - v_u)
    rescaled = combined * v_c.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(guided, rescaled, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(guided.norm(dim=-1), v_c.norm(dim=-1), atol=1e-5, rtol=1e-5)
    assert (guided - combined).abs().max() > 1e-3  # the rescale does something here


def test_true_cfg_velocity_keeps_each_tokens_conditional_norm():
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(3, 5, 8, generator=g), torch.randn(3, 5, 8, generator=g)
    out = true_cfg_velocity(cond, uncond, 4.0)
    torch.testing.assert_close(out.norm(dim=-1), cond.norm(dim=-1))
    direction = uncond + 4.0 * (cond - uncond)
    cosine = torch.nn.functional.cosine_similarity(out, direction, dim=-1)
    torch.testing.assert_close(cosine, torch.ones_like(cosine))
    torch.testing.assert_close(true_cfg_velocity(cond, uncond, 1.0), cond)


def test_per_row_timesteps_equal_row_by_row_predictions(pipe):
    policy = _policy(pipe)
    cond = policy.encode_prompts(PROMPTS)
    x = policy.initial_noise(2, torch.Generator().manual_seed(2))
    with torch.no_grad():
        both = policy.predict(x, torch.tensor([900.0, 300.0]), cond)
        first = policy.predict(x[:1], torch.tensor(900.0), cond.select([0]))
        second = policy.predict(x[1:], torch.tensor(300.0), cond.select([1]))
    torch.testing.assert_close(both, torch.cat([first, second]), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ embedding cache


def test_cached_embeddings_give_the_same_rollout(pipe, tmp_path):
    policy = _policy(pipe)
    cache = checks.assert_cache_matches_encoding(policy, PROMPTS, tmp_path)
    assert set(cache.keys) == {
        "prompt_embeds",
        "prompt_embeds_mask",
        "negative_prompt_embeds",
        "negative_prompt_embeds_mask",
    }
    direct = policy.encode_prompts(PROMPTS)
    cached = cache.lookup(PROMPTS[::-1])
    for key, value in direct.tensors.items():
        torch.testing.assert_close(cached.tensors[key], value.flip(0), rtol=0, atol=0)
    no_text = QwenImagePolicy(
        transformer=pipe.transformer,
        vae=pipe.vae,
        config=_config(load_text_encoders=False, prompt_template_encode_start_idx=34),
    )
    _, from_cache, _ = rollout_trajectory(no_text, cache.lookup(PROMPTS), 2, eta=0.5, seed=3)
    _, from_text, _ = rollout_trajectory(policy, direct, 2, eta=0.5, seed=3)
    torch.testing.assert_close(from_cache[-1], from_text[-1], rtol=0, atol=0)


# ------------------------------------------------------------------ log-probs and gradients


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_recomputed_log_probs_give_ratio_one(pipe, true_cfg_scale):
    policy = _policy(pipe, true_cfg_scale=true_cfg_scale)
    cond = policy.encode_prompts(PROMPTS).select([0, 0, 1, 1])
    checks.assert_recompute_ratio_is_one(policy, cond, eta=0.7)


def _grad_step(policy: QwenImagePolicy, seed: int) -> None:
    checks.grad_step(policy, policy.encode_prompts(PROMPTS), eta=0.3, seed=seed)


def test_gradients_reach_transformer_only():
    policy = _owned_policy()
    _grad_step(policy, seed=4)
    parts = ("img_in", "txt_in", "time_text_embed", "transformer_blocks.0.txt_mlp")
    checks.assert_gradients_reach(policy.trainable_module(), parts)
    checks.assert_frozen(policy.text_encoder, policy.vae)


def test_lora_adapter_gets_gradients_and_base_weights_do_not():
    policy = _owned_policy()
    assert policy.lora_target_modules == QWEN_IMAGE_LORA_TARGET_MODULES
    checks.assert_lora_trains_only_adapters(policy, lambda: _grad_step(policy, seed=5))


def test_gradient_checkpointing_gives_the_same_gradients():
    checks.assert_checkpointing_keeps_gradients(
        _owned_policy, lambda policy: _grad_step(policy, seed=6)
    )


def test_fsdp_units_are_the_transformer_blocks(pipe):
    policy = _policy(pipe)
    (block_type,) = policy.fsdp_block_types()
    blocks = [m for m in policy.transformer.modules() if isinstance(m, block_type)]
    assert len(blocks) == len(policy.transformer.transformer_blocks) == 2


# ------------------------------------------------------------------ loading


def test_from_pretrained_loads_a_saved_pipeline(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "qwen-image")
    loaded = QwenImagePolicy.from_pretrained(path, _config())
    reference = _policy(pipe)
    assert loaded.modality == "image" and loaded.latent_channels == TINY_Z_DIM
    cond = loaded.encode_prompts(PROMPTS)
    for key, value in reference.encode_prompts(PROMPTS).tensors.items():
        torch.testing.assert_close(cond.tensors[key], value, rtol=0, atol=0)
    _, traj_loaded, _ = rollout_trajectory(loaded, cond, 2, eta=0.3, seed=8)
    _, traj_reference, _ = rollout_trajectory(reference, cond, 2, eta=0.3, seed=8)
    torch.testing.assert_close(traj_loaded[-1], traj_reference[-1])

    no_text = QwenImagePolicy.from_pretrained(
        path, _config(load_text_encoders=False, prompt_template_encode_start_idx=34)
    )
    assert no_text.text_encoder is None and no_text.tokenizer is None
    with pytest.raises(FileNotFoundError, match="transformer/"):
        QwenImagePolicy.from_pretrained(tmp_path, _config())


def test_policy_factory_builds_the_adapter(pipe, tmp_path):
    path = save_pipeline(pipe, tmp_path / "qwen-image")
    cfg = ModelConfig(
        kind="qwen_image",
        path=str(path),
        height=16,
        width=48,
        options={
            "true_cfg_scale": 5.0,
            "negative_prompt": "blurry",
            "prompt_template_encode_start_idx": None,
            "max_sequence_length": 16,
        },
    )
    cfg.validate()
    policy = build_policy(cfg, torch.device("cpu"))
    assert isinstance(policy, QwenImagePolicy)
    assert (policy.height, policy.width) == (16, 48)
    assert (policy.config.true_cfg_scale, policy.config.negative_prompt) == (5.0, "blurry")
    assert policy.initial_noise(1).shape == (1, 3, 4 * TINY_Z_DIM)
    cfg.options = {"true_cfg_scale": -1.0}
    with pytest.raises(ConfigError, match="model.options: true_cfg_scale"):
        build_policy(cfg, torch.device("cpu"))


# ------------------------------------------------------------------ configuration


def test_config_defaults_follow_flow_factory_and_diffusers():
    c = QwenImageConfig()
    assert (c.resolution, c.num_steps, c.true_cfg_scale, c.negative_prompt) == (512, 10, 4.0, "")
    assert (c.noise_schedule, c.dynamic_shift, c.max_shift, c.max_image_seq_len) == (
        "flow_grpo",
        True,
        0.9,
        8192,
    )
    assert (c.shift_terminal, c.max_sequence_length) == (0.02, 512)
    assert c.do_true_cfg and not QwenImageConfig(true_cfg_scale=1.0).do_true_cfg


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("true_cfg_scale", -0.5),
        ("resolution", 24),
        ("max_sequence_length", 2000),
        ("shift_terminal", 1.0),
        ("prompt_template", "no placeholder"),
        ("prompt_template_encode_start_idx", -1),
        ("eta", -0.1),
    ],
)
def test_config_errors_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        QwenImageConfig(**{field: value})


@pytest.mark.parametrize(
    ("changes", "field", "hint"),
    [
        ({"height": 530}, "model.height", "multiple of 16 for qwen_image.*try 528"),
        ({"num_frames": 5}, "model.num_frames", "must be 1 for qwen_image"),
        ({"guidance_scale": 4.0}, "model.guidance_scale", "options.true_cfg_scale"),
    ],
)
def test_model_config_checks_qwen_image(changes, field, hint):
    base = {"kind": "qwen_image", "path": "x", "height": 512, "width": 768}
    ModelConfig(**base).validate()
    with pytest.raises(ConfigError, match=f"{field}: .*{hint}"):
        ModelConfig(**(base | changes)).validate()


def test_recipe_values_follow_flow_factory():
    """Flow-Factory's examples/grpo/lora/qwen_image/default.yaml (LoRA r64/α128, lr 3e-4,
    512 px, 10 steps, CFG 4, G = 16, clip 1e-4, adv clip 5, grad norm 1, wd 1e-4)."""
    cfg = load_config(RECIPE, ["model.path=x", "data.train_prompts=[p]", "data.eval_prompts=[]"])
    m, s, t = cfg.model, cfg.sampling, cfg.train
    assert (m.kind, m.height, m.width, m.guidance_scale) == ("qwen_image", 512, 512, 1.0)
    assert m.options == {"true_cfg_scale": 4.0, "negative_prompt": ""}
    assert s.eta == 1.0 and not s.shared_noise
    assert (s.window.kind, s.window.size, s.window.span) == ("fast", 1, [1, 4])
    assert (s.num_steps, s.group_size, s.prompts_per_step) == (10, 16, 3)
    assert (t.lora.rank, t.lora.alpha, t.learning_rate) == (64, 128, 3e-4)
    assert (t.clip_range, t.adv_clip_max, t.max_grad_norm, t.weight_decay) == (
        1e-4,
        5.0,
        1.0,
        1e-4,
    )
    assert t.gradient_checkpointing and t.kl_coef == 0
    assert [(e.reward, e.weight) for e in cfg.rewards.endpoints] == [
        ("clip", 1.0),
        ("pickscore", 0.5),
    ]


def test_text_to_image_kind_accepts_plain_prompt_files():
    cfg = {
        "model": {"kind": "qwen_image", "path": "x", "height": 32, "width": 32},
        "rewards": {"endpoints": [{"target": "localhost:1", "reward": "clip"}]},
        "data": {"train_prompts": "p.txt", "embedding_cache": "cache"},
    }
    assert config_from_dict(cfg).data.embedding_cache == "cache"
