"""QwenImageEditPolicy / QwenImageEditPlusPolicy against diffusers' QwenImageEditPipeline /
QwenImageEditPlusPipeline on tiny random weights: sampling at η = 0 (one and two source
images, Edit-2511's ``zero_cond_t`` transformer), the source image in the text encoder and
in the sequence, the refused embedding cache, log-probs and gradients, loading, config
checks, the recipes' values and ``dancegrpo-eval`` on an edit prompt set."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import save_file

from dancegrpo_testing import policy_checks as checks
from dancegrpo_testing.diffusion_models import rollout_trajectory, save_pipeline
from dancegrpo_testing.qwen_image_models import (
    TINY_Z_DIM,
    tiny_qwen_image_edit_pipeline,
    tiny_qwen_image_transformer,
)
from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer.config import ConfigError, ModelConfig, config_from_dict, load_config
from dancegrpo_trainer.policies.qwen_image_edit import (
    QwenImageEditConfig,
    QwenImageEditPlusConfig,
    QwenImageEditPlusPolicy,
    QwenImageEditPolicy,
    edit_dimensions,
)
from dancegrpo_trainer.policy_factory import build_policy

PROMPTS = ["make it red", "add a small hat to the cat in the picture"]
RESOLUTION = 32  # 4 packed tokens of the edited image
#: Source-image pixels for the VAE (diffusers: 1024²) and, Edit-Plus, the text encoder
#: (diffusers: 384²), small for CPU; the pipelines' constants are patched to the same.
AREA, VL_AREA = 64 * 48, 56 * 56
ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def small_pipeline_areas(monkeypatch: pytest.MonkeyPatch) -> None:
    """The pipelines' source-image areas set to the tests' (the Edit pipeline's literal
    ``1024 * 1024`` through its ``calculate_dimensions``, Edit-Plus's module constants)."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus

    original = edit.calculate_dimensions
    monkeypatch.setattr(edit, "calculate_dimensions", lambda _area, ratio: original(AREA, ratio))
    monkeypatch.setattr(plus, "VAE_IMAGE_SIZE", AREA)
    monkeypatch.setattr(plus, "CONDITION_IMAGE_SIZE", VL_AREA)


@pytest.fixture(scope="module")
def edit_pipe():
    return tiny_qwen_image_edit_pipeline()


@pytest.fixture(scope="module")
def plus_pipe():
    return tiny_qwen_image_edit_pipeline(plus=True)


def _images(seed: int = 0, size: tuple[int, int] = (40, 56), n: int = 2) -> torch.Tensor:
    """Random ``uint8 [n, H, W, 3]`` source images (not square, not the output size)."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(0, 256, (n, *size, 3), dtype=np.uint8))


def _config(plus: bool, **overrides: Any) -> QwenImageEditConfig:
    options = {
        "resolution": RESOLUTION,
        "device": "cpu",
        "prompt_template_encode_start_idx": None,  # count with the tiny tokenizer
        "true_cfg_scale": 3.0,
        "negative_prompt": "blurry",
        "condition_image_area": AREA,
    } | overrides
    if plus:
        return QwenImageEditPlusConfig(**({"vl_image_area": VL_AREA} | options))
    return QwenImageEditConfig(**options)


def _policy(pipe, **overrides: Any) -> QwenImageEditPolicy:
    plus = "Plus" in type(pipe).__name__
    cls = QwenImageEditPlusPolicy if plus else QwenImageEditPolicy
    return cls.from_pipeline(pipe, _config(plus, **overrides))


def _pipeline_latents(pipe, policy, prompt: str, images: list[Image.Image] | Image.Image):
    """The pipeline's final latents for one prompt (Edit-Plus takes one prompt per call)."""
    c = policy.config
    return pipe(
        images,
        prompt,
        negative_prompt=c.negative_prompt if c.do_true_cfg else None,
        true_cfg_scale=c.true_cfg_scale,
        height=RESOLUTION,
        width=RESOLUTION,
        num_inference_steps=4,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    ).images


def _rollout_per_row_noise(policy, cond, steps: int = 4) -> torch.Tensor:
    """η = 0 from the noise the pipeline draws for each prompt (seed 0 each)."""
    x = torch.cat([policy.initial_noise(1, torch.Generator().manual_seed(0)) for _ in PROMPTS])
    _, trajectory, log_probs = rollout_trajectory(policy, cond, steps, eta=0.0, seed=0, noise=x)
    assert torch.all(log_probs == 0)
    return trajectory[-1]


# ------------------------------------------------------------------ sampling vs diffusers


@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_edit_eta0_sampling_matches_diffusers_pipeline(edit_pipe, true_cfg_scale):
    policy = _policy(edit_pipe, true_cfg_scale=true_cfg_scale)
    images = _images()
    expected = torch.cat(
        [
            _pipeline_latents(edit_pipe, policy, p, Image.fromarray(img))
            for p, img in zip(PROMPTS, images.numpy(), strict=True)
        ]
    )
    cond = policy.encode_prompts(PROMPTS, images)  # both prompts in one batch
    assert ("negative_prompt_embeds" in cond.tensors) == (true_cfg_scale > 1)
    latents = _rollout_per_row_noise(policy, cond)
    assert latents.shape == (2, 4, 4 * TINY_Z_DIM)
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("zero_cond_t", [False, True], ids=["2509", "2511_zero_cond_t"])
@pytest.mark.parametrize("true_cfg_scale", [1.0, 3.0], ids=["no_cfg", "true_cfg"])
def test_edit_plus_two_source_images_match_diffusers_pipeline(true_cfg_scale, zero_cond_t):
    pipe = tiny_qwen_image_edit_pipeline(plus=True)
    pipe.transformer = tiny_qwen_image_transformer(zero_cond_t=zero_cond_t)
    policy = _policy(pipe, true_cfg_scale=true_cfg_scale)
    first, second = _images(1, (40, 56)), _images(2, (64, 32))  # two aspect ratios per prompt
    rows = [[first[i], second[i]] for i in range(2)]
    expected = torch.cat(
        [
            _pipeline_latents(pipe, policy, p, [Image.fromarray(i.numpy()) for i in row])
            for p, row in zip(PROMPTS, rows, strict=True)
        ]
    )
    cond = policy.encode_prompts(PROMPTS, rows)
    shapes = cond.tensors["image_shapes"]
    assert shapes.tolist() == [[[2, 4], [4, 2]]] * 2  # 32x64 and 64x32 px, packed 2x2
    assert cond.tensors["image_latents"].shape == (2, 8 + 8, 4 * TINY_Z_DIM)
    torch.testing.assert_close(_rollout_per_row_noise(policy, cond), expected, atol=1e-4, rtol=1e-4)
    # Decoding is text-to-image Qwen-Image's: uint8 images at the output size.
    assert policy.decode(expected).shape == (2, RESOLUTION, RESOLUTION, 3)


def test_edit_plus_one_image_per_prompt_as_a_4d_batch(plus_pipe):
    policy = _policy(plus_pipe, true_cfg_scale=1.0)
    images = _images()
    expected = torch.cat(
        [
            _pipeline_latents(plus_pipe, policy, p, Image.fromarray(img))
            for p, img in zip(PROMPTS, images.numpy(), strict=True)
        ]
    )
    latents = _rollout_per_row_noise(policy, policy.encode_prompts(PROMPTS, images))
    torch.testing.assert_close(latents, expected, atol=1e-4, rtol=1e-4)


def test_edit_dimensions_are_the_pipelines():
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit_plus import calculate_dimensions

    for area in (64 * 48, 384 * 384, 1024 * 1024):
        for width, height in ((40, 56), (56, 40), (1000, 1000), (1920, 1080)):
            assert edit_dimensions(area, width, height) == calculate_dimensions(
                area, width / height
            )


# ------------------------------------------------------------------ the source image


def test_source_image_conditions_the_text_and_the_sequence(edit_pipe):
    policy = _policy(edit_pipe)
    a, b = _images(seed=1), _images(seed=2)
    cond_a, cond_b = policy.encode_prompts(PROMPTS, a), policy.encode_prompts(PROMPTS, b)
    # The text encoder sees the image: the prompt (and negative prompt) embeddings move.
    for key in ("prompt_embeds", "negative_prompt_embeds"):
        assert (cond_a.tensors[key] - cond_b.tensors[key]).abs().max() > 1e-3
    # Text from image a, sequence tokens from image b: still differs from a alone.
    mixed = dict(cond_a.tensors, image_latents=cond_b.tensors["image_latents"])
    x = policy.initial_noise(2, torch.Generator().manual_seed(3))
    with torch.no_grad():
        v_a = policy.predict(x, 700.0, cond_a)
        v_mixed = policy.predict(x, 700.0, type(cond_a)(mixed))
    assert (v_a - v_mixed).abs().max() > 1e-3
    again = policy.encode_prompts(PROMPTS, a)
    for key, value in cond_a.tensors.items():
        assert torch.equal(again.tensors[key], value)


def test_image_latents_are_the_pipelines_normalised_posterior_mode(edit_pipe):
    policy = _policy(edit_pipe)
    images = _images()
    latents = policy.encode_prompts(PROMPTS, images).tensors["image_latents"]
    width, height = edit_dimensions(AREA, 56, 40)
    for row, image in zip(latents, images.numpy(), strict=True):
        resized = edit_pipe.image_processor.resize(Image.fromarray(image), height, width)
        pixels = edit_pipe.image_processor.preprocess(resized, height, width).unsqueeze(2)
        with torch.no_grad():
            expected = edit_pipe._encode_vae_image(pixels, generator=None)
        packed = edit_pipe._pack_latents(expected, 1, TINY_Z_DIM, height // 8, width // 8)
        torch.testing.assert_close(row, packed[0], rtol=1e-5, atol=1e-6)


def test_edit_prompt_embeddings_equal_the_pipelines(edit_pipe, plus_pipe):
    images = _images()
    pils = [Image.fromarray(img) for img in images.numpy()]
    width, height = edit_dimensions(AREA, 56, 40)
    edit = _policy(edit_pipe, true_cfg_scale=1.0).encode_prompts(PROMPTS, images).tensors
    plus = _policy(plus_pipe, true_cfg_scale=1.0).encode_prompts(PROMPTS, images).tensors
    vl_width, vl_height = edit_dimensions(VL_AREA, 56, 40)
    for i, prompt in enumerate(PROMPTS):
        resized = edit_pipe.image_processor.resize(pils[i], height, width)
        expected, _ = edit_pipe.encode_prompt(prompt, image=resized, device="cpu")
        n = expected.shape[1]
        assert int(edit["prompt_embeds_mask"][i].sum()) == n
        torch.testing.assert_close(edit["prompt_embeds"][i, :n], expected[0], rtol=1e-4, atol=1e-5)
        vl = plus_pipe.image_processor.resize(pils[i], vl_height, vl_width)
        expected, _ = plus_pipe.encode_prompt(prompt, image=[vl], device="cpu")
        n = expected.shape[1]
        assert int(plus["prompt_embeds_mask"][i].sum()) == n
        torch.testing.assert_close(plus["prompt_embeds"][i, :n], expected[0], rtol=1e-4, atol=1e-5)


def test_refusals_name_the_fix(edit_pipe, plus_pipe):
    edit, plus = _policy(edit_pipe), _policy(plus_pipe)
    images = _images()
    with pytest.raises(ValueError, match="unset data.embedding_cache"):
        edit.encode_condition_images(images)
    with pytest.raises(ValueError, match="needs its source image"):
        edit.encode_prompts(PROMPTS)
    with pytest.raises(ValueError, match="one source image per prompt.*qwen_image_edit_plus"):
        edit.encode_prompts(PROMPTS, [[images[0], images[1]], [images[1], images[0]]])
    with pytest.raises(ValueError, match="1 condition images for 2 prompts"):
        edit.encode_prompts(PROMPTS, images[:1])
    with pytest.raises(ValueError, match="uint8"):
        edit.encode_prompts(PROMPTS, images.float())
    square = _images(3, (48, 48), n=1)
    with pytest.raises(ValueError, match="same aspect ratio"):
        plus.encode_prompts(PROMPTS, [[images[0]], [square[0]]])
    text = plus.encode_prompts(PROMPTS, images)
    without = {k: v for k, v in text.tensors.items() if k != "image_latents"}
    with pytest.raises(ValueError, match="needs the source image"):
        plus.predict(plus.initial_noise(2), 500.0, type(text)(without))


# ------------------------------------------------------------------ log-probs and gradients


def test_recomputed_log_probs_give_ratio_one(plus_pipe):
    policy = _policy(plus_pipe)
    cond = policy.encode_prompts(PROMPTS, _images()).select([0, 0, 1, 1])
    checks.assert_recompute_ratio_is_one(policy, cond, eta=0.7)


def test_gradients_reach_the_transformer_or_its_lora_only():
    for lora in (False, True):
        pipe = tiny_qwen_image_edit_pipeline()
        # The constructor places and freezes the text encoder and VAE (from_pipeline may
        # leave shared modules as they are).
        parts = {k: getattr(pipe, k) for k in ("transformer", "vae", "text_encoder")}
        policy = QwenImageEditPolicy(**parts, tokenizer=pipe.processor, config=_config(False))

        def step(policy=policy) -> None:
            checks.grad_step(policy, policy.encode_prompts(PROMPTS, _images()), eta=0.3, seed=4)

        if lora:
            checks.assert_lora_trains_only_adapters(policy, step)
        else:
            step()
            checks.assert_gradients_reach(
                policy.trainable_module(), ("img_in.weight", "txt_in.weight")
            )
        checks.assert_frozen(policy.text_encoder, policy.vae)


# ------------------------------------------------------------------ loading


@pytest.mark.parametrize("plus", [False, True], ids=["edit", "edit_plus"])
def test_from_pretrained_and_the_factory_load_a_saved_pipeline(
    plus, edit_pipe, plus_pipe, tmp_path
):
    pipe = plus_pipe if plus else edit_pipe
    path = save_pipeline(pipe, tmp_path / "qwen-edit")
    assert (path / "processor").is_dir()
    cls = QwenImageEditPlusPolicy if plus else QwenImageEditPolicy
    loaded = cls.from_pretrained(path, _config(plus))
    reference = _policy(pipe)
    images = _images()
    cond = loaded.encode_prompts(PROMPTS, images)
    for key, value in reference.encode_prompts(PROMPTS, images).tensors.items():
        torch.testing.assert_close(cond.tensors[key], value, rtol=0, atol=0)
    _, traj_loaded, _ = rollout_trajectory(loaded, cond, 2, eta=0.3, seed=8)
    _, traj_reference, _ = rollout_trajectory(reference, cond, 2, eta=0.3, seed=8)
    torch.testing.assert_close(traj_loaded[-1], traj_reference[-1])

    kind = "qwen_image_edit_plus" if plus else "qwen_image_edit"
    options = {"prompt_template_encode_start_idx": None, "condition_image_area": AREA}
    cfg = ModelConfig(kind=kind, path=str(path), height=16, width=32, options=options)
    cfg.validate()
    built = build_policy(cfg, torch.device("cpu"))
    assert type(built) is cls and (built.height, built.width) == (16, 32)
    assert built.config.condition_image_area == AREA
    assert built.encode_prompts(PROMPTS[:1], images[:1]).tensors["image_shapes"].tolist() == [
        [[2, 4]]
    ]


# ------------------------------------------------------------------ configuration


def test_config_defaults_follow_diffusers():
    edit, plus = QwenImageEditConfig(), QwenImageEditPlusConfig()
    assert edit.condition_image_area == plus.condition_image_area == 1024 * 1024
    assert plus.vl_image_area == 384 * 384
    assert edit.prompt_template_encode_start_idx == plus.prompt_template_encode_start_idx == 64
    assert "<|image_pad|>" in edit.prompt_template and "<|image_pad|>" not in plus.prompt_template
    assert not hasattr(edit, "max_sequence_length")
    with pytest.raises(ValueError, match="condition_image_area"):
        QwenImageEditConfig(condition_image_area=100)
    with pytest.raises(ValueError, match="vl_image_area"):
        QwenImageEditPlusConfig(vl_image_area=100)


@pytest.mark.parametrize("kind", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_edit_kinds_need_jsonl_sources_and_no_embedding_cache(kind):
    cfg = {
        "model": {"kind": kind, "path": "x", "height": 32, "width": 32},
        "rewards": {"endpoints": [{"target": "localhost:1", "reward": "clip"}]},
        "data": {"train_prompts": "p.txt"},
    }
    with pytest.raises(ConfigError, match="data.train_prompts: .*image editing.*condition_image"):
        config_from_dict(cfg)
    cfg["data"] = {"train_prompts": "p.jsonl", "embedding_cache": "cache"}
    with pytest.raises(ConfigError, match="data.embedding_cache: must be unset.*source image"):
        config_from_dict(cfg)
    cfg["data"] = {"train_prompts": "p.jsonl"}
    config_from_dict(cfg)


@pytest.mark.parametrize("recipe", ["qwen_image_edit", "qwen_image_edit_plus"])
def test_recipe_values_follow_flow_factory(recipe):
    """Flow-Factory's examples/grpo/lora/qwen_image_edit_plus/default.yaml: 384 px output and
    source area, 10 steps, CFG 4, G = 16, LoRA r64/α128, lr 3e-4, clip 1e-4, grad norm 1."""
    cfg = load_config(
        ROOT / "configs" / f"{recipe}.yaml",
        ["model.path=x", "data.train_prompts=p.jsonl", "data.eval_prompts=e.jsonl"],
    )
    m, s, t = cfg.model, cfg.sampling, cfg.train
    assert (m.kind, m.height, m.width, m.guidance_scale) == (recipe, 384, 384, 1.0)
    assert m.options == {
        "true_cfg_scale": 4.0,
        "negative_prompt": "",
        "condition_image_area": 384 * 384,
    }
    assert (s.num_steps, s.group_size, s.prompts_per_step, s.shared_noise) == (10, 16, 3, False)
    assert s.eta == 1.0 and (s.window.kind, s.window.size, s.window.span) == ("fast", 1, [1, 4])
    assert (t.lora.rank, t.lora.alpha, t.learning_rate, t.max_grad_norm) == (64, 128, 3e-4, 1.0)
    assert (t.clip_range, t.adv_clip_max, t.kl_coef) == (1e-4, 5.0, 0.0)
    assert cfg.data.embedding_cache is None
    rewards = [(e.reward, e.weight) for e in cfg.rewards.endpoints]
    assert rewards == [("pickscore", 1.0), ("image_similarity", 1.0)]


# ------------------------------------------------------------------ dancegrpo-eval


def test_eval_compares_base_and_tuned_on_an_edit_prompt_set(edit_pipe, tmp_path):
    """``dancegrpo-eval`` for Qwen-Image-Edit: a JSONL prompt set with source images reaches
    the policy (swapping the images changes the edits) and the reward service; base and
    tuned weights give different edits, and the table equals direct scoring."""
    from dancegrpo_proto import RewardClient
    from dancegrpo_testing.servers import running_reward_server
    from dancegrpo_trainer import evaluate as ev

    model_path = save_pipeline(edit_pipe, tmp_path / "qwen-edit")
    generator = torch.Generator().manual_seed(0)
    tuned = {
        k: (v + 0.05 * torch.randn(v.shape, generator=generator)).contiguous()
        for k, v in edit_pipe.transformer.state_dict().items()
    }
    save_file(tuned, str(tmp_path / "tuned.safetensors"))
    rows = []
    for i, (prompt, image) in enumerate(zip(PROMPTS, _images().numpy(), strict=True)):
        Image.fromarray(image).save(tmp_path / f"src{i}.png")
        rows.append({"prompt": prompt, "condition_image": f"src{i}.png"})
    prompts_path = tmp_path / "edits.jsonl"
    prompts_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = {
        "kind": "qwen_image_edit",
        "path": str(model_path),
        "height": RESOLUTION,
        "width": RESOLUTION,
        "options": {"prompt_template_encode_start_idx": None, "condition_image_area": AREA},
    }
    server_config = {"rewards": {"bright": {"kind": "brightness"}}}
    steps, seed = 2, 1
    with running_reward_server(server_config, metrics=False) as server:
        config = tmp_path / "train.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "model": model,
                    "rewards": {"endpoints": [{"target": server.target, "reward": "bright"}]},
                    "data": {"train_prompts": str(prompts_path)},
                }
            )
        )
        out = tmp_path / "eval"
        argv = ["--config", str(config), "--prompts", str(prompts_path), "--out", str(out)]
        argv += ["--tuned", str(tmp_path / "tuned.safetensors")]
        argv += ["--reward", f"brightness={server.target}/bright"]
        assert ev.main([*argv, "--num-steps", str(steps), "--seed", str(seed)]) == 0

        prompts = ev.load_prompt_set(prompts_path)
        policy = build_policy(load_config(config).model, torch.device("cpu"))
        frames = {
            "base": ev.generate(policy, prompts, samples_per_prompt=1, num_steps=steps, seed=seed)
        }
        swapped = [
            dataclasses.replace(p, condition_image=q.condition_image)
            for p, q in zip(prompts, prompts[::-1], strict=True)
        ]
        other = ev.generate(policy, swapped, samples_per_prompt=1, num_steps=steps, seed=seed)
        assert not np.array_equal(frames["base"], other)
        ev.load_weights(policy, tmp_path / "tuned.safetensors")
        frames["tuned"] = ev.generate(
            policy, prompts, samples_per_prompt=1, num_steps=steps, seed=seed
        )
        assert frames["base"].shape == (2, RESOLUTION, RESOLUTION, 3)
        assert not np.array_equal(frames["base"], frames["tuned"])
        images = ev.condition_images(prompts, 1)
        with RewardClient(server.target) as client:
            direct = {
                label: client.score(
                    "bright",
                    images=f,
                    prompts=[p.prompt for p in prompts],
                    condition_images=images,
                )["score"]
                for label, f in frames.items()
            }
    result = json.loads((out / "results.json").read_text())
    for label in ("base", "tuned"):
        np.testing.assert_allclose(result["scores"][label]["brightness"], direct[label], rtol=1e-6)
    (row,) = result["rows"]
    assert row["base"] == pytest.approx(float(direct["base"].mean()), abs=1e-6)
    assert row["tuned"] == pytest.approx(float(direct["tuned"].mean()), abs=1e-6)


# ------------------------------------------------------------------ samplers and windows


@pytest.mark.parametrize("sampler", ["dancegrpo", "flow_grpo", "cps"])
def test_every_flow_sampler_in_a_window_replays_and_recomputes_exactly(plus_pipe, sampler):
    """The rollout API on Edit-Plus (true CFG, source tokens in the sequence): an SDE window
    (step 1 of 3 stochastic) with each flow sampler replays bit for bit from its recorded
    noise, and the window step's recomputed log-probability gives ratio exactly 1."""
    from dancegrpo_trainer.rollout import RolloutPlan, sample_rollout, seeded_generators

    policy = _policy(plus_pipe)
    cond = policy.encode_prompts(PROMPTS, _images())
    noise = policy.initial_noise(2, torch.Generator().manual_seed(0))
    plan = RolloutPlan(policy.schedule(3), stochastic=[False, True, False], sampler=sampler)
    eta = 0.5
    kw = dict(eta=eta, plan=plan, chunk_size=2, decode=False)
    rollout = sample_rollout(
        policy,
        cond,
        noise,
        row_generators=seeded_generators(range(2), 7),
        keep=("log_probs", "noise"),
        **kw,
    )
    assert (rollout.log_probs[:, 1] != 0).all() and (rollout.log_probs[:, [0, 2]] == 0).all()
    again = sample_rollout(policy, cond, noise, step_noise=rollout.noise, **kw)
    assert torch.equal(again.latents, rollout.latents)
    with torch.no_grad():
        out = policy.denoise_step(
            rollout.latents[:, 1],
            1,
            rollout.schedule,
            cond,
            eta=eta,
            prev_sample=rollout.latents[:, 2],
            sampler=sampler,
        )
    assert torch.equal(torch.exp(out.log_prob - rollout.log_probs[:, 1]), torch.ones(2))
