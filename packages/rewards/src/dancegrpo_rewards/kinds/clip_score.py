"""``clip``: CLIP score, the text–image alignment reward.

``score`` is the cosine of the L2-normalised image and prompt features; ``clip_score`` is
``100 * max(cos, 0)``, the convention of Hessel et al. 2021 as implemented by torchmetrics'
``CLIPScore`` (``torchmetrics.functional.multimodal.clip_score``). The backbone is an
open_clip model (``arch`` + ``checkpoint``) or a Hugging Face ``CLIPModel`` folder
(``hf_path``), see ``backbone``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.base import Reward, RewardBatch
from dancegrpo_rewards.kinds.backbone import ClipEncoder, check_backbone_options, resolve_backbone
from dancegrpo_rewards.kinds.checkpoints import version_string
from dancegrpo_rewards.kinds.options import (
    check_device,
    check_dtype,
    check_non_negative,
    parse_options,
)
from dancegrpo_rewards.kinds.runtime import TextFeatureCache, torch_device, torch_dtype

DOCS_SECTION = "clip"


@dataclasses.dataclass(frozen=True)
class CLIPScoreOptions:
    """Options of the ``clip`` kind.

    Attributes:
        hf_path: a Hugging Face ``CLIPModel`` folder; or else
        checkpoint: an open_clip checkpoint file, with
        arch: its open_clip model name or config JSON path (e.g. ``ViT-L-14-quickgelu``
            for OpenAI's ViT-L/14, ``ViT-H-14`` for LAION's).
        quick_gelu: force QuickGELU (open_clip only; OpenAI weights need it unless the
            arch name ends in ``-quickgelu``).
        device, dtype, text_cache_size: as for every model-backed kind.
    """

    hf_path: str | None = None
    checkpoint: str | None = None
    arch: str | None = None
    quick_gelu: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    text_cache_size: int = 4096

    def __post_init__(self) -> None:
        check_backbone_options(self.hf_path, self.checkpoint, self.arch)
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)
        check_non_negative("text_cache_size", self.text_cache_size)


class CLIPScoreReward(Reward):
    """CLIP text–image alignment; outputs ``score`` (cosine) and ``clip_score`` (0–100)."""

    kind = "clip"
    modality = "image"
    description = "CLIP score: cosine(image, prompt) and 100*max(cos, 0) (torchmetrics CLIPScore)"
    requires_prompt = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(CLIPScoreOptions, options, reward_name=name)
        self.backbone = resolve_backbone(
            reward_name=name,
            hf_path=self.config.hf_path,
            checkpoint=self.config.checkpoint,
            arch=self.config.arch,
            quick_gelu=self.config.quick_gelu,
            docs_section=DOCS_SECTION,
        )
        self._version = version_string(
            self.kind, self.backbone.digests, {**self.backbone.identity, "dtype": self.config.dtype}
        )
        self._encoder: ClipEncoder | None = None
        self._text_cache = TextFeatureCache(self.config.text_cache_size)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score", "clip_score")

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Loads the backbone on the configured device/dtype."""
        self._encoder = self.backbone.load(
            torch_device(self.config.device, reward_name=self.name), torch_dtype(self.config.dtype)
        )

    @property
    def encoder(self) -> ClipEncoder:
        """The loaded backbone (``load()`` is called on first use if the server did not)."""
        if self._encoder is None:
            self.load()
        assert self._encoder is not None
        return self._encoder

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``score = cos(image, prompt)``, ``clip_score = 100 * max(score, 0)``; float32 ``(N,)``."""
        encoder = self.encoder
        image_features = encoder.encode_images(list(batch.media))
        text_features = self._text_cache.features(batch.prompts, encoder.encode_text)
        cosine = (image_features * text_features).sum(dim=-1)
        return {
            "score": cosine.cpu().numpy().astype(np.float32),
            "clip_score": (100 * cosine.clamp(min=0)).cpu().numpy().astype(np.float32),
        }
