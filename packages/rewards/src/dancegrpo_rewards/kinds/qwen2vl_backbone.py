"""The Qwen2-VL parts of the preference models fine-tuned from it (HPSv3, VideoAlign):
qwen-vl-utils' image size rule (``resized_frame_size``), and the backbone,
``Qwen2VLModel`` built from a checkpoint's state dict, strictly, without its LM head.

The rewards read hidden states, never logits: ``lm_head`` is dropped and tied to the
embeddings so nothing is allocated or reported missing for it, and the vocabulary is the
checkpoint's embedding table (the fine-tunes appended reward tokens to the tokenizer).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

#: qwen-vl-utils' ``MAX_RATIO``: ``smart_resize`` rejects images (frames) longer than this.
MAX_ASPECT_RATIO = 200


def resized_frame_size(
    height: int, width: int, *, factor: int, min_pixels: int, max_pixels: int
) -> tuple[int, int]:
    """``(h, w)`` multiples of ``factor`` near the frame's aspect ratio with ``h·w`` in
    ``[min_pixels, max_pixels]`` (qwen-vl-utils ``smart_resize``).

    Rounded to the nearest multiple (Python's round, half to even, as qwen-vl-utils'
    ``round_by_factor``); if too large, both sides scaled by ``√(H·W / max_pixels)`` and
    floored; else if too small, scaled by ``√(min_pixels / (H·W))`` and ceiled (so
    ``max_pixels`` wins where it is below ``min_pixels``). Sides never drop below ``factor``
    (the reference can reach 0 only for aspect ratios it rejects anyway).
    """
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(f"aspect ratio of {height}x{width} exceeds {MAX_ASPECT_RATIO}")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


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
