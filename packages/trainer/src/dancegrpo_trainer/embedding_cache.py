"""Prompt-embedding precompute: encode a prompt list once with a policy's text encoders,
store the :class:`Conditioning` rows on disk, and look them up during training, so the
text encoders (T5-XXL alone is ~9 GB in bf16) need not sit on the training GPU.

Layout of a cache folder::

    index.json                   {"format", "version", "policy", "keys", "shards", "prompts"}
    shard-00000.safetensors      one tensor per Conditioning key, rows = prompts
    shard-00001.safetensors      ...

``index.json`` maps each prompt to ``[shard, row]`` and is written last (atomically), so a
folder with an index is complete. Rows are read through safetensors' memory map: a
lookup touches only the rows it returns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from dancegrpo_trainer.policies.base import Conditioning, Policy

INDEX_FILE = "index.json"
FORMAT = "dancegrpo-embeddings"
VERSION = 1


def _unique(prompts: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(prompts))


def precompute_embeddings(
    policy: Policy,
    prompts: Sequence[str],
    out_dir: str | Path,
    batch_size: int = 16,
    *,
    shard_size: int = 1024,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> Path:
    """Encodes ``prompts`` with ``policy.encode_prompts`` and writes them to ``out_dir``.

    Duplicate prompts are encoded once. Every tensor of the policy's conditioning (e.g.
    SD's ``prompt_embeds``/``negative_prompt_embeds``, FLUX's ``prompt_embeds``/
    ``pooled_prompt_embeds``) is stored row by row.

    Args:
        policy: a policy with its text encoders loaded.
        prompts: the prompt list (e.g. the lines of the training prompt file).
        out_dir: the cache folder (created).
        batch_size: prompts per ``encode_prompts`` call.
        shard_size: prompts per safetensors file (bounds the memory held while writing).
        dtype: store floating tensors in this dtype (e.g. ``torch.bfloat16`` halves FLUX's
            T5 embeddings); ``None`` keeps the encoder's dtype.
        overwrite: replace an existing cache in ``out_dir`` (otherwise an error).

    Returns:
        ``out_dir`` as a :class:`Path`.
    """
    from safetensors.torch import save_file

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}")
    unique = _unique(prompts)
    if not unique:
        raise ValueError("prompts is empty")
    out = Path(out_dir)
    index_path = out / INDEX_FILE
    if index_path.exists() and not overwrite:
        raise FileExistsError(f"{index_path} exists; pass overwrite=True to rebuild the cache")
    out.mkdir(parents=True, exist_ok=True)
    if index_path.exists():
        index_path.unlink()
        for old in out.glob("shard-*.safetensors"):
            old.unlink()

    shards: list[str] = []
    rows: dict[str, list[int]] = {}
    keys: dict[str, Any] = {}
    for shard_index, start in enumerate(range(0, len(unique), shard_size)):
        shard_prompts = unique[start : start + shard_size]
        parts = []
        for b in range(0, len(shard_prompts), batch_size):
            cond = policy.encode_prompts(shard_prompts[b : b + batch_size])
            parts.append(cond.to("cpu", dtype))
        tensors = {k: v.contiguous() for k, v in Conditioning.concat(parts).tensors.items()}
        if not keys:
            keys = {
                k: {"shape": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                for k, v in tensors.items()
            }
        name = f"shard-{shard_index:05d}.safetensors"
        save_file(tensors, str(out / name), metadata={"format": FORMAT})
        shards.append(name)
        for row, prompt in enumerate(shard_prompts):
            rows[prompt] = [shard_index, row]

    index = {
        "format": FORMAT,
        "version": VERSION,
        "policy": type(policy).__name__,
        "keys": keys,
        "shards": shards,
        "prompts": rows,
    }
    tmp = out / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, ensure_ascii=False))
    os.replace(tmp, index_path)
    return out


class EmbeddingCache:
    """Read side of a cache folder written by :func:`precompute_embeddings`.

    Example::

        cache = EmbeddingCache("runs/embeddings")
        cond = cache.lookup(["a photo of a cat", "a red car"])   # Conditioning, 2 rows
    """

    def __init__(self, out_dir: str | Path) -> None:
        self.path = Path(out_dir)
        index_path = self.path / INDEX_FILE
        if not index_path.is_file():
            raise FileNotFoundError(
                f"no embedding cache at {self.path} ({INDEX_FILE} missing); "
                "run `dancegrpo-train preprocess` first"
            )
        index = json.loads(index_path.read_text())
        if index.get("format") != FORMAT or index.get("version") != VERSION:
            raise ValueError(
                f"{index_path} is not a version-{VERSION} {FORMAT} index "
                f"(format={index.get('format')!r}, version={index.get('version')!r})"
            )
        self.policy_name: str = index["policy"]
        self.keys: dict[str, Any] = index["keys"]
        self._shards: list[str] = index["shards"]
        self._rows: dict[str, list[int]] = index["prompts"]
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, prompt: object) -> bool:
        return prompt in self._rows

    @property
    def prompts(self) -> list[str]:
        """The cached prompts, in the order they were written."""
        return list(self._rows)

    def _handle(self, shard: int) -> Any:
        from safetensors import safe_open

        if shard not in self._handles:
            path = self.path / self._shards[shard]
            self._handles[shard] = safe_open(str(path), framework="pt", device="cpu")
        return self._handles[shard]

    def lookup(
        self, prompts: Sequence[str], device: torch.device | str | None = None
    ) -> Conditioning:
        """The cached conditioning rows of ``prompts`` (repeats allowed), in order.

        Args:
            prompts: ``N`` prompts, each present in the cache.
            device: where to put the tensors (default CPU).

        Returns:
            a :class:`Conditioning` with ``N`` rows and the keys the policy produced.

        Raises:
            KeyError: naming the first prompts that are not cached.
        """
        missing = [p for p in prompts if p not in self._rows]
        if missing:
            shown = ", ".join(repr(p) for p in missing[:3])
            raise KeyError(
                f"{len(missing)} prompt(s) not in the embedding cache at {self.path}: {shown}"
                "; rerun preprocess with the current prompt file"
            )
        if not prompts:
            raise ValueError("prompts is empty")
        tensors: dict[str, torch.Tensor] = {}
        for key in self.keys:
            rows = []
            for prompt in prompts:
                shard, row = self._rows[prompt]
                rows.append(self._handle(shard).get_slice(key)[row : row + 1])
            tensors[key] = torch.cat(rows)
            if device is not None:
                tensors[key] = tensors[key].to(device)
        return Conditioning(tensors)
