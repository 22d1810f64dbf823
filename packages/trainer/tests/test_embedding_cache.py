"""Prompt-embedding cache: write with a policy's text encoders, read back as Conditioning."""

from __future__ import annotations

import json

import pytest
import torch

from dancegrpo_testing.diffusion_models import (
    TINY_T5_MAX_LENGTH,
    save_pipeline,
    tiny_flux_pipeline,
    tiny_stable_diffusion_pipeline,
)
from dancegrpo_trainer.embedding_cache import EmbeddingCache, precompute_embeddings
from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy
from dancegrpo_trainer.policies.stable_diffusion import (
    StableDiffusionConfig,
    StableDiffusionPolicy,
)

PROMPTS = ["a cat", "a dog on a chair", "a red car", "a cat", "two birds in the sky"]


@pytest.fixture(scope="module")
def sd_pipe():
    return tiny_stable_diffusion_pipeline()


def _sd_policy(pipe, **overrides):
    options = {"resolution": 16, "device": "cpu"} | overrides
    return StableDiffusionPolicy.from_pipeline(pipe, StableDiffusionConfig(**options))


def test_round_trip_across_shards_equals_direct_encoding(sd_pipe, tmp_path):
    policy = _sd_policy(sd_pipe)
    precompute_embeddings(policy, PROMPTS, tmp_path, batch_size=2, shard_size=2)
    index = json.loads((tmp_path / "index.json").read_text())
    assert len(index["shards"]) == 2  # 4 unique prompts, 2 per shard
    assert index["policy"] == "StableDiffusionPolicy"

    cache = EmbeddingCache(tmp_path)
    assert len(cache) == 4 and "a red car" in cache
    query = ["two birds in the sky", "a cat", "a cat", "a dog on a chair"]
    cached = cache.lookup(query)
    direct = policy.encode_prompts(query)
    assert set(cached.tensors) == {"prompt_embeds", "negative_prompt_embeds"}
    for key, value in direct.tensors.items():
        torch.testing.assert_close(cached.tensors[key], value)


def test_flux_round_trip_in_bfloat16(tmp_path):
    pipe = tiny_flux_pipeline()
    policy = FluxPolicy.from_pipeline(
        pipe, FluxConfig(resolution=16, device="cpu", max_sequence_length=TINY_T5_MAX_LENGTH)
    )
    precompute_embeddings(policy, PROMPTS, tmp_path, batch_size=3, dtype=torch.bfloat16)
    cached = EmbeddingCache(tmp_path).lookup(PROMPTS[:3])
    direct = policy.encode_prompts(PROMPTS[:3])
    assert cached.tensors["prompt_embeds"].dtype == torch.bfloat16
    assert cached.tensors["prompt_embeds"].shape == (3, TINY_T5_MAX_LENGTH, 32)
    for key, value in direct.tensors.items():
        torch.testing.assert_close(cached.tensors[key], value.to(torch.bfloat16))


def test_policy_without_text_encoders_samples_from_cached_embeddings(sd_pipe, tmp_path):
    policy = _sd_policy(sd_pipe)
    precompute_embeddings(policy, PROMPTS, tmp_path / "cache")
    save_pipeline(sd_pipe, tmp_path / "sd")
    lean = StableDiffusionPolicy.from_pretrained(
        tmp_path / "sd",
        StableDiffusionConfig(resolution=16, device="cpu", load_text_encoders=False),
    )
    cond = EmbeddingCache(tmp_path / "cache").lookup(PROMPTS[:2])
    schedule = lean.schedule(2)
    x = lean.initial_noise(2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = lean.denoise_step(x, 0, schedule, cond, eta=0.0).prev_sample
        want = policy.denoise_step(
            x, 0, policy.schedule(2), policy.encode_prompts(PROMPTS[:2]), eta=0.0
        ).prev_sample
    torch.testing.assert_close(got, want)


def test_missing_prompt_is_named(sd_pipe, tmp_path):
    precompute_embeddings(_sd_policy(sd_pipe, guidance_scale=1.0), PROMPTS[:2], tmp_path)
    with pytest.raises(KeyError, match="an unknown prompt"):
        EmbeddingCache(tmp_path).lookup(["a cat", "an unknown prompt"])


def test_existing_cache_is_not_overwritten_by_default(sd_pipe, tmp_path):
    policy = _sd_policy(sd_pipe, guidance_scale=1.0)
    precompute_embeddings(policy, PROMPTS[:2], tmp_path)
    with pytest.raises(FileExistsError, match="overwrite"):
        precompute_embeddings(policy, PROMPTS[2:], tmp_path)
    precompute_embeddings(policy, PROMPTS[2:], tmp_path, overwrite=True)
    assert EmbeddingCache(tmp_path).prompts == ["a red car", "a cat", "two birds in the sky"]


def test_missing_cache_folder_explains_what_to_run(tmp_path):
    with pytest.raises(FileNotFoundError, match="preprocess"):
        EmbeddingCache(tmp_path)
