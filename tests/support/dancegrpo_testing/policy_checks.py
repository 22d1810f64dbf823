"""The guarantees every policy adapter's tests check, written once; each adapter's test file
calls them with its own tiny policy, pipeline and conditioning, and keeps the diffusers
pipeline calls (the reference) to itself.

- ``assert_eta0_matches_pipeline``: at η = 0 a rollout is the official pipeline's sampling
  (its schedule, final latents and decoded frames) and every log-probability is 0;
- ``assert_recompute_ratio_is_one``: recomputing each stored step gives its rollout
  log-probability exactly (the on-policy ratio is 1);
- ``grad_step``, ``assert_gradients_reach``, ``assert_frozen``: one GRPO-like backward, and
  where its gradients land;
- ``assert_lora_trains_only_adapters``: with LoRA on the default targets (each of which
  must exist in the model) only the adapters get gradients;
- ``assert_checkpointing_keeps_gradients``: activation checkpointing changes no gradient;
- ``assert_cache_matches_encoding``: embeddings precomputed into an ``EmbeddingCache``
  (plus condition images encoded apart, as the trainer does) equal direct encoding;
- ``unchanged_modules``: ``from_pipeline`` leaves the caller's modules as they were.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancegrpo_testing.diffusion_models import rollout_trajectory


def assert_eta0_matches_pipeline(
    policy: Any,
    cond: Any,
    scheduler: Any | None,
    latents: torch.Tensor,
    frames: np.ndarray,
    *,
    num_steps: int = 4,
    noise: torch.Tensor | None = None,
    sigma_atol: float = 1e-6,
    timestep_atol: float | None = None,
) -> torch.Tensor:
    """Samples ``num_steps`` steps at η = 0 from seed 0 (or from ``noise``, the pipeline's
    initial latents) and checks them against what the pipeline did: ``scheduler``'s sigmas
    (and timesteps, given ``timestep_atol``; no ``scheduler`` for DDIM, whose schedule has
    no sigmas), its final ``latents`` (1e-4) and its decoded ``frames`` (float in
    ``[0, 1]``, ``[N, H, W, 3]`` or ``[N, F, H, W, 3]``; ``uint8`` within 1). Every step's
    log-probability must be 0 (η = 0 is deterministic: no density). Returns the policy's
    final latents."""
    schedule, trajectory, log_probs = rollout_trajectory(
        policy, cond, num_steps, eta=0.0, seed=0, noise=noise
    )
    if scheduler is not None:
        torch.testing.assert_close(schedule.sigmas, scheduler.sigmas, atol=sigma_atol, rtol=0)
    if timestep_atol is not None:
        torch.testing.assert_close(
            schedule.timesteps, scheduler.timesteps, atol=timestep_atol, rtol=0
        )
    torch.testing.assert_close(trajectory[-1], latents, atol=1e-4, rtol=1e-4)
    assert torch.all(log_probs == 0)
    decoded = policy.decode(trajectory[-1])
    assert decoded.dtype == torch.uint8 and decoded.shape == frames.shape
    reference = np.round(frames * 255).astype(np.int16)
    assert np.abs(decoded.numpy().astype(np.int16) - reference).max() <= 1
    return trajectory[-1]


def recomputed_log_probs(
    policy: Any, cond: Any, schedule: Any, trajectory: Sequence[torch.Tensor], eta: float
) -> torch.Tensor:
    """``[N, n]`` log-probabilities of each stored step ``x_i → x_{i+1}`` recomputed
    (no grad), as a training pass does."""
    with torch.no_grad():
        return torch.stack(
            [
                policy.denoise_step(
                    trajectory[i], i, schedule, cond, eta=eta, prev_sample=trajectory[i + 1]
                ).log_prob
                for i in range(len(trajectory) - 1)
            ],
            dim=1,
        )


def assert_recompute_ratio_is_one(
    policy: Any, cond: Any, *, eta: float, num_steps: int = 3, seed: int = 3
) -> None:
    """A stochastic rollout's log-probabilities (finite, non-zero) recomputed step by step
    give ``exp(new − old) == 1`` exactly."""
    schedule, trajectory, rollout = rollout_trajectory(policy, cond, num_steps, eta=eta, seed=seed)
    assert torch.isfinite(rollout).all() and (rollout != 0).all()
    ratio = torch.exp(recomputed_log_probs(policy, cond, schedule, trajectory, eta) - rollout)
    assert torch.equal(ratio, torch.ones_like(ratio))


def grad_step(
    policy: Any, cond: Any, *, eta: float, seed: int, step: int = 0, num_steps: int = 2
) -> None:
    """Rolls out ``num_steps`` steps (no grad), then backpropagates the mean
    log-probability of step ``step`` recomputed with gradients."""
    schedule, trajectory, _ = rollout_trajectory(policy, cond, num_steps, eta=eta, seed=seed)
    out = policy.denoise_step(
        trajectory[step], step, schedule, cond, eta=eta, prev_sample=trajectory[step + 1]
    )
    out.log_prob.mean().backward()


def assert_gradients_reach(module: torch.nn.Module, parts: Sequence[str]) -> None:
    """Some parameter whose name contains each of ``parts`` has a non-zero gradient."""
    grads = {n: p.grad for n, p in module.named_parameters()}
    for part in parts:
        assert any(
            g is not None and float(g.abs().sum()) > 0 for n, g in grads.items() if part in n
        ), part


def assert_frozen(*modules: torch.nn.Module) -> None:
    """Each module is in eval mode, without ``requires_grad`` and without gradients."""
    for module in modules:
        assert not module.training
        assert all(not p.requires_grad and p.grad is None for p in module.parameters())


def assert_lora_trains_only_adapters(policy: Any, step: Callable[[], None]) -> None:
    """LoRA (rank 4) on ``policy.lora_target_modules`` of the frozen trainable module:
    every target exists in the model (a typo would silently train nothing), every adapter
    weight is trainable, and after ``step()`` (a first backward) the ``lora_B`` weights have
    non-zero gradients (``lora_A``'s are zero while ``lora_B`` starts at zero) and no base
    weight has one."""
    from peft import LoraConfig

    module = policy.trainable_module()
    module.requires_grad_(False)
    module.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=policy.lora_target_modules))
    step()
    lora = {n: p for n, p in module.named_parameters() if "lora_" in n}
    for target in policy.lora_target_modules:
        assert any(f"{target}.lora_A" in n for n in lora), target
    assert all(p.requires_grad for p in lora.values())
    assert any(float(p.grad.abs().sum()) > 0 for n, p in lora.items() if "lora_B" in n)
    assert all(p.grad is None for n, p in module.named_parameters() if "lora_" not in n)


def assert_checkpointing_keeps_gradients(
    make_policy: Callable[[], Any],
    step: Callable[[Any], None],
    *,
    atol: float = 1e-7,
    rtol: float = 1e-5,
) -> Any:
    """Two fresh policies from ``make_policy``, one with gradient checkpointing on, each in
    train mode through ``step(policy)`` (a backward): the trainable module's gradients are
    the same. Returns the checkpointed policy."""
    grads = []
    for checkpointing in (False, True):
        policy = make_policy()
        if checkpointing:
            policy.enable_gradient_checkpointing()
        module = policy.trainable_module()
        assert module.is_gradient_checkpointing == checkpointing
        module.train()
        step(policy)
        grads.append(
            {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
        )
    plain, checkpointed = grads
    assert plain and plain.keys() == checkpointed.keys()
    for name, grad in plain.items():
        torch.testing.assert_close(
            checkpointed[name], grad, atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}"
        )
    return policy


def assert_cache_matches_encoding(
    policy: Any,
    prompts: list[str],
    cache_dir: Path,
    *,
    images: torch.Tensor | None = None,
    image_policy: Any = None,
) -> Any:
    """Precomputes ``policy``'s embeddings of ``prompts`` into ``cache_dir`` and checks
    that the cache's rows (with ``images``: merged with ``image_policy``'s
    ``encode_condition_images``, a policy without text encoders, as the trainer encodes
    images at rollout) equal ``policy.encode_prompts`` exactly, key for key. Returns the
    ``EmbeddingCache``."""
    from dancegrpo_trainer.embedding_cache import EmbeddingCache, precompute_embeddings

    precompute_embeddings(policy, prompts, cache_dir)
    cache = EmbeddingCache(cache_dir)
    cached = dict(cache.lookup(prompts).tensors)
    if images is None:
        direct = policy.encode_prompts(prompts)
    else:
        direct = policy.encode_prompts(prompts, images)
        cached.update(image_policy.encode_condition_images(images).tensors)
    assert set(cached) == set(direct.tensors)
    for key, value in direct.tensors.items():
        torch.testing.assert_close(
            cached[key], value, rtol=0, atol=0, msg=lambda m, key=key: f"{key}: {m}"
        )
    return cache


def module_state(module: torch.nn.Module) -> tuple:
    """What wrapping a module must not change: ``requires_grad`` flags, train/eval modes,
    dtypes and devices."""
    return (
        [p.requires_grad for p in module.parameters()],
        [m.training for m in module.modules()],
        {p.dtype for p in module.parameters()},
        {p.device for p in module.parameters()},
    )


@contextlib.contextmanager
def unchanged_modules(pipe: Any, names: Sequence[str]) -> Iterator[None]:
    """Checks on leaving the block that each named module of ``pipe`` kept its
    :func:`module_state`."""
    before = {name: module_state(getattr(pipe, name)) for name in names}
    yield
    for name, state in before.items():
        assert module_state(getattr(pipe, name)) == state, name
