"""The pipelined update (``train.pipeline_update``): each rollout chunk's whole prompt groups
are trained as soon as that chunk is scored, while later chunks are still being scored.

It must be the same optimisation step as waiting for every reward first: same parameters
after the step (up to float summation order, since a micro-batch cut by a group boundary
runs as two smaller batches) and the same logged metrics; and ``reward_wait_s`` must be
the time the trainer was actually blocked.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from dancegrpo_testing.torch_threads import one_torch_thread  # noqa: F401 - autouse
from dancegrpo_trainer.config import TrainConfig, config_from_dict
from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy
from dancegrpo_trainer.rollout import derive_seed, group_parts, sample_rollout
from dancegrpo_trainer.scoring import PendingScores, RewardScorer, Scores
from dancegrpo_trainer.trainer import Trainer
from dancegrpo_trainer.update import GradientAccumulator, GradNormMonitor, grpo_update

ROOT = Path(__file__).resolve().parents[3]
PROMPTS = ["a red square", "a blue square", "a green square", "a yellow square"]
TIMING_KEYS = {"sample_s", "reward_wait_s", "train_s"}
# Parameters are ~1 (float32 ulp 1.2e-7); a micro-batch split at a group boundary sums
# the same terms in another order. Training moves them by ~1e-3 (asserted below).
ATOL = 1e-5


@pytest.fixture(scope="module")
def reward_target() -> Iterator[str]:
    from dancegrpo_testing.servers import running_reward_server

    with running_reward_server(ROOT / "services/demo.yaml", metrics=False) as server:
        yield server.target


def _config(target: str, out: Path, **overrides: Any):
    sections: dict[str, dict[str, Any]] = {
        "model": {
            "kind": "tiny_flow",
            "options": {"latent_size": 4, "channels": 16, "embed_dim": 32, "num_blocks": 2},
        },
        "rewards": {"endpoints": [{"target": target, "reward": "color_match"}]},
        # 12 samples in chunks of 5: chunk 0 completes group 0, chunk 1 group 1, chunk 2
        # group 2; micro-batches of 3 straddle the group boundaries at 4 and 8.
        "sampling": {
            "num_steps": 4,
            "eta": 0.7,
            "group_size": 4,
            "prompts_per_step": 3,
            "rollout_batch_size": 5,
        },
        "train": {
            "learning_rate": 1e-3,
            "micro_batch_size": 3,
            "timestep_fraction": 0.5,
            "skip_grad_norm_factor": 0,
        },
        "data": {"train_prompts": PROMPTS},
        "run": {
            "output_dir": str(out),
            "progress": False,
            "sample_grid_every": 0,
            "resume": "never",
        },
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__", 1)
        sections[section][key] = value
    return config_from_dict(sections)


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {
        k: v.detach().clone() for k, v in trainer.policy.trainable_module().state_dict().items()
    }


def _train(cfg, steps: int) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor], Trainer]:
    """``steps`` train steps; returns their records, the final parameters and the trainer
    (whose ``initial`` attribute holds the parameters before training)."""
    trainer = Trainer(cfg)
    trainer.initial = _params(trainer)  # type: ignore[attr-defined]
    try:
        records = [trainer.train_step() for _ in range(steps)]
    finally:
        trainer.close()
    return records, _params(trainer), trainer


def test_group_parts_cover_the_groups_each_chunk_completes():
    assert group_parts([5, 10, 12], 4) == [(0, 4), (4, 8), (8, 12)]
    assert group_parts([2, 4, 6, 8], 4) == [(0, 0), (0, 4), (4, 4), (4, 8)]
    assert group_parts([16], 4) == [(0, 16)]
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_parts([5, 10], 4)
    with pytest.raises(ValueError, match="increase"):
        group_parts([8, 4, 12], 4)


@pytest.mark.parametrize("stream", [False, True], ids=["per-micro-batch", "one-stream"])
def test_accumulating_in_parts_equals_one_pass(stream: bool):
    torch.manual_seed(0)
    policy = TinyFlowPolicy(8, 8, latent_size=4, channels=16, embed_dim=32, num_blocks=2)
    cond = policy.encode_prompts(PROMPTS[:2] * 4)
    gen = torch.Generator().manual_seed(1)
    noise = policy.initial_noise(8, generator=gen)
    rollout = sample_rollout(policy, cond, noise, num_steps=4, eta=0.7, generator=gen, chunk_size=8)
    advantages = torch.randn(8, generator=gen)
    cfg = TrainConfig(micro_batch_size=3, timestep_fraction=0.5, max_grad_norm=1e3)
    initial = copy.deepcopy(policy.trainable_module().state_dict())

    def timesteps() -> dict[str, Any]:
        if stream:
            return {"generator": torch.Generator().manual_seed(2)}
        return {"timestep_generator": lambda k: torch.Generator().manual_seed(derive_seed(2, k))}

    def optimizer() -> torch.optim.Optimizer:
        # SGD with lr 1: the step is the (clipped) gradient itself, which Adam would
        # normalise away (a float-noise-sized gradient becomes a full lr step under Adam).
        policy.trainable_module().load_state_dict(initial)
        return torch.optim.SGD(policy.trainable_module().parameters(), lr=1.0)

    monitor = GradNormMonitor(cfg.grad_norm_window, 0)
    whole = grpo_update(
        policy,
        optimizer(),
        rollout,
        advantages,
        cfg=cfg,
        eta=0.7,
        grad_monitor=monitor,
        **timesteps(),
    )
    expected = copy.deepcopy(policy.trainable_module().state_dict())
    acc = GradientAccumulator(policy, optimizer(), num_samples=8, cfg=cfg, eta=0.7, **timesteps())
    # Parts cut micro-batch 1 (samples 3, 4, 5) and micro-batch 2 (6, 7) in two.
    for start, stop in [(0, 4), (4, 7), (7, 8)]:
        acc.accumulate(rollout.rows(start, stop), advantages[start:stop], sample_offset=start)
    parts = acc.step(monitor)

    for key, value in policy.trainable_module().state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6, msg=key)
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 1e-3, "a zero gradient would make the comparison vacuous"
    assert parts.metrics.keys() == whole.metrics.keys()
    for key, value in whole.metrics.items():
        assert parts.metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def test_accumulator_rejects_a_batch_not_covered_exactly_once():
    policy = TinyFlowPolicy(8, 8, latent_size=4, channels=8, embed_dim=8, num_blocks=1)
    cond = policy.encode_prompts(PROMPTS[:2])
    noise = policy.initial_noise(2, generator=torch.Generator().manual_seed(0))
    rollout = sample_rollout(
        policy, cond, noise, num_steps=2, eta=0.7, generator=torch.Generator(), chunk_size=2
    )
    opt = torch.optim.AdamW(policy.trainable_module().parameters())
    acc = GradientAccumulator(
        policy, opt, num_samples=2, cfg=TrainConfig(), eta=0.7, generator=torch.Generator()
    )
    acc.accumulate(rollout.rows(0, 1), torch.zeros(1))
    with pytest.raises(ValueError, match="1 samples accumulated, expected 2"):
        acc.step(GradNormMonitor(3, 0))
    with pytest.raises(ValueError, match="3 samples accumulated"):
        acc.accumulate(rollout, torch.zeros(2))


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"rewards__best_of_n": {"top_k": 1, "bottom_k": 2}, "train__kl_coef": 0.1},
        {"sampling__rollout_batch_size": 2, "train__micro_batch_size": 5},
    ],
    ids=["groups-cut-by-chunks", "best-of-n-and-kl", "chunks-smaller-than-groups"],
)
def test_pipelined_update_equals_waiting_for_every_reward(
    reward_target: str, tmp_path: Path, overrides: dict[str, Any]
):
    steps = 2
    runs = {}
    for pipelined in (True, False):
        cfg = _config(
            reward_target, tmp_path / str(pipelined), train__pipeline_update=pipelined, **overrides
        )
        runs[pipelined] = _train(cfg, steps)
    (records, params, trainer), (base_records, base_params, base) = runs[True], runs[False]
    assert trainer.pipelined and not base.pipelined

    initial = base.initial
    for key, value in trainer.initial.items():
        torch.testing.assert_close(value, initial[key], rtol=0, atol=0)
    moved = max(float((base_params[k] - initial[k]).abs().max()) for k in initial)
    assert moved > 100 * ATOL, "training barely moved the parameters: the comparison is vacuous"
    for key, value in base_params.items():
        torch.testing.assert_close(params[key], value, rtol=0, atol=ATOL, msg=key)
    for rec, base_rec in zip(records, base_records, strict=True):
        assert rec.keys() == base_rec.keys()
        assert rec["split"] == base_rec["split"] == "train"
        # abs: the loss is a mean of zero-sum group advantages × ratios ≈ 1, ~3e-8 here,
        # so its float cancellation noise is relatively large.
        for key in rec.keys() - TIMING_KEYS - {"split"}:
            assert rec[key] == pytest.approx(base_rec[key], rel=1e-4, abs=1e-7), (rec["step"], key)


class _LateScores:
    """A scored chunk whose result is available only ``delay_s`` after submission."""

    def __init__(self, inner: PendingScores, delay_s: float, log: list[tuple[str, float]]):
        self.inner, self.ready_at, self.log = inner, time.perf_counter() + delay_s, log

    def result(self) -> Scores:
        asked = time.perf_counter()
        time.sleep(max(0.0, self.ready_at - asked))
        scores = self.inner.result()
        self.log.append(("result", time.perf_counter() - asked))
        return scores


class _LateScorer(RewardScorer):
    """The real gRPC scorer whose chunks become ready ``delay_s`` after submission."""

    def __init__(self, *args: Any, delay_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.delay_s = delay_s
        self.log: list[tuple[str, float]] = []

    def submit(self, frames, prompts, condition_images=None, metadata=None):  # type: ignore[override]
        inner = super().submit(frames, prompts, condition_images, metadata)
        return _LateScores(inner, self.delay_s, self.log)


@pytest.mark.parametrize("pipelined", [True, False], ids=["pipelined", "wait-for-all"])
def test_training_overlaps_scoring_and_reward_wait_is_time_blocked(
    reward_target: str, tmp_path: Path, pipelined: bool
):
    cfg = _config(reward_target, tmp_path, train__pipeline_update=pipelined)
    scorer = _LateScorer(cfg.rewards.endpoints, delay_s=0.3)
    trainer = Trainer(cfg, scorer=scorer)
    policy = trainer.policy
    denoise = policy.denoise_step

    def logged_denoise(*args: Any, **kwargs: Any):
        if torch.is_grad_enabled():  # a training forward (rollouts run under no_grad)
            scorer.log.append(("train", 0.0))
        return denoise(*args, **kwargs)

    policy.denoise_step = logged_denoise  # type: ignore[method-assign]
    try:
        record = trainer.train_step()
    finally:
        trainer.close()
    events = [name for name, _ in scorer.log]
    assert events.count("result") == 3  # 12 samples in chunks of 5
    last_result = len(events) - 1 - events[::-1].index("result")
    trained_before_last = "train" in events[:last_result]
    assert trained_before_last == pipelined, events
    blocked = sum(seconds for name, seconds in scorer.log if name == "result")
    assert blocked > 0.05  # the last chunk is always waited for here: it is 0.3 s late
    assert blocked <= record["reward_wait_s"] <= blocked + 0.1


def test_skip_last_timestep_never_trains_the_final_step():
    from dancegrpo_trainer.algorithms.grpo import GRPO

    policy = TinyFlowPolicy(8, 8, latent_size=4, channels=8, embed_dim=8, num_blocks=1)
    cond = policy.encode_prompts(PROMPTS[:1])
    noise = policy.initial_noise(1, generator=torch.Generator().manual_seed(0))
    rollout = sample_rollout(
        policy, cond, noise, num_steps=4, eta=0.7, generator=torch.Generator(), chunk_size=1
    )
    drawn = {}
    for skip in (False, True):
        cfg = TrainConfig(micro_batch_size=1, timestep_fraction=1.0, skip_last_timestep=skip)
        grpo = GRPO(cfg, policy)
        drawn[skip] = [sorted(grpo.terms(rollout, torch.Generator())) for _ in range(8)]
    assert all(steps == [0, 1, 2, 3] for steps in drawn[False])
    assert all(steps == [0, 1, 2] for steps in drawn[True])
