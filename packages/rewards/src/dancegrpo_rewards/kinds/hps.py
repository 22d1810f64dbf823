"""``hps``: Human Preference Score v2 / v2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2).

HPS is an open_clip ``ViT-H-14`` fine-tuned on human preference pairs; the score of an
image for a prompt is the cosine of the L2-normalised image and text features (no logit
scale). This follows ``hpsv2.img_score.score`` exactly: hpsv2's evaluation preprocessing
(``open_clip_common.hps_pixels``), open_clip's tokenizer, and ``diag(img @ txt.T)`` per
pair. Typical scores are ~0.2–0.35; the DanceGRPO paper thresholds at 0.28.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.base import Reward, RewardBatch
from dancegrpo_rewards.kinds import open_clip_common as oc
from dancegrpo_rewards.kinds.checkpoints import file_digest, require_file, version_string
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    check_non_negative,
    option_path,
    parse_options,
)
from dancegrpo_rewards.kinds.runtime import TextFeatureCache, torch_device, torch_dtype

DOCS_SECTION = "hps"
EXPECTED = (
    "an HPS checkpoint (HPS_v2.1_compressed.pt / HPS_v2_compressed.pt: a torch.save dict with "
    "'state_dict', or a bare open_clip state dict, 'module.' prefixes allowed) matching `arch`"
)


@dataclasses.dataclass(frozen=True)
class HPSOptions:
    """Options of the ``hps`` kind.

    Attributes:
        checkpoint: path of the HPS checkpoint (required); it holds the full CLIP weights.
        arch: open_clip model name or model-config JSON path (HPS uses ``ViT-H-14``).
        base_checkpoint: optional open_clip checkpoint loaded first (e.g. ViT-H-14
            ``laion2b_s32b_b79k``), for HPS checkpoints that hold only some weights.
        quick_gelu: force QuickGELU activations (leave false for HPS).
        device: ``cpu``, ``cuda``, ``cuda:N``.
        dtype: ``fp32``, ``bf16`` or ``fp16`` weights and activations.
        text_cache_size: prompts whose text features are kept (LRU); 0 disables.
    """

    checkpoint: str | None = None
    arch: str = "ViT-H-14"
    base_checkpoint: str | None = None
    quick_gelu: bool = False
    device: str = "cpu"
    dtype: str = "fp32"
    text_cache_size: int = 4096

    def __post_init__(self) -> None:
        if not self.checkpoint:
            raise OptionError(
                "checkpoint", "required: path of HPS_v2.1_compressed.pt (see docs/rewards.md#hps)"
            )
        oc.check_arch("arch", self.arch)
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)
        check_non_negative("text_cache_size", self.text_cache_size)


class HPSReward(Reward):
    """HPS-v2/v2.1 score of each image for its prompt; output ``score`` (cosine)."""

    kind = "hps"
    modality = "image"
    description = (
        "Human Preference Score v2/v2.1 (open_clip ViT-H-14 + HPS checkpoint): cosine, ~0.2-0.35"
    )
    requires_prompt = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(HPSOptions, options, reward_name=name)
        assert self.config.checkpoint is not None
        self.checkpoint = require_file(
            option_path(name, "checkpoint", self.config.checkpoint),
            what=f"reward {name!r}: HPS checkpoint (option 'checkpoint')",
            expected=EXPECTED,
            docs_section=DOCS_SECTION,
        )
        self.base_checkpoint = None
        digests = {"checkpoint": file_digest(self.checkpoint)}
        if self.config.base_checkpoint:
            self.base_checkpoint = require_file(
                option_path(name, "base_checkpoint", self.config.base_checkpoint),
                what=f"reward {name!r}: open_clip base checkpoint (option 'base_checkpoint')",
                expected="an open_clip state dict for `arch`",
                docs_section=DOCS_SECTION,
            )
            digests["base_checkpoint"] = file_digest(self.base_checkpoint)
        self._version = version_string(
            self.kind,
            digests,
            {
                "arch": oc.arch_identity("arch", self.config.arch),
                "quick_gelu": self.config.quick_gelu,
                "dtype": self.config.dtype,
            },
        )
        self._encoder: oc.OpenClipEncoder | None = None
        self._text_cache = TextFeatureCache(self.config.text_cache_size)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score",)

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Builds ``arch`` and loads the base (if any) and HPS checkpoints strictly."""
        checkpoints = []
        if self.base_checkpoint is not None:
            checkpoints.append((self.base_checkpoint, True))
        checkpoints.append((self.checkpoint, self.base_checkpoint is None))
        self._encoder = oc.load_open_clip_encoder(
            arch=self.config.arch,
            checkpoints=checkpoints,
            quick_gelu=self.config.quick_gelu,
            device=torch_device(self.config.device, reward_name=self.name),
            dtype=torch_dtype(self.config.dtype),
            what=f"reward {self.name!r}: HPS checkpoint",
            expected=EXPECTED,
            docs_section=DOCS_SECTION,
        )

    @property
    def encoder(self) -> oc.OpenClipEncoder:
        """The loaded model (``load()`` is called on first use if the server did not)."""
        if self._encoder is None:
            self.load()
        assert self._encoder is not None
        return self._encoder

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``score[i] = cos(image_i, prompt_i)`` with hpsv2's preprocessing; float32 ``(N,)``."""
        encoder = self.encoder
        image_features = encoder.encode_pixels(oc.hps_pixels(batch.media, encoder.image_size))
        text_features = self._text_cache.features(batch.prompts, encoder.encode_text)
        scores = (image_features * text_features).sum(dim=-1)
        return {"score": scores.cpu().numpy().astype(np.float32)}
