"""The Stable Diffusion 3.5 and FLUX.1-Kontext recipes (``configs/sd3_*.yaml``,
``configs/flux_kontext_edit.yaml``) run as a user runs them: the real recipe files, tiny
diffusers folders under ``$DANCEGRPO_WEIGHTS``, prompt files (GenEval rows, text lines,
edit rows with source images) and embedding caches under ``$DANCEGRPO_DATA`` (built by
``dancegrpo-train preprocess``), one real reward-service process at ``$DANCEGRPO_REWARDS``;
then ``dancegrpo-eval`` compares the base and the trained checkpoint through that service.

The service hosts the recipes' reward names: ``geneval`` (tiny random Mask2Former, the real
kind), ``image_similarity`` (the real kind on a tiny CLIP), and stand-ins for the kinds of
issue 18 that have not shipped yet: ``pickscore`` and ``ocr`` are served by the ``clip``
kind (same wire contract, output ``score``), which exercises the recipes' plumbing, not
those rewards' semantics.

Only what CPU and tiny models force is overridden: 16 px images (and source images),
3 sampling steps, one prompt per step, the run folder.
"""

from __future__ import annotations

import json
import os
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_testing.trainer_runs import RecordingTrainer, records, trainable_state
from dancegrpo_trainer import evaluate as ev
from dancegrpo_trainer import trainer as trainer_module
from dancegrpo_trainer.cli import train_main
from dancegrpo_trainer.config import load_config
from dancegrpo_trainer.embedding_cache import EmbeddingCache
from dancegrpo_trainer.policy_factory import build_policy
from dancegrpo_trainer.scoring import RewardScorer
from dancegrpo_trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
CPU = [
    "model.height=16",
    "model.width=16",
    "sampling.num_steps=3",
    "sampling.prompts_per_step=1",
    "run.progress=false",
]
# 3 steps instead of 10: the recipe's one-step window within [1, 4) shrinks to [1, 3).
KONTEXT_CPU = [*CPU, "model.options.condition_resolution=16", "sampling.window.span=[1,3]"]
SD3_RECIPES = ("sd3_geneval", "sd3_pickscore", "sd3_ocr")
TEXT_PROMPTS = {
    "pickscore": (["a photo of a cat", "a red car"], ["a dog on a chair"]),
    "ocr": (['a sign that says "open"', 'a cake with "happy" written on it'], ['a "stop" sign']),
}
GENEVAL_TRAIN = [
    {"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a bench"},
]
GENEVAL_EVAL = [
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a car"},
]
EDITS = (["make the cat red", "add a tree"], ["make the sky stormy"])


def write_edit_prompts(folder: Path, name: str, prompts: Sequence[str]) -> Path:
    """``folder/name.jsonl``: one ``{"prompt", "condition_image"}`` row per edit, its source
    image (random noise, 20x24: not the model's size) as a PNG beside it, paths relative."""
    images = folder / name
    images.mkdir()
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    rows = []
    for i, prompt in enumerate(prompts):
        Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
            images / f"{i:04d}.png"
        )
        rows.append({"prompt": prompt, "condition_image": f"{name}/{i:04d}.png"})
    path = folder / f"{name}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dancegrpo_testing import clip_models, diffusion_models, geneval_models

    root = tmp_path_factory.mktemp("recipes_sd3_kontext")
    weights = root / "weights"
    diffusion_models.save_pipeline(
        diffusion_models.tiny_sd3_pipeline(), weights / "stable-diffusion-3.5-medium"
    )
    diffusion_models.save_pipeline(
        diffusion_models.tiny_flux_kontext_pipeline(), weights / "FLUX.1-Kontext-dev"
    )
    prompts = root / "data" / "prompts"
    prompts.mkdir(parents=True)
    for name, (train, evaluation) in TEXT_PROMPTS.items():
        (prompts / f"{name}_train.txt").write_text("\n".join(train) + "\n")
        (prompts / f"{name}_eval.txt").write_text("\n".join(evaluation) + "\n")
    for name, rows in (("geneval_train", GENEVAL_TRAIN), ("geneval_eval", GENEVAL_EVAL)):
        (prompts / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_edit_prompts(prompts, "edit_train", EDITS[0])
    write_edit_prompts(prompts, "edit_eval", EDITS[1])
    return {
        "weights": weights,
        "data": root / "data",
        "clip": clip_models.write_tiny_clip_files(root / "clip").hf_folder,
        "geneval": geneval_models.write_tiny_geneval_files(root / "geneval"),
    }


@pytest.fixture(scope="module")
def server(assets: dict[str, Any]) -> Iterator[str]:
    from dancegrpo_testing.servers import running_reward_server

    clip = {"hf_path": str(assets["clip"])}
    geneval = assets["geneval"]
    config = {
        "server": {"host": "127.0.0.1"},
        "rewards": {
            # Thresholds 0: the random detector finds a class in some images only.
            "geneval": {
                "kind": "geneval",
                "options": {
                    "detector_path": str(geneval.detector),
                    "clip_checkpoint": str(geneval.clip_checkpoint),
                    "clip_arch": str(geneval.clip_config),
                    "detector_shortest_edge": 64,
                    "detector_longest_edge": 96,
                    "threshold": 0.0,
                    "counting_threshold": 0.0,
                },
            },
            "image_similarity": {"kind": "image_similarity", "options": clip},
            "pickscore": {"kind": "clip", "options": clip},  # stand-in (issue 18)
            "ocr": {"kind": "clip", "options": clip},  # stand-in (issue 18)
        },
    }
    with running_reward_server(
        config, {"OMP_NUM_THREADS": "1"}, metrics=False, startup_timeout_s=180
    ) as running:
        yield running.target


@pytest.fixture(scope="module")
def recipe_env(assets: dict[str, Any], server: str) -> Iterator[dict[str, Any]]:
    """The recipes' environment variables, then every recipe's embedding cache built by the
    CLI as the recipe headers tell users to."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DANCEGRPO_WEIGHTS", str(assets["weights"]))
        mp.setenv("DANCEGRPO_DATA", str(assets["data"]))
        mp.setenv("DANCEGRPO_REWARDS", server)
        for recipe in (*SD3_RECIPES, "flux_kontext_edit"):
            assert train_main(["preprocess", "--config", str(CONFIGS / f"{recipe}.yaml")]) == 0
        yield assets


class RecordingScorer(RewardScorer):
    """The real gRPC scorer, keeping the prompts and condition images it sent."""

    last: ClassVar[RecordingScorer | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[list[str], np.ndarray | None]] = []
        RecordingScorer.last = self

    def submit(self, frames, prompts, condition_images=None, metadata=None):  # type: ignore[override]
        images = None if condition_images is None else np.asarray(condition_images)
        self.sent.append((list(prompts), images))
        return super().submit(frames, prompts, condition_images, metadata)


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingTrainer.last = RecordingScorer.last = None
    monkeypatch.setattr(trainer_module, "Trainer", RecordingTrainer)
    monkeypatch.setattr(trainer_module, "RewardScorer", RecordingScorer)


def run_recipe(name: str, out: Path, *overrides: str) -> RecordingTrainer:
    """``dancegrpo-train --config configs/NAME.yaml`` for one step; returns its Trainer."""
    cpu = KONTEXT_CPU if name.startswith("flux_kontext") else CPU
    args = ["--config", str(CONFIGS / f"{name}.yaml"), *cpu, f"run.output_dir={out}"]
    assert train_main([*args, "run.max_steps=1", *overrides]) == 0
    assert RecordingTrainer.last is not None
    return RecordingTrainer.last


def assert_lora_trained_and_saved(trainer: Trainer, out: Path) -> None:
    """Only LoRA weights train; nearly every ``lora_B`` (zero at start, so the only factor
    with a gradient at step 1) moved, and the checkpoint holds exactly the live adapter.
    (SD3's last joint block discards its text stream, so its context-query adapter gets no
    gradient.)"""
    live = trainable_state(trainer)
    assert live and all("lora_" in k and v.dtype == torch.float32 for k, v in live.items())
    moved_b = [not torch.equal(live[k], trainer.initial[k]) for k in live if "lora_B" in k]
    assert moved_b and sum(moved_b) >= 0.85 * len(moved_b), f"{sum(moved_b)} of {len(moved_b)}"
    saved = load_file(str(out / "checkpoints" / "step_000001" / "model.safetensors"))
    for k, v in live.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)
    rec = records(out)[-1]
    assert rec["grad_norm"] > 0 and rec["skipped"] == 0


# ------------------------------------------------------------------------------ training


@pytest.mark.parametrize("recipe", SD3_RECIPES)
def test_sd3_recipe_trains_one_step_from_the_cache(
    recipe_env: dict[str, Any], tmp_path: Path, recording: None, recipe: str
) -> None:
    """SD3.5 with CFG 4.5 from cached embeddings (no text encoder loaded), G = 24, LoRA,
    KL to the base model, against the recipe's reward name on the real service."""
    trainer = run_recipe(recipe, tmp_path)
    reward = {"sd3_geneval": "geneval/correct"}.get(recipe, f"{recipe[4:]}/score")
    rec = records(tmp_path)[0]
    assert rec["samples"] == 24 and f"reward/{reward}_mean" in rec
    assert rec["reward_mean"] == pytest.approx(rec[f"reward/{reward}_mean"], abs=1e-6)
    assert [r["step"] for r in records(tmp_path, "eval")] == [0, 1]
    policy = trainer.policy
    assert policy.text_encoder is None and policy.text_encoder_3 is None
    assert policy.config.do_cfg and trainer.cfg.sampling.sampler == "flow_grpo"
    assert trainer.reference is not None and trainer.reference.lora  # KL beta > 0
    assert "kl" in rec
    assert_lora_trained_and_saved(trainer, tmp_path)


def test_flux_kontext_edit_recipe_sends_each_source_image_with_its_edits(
    recipe_env: dict[str, Any], tmp_path: Path, recording: None
) -> None:
    """Kontext from cached text + source images encoded at rollout: every sample reaches
    the service with its own source image (the prompt file's PNG), scored by PickScore
    (stand-in) and the real ``image_similarity``, each normalised then summed."""
    trainer = run_recipe("flux_kontext_edit", tmp_path)
    rec = records(tmp_path)[0]
    assert rec["samples"] == 16
    sim, pick = rec["reward/image_similarity/score_mean"], rec["reward/pickscore/score_mean"]
    assert rec["reward_mean"] == pytest.approx((sim + pick) / 2, abs=1e-6)
    assert -1 <= sim <= 1
    scorer = RecordingScorer.last
    assert scorer is not None
    sources = {}
    for split, prompts in (("edit_train", EDITS[0]), ("edit_eval", EDITS[1])):
        for i, prompt in enumerate(prompts):
            path = recipe_env["data"] / "prompts" / split / f"{i:04d}.png"
            sources[prompt] = np.asarray(Image.open(path).convert("RGB"))
    assert {p for prompts, _ in scorer.sent for p in prompts} <= set(sources)
    for prompts, images in scorer.sent:
        assert images is not None and images.shape == (len(prompts), 20, 24, 3)
        for prompt, image in zip(prompts, images, strict=True):
            np.testing.assert_array_equal(image, sources[prompt])
    assert trainer.policy.text_encoder is None and trainer.policy.condition_seq_len == 16
    assert [r["step"] for r in records(tmp_path, "eval")] == [0, 1]
    assert_lora_trained_and_saved(trainer, tmp_path)


def test_preprocess_caches_equal_direct_encoding(recipe_env: dict[str, Any]) -> None:
    """The caches the CLI wrote hold exactly what the recipes' text encoders produce:
    SD3's prompt + empty-negative rows, Kontext's text only (no image latents)."""
    for recipe, prompts, keys in (
        ("sd3_pickscore", TEXT_PROMPTS["pickscore"][0], 4),
        ("flux_kontext_edit", EDITS[0], 2),
    ):
        overrides = KONTEXT_CPU if recipe.startswith("flux_kontext") else CPU
        cfg = load_config(CONFIGS / f"{recipe}.yaml", overrides)
        cache = EmbeddingCache(recipe_env["data"] / "embeddings" / recipe)
        direct = build_policy(cfg.model, torch.device("cpu")).encode_prompts(prompts)
        cached = cache.lookup(prompts)
        assert len(cached.tensors) == keys and set(cached.tensors) == set(direct.tensors)
        for key, value in direct.tensors.items():
            assert cached.tensors[key].dtype == value.dtype == torch.bfloat16  # recipe dtype
            torch.testing.assert_close(cached.tensors[key], value, rtol=0, atol=0)


# ------------------------------------------------------------------------------ evaluation


def _trained_checkpoint(recipe: str, out: Path, cpu: Sequence[str]) -> tuple[Path, Path]:
    """One step with a large learning rate (so base and tuned samples visibly differ),
    group of 4, no in-training eval; returns ``(config, checkpoint)``."""
    overrides = [*cpu, f"run.output_dir={out}", "run.max_steps=1", "data.eval_prompts=[]"]
    overrides += ["sampling.group_size=4", "train.learning_rate=0.05", "train.kl_coef=0"]
    assert train_main(["--config", str(CONFIGS / f"{recipe}.yaml"), *overrides]) == 0
    return CONFIGS / f"{recipe}.yaml", out / "checkpoints" / "step_000001"


@pytest.mark.parametrize(
    ("recipe", "prompt_file", "rewards"),
    [
        ("sd3_pickscore", "pickscore_eval.txt", ["pickscore"]),
        ("flux_kontext_edit", "edit_eval.jsonl", ["pickscore", "image_similarity"]),
    ],
    ids=["sd3", "kontext_edit"],
)
def test_eval_compares_base_and_tuned_lora_checkpoints(
    recipe_env: dict[str, Any], server: str, tmp_path: Path, recipe, prompt_file, rewards
) -> None:
    """``dancegrpo-eval`` on a recipe's config and its trained LoRA checkpoint: the table
    holds both policies' scores, equal to direct scoring of the frames each policy samples
    (base: the recipe's model; tuned: the checkpoint's adapter injected and loaded), the
    two differ, and edit prompts send their source images to every reward."""
    from dancegrpo_proto import RewardClient

    cpu = KONTEXT_CPU if recipe.startswith("flux_kontext") else CPU
    config, checkpoint = _trained_checkpoint(recipe, tmp_path / "run", cpu)
    prompts_path = recipe_env["data"] / "prompts" / prompt_file
    out = tmp_path / "eval"
    argv = ["--config", str(config), "--tuned", str(checkpoint), "--prompts", str(prompts_path)]
    argv += ["--out", str(out), "--num-steps", "3", "--seed", "2", "--samples-per-prompt", "2"]
    argv += [f"--reward={name}={server}/{name}:score" for name in rewards]
    assert ev.main([*argv, *cpu]) == 0

    cfg = load_config(config, cpu)
    prompts = ev.load_prompt_set(prompts_path)
    frames = {}
    for label in ("base", "tuned"):
        policy = build_policy(cfg.model, torch.device("cpu"))
        if label == "tuned":
            ev.load_weights(policy, checkpoint, cfg.train.lora)
        frames[label] = ev.generate(policy, prompts, samples_per_prompt=2, num_steps=3, seed=2)
    assert frames["base"].shape == (2 * len(prompts), 16, 16, 3)
    assert not np.array_equal(frames["base"], frames["tuned"])
    images = ev.condition_images(prompts, 2)
    assert (images is not None) == recipe.startswith("flux_kontext")
    result = json.loads((out / "results.json").read_text())
    texts = [p.prompt for p in prompts for _ in range(2)]
    extra = {} if images is None else {"condition_images": images}
    with RewardClient(os.environ["DANCEGRPO_REWARDS"]) as client:
        for label in ("base", "tuned"):
            for name in rewards:
                direct = client.score(name, images=frames[label], prompts=texts, **extra)
                np.testing.assert_allclose(
                    result["scores"][label][name], direct["score"], rtol=1e-6, atol=1e-6
                )
    table = (out / "results.md").read_text()
    assert all(f"| {name} |" in table for name in rewards)


# ------------------------------------------------------------------------------ values


def test_sd3_recipe_values_follow_flow_grpo() -> None:
    """Flow-GRPO config/grpo.py geneval_sd3 / pickscore_sd3 / general_ocr_sd3 and
    scripts/train_sd3.py (SD3.5-M, 32 GPUs)."""
    env = {"DANCEGRPO_DATA": "/data"}
    for recipe, reward, beta in (
        ("sd3_geneval", "geneval", 0.04),
        ("sd3_pickscore", "pickscore", 0.01),
        ("sd3_ocr", "ocr", 0.04),
    ):
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            cfg = load_config(CONFIGS / f"{recipe}.yaml")
        m, s, t = cfg.model, cfg.sampling, cfg.train
        assert (m.kind, m.height, m.width, m.guidance_scale) == ("sd3", 512, 512, 4.5)
        assert m.options == {
            "negative_prompt": "",
            "shift": 3.0,
            "max_sequence_length": 128,
        }
        assert (s.num_steps, s.eta, s.group_size, s.shared_noise) == (10, 0.7, 24, False)
        assert s.sampler == "flow_grpo" and s.window.kind == "full"
        assert s.prompts_per_step * 8 == 48  # 48 prompts per round on 8 ranks
        assert (t.learning_rate, t.weight_decay, t.clip_range, t.adv_clip_max) == (
            3e-4,
            1e-4,
            1e-4,
            5.0,
        )
        assert (t.kl_coef, t.max_grad_norm, t.lora.rank, t.lora.alpha) == (beta, 1.0, 32, 64)
        # timestep_fraction 0.99 of 10 steps: int(9.9) = 9, the first nine (all but the last).
        assert (t.timestep_fraction, t.skip_last_timestep) == (1.0, True)
        assert [ep.reward for ep in cfg.rewards.endpoints] == [reward]
        assert cfg.rewards.endpoints[0].metadata == (reward == "geneval")


def test_flux_kontext_recipe_values_follow_flow_factory() -> None:
    """Flow-Factory examples/grpo/lora/flux1_kontext/default.yaml."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DANCEGRPO_DATA", "/data")
        cfg = load_config(CONFIGS / "flux_kontext_edit.yaml")
    m, s, t = cfg.model, cfg.sampling, cfg.train
    assert (m.kind, m.height, m.width, m.guidance_scale) == ("flux_kontext", 384, 384, 2.5)
    assert m.options == {"condition_resolution": 384, "dynamic_shift": True}
    assert s.sampler == "flow_grpo"
    # num_sde_steps 1 drawn from sde_steps [1, 2, 3]: a one-step Fast window within [1, 4).
    assert (s.window.kind, s.window.size, s.window.span) == ("fast", 1, [1, 4])
    assert (s.num_steps, s.eta, s.group_size, s.shared_noise) == (10, 0.9, 16, False)
    assert s.prompts_per_step * 8 == 48
    assert (t.learning_rate, t.weight_decay, t.clip_range, t.adv_clip_max, t.kl_coef) == (
        3e-4,
        1e-4,
        1e-4,
        5.0,
        0.0,
    )
    assert (t.max_grad_norm, t.lora.rank, t.lora.alpha) == (1.0, 64, 128)
    rewards = [(ep.reward, ep.output, ep.weight) for ep in cfg.rewards.endpoints]
    assert rewards == [("pickscore", "score", 1.0), ("image_similarity", "score", 1.0)]
    assert cfg.data.train_prompts.endswith(".jsonl") and cfg.data.eval_prompts.endswith(".jsonl")
