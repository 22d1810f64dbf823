"""``image_similarity``: how much an image keeps of a reference image sent with it.

``score`` is the cosine of the L2-normalised image features of the sample and of its
condition image (the source of an edit; for image-to-video, wrap this kind in
``video_frames`` to compare sampled frames with the first-frame image). It is the
CLIP-I / DINO image–image similarity of subject-driven generation and editing benchmarks
(DreamBooth's CLIP-I and DINO metrics, Ruiz et al. 2023), here as a reward an editing run
trains beside an instruction-following one, so an edit both follows the instruction and
keeps the source.

Backbones (``backbone`` option):

- ``clip``: the ``clip`` kind's backbone, an open_clip model (``arch`` + ``checkpoint``)
  or a Hugging Face ``CLIPModel`` folder (``hf_path``), with its own preprocessing
  (``backbone.py``);
- ``dinov2``: a Hugging Face DINOv2 folder (``hf_path``), class-token features
  (``hf_dinov2_common.py``). DINO features track structure and identity more than
  semantics, which is often what "keeps the source" means.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from dancegrpo_rewards.base import Reward, RewardBatch
from dancegrpo_rewards.kinds import hf_dinov2_common as dino
from dancegrpo_rewards.kinds.backbone import check_backbone_options, resolve_backbone
from dancegrpo_rewards.kinds.checkpoints import folder_digest, version_string
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    option_path,
    parse_options,
)
from dancegrpo_rewards.kinds.runtime import torch_device, torch_dtype

DOCS_SECTION = "image_similarity"
BACKBONES = ("clip", "dinov2")


class ImageEncoder(Protocol):
    """What this kind needs from a loaded backbone."""

    def encode_images(self, media: Sequence[np.ndarray]) -> torch.Tensor: ...


@dataclasses.dataclass(frozen=True)
class ImageSimilarityOptions:
    """Options of the ``image_similarity`` kind.

    Attributes:
        backbone: ``clip`` or ``dinov2``.
        hf_path: a Hugging Face ``CLIPModel`` folder (``clip``) or DINOv2 folder
            (``dinov2``, required); or else, for ``clip`` only,
        checkpoint: an open_clip checkpoint file, with
        arch: its open_clip model name or config JSON path.
        quick_gelu: force QuickGELU (open_clip only).
        device, dtype: as for every model-backed kind.
    """

    backbone: str = "clip"
    hf_path: str | None = None
    checkpoint: str | None = None
    arch: str | None = None
    quick_gelu: bool = False
    device: str = "cpu"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise OptionError(
                "backbone", f"must be one of {', '.join(BACKBONES)}, got {self.backbone!r}"
            )
        if self.backbone == "clip":
            check_backbone_options(self.hf_path, self.checkpoint, self.arch)
        else:
            if not self.hf_path:
                raise OptionError("hf_path", "required with backbone 'dinov2': a DINOv2 folder")
            for key in ("checkpoint", "arch"):
                if getattr(self, key) is not None:
                    raise OptionError(key, "only used with backbone 'clip' (open_clip weights)")
            if self.quick_gelu:
                raise OptionError("quick_gelu", "only used with backbone 'clip'")
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)


class ImageSimilarityReward(Reward):
    """Image–image cosine between each sample and its condition image; output ``score``."""

    kind = "image_similarity"
    modality = "image"
    description = (
        "cosine(image features of the sample, of its condition image), CLIP or DINOv2: "
        "how much of the reference (edit source) the sample keeps"
    )
    requires_condition_image = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(ImageSimilarityOptions, options, reward_name=name)
        c = self.config
        if c.backbone == "clip":
            self._clip = resolve_backbone(
                reward_name=name,
                hf_path=c.hf_path,
                checkpoint=c.checkpoint,
                arch=c.arch,
                quick_gelu=c.quick_gelu,
                docs_section=DOCS_SECTION,
            )
            digests, identity = self._clip.digests, dict(self._clip.identity)
        else:
            assert c.hf_path is not None
            self._dino_path = option_path(name, "hf_path", c.hf_path)
            self._dino_what = f"reward {name!r}: DINOv2 folder (option 'hf_path')"
            dino.check_dinov2_folder(
                self._dino_path, what=self._dino_what, docs_section=DOCS_SECTION
            )
            digests, identity = {"hf_path": folder_digest(self._dino_path)}, {"source": "hf"}
        identity.update(backbone=c.backbone, dtype=c.dtype)
        self._version = version_string(self.kind, digests, identity)
        self._encoder: ImageEncoder | None = None

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score",)

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Loads the backbone on the configured device/dtype."""
        device = torch_device(self.config.device, reward_name=self.name)
        dtype = torch_dtype(self.config.dtype)
        if self.config.backbone == "clip":
            self._encoder = self._clip.load(device, dtype)
        else:
            self._encoder = dino.load_hf_dinov2_encoder(
                self._dino_path,
                device=device,
                dtype=dtype,
                what=self._dino_what,
                docs_section=DOCS_SECTION,
            )

    @property
    def encoder(self) -> ImageEncoder:
        """The loaded backbone (``load()`` is called on first use if the server did not)."""
        if self._encoder is None:
            self.load()
        assert self._encoder is not None
        return self._encoder

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``score = cos(features(sample), features(condition image))``, float32 ``(N,)`` in
        ``[-1, 1]``. Samples and references go through the encoder as one batch."""
        references = list(batch.condition_images)
        missing = [i for i, image in enumerate(references) if image is None]
        if missing:  # the server rejects these first (requires_condition_image)
            raise ValueError(f"samples {missing} have no condition image")
        n = len(batch)
        features = self.encoder.encode_images([*batch.media, *references])
        cosine = (features[:n] * features[n:]).sum(dim=-1)
        return {"score": cosine.cpu().numpy().astype(np.float32)}
