"""Hugging Face DINOv2 folders (``facebook/dinov2-*``) as image-feature encoders.

A folder saved with ``save_pretrained``: ``config.json`` (``model_type: dinov2``), the
weights and ``preprocessor_config.json`` (``BitImageProcessor``: shortest side → 256
bicubic, centre crop 224, ImageNet mean/std). The image feature is the model's
``pooler_output``: the class token after the final layer norm, which is what the official
DINOv2 backbone returns as ``x_norm_clstoken`` (github.com/facebookresearch/dinov2,
``DinoVisionTransformer.forward``). Loaded with ``local_files_only=True``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.kinds.checkpoints import (
    checkpoint_error,
    load_errors_as_checkpoint_error,
    require_dir,
)
from dancegrpo_rewards.kinds.hf_clip_common import (
    CONFIG_FILE,
    PROCESSOR_FILES,
    has_processor_config,
    has_weights,
    processor_pixels,
)

EXPECTED = (
    "a Hugging Face DINOv2 folder (save_pretrained of Dinov2Model and its image processor: "
    "config.json with model_type 'dinov2', weights, preprocessor_config.json)"
)


def check_dinov2_folder(path: Path, *, what: str, docs_section: str) -> None:
    """Raises ``CheckpointError`` naming ``path`` unless it holds a DINOv2 config, weights
    and an image-processor config."""
    require_dir(path, [CONFIG_FILE], what=what, expected=EXPECTED, docs_section=docs_section)
    try:
        model_type = json.loads((path / CONFIG_FILE).read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise checkpoint_error(
            path, what, EXPECTED, docs_section, f"has an unreadable config.json ({err})"
        ) from err
    if model_type != "dinov2":
        problem = f"is not a DINOv2 folder (config.json model_type is {model_type!r})"
        raise checkpoint_error(path, what, EXPECTED, docs_section, problem)
    if not has_weights(path):
        raise checkpoint_error(path, what, EXPECTED, docs_section, "folder holds no model weights")
    if not has_processor_config(path):
        problem = f"folder lacks an image-processor config ({' or '.join(PROCESSOR_FILES)})"
        raise checkpoint_error(path, what, EXPECTED, docs_section, problem)


@dataclasses.dataclass
class HFDinov2Encoder:
    """A loaded ``Dinov2Model`` + its image processor with L2-normalised image features."""

    model: Any
    processor: Any
    device: torch.device
    dtype: torch.dtype

    @property
    def embed_dim(self) -> int:
        """The feature (hidden) dimension."""
        return int(self.model.config.hidden_size)

    def encode_images(self, media: Sequence[np.ndarray]) -> torch.Tensor:
        """``[N, D]`` float32 L2-normalised class-token features of ``uint8 [H, W, 3]``
        images, preprocessed by the folder's own image processor (given ``uint8 [3, H, W]``
        tensors, channels said explicitly)."""
        pixels = processor_pixels(self.processor, media)
        out = self.model(pixel_values=pixels.to(self.device, self.dtype))
        return torch.nn.functional.normalize(out.pooler_output.float(), dim=-1)


def load_hf_dinov2_encoder(
    path: Path, *, device: torch.device, dtype: torch.dtype, what: str, docs_section: str
) -> HFDinov2Encoder:
    """Loads a DINOv2 folder (eval mode) on ``device`` in ``dtype``."""
    from transformers import AutoImageProcessor, Dinov2Model

    with load_errors_as_checkpoint_error(
        path, what=what, expected=EXPECTED, docs_section=docs_section
    ):
        model = Dinov2Model.from_pretrained(str(path), local_files_only=True)
        processor = AutoImageProcessor.from_pretrained(str(path), local_files_only=True)
    model = model.to(device=device, dtype=dtype).eval()
    return HFDinov2Encoder(model=model, processor=processor, device=device, dtype=dtype)
