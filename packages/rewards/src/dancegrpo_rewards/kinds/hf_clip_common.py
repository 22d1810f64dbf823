"""Hugging Face ``CLIPModel`` folders for the ``clip`` and ``aesthetic`` kinds.

A folder saved with ``save_pretrained`` (e.g. a local snapshot of
``openai/clip-vit-large-patch14``): ``config.json``, the weights, the tokenizer files and
``preprocessor_config.json``. Images and text go through the folder's own
``CLIPProcessor`` — the same preprocessing as torchmetrics' ``CLIPScore`` and the HF
examples — and features come from ``get_image_features`` / ``get_text_features``.
Loaded with ``local_files_only=True``: never a hub download.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.kinds.checkpoints import load_errors_as_checkpoint_error

#: The model config every CLIPModel folder holds.
CONFIG_FILE = "config.json"
#: Image-processor configs: hub folders have the first, transformers 5 writes the second.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json")


def _pooled(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected
    # feature; transformers 4 returned the tensor itself.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@dataclasses.dataclass
class HFClipEncoder:
    """A loaded ``CLIPModel`` + ``CLIPProcessor`` with L2-normalised encoders."""

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype

    @property
    def embed_dim(self) -> int:
        """The projection (feature) dimension."""
        return int(self.model.config.projection_dim)

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``[N, D]`` float32 L2-normalised text features.

        Padded to the longest prompt (the causal mask and end-of-text pooling make the
        features independent of padding) and truncated to the model's positions,
        keeping the end-of-text token.
        """
        max_length = int(self.model.config.text_config.max_position_embeddings)
        tokens = self.processor.tokenizer(
            prompts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        out = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1)

    def encode_images(self, media: Sequence[np.ndarray]) -> torch.Tensor:
        """``[N, D]`` float32 L2-normalised features of ``uint8 [H, W, 3]`` images.

        Images are handed to the processor as ``uint8 [3, H, W]`` tensors, as
        torchmetrics' CLIPScore does.
        """
        pixels = processor_pixels(self.processor, media)
        out = self.model.get_image_features(pixel_values=pixels.to(self.device, self.dtype))
        return torch.nn.functional.normalize(_pooled(out).float(), dim=-1)


def processor_pixels(processor: Any, media: Sequence[np.ndarray]) -> torch.Tensor:
    """``pixel_values`` of ``uint8 [H, W, 3]`` images through a Hugging Face image
    processor, handed over as ``uint8 [3, H, W]`` tensors (as torchmetrics' CLIPScore does)."""
    images = [torch.from_numpy(np.ascontiguousarray(m)).permute(2, 0, 1) for m in media]
    # Said, not inferred: a tiny crop such as 3 x 5 would be ambiguous to infer.
    return processor(images=images, return_tensors="pt", input_data_format="channels_first")[
        "pixel_values"
    ]


def has_processor_config(path: Path) -> bool:
    """Whether a CLIPModel folder holds an image-processor config."""
    return any((path / name).is_file() for name in PROCESSOR_FILES)


def has_weights(path: Path) -> bool:
    """Whether a CLIPModel folder holds a weights file."""
    return any((path / name).is_file() for name in _WEIGHT_FILES)


def load_hf_clip_encoder(
    path: Path,
    *,
    device: torch.device,
    dtype: torch.dtype,
    what: str,
    expected: str,
    docs_section: str,
) -> HFClipEncoder:
    """Loads a ``CLIPModel`` folder (eval mode) on ``device`` in ``dtype``."""
    from transformers import CLIPModel, CLIPProcessor

    with load_errors_as_checkpoint_error(
        path, what=what, expected=expected, docs_section=docs_section
    ):
        model = CLIPModel.from_pretrained(str(path), local_files_only=True)
        processor = CLIPProcessor.from_pretrained(str(path), local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    return HFClipEncoder(model=model, processor=processor, device=device, dtype=dtype)
