"""The algorithm interface: an algorithm plugs in through the registry alone.

A toy forward-process algorithm (reward-weighted flow matching on the final latents of
deterministic ODE rollouts, the shape of DiffusionNFT: ``stochastic="none"``, no
log-probs, its own checkpointed state) trains through the unchanged trainer, resumes
bit-exactly, and its state survives the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from dancegrpo_testing.scorers import RednessScorer
from dancegrpo_trainer.algorithms import ALGORITHMS
from dancegrpo_trainer.algorithms.base import Algorithm, LossTerm, RolloutSpec
from dancegrpo_trainer.config import ConfigError, config_from_dict
from dancegrpo_trainer.rollout import Rollout
from dancegrpo_trainer.trainer import Trainer

SEEN: list[Rollout] = []


class RewardWeightedFlowMatching(Algorithm):
    """``mean(relu(A)·‖v_θ(x_σ, σ) − (ε − x0)‖²)`` at a random σ per sample, ``x0`` the
    rollout's final latent. Counts its optimiser steps as checkpointed state."""

    name = "rwfm"

    def __init__(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        super().__init__(*args, **kwargs)
        self.steps_taken = torch.zeros((), dtype=torch.int64)

    def rollout_spec(self) -> RolloutSpec:
        return RolloutSpec(stochastic="none", keep=())

    def terms(self, rollout: Rollout, generator: torch.Generator | None) -> list[int]:
        SEEN.append(rollout)
        return [int(torch.randint(0, 2**31 - 1, (1,), generator=generator))]

    def loss(self, batch: Rollout, advantages: torch.Tensor, term: int) -> LossTerm:
        g = torch.Generator().manual_seed(term)
        x0 = batch.latents[:, -1]
        sigma = torch.rand(len(batch), generator=g) * 0.8 + 0.1
        eps = torch.randn(x0.shape, generator=g)
        s = sigma.view(-1, *[1] * (x0.ndim - 1))
        x_t = (1 - s) * x0 + s * eps
        timesteps = self.policy.schedule_from_sigmas(torch.cat([sigma, torch.zeros(1)])).timesteps
        v = self.policy.predict(x_t, timesteps, batch.cond)
        per_sample = ((v - (eps - x0)) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        loss = (advantages.clamp(min=0) * per_sample).mean()
        return LossTerm(loss=loss, metrics={"loss": float(loss.detach())})

    def after_optimizer_step(self, skipped: bool) -> None:
        self.steps_taken += int(not skipped)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"rwfm.steps_taken": self.steps_taken}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.steps_taken.copy_(state["rwfm.steps_taken"])


@pytest.fixture(autouse=True)
def registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setitem(ALGORITHMS, "rwfm", RewardWeightedFlowMatching)
    SEEN.clear()
    yield
    torch.set_num_threads(threads)


def _trainer(out: Path, max_steps: int, shared_noise: bool = False) -> Trainer:
    cfg = config_from_dict(
        {
            "model": {
                "kind": "tiny_flow",
                "options": {"latent_size": 4, "channels": 8, "embed_dim": 16, "num_blocks": 1},
            },
            "rewards": {"endpoints": [{"target": "x:1", "reward": "r"}]},
            "sampling": {
                "num_steps": 4,
                "group_size": 4,
                "prompts_per_step": 2,
                "rollout_batch_size": 3,
                "shared_noise": shared_noise,
            },
            "train": {"algorithm": "rwfm", "learning_rate": 1e-2, "micro_batch_size": 3},
            "data": {"train_prompts": ["a red square", "a blue square", "a green square"]},
            "run": {
                "output_dir": str(out),
                "progress": False,
                "sample_grid_every": 0,
                "max_steps": max_steps,
                "checkpoint_every": 1,
            },
        }
    )
    return Trainer(cfg, scorer=RednessScorer())


def test_an_ode_rollout_algorithm_trains_through_the_registry_and_resumes_exactly(tmp_path):
    full = _trainer(tmp_path / "full", 2)
    before = {k: v.clone() for k, v in full.policy.trainable_module().state_dict().items()}
    record = full.train_step()
    full.train()
    full.close()
    assert isinstance(full.algorithm, RewardWeightedFlowMatching)
    # Deterministic rollouts: nothing stochastic, nothing recorded, log-probs 0.
    assert SEEN and all(r.recorded_steps == [] and (r.log_probs == 0).all() for r in SEEN)
    assert record["grad_norm"] > 0 and "loss" in record and "ratio_min" not in record
    after = full.policy.trainable_module().state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert int(full.algorithm.steps_taken) == 2

    half = _trainer(tmp_path / "resumed", 1)
    half.train()
    half.close()
    resumed = _trainer(tmp_path / "resumed", 2)
    assert resumed.step == 1 and int(resumed.algorithm.steps_taken) == 1  # from the checkpoint
    resumed.train()
    resumed.close()
    for k, v in resumed.policy.trainable_module().state_dict().items():
        assert torch.equal(v, after[k]), k


def test_an_ode_rollout_algorithm_rejects_shared_group_noise(tmp_path):
    with pytest.raises(ConfigError, match="sampling.shared_noise: .*identical samples"):
        _trainer(tmp_path, 1, shared_noise=True)
