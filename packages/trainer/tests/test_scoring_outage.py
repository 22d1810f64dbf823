"""Riding out reward outages: calls failing with an outage code are resent until
``rewards.outage_budget_s`` runs out (logging the wait, rate-limited), other failures stop
at once, and a reward server killed mid-run and restarted leaves training bit-identical."""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import socket
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch

from dancegrpo_proto import RewardServiceError
from dancegrpo_proto.client import RETRYABLE_CODES
from dancegrpo_trainer import scoring
from dancegrpo_trainer.config import ConfigError, RewardEndpoint, load_config
from dancegrpo_trainer.scoring import RewardScorer, RewardScoringError
from dancegrpo_trainer.trainer import Trainer

ROOT = Path(__file__).resolve().parents[3]
FRAMES = np.zeros((2, 4, 4, 3), np.uint8)
PROMPTS = ["a red square", "a blue square"]


class _FlakyClient:
    """A ``RewardClient`` stand-in whose first ``failures`` calls fail with ``code``."""

    def __init__(self, failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        self.failures = failures
        self.code = code
        self.calls: list[dict] = []
        self._pool = concurrent.futures.ThreadPoolExecutor(1)

    def score_async(self, reward: str, **kwargs) -> concurrent.futures.Future:
        self.calls.append(kwargs)
        failing = len(self.calls) <= self.failures
        return self._pool.submit(self._score, reward, failing, kwargs)

    def _score(self, reward: str, failing: bool, kwargs: dict) -> dict[str, np.ndarray]:
        if failing:
            raise RewardServiceError("fake:1", reward, self.code, "replica restarting")
        return {"score": np.arange(len(kwargs["prompts"]), dtype=np.float32)}

    def close(self) -> None:
        self._pool.shutdown()


def _scorer(client: _FlakyClient, budget_s: float) -> RewardScorer:
    endpoint = RewardEndpoint(target="fake:1", reward="color_match")
    return RewardScorer([endpoint], lambda target, ep: client, outage_budget_s=budget_s)


@pytest.fixture(autouse=True)
def short_waits(monkeypatch):
    monkeypatch.setattr(scoring, "OUTAGE_INITIAL_WAIT_S", 0.01)
    monkeypatch.setattr(scoring, "OUTAGE_MAX_WAIT_S", 0.02)


def test_outage_codes_are_the_codes_the_client_retries():
    assert {c.name for c in RETRYABLE_CODES} == scoring.OUTAGE_CODES


def test_a_failing_call_is_resent_with_the_same_samples_until_it_succeeds(caplog):
    client = _FlakyClient(failures=6)
    with caplog.at_level(logging.WARNING, "dancegrpo_trainer.scoring"):
        scores = _scorer(client, budget_s=60).submit(FRAMES, PROMPTS).result()
    np.testing.assert_array_equal(scores.terms["color_match/score"], [0.0, 1.0])
    assert len(client.calls) == 7
    assert all(call == client.calls[0] for call in client.calls)  # same request resent
    # Rate-limited: one line when the outage is first seen, one when scoring is back.
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 2, messages
    assert "UNAVAILABLE for 0 s; resending (outage budget 60 s" in messages[0]
    assert "scoring again after" in messages[1]


def test_the_wait_is_logged_again_while_the_outage_lasts(monkeypatch, caplog):
    monkeypatch.setattr(scoring, "OUTAGE_LOG_EVERY_S", 0.05)
    client = _FlakyClient(failures=12)
    with caplog.at_level(logging.WARNING, "dancegrpo_trainer.scoring"):
        _scorer(client, budget_s=60).submit(FRAMES, PROMPTS).result()
    waits = [r for r in caplog.records if "resending" in r.getMessage()]
    assert 2 <= len(waits) < 12  # repeated, but not once per resend


def test_the_budget_bounds_how_long_a_call_keeps_failing():
    client = _FlakyClient(failures=10**6, code=grpc.StatusCode.RESOURCE_EXHAUSTED)
    start = time.monotonic()
    with pytest.raises(RewardScoringError, match=r"rewards\.outage_budget_s = 0\.3") as info:
        _scorer(client, budget_s=0.3).submit(FRAMES, PROMPTS).result()
    assert time.monotonic() - start >= 0.3
    assert "'color_match' at fake:1" in str(info.value)
    assert "RESOURCE_EXHAUSTED" in str(info.value)
    with pytest.raises(RewardScoringError, match="outage_budget_s = 0"):
        _scorer(_FlakyClient(failures=1), budget_s=0).submit(FRAMES, PROMPTS).result()


def test_errors_that_are_not_outages_are_not_resent():
    client = _FlakyClient(failures=1, code=grpc.StatusCode.INVALID_ARGUMENT)
    with pytest.raises(RewardScoringError, match="INVALID_ARGUMENT"):
        _scorer(client, budget_s=60).submit(FRAMES, PROMPTS).result()
    assert len(client.calls) == 1


class _FlakyListing(_FlakyClient):
    """Hosts a group-wise ``color_match``; its first ``list_failures`` ListRewards fail."""

    def __init__(self, list_failures: int, code: grpc.StatusCode = grpc.StatusCode.UNAVAILABLE):
        super().__init__(failures=0)
        self.list_failures = list_failures
        self.list_code = code
        self.listings = 0

    def list_rewards(self, timeout: float | None = None) -> list:
        from dancegrpo_proto.v1 import rewards_pb2 as pb

        self.listings += 1
        if self.listings <= self.list_failures:
            raise RewardServiceError("fake:1", "", self.list_code, "replica restarting")
        scope = pb.SCORING_SCOPE_GROUP
        return [pb.RewardInfo(name="color_match", output_names=["score"], scoring_scope=scope)]


def test_the_first_steps_list_rewards_rides_out_an_outage_too(caplog):
    client = _FlakyListing(list_failures=4)
    scorer = _scorer(client, budget_s=60)
    with caplog.at_level(logging.WARNING, "dancegrpo_trainer.scoring"):
        scores = scorer.submit(FRAMES, PROMPTS, groups=[0, 0]).result()
    np.testing.assert_array_equal(scores.terms["color_match/score"], [0.0, 1.0])
    assert client.listings == 5
    assert client.calls[0]["group_sizes"] == [2]  # learnt from the listing that succeeded
    assert "UNAVAILABLE for 0 s; resending" in caplog.records[0].getMessage()
    scorer.submit(FRAMES, PROMPTS, groups=[0, 0]).result()
    assert client.listings == 5  # asked once per target


def test_list_rewards_gives_up_past_the_budget_and_at_once_on_other_errors():
    client = _FlakyListing(list_failures=10**6)
    with pytest.raises(RewardScoringError, match=r"reading ListRewards.*outage_budget_s = 0\.2"):
        _scorer(client, budget_s=0.2).submit(FRAMES, PROMPTS, groups=[0, 0])
    assert client.listings > 1 and not client.calls
    client = _FlakyListing(list_failures=1, code=grpc.StatusCode.PERMISSION_DENIED)
    with pytest.raises(RewardScoringError, match="PERMISSION_DENIED.*reading ListRewards"):
        _scorer(client, budget_s=60).submit(FRAMES, PROMPTS, groups=[0, 0])
    assert client.listings == 1


@pytest.mark.parametrize("value", ["-1", ".nan", ".inf"])
def test_outage_budget_is_validated(value: str):
    with pytest.raises(ConfigError, match=r"rewards\.outage_budget_s: must be a finite number"):
        load_config(ROOT / "configs/demo_grpo.yaml", [f"rewards.outage_budget_s={value}"])
    with pytest.raises(ConfigError, match=r"rewards\.outage_budget_s"):
        load_config(ROOT / "configs/demo_grpo.yaml", ["rewards.outage_budget_s=soon"])
    assert load_config(ROOT / "configs/demo_grpo.yaml").rewards.outage_budget_s == 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(target: str, out: Path):
    return load_config(
        ROOT / "configs/demo_grpo.yaml",
        [
            f"rewards.endpoints.0.target={target}",
            f"run.output_dir={out}",
            "run.progress=false",
            "run.checkpoint_every=0",
            "run.sample_grid_every=0",
            "run.max_steps=3",
            "sampling.prompts_per_step=2",
            "sampling.group_size=4",
            "sampling.num_steps=4",
            "sampling.rollout_batch_size=4",
            "train.micro_batch_size=4",
            "data.eval_prompts=[]",
        ],
    )


def _train_records(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timings = {"sample_s", "reward_wait_s", "train_s", "step_s"}
    return [{k: v for k, v in r.items() if k not in timings} for r in rows]


def _params(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.policy.trainable_module().state_dict().items()}


def test_training_rides_out_a_reward_server_restart_with_identical_results(tmp_path: Path):
    from dancegrpo_testing.servers import running_reward_server

    demo = ROOT / "services/demo.yaml"
    port = _free_port()
    with running_reward_server(demo, metrics=False, port=port) as server:
        full = Trainer(_config(server.target, tmp_path / "full"))
        full.train()
        full.close()

    with contextlib.ExitStack() as servers:
        server = servers.enter_context(running_reward_server(demo, metrics=False, port=port))
        trainer = Trainer(_config(server.target, tmp_path / "outage"))
        submit = trainer.scorer.submit
        submitted = []
        restarted = threading.Event()

        def restart_later() -> None:
            time.sleep(3.0)
            servers.enter_context(running_reward_server(demo, metrics=False, port=port))
            restarted.set()

        def submit_killing_the_server(*args, **kwargs):
            submitted.append(len(submitted))
            if len(submitted) == 3:  # step 2, first of its two rollout chunks
                server.process.kill()  # kill -9, no drain
                server.process.wait()
                threading.Thread(target=restart_later, daemon=True).start()
            return submit(*args, **kwargs)

        trainer.scorer.submit = submit_killing_the_server
        trainer.train()
        trainer.close()
        assert restarted.is_set()  # the run outlived the outage, not the other way round

    assert len(submitted) == 6
    assert _train_records(tmp_path / "outage") == _train_records(tmp_path / "full")
    for key, value in _params(full).items():
        torch.testing.assert_close(_params(trainer)[key], value, rtol=0, atol=0)
