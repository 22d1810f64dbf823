"""The Qwen2-VL backbone of the preference models fine-tuned from it (HPSv3, VideoAlign):
``Qwen2VLModel`` built from a checkpoint's state dict, strictly, without its LM head.

The rewards read hidden states, never logits: ``lm_head`` is dropped and tied to the
embeddings so nothing is allocated or reported missing for it, and the vocabulary is the
checkpoint's embedding table (the fine-tunes appended reward tokens to the tokenizer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch


def embedding_rows(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Rows of the checkpoint's one ``embed_tokens.weight`` (its vocabulary size)."""
    keys = [k for k in state_dict if k.endswith("embed_tokens.weight")]
    if len(keys) != 1:
        raise ValueError(f"expected one embed_tokens.weight, found {keys}")
    return int(state_dict[keys[0]].shape[0])


def build_backbone(
    config: Any, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype, attn: str
) -> Any:
    """``Qwen2VLModel`` (vision tower + language model, eval mode) of ``config`` from
    ``state_dict`` in transformers-4 or -5 key names; a missing, unexpected or mis-shaped
    weight raises ``ValueError`` naming a few of them."""
    from transformers import Qwen2VLForConditionalGeneration

    weights = {k: v for k, v in state_dict.items() if not k.startswith("lm_head.")}
    config.tie_word_embeddings = True
    config.text_config.vocab_size = embedding_rows(weights)
    model, info = Qwen2VLForConditionalGeneration.from_pretrained(
        None,
        config=config,
        state_dict=weights,
        dtype=dtype,
        attn_implementation=attn,
        output_loading_info=True,
    )
    problems = {
        "missing": sorted(k for k in info["missing_keys"] if not k.startswith("lm_head.")),
        "unexpected": sorted(info["unexpected_keys"]),
        "mismatched": sorted(str(k) for k in info["mismatched_keys"]),
    }
    problems = {label: keys for label, keys in problems.items() if keys}
    if problems:
        detail = "; ".join(f"{label}: {', '.join(keys[:5])}" for label, keys in problems.items())
        raise ValueError(f"weights do not match config.json ({detail})")
    return model.model.eval()
