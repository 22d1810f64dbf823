"""``aesthetic``: the LAION aesthetic predictor v2 (christophschuhmann/improved-aesthetic-predictor).

An MLP on the L2-normalised OpenAI CLIP ViT-L/14 image embedding, trained on SAC + LAION
logos + AVA ratings (``sac+logos+ava1-l14-linearMSE.pth``). The published head is an
``nn.Sequential`` named ``layers``: Linear(768, 1024), Dropout(0.2), Linear(1024, 128),
Dropout(0.2), Linear(128, 64), Dropout(0.1), Linear(64, 16), Linear(16, 1) — no
activations — so its state dict has ``layers.{0,2,4,6,7}.{weight,bias}``. As in the
reference ``simple_inference.py``, the head runs in float32 on the normalised embedding.
Scores are on the 1–10 rating scale (most real images land in ~4–7).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dancegrpo_rewards.base import Reward, RewardBatch
from dancegrpo_rewards.kinds.backbone import ClipEncoder, check_backbone_options, resolve_backbone
from dancegrpo_rewards.kinds.checkpoints import (
    checkpoint_error,
    file_digest,
    load_state_dict_file,
    require_file,
    version_string,
)
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    option_path,
    parse_options,
)
from dancegrpo_rewards.kinds.runtime import torch_device, torch_dtype

DOCS_SECTION = "aesthetic"
#: open_clip arch of OpenAI's ViT-L/14 (QuickGELU), used when ``arch`` is not given.
DEFAULT_ARCH = "ViT-L-14-quickgelu"
MLP_EXPECTED = (
    "the LAION aesthetic predictor v2 head (sac+logos+ava1-l14-linearMSE.pth): a torch.save "
    "state dict with keys layers.{0,2,4,6,7}.{weight,bias}"
)
_LINEAR_INDICES = (0, 2, 4, 6, 7)


class AestheticMLP(nn.Module):
    """The published head; module names match the ``.pth`` state dict. ``[N, D] -> [N]``."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.layers(embedding).squeeze(-1)


def load_aesthetic_mlp(path: Path, *, what: str) -> AestheticMLP:
    """Loads the head from ``path`` (input size read from ``layers.0.weight``), eval mode."""
    state_dict = load_state_dict_file(
        path, what=what, expected=MLP_EXPECTED, docs_section=DOCS_SECTION
    )
    expected_keys = {f"layers.{i}.{p}" for i in _LINEAR_INDICES for p in ("weight", "bias")}
    if set(state_dict) != expected_keys:
        odd = sorted(set(state_dict) ^ expected_keys)[:4]
        raise checkpoint_error(
            path, what, MLP_EXPECTED, DOCS_SECTION, f"has the wrong keys (e.g. {', '.join(odd)})"
        )
    mlp = AestheticMLP(int(state_dict["layers.0.weight"].shape[1]))
    try:
        mlp.load_state_dict(state_dict)
    except RuntimeError as err:
        raise checkpoint_error(
            path, what, MLP_EXPECTED, DOCS_SECTION, f"has wrong shapes ({err})"
        ) from err
    return mlp.eval()


@dataclasses.dataclass(frozen=True)
class AestheticOptions:
    """Options of the ``aesthetic`` kind.

    Attributes:
        mlp_checkpoint: the aesthetic head ``sac+logos+ava1-l14-linearMSE.pth`` (required).
        hf_path: a Hugging Face ``CLIPModel`` folder (``openai/clip-vit-large-patch14``); or
        checkpoint: an open_clip checkpoint of OpenAI ViT-L/14 (e.g. OpenAI's ``ViT-L-14.pt``),
        arch: its open_clip arch; default ``ViT-L-14-quickgelu`` when ``checkpoint`` is set.
        quick_gelu, device, dtype: as for every model-backed kind (the head runs in fp32).
    """

    mlp_checkpoint: str | None = None
    hf_path: str | None = None
    checkpoint: str | None = None
    arch: str | None = None
    quick_gelu: bool = False
    device: str = "cpu"
    dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not self.mlp_checkpoint:
            raise OptionError(
                "mlp_checkpoint", "required: path of sac+logos+ava1-l14-linearMSE.pth"
            )
        arch = self.arch if self.arch is not None or self.hf_path else DEFAULT_ARCH
        check_backbone_options(self.hf_path, self.checkpoint, arch)
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)

    @property
    def effective_arch(self) -> str | None:
        """``arch``, defaulted to ``DEFAULT_ARCH`` for open_clip checkpoints."""
        return None if self.hf_path else (self.arch or DEFAULT_ARCH)


class AestheticReward(Reward):
    """LAION aesthetic predictor v2 on CLIP ViT-L/14 embeddings; output ``score`` (1–10)."""

    kind = "aesthetic"
    modality = "image"
    description = "LAION aesthetic predictor v2 (CLIP ViT-L/14 + MLP): rating on a 1-10 scale"
    requires_prompt = False

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(AestheticOptions, options, reward_name=name)
        assert self.config.mlp_checkpoint is not None
        self._mlp_what = f"reward {name!r}: aesthetic head (option 'mlp_checkpoint')"
        self.mlp_checkpoint = require_file(
            option_path(name, "mlp_checkpoint", self.config.mlp_checkpoint),
            what=self._mlp_what,
            expected=MLP_EXPECTED,
            docs_section=DOCS_SECTION,
        )
        self.backbone = resolve_backbone(
            reward_name=name,
            hf_path=self.config.hf_path,
            checkpoint=self.config.checkpoint,
            arch=self.config.effective_arch,
            quick_gelu=self.config.quick_gelu,
            docs_section=DOCS_SECTION,
        )
        digests = {**self.backbone.digests, "mlp_checkpoint": file_digest(self.mlp_checkpoint)}
        self._version = version_string(
            self.kind, digests, {**self.backbone.identity, "dtype": self.config.dtype}
        )
        self._encoder: ClipEncoder | None = None
        self._mlp: AestheticMLP | None = None

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("score",)

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Loads the CLIP backbone and the head; checks the embedding sizes agree."""
        device = torch_device(self.config.device, reward_name=self.name)
        mlp = load_aesthetic_mlp(self.mlp_checkpoint, what=self._mlp_what)
        encoder = self.backbone.load(device, torch_dtype(self.config.dtype))
        input_dim = mlp.layers[0].in_features
        if input_dim != encoder.embed_dim:
            raise checkpoint_error(
                self.mlp_checkpoint,
                self._mlp_what,
                MLP_EXPECTED,
                DOCS_SECTION,
                f"expects {input_dim}-d embeddings but the CLIP backbone gives {encoder.embed_dim}-d "
                "(the published head needs OpenAI CLIP ViT-L/14, 768-d)",
            )
        self._mlp = mlp.to(device)
        self._encoder = encoder

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``score = MLP(normalize(clip_image_embedding))``; float32 ``(N,)``."""
        if self._encoder is None or self._mlp is None:
            self.load()
        assert self._encoder is not None and self._mlp is not None
        embedding = self._encoder.encode_images(list(batch.media))  # float32, L2-normalised
        return {"score": self._mlp(embedding).cpu().numpy().astype(np.float32)}
