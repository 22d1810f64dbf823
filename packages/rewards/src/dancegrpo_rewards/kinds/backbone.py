"""The CLIP image/text backbone of the ``clip`` and ``aesthetic`` kinds.

Two interchangeable sources, chosen by options:

- open_clip: ``arch`` (model name or config JSON) + ``checkpoint`` (file), optional
  ``quick_gelu`` — see ``open_clip_common``;
- Hugging Face: ``hf_path``, a ``CLIPModel`` folder — see ``hf_clip_common``.

Both produce encoders with ``embed_dim``, ``encode_text(list[str]) -> [N, D]`` and
``encode_images(list[uint8 [H, W, 3]]) -> [N, D]``, float32 and L2-normalised.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from dancegrpo_rewards.kinds import hf_clip_common as hf
from dancegrpo_rewards.kinds import open_clip_common as oc
from dancegrpo_rewards.kinds.checkpoints import (
    checkpoint_error,
    file_digest,
    folder_digest,
    require_dir,
    require_file,
)
from dancegrpo_rewards.kinds.options import OptionError, option_path


class ClipEncoder(Protocol):
    """What the kinds need from a loaded CLIP (open_clip or Hugging Face)."""

    @property
    def embed_dim(self) -> int: ...

    def encode_text(self, prompts: list[str]) -> torch.Tensor: ...

    def encode_images(self, media: list[np.ndarray]) -> torch.Tensor: ...


def check_backbone_options(hf_path: str | None, checkpoint: str | None, arch: str | None) -> None:
    """Exactly one source: ``hf_path``, or ``checkpoint`` (with ``arch``)."""
    if hf_path and checkpoint:
        raise OptionError(
            "hf_path",
            "give either 'hf_path' (CLIPModel folder) or 'checkpoint' (open_clip), not both",
        )
    if not hf_path and not checkpoint:
        raise OptionError(
            "checkpoint",
            "required: an open_clip 'checkpoint' file (with 'arch') or an 'hf_path' folder",
        )
    if hf_path and arch is not None:
        raise OptionError("arch", "only used with 'checkpoint' (an HF folder has its own config)")
    if checkpoint:
        if not arch:
            raise OptionError(
                "arch", "required with 'checkpoint': an open_clip model name or config JSON path"
            )
        oc.check_arch("arch", arch)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """A resolved backbone: where its files are and what identifies them.

    Attributes:
        path: the open_clip checkpoint file, or the HF folder.
        arch: the open_clip arch (``None`` for HF).
        digests: fast fingerprints of the files, for ``version``.
        identity: output-affecting settings, for ``version``.
    """

    path: Path
    arch: str | None
    quick_gelu: bool
    what: str
    expected: str
    docs_section: str
    digests: dict[str, str]
    identity: dict[str, Any]

    def load(self, device: torch.device, dtype: torch.dtype) -> ClipEncoder:
        """Loads the model on ``device`` in ``dtype`` (eval mode)."""
        if self.arch is None:
            return hf.load_hf_clip_encoder(
                self.path,
                device=device,
                dtype=dtype,
                what=self.what,
                expected=self.expected,
                docs_section=self.docs_section,
            )
        return oc.load_open_clip_encoder(
            arch=self.arch,
            checkpoints=[(self.path, True)],
            quick_gelu=self.quick_gelu,
            device=device,
            dtype=dtype,
            what=self.what,
            expected=self.expected,
            docs_section=self.docs_section,
        )


OPEN_CLIP_EXPECTED = (
    "an open_clip checkpoint for `arch` (.safetensors, torch.save state dict or "
    "{'state_dict': ...}, or OpenAI's TorchScript ViT-L-14.pt)"
)
HF_EXPECTED = (
    "a Hugging Face CLIPModel folder (save_pretrained of CLIPModel and CLIPProcessor: config.json, "
    "weights, tokenizer files, preprocessor_config.json)"
)


def resolve_backbone(
    *,
    reward_name: str,
    hf_path: str | None,
    checkpoint: str | None,
    arch: str | None,
    quick_gelu: bool,
    docs_section: str,
    option_prefix: str = "",
) -> BackboneSpec:
    """Checks that the backbone's files exist and fingerprints them (at construction).

    ``option_prefix`` is how the reward names these options (``"clip_"`` for geneval's
    ``clip_hf_path``/``clip_checkpoint``), so errors name the key the user wrote.
    """
    if hf_path:
        key = f"{option_prefix}hf_path"
        path = option_path(reward_name, key, hf_path)
        what = f"reward {reward_name!r}: CLIPModel folder (option '{key}')"
        require_dir(
            path, [hf.CONFIG_FILE], what=what, expected=HF_EXPECTED, docs_section=docs_section
        )
        if not hf.has_weights(path):
            raise checkpoint_error(
                path, what, HF_EXPECTED, docs_section, "folder holds no model weights"
            )
        if not hf.has_processor_config(path):
            problem = f"folder lacks an image-processor config ({' or '.join(hf.PROCESSOR_FILES)})"
            raise checkpoint_error(path, what, HF_EXPECTED, docs_section, problem)
        return BackboneSpec(
            path=path,
            arch=None,
            quick_gelu=False,
            what=what,
            expected=HF_EXPECTED,
            docs_section=docs_section,
            digests={"hf_path": folder_digest(path)},
            identity={"source": "hf"},
        )
    assert checkpoint is not None and arch is not None
    key = f"{option_prefix}checkpoint"
    path = option_path(reward_name, key, checkpoint)
    what = f"reward {reward_name!r}: open_clip checkpoint (option '{key}')"
    require_file(path, what=what, expected=OPEN_CLIP_EXPECTED, docs_section=docs_section)
    return BackboneSpec(
        path=path,
        arch=arch,
        quick_gelu=quick_gelu,
        what=what,
        expected=OPEN_CLIP_EXPECTED,
        docs_section=docs_section,
        digests={"checkpoint": file_digest(path)},
        identity={
            "source": "open_clip",
            "arch": oc.arch_identity("arch", arch),
            "quick_gelu": quick_gelu,
        },
    )
