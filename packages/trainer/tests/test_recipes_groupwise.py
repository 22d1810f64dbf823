"""Group-wise rewards and routed prompt sources end to end: real recipe files, tiny
diffusers folders under ``$DANCEGRPO_WEIGHTS``, and two real reward-service processes:

- "image" (``$DANCEGRPO_REWARDS``): ``pref`` (``pairwise_preference`` whose VLM judge is a
  local OpenAI-compatible server answering in UnifiedReward-Think's format: the brighter
  image wins), tiny ``clip``, tiny ``geneval`` (random Mask2Former), tiny ``pickscore``
  and the weight-free ``bright``;
- "ocr" (``$DANCEGRPO_REWARDS_OCR``): ``ocr`` on the real PP-OCRv4 weights.

The Pref-GRPO recipe trains one FLUX step with each prompt group judged whole in one
request; the routed recipe sends GenEval prompts to ``geneval`` and OCR prompts to ``ocr``
(both to PickScore) and nothing else; a routed tiny-policy run resumes bit for bit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_testing.trainer_runs import RecordingTrainer, records, trainable_state
from dancegrpo_trainer import trainer as trainer_module
from dancegrpo_trainer.cli import train_main
from dancegrpo_trainer.config import config_from_dict
from dancegrpo_trainer.scoring import RewardScorer
from dancegrpo_trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[3]
CONFIGS = ROOT / "configs"
CPU = ["model.height=16", "model.width=16", "sampling.num_steps=3", "run.progress=false"]
PREF_TRAIN = ["a lighthouse at dusk", "a bowl of ramen"]
PREF_EVAL = ["a red fox in snow"]
GENEVAL_TRAIN = {
    "tag": "single_object",
    "include": [{"class": "bench", "count": 1}],
    "prompt": "a photo of a bench",
}
GENEVAL_EVAL = {
    "tag": "colors",
    "include": [{"class": "car", "count": 1, "color": "red"}],
    "prompt": "a red car",
}
OCR_TRAIN = ['a shop sign that says "OPEN"']
OCR_EVAL = ['a street sign reading "MAIN ST"']


class BrighterJudge:
    """UnifiedReward-Think's answer format; the image of higher mean pixel wins."""

    def __call__(self, chat: Any) -> tuple[str, None]:
        a, b = (float(image.mean()) for image in chat.images[-2:])
        verdict = "Image 1 is better" if a >= b else "Image 2 is better"
        return f"<think>Total score: {a:.1f} vs {b:.1f}</think>\n<answer>{verdict}</answer>", None


class RecordingScorer(RewardScorer):
    """The real scorer, remembering every call it sends: ``(reward, kwargs)``."""

    last: ClassVar[RecordingScorer | None] = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sent: list[tuple[str, dict[str, Any]]] = []
        RecordingScorer.last = self

    def _call_kwargs(self, call, rows, *args, **kwargs):  # type: ignore[override]
        out = super()._call_kwargs(call, rows, *args, **kwargs)
        self.sent.append((call[1], out))
        return out


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from dancegrpo_testing import clip_models, diffusion_models, geneval_models

    root = tmp_path_factory.mktemp("groupwise")
    diffusion_models.save_pipeline(
        diffusion_models.tiny_flux_pipeline(), root / "weights" / "FLUX.1-dev"
    )
    prompts = root / "data" / "prompts"
    prompts.mkdir(parents=True)
    for name, lines in (
        ("pref_train", PREF_TRAIN),
        ("pref_eval", PREF_EVAL),
        ("ocr_train", OCR_TRAIN),
        ("ocr_eval", OCR_EVAL),
    ):
        (prompts / f"{name}.txt").write_text("\n".join(lines) + "\n")
    (prompts / "geneval_train.jsonl").write_text(json.dumps(GENEVAL_TRAIN) + "\n")
    (prompts / "geneval_eval.jsonl").write_text(json.dumps(GENEVAL_EVAL) + "\n")
    clip = clip_models.write_tiny_clip_files(root / "clip")
    pickscore = clip_models.write_pickscore_folders(root / "pickscore")
    geneval = geneval_models.write_tiny_geneval_files(root / "geneval")
    return {
        "root": root,
        "clip_config": clip.config,
        "clip_dir": clip.config.parent,
        "pickscore": pickscore.model,
        "pickscore_processor": pickscore.processor,
        "geneval_detector": geneval.detector,
        "geneval_clip": geneval.clip_checkpoint,
        "geneval_clip_arch": geneval.clip_config,
    }


@pytest.fixture(scope="module")
def services(assets: dict[str, Path]) -> Iterator[dict[str, Any]]:
    from dancegrpo_testing.openai_judge import serve_judge
    from dancegrpo_testing.servers import running_reward_server

    clip_dir = assets["clip_dir"]
    with serve_judge(BrighterJudge(), model="UnifiedReward") as judge:
        image = {
            "rewards": {
                "pref": {
                    "kind": "pairwise_preference",
                    "max_batch_size": 8,
                    "options": {
                        "judge": {
                            "type": "vlm",
                            "base_url": judge.base_url,
                            "model": "UnifiedReward",
                        }
                    },
                },
                "clip": {
                    "kind": "clip",
                    "options": {
                        "checkpoint": str(clip_dir / "clip_tiny.bin"),
                        "arch": str(assets["clip_config"]),
                    },
                },
                "geneval": {
                    "kind": "geneval",
                    "options": {
                        "detector_path": str(assets["geneval_detector"]),
                        "clip_checkpoint": str(assets["geneval_clip"]),
                        "clip_arch": str(assets["geneval_clip_arch"]),
                        "detector_shortest_edge": 64,
                        "detector_longest_edge": 96,
                        "threshold": 0.0,
                        "counting_threshold": 0.0,
                    },
                },
                "pickscore": {
                    "kind": "pickscore",
                    "options": {
                        "path": str(assets["pickscore"]),
                        "processor_path": str(assets["pickscore_processor"]),
                    },
                },
                "bright": {"kind": "brightness"},
            }
        }
        ocr = {"rewards": {"ocr": {"kind": "ocr", "options": {"num_threads": 1}}}}
        env = {"OMP_NUM_THREADS": "1"}
        with (
            running_reward_server(image, env, metrics=False, startup_timeout_s=120) as a,
            running_reward_server(ocr, env, metrics=False, startup_timeout_s=120) as b,
        ):
            yield {"image": a.target, "ocr": b.target, "judge": judge}


@pytest.fixture(scope="module")
def recipe_env(assets: dict[str, Path], services: dict[str, Any]) -> Iterator[dict[str, Any]]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DANCEGRPO_WEIGHTS", str(assets["root"] / "weights"))
        mp.setenv("DANCEGRPO_DATA", str(assets["root"] / "data"))
        mp.setenv("DANCEGRPO_REWARDS", services["image"])
        mp.setenv("DANCEGRPO_REWARDS_OCR", services["ocr"])
        for recipe in ("flux_pref_grpo", "flux_geneval_ocr_routed"):
            assert train_main(["preprocess", "--config", str(CONFIGS / f"{recipe}.yaml")]) == 0
        yield services


@pytest.fixture
def recording(monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingScorer.last = RecordingTrainer.last = None
    monkeypatch.setattr(trainer_module, "RewardScorer", RecordingScorer)
    monkeypatch.setattr(trainer_module, "Trainer", RecordingTrainer)


def run_recipe(name: str, out: Path, *overrides: str) -> RecordingTrainer:
    args = ["--config", str(CONFIGS / f"{name}.yaml"), *CPU, f"run.output_dir={out}"]
    assert train_main([*args, "run.max_steps=1", *overrides]) == 0
    assert RecordingTrainer.last is not None
    return RecordingTrainer.last


# ------------------------------------------------------------------------------ Pref-GRPO


def test_pref_grpo_recipe_judges_each_group_whole_and_trains_one_step(
    recipe_env: dict[str, Any], tmp_path: Path, recording: None
) -> None:
    """Pref-GRPO's FLUX recipe against the served ``pairwise_preference``: the 8 samples of
    the step's prompt go out in one request (rollout chunks of 4 wait for the group), the
    judge sees C(8, 2) = 28 pairs, the win rates (mean ½ by construction) equal a direct
    whole-group request, and the step trains. Eval scores CLIP only."""
    from dancegrpo_proto import RewardClient

    judge = recipe_env["judge"]
    asked_before = len(judge.requests)
    trainer = run_recipe("flux_pref_grpo", tmp_path)
    scorer = RecordingScorer.last
    assert scorer is not None
    pref = [kwargs for reward, kwargs in scorer.sent if reward == "pref"]
    assert len(pref) == 1 and pref[0]["group_sizes"] == [8]
    assert len(set(pref[0]["prompts"])) == 1
    assert len(judge.requests) - asked_before == 28  # eval never calls the group-wise judge
    rec = records(tmp_path)[0]
    assert rec["samples"] == 8 and rec["reward/pref/win_rate_mean"] == pytest.approx(0.5)
    assert rec["advantage_abs_mean"] > 0 and rec["grad_norm"] > 0
    with RewardClient(recipe_env["image"]) as client:
        sent = pref[0]
        direct = client.score(
            "pref", images=sent["images"], prompts=sent["prompts"], group_sizes=[8]
        )["win_rate"]
    assert float(np.std(direct)) > 0  # the judge told the samples apart
    assert rec["reward/pref/win_rate_std"] == pytest.approx(float(np.std(direct)), rel=1e-5)
    evals = records(tmp_path, "eval")
    assert len(evals) == 2 and all("reward/clip/score_mean" in r for r in evals)
    assert not any(key.startswith("reward/pref") for r in evals for key in r)
    live = trainable_state(trainer)
    moved = sum(int((live[k] != v).sum()) for k, v in trainer.initial.items())
    assert moved > 0.9 * sum(v.numel() for v in live.values())
    saved = load_file(str(tmp_path / "checkpoints" / "step_000001" / "model.safetensors"))
    for k, v in live.items():
        torch.testing.assert_close(saved[k], v, rtol=0, atol=0)


# ------------------------------------------------------------------------------ routing


def test_routed_recipe_calls_only_each_sources_rewards(
    recipe_env: dict[str, Any], tmp_path: Path, recording: None
) -> None:
    """GenEval rows reach ``geneval`` (with their specs) and never ``ocr``; OCR prompts reach
    ``ocr`` (real PP-OCRv4) and never ``geneval``; PickScore sees both. Rollout chunks of 3
    straddle groups of both sources, so calls get row subsets. Metrics per source and per
    reward; the OCR term equals the service's own score of the OCR samples."""
    from dancegrpo_proto import RewardClient

    run_recipe(
        "flux_geneval_ocr_routed",
        tmp_path,
        "sampling.group_size=4",
        "sampling.prompts_per_step=4",  # two epochs of the two-prompt pool: both sources
        "sampling.rollout_batch_size=3",
        "train.lora.rank=4",
        "train.lora.alpha=8",
    )
    scorer = RecordingScorer.last
    assert scorer is not None
    train_calls = scorer.sent[: len(scorer.sent)]
    geneval_prompt, ocr_prompt = GENEVAL_TRAIN["prompt"], OCR_TRAIN[0]
    seen: dict[str, list[str]] = {}
    for reward, kwargs in train_calls:
        seen.setdefault(reward, []).extend(kwargs["prompts"])
        if reward == "geneval":
            assert all(m["geneval"]["tag"] for m in kwargs["metadata"])
        else:
            assert "metadata" not in kwargs
    eval_geneval, eval_ocr = GENEVAL_EVAL["prompt"], OCR_EVAL[0]
    assert set(seen["geneval"]) == {geneval_prompt, eval_geneval}
    assert set(seen["ocr"]) == {ocr_prompt, eval_ocr}
    assert set(seen["pickscore"]) == {geneval_prompt, ocr_prompt, eval_geneval, eval_ocr}
    # Train step: 4 groups of 4, two per source: 8 samples each to geneval and ocr, 16 to
    # PickScore; each eval (before and after) adds one sample per source.
    assert seen["geneval"].count(geneval_prompt) == 8 and seen["ocr"].count(ocr_prompt) == 8
    assert len(seen["pickscore"]) == 16 + 2 * 2
    rec = records(tmp_path)[0]
    assert rec["samples"] == 16 and rec["source/geneval/samples"] == 8
    for key in (
        "source/geneval/reward_mean",
        "source/ocr/reward_mean",
        "reward/geneval_mean",
        "reward/ocr_mean",
        "reward/pickscore_mean",
    ):
        assert key in rec and math.isfinite(rec[key])
    ocr_frames = np.concatenate(
        [
            kw["images"]
            for reward, kw in train_calls
            if reward == "ocr" and kw["prompts"][0] == ocr_prompt
        ]
    )
    with RewardClient(recipe_env["ocr"]) as client:
        direct = client.score("ocr", images=ocr_frames, prompts=[ocr_prompt] * len(ocr_frames))
    assert rec["reward/ocr_mean"] == pytest.approx(float(direct["score"].mean()), abs=1e-7)
    for rec in records(tmp_path, "eval"):
        assert rec["source/geneval/samples"] == 1 and rec["source/ocr/samples"] == 1
        assert {"reward/geneval_mean", "reward/ocr_mean", "reward/pickscore_mean"} <= set(rec)


def _tiny_routed_config(out: Path, services: dict[str, Any], **run: Any) -> Any:
    data = yaml.safe_load((CONFIGS / "demo_grpo.yaml").read_text())
    data["rewards"]["endpoints"] = [
        {
            "target": services["image"],
            "reward": "geneval",
            "output": "correct",
            "name": "geneval",
            "metadata": True,
        },
        {"target": services["ocr"], "reward": "ocr", "output": "score", "name": "ocr"},
        {"target": services["image"], "reward": "bright", "output": "score", "name": "bright"},
    ]
    rows = out.parent / "geneval_rows.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    rows.write_text(
        "".join(
            json.dumps({**GENEVAL_TRAIN, "prompt": f"a photo of a bench, take {i}"}) + "\n"
            for i in range(3)
        )
    )
    data["data"] = {
        "sources": [
            {
                "name": "geneval",
                "train_prompts": str(rows),
                "rewards": {"geneval": 1.0, "bright": 0.5},
                "share": 2.0,
            },
            {
                "name": "ocr",
                "train_prompts": ['a sign "OPEN"', 'a mug that says "HI"'],
                "rewards": ["ocr", "bright"],
                "share": 1.0,
            },
        ]
    }
    data["sampling"].update(num_steps=3, group_size=4, prompts_per_step=3, rollout_batch_size=5)
    data["train"].update(micro_batch_size=4)
    data["run"].update(
        {
            "output_dir": str(out),
            "progress": False,
            "checkpoint_every": 1,
            "keep_checkpoints": 5,
            "sample_grid_every": 0,
            "max_steps": 3,
            **run,
        }
    )
    return config_from_dict(data)


def test_routed_run_resumes_exactly(services: dict[str, Any], tmp_path: Path) -> None:
    """A routed run with sampling shares, stopped after step 2 and resumed, ends with the
    same weights, sampler state and step-3 metrics as an uninterrupted run."""
    full = Trainer(_tiny_routed_config(tmp_path / "full" / "run", services))
    full.train()
    full.close()
    part = Trainer(_tiny_routed_config(tmp_path / "resumed" / "run", services, max_steps=2))
    part.train()
    part.close()
    resumed = Trainer(_tiny_routed_config(tmp_path / "resumed" / "run", services))
    assert resumed.step == 2
    resumed.train()
    resumed.close()
    for key, value in trainable_state(full).items():
        torch.testing.assert_close(trainable_state(resumed)[key], value, rtol=0, atol=0)
    assert resumed.sampler.state_dict() == full.sampler.state_dict()
    a, b = records(tmp_path / "full" / "run"), records(tmp_path / "resumed" / "run")
    timing = {"sample_s", "reward_wait_s", "train_s"}
    assert [{k: v for k, v in r.items() if k not in timing} for r in a] == [
        {k: v for k, v in r.items() if k not in timing} for r in b
    ]
    # Both sources were drawn, each scored by its own rewards.
    assert any("source/ocr/samples" in r for r in a) and any(
        "source/geneval/samples" in r for r in a
    )


# ------------------------------------------------------------------------------ two ranks


def _routed_overrides(target: str, out: Path, prompts_per_step: int) -> list[str]:
    endpoints = (
        f"[{{target: '{target}', reward: color_match, output: score, name: color}},"
        f" {{target: '{target}', reward: brightness, output: score, name: light}}]"
    )
    sources = (
        "[{name: colours, train_prompts: [a red square, a blue square],"
        " eval_prompts: [a green square], rewards: [color]},"
        " {name: light, train_prompts: [a white square, a black square],"
        " eval_prompts: [a grey square], rewards: {light: 1.0, color: 0.5}}]"
    )
    return [
        f"rewards.endpoints={endpoints}",
        "data.train_prompts=[]",
        "data.eval_prompts=[]",
        f"data.sources={sources}",
        f"run.output_dir={out}",
        "run.progress=false",
        "run.max_steps=2",
        "run.checkpoint_every=0",
        "run.sample_grid_every=0",
        "run.resume=never",
        f"sampling.prompts_per_step={prompts_per_step}",
        "sampling.group_size=4",
        "sampling.num_steps=4",
        "sampling.rollout_batch_size=3",
        "train.micro_batch_size=3",
        "train.learning_rate=1e-3",
        "train.timestep_fraction=0.5",
        "train.skip_grad_norm_factor=0",
        "eval.samples_per_prompt=2",
        "eval.every_steps=2",
    ]


@pytest.mark.slow
def test_routed_run_on_two_ranks_matches_one_process(tmp_path: Path) -> None:
    """Routing under ``torchrun`` (gloo, 2 ranks × 2 prompts; the ranks hold different
    sources, so NaN columns, weights and source names are gathered) reproduces one process
    × 4 prompts: parameters to float32 noise, per-source metrics to 1e-4."""
    import os
    import socket
    import subprocess
    import sys

    from dancegrpo_testing.servers import running_reward_server

    script = str(Path(__file__).with_name("test_trainer_distributed.py"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_addr=127.0.0.1",
        f"--master_port={port}",
    ]
    one, two = tmp_path / "one", tmp_path / "two"
    with running_reward_server(ROOT / "services/demo.yaml", metrics=False) as server:
        for cmd in (
            [sys.executable, script, str(one), *_routed_overrides(server.target, one, 4)],
            [*torchrun, script, str(two), *_routed_overrides(server.target, two, 2)],
        ):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
            assert proc.returncode == 0, proc.stderr[-5000:]
    single = torch.load(one / "params_rank0.pt", weights_only=True)
    initial = torch.load(one / "params_initial.pt", weights_only=True)
    for rank in (0, 1):
        ranked = torch.load(two / f"params_rank{rank}.pt", weights_only=True)
        for key, value in single.items():
            torch.testing.assert_close(ranked[key], value, rtol=0, atol=1e-5, msg=key)
    assert max(float((single[k] - initial[k]).abs().max()) for k in single) > 1e-3
    a = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    assert [(r["split"], r["step"]) for r in a] == [(r["split"], r["step"]) for r in b]
    for x, y in zip(a, b, strict=True):
        keys = {k for k in x if k.startswith(("source/", "reward_mean", "reward_std", "reward/"))}
        assert keys == {
            k for k in y if k.startswith(("source/", "reward_mean", "reward_std", "reward/"))
        }
        assert {"source/colours/reward_mean", "source/light/reward_mean"} <= keys
        for k in keys:
            assert x[k] == pytest.approx(y[k], rel=1e-4, abs=1e-6), (x["step"], k)
