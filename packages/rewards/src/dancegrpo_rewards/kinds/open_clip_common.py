"""open_clip models for the ``hps``, ``clip`` and ``aesthetic`` kinds: build, load, encode.

An ``arch`` option is either an open_clip model name (``ViT-H-14``, ``ViT-L-14-quickgelu``)
or the path of an open_clip model-config JSON (the schema of open_clip's
``model_configs/*.json``, or an ``open_clip_config.json`` with a ``model_cfg`` key). A JSON
path is loaded through open_clip's own ``local-dir:`` schema from a temporary folder, so a
custom or tiny architecture goes through exactly the code path of a built-in one and
nothing is added to open_clip's global config registry.

Weights never come from a hub: the model is created with random weights
(``pretrained=None``) and the checkpoint file is loaded strictly (``load_open_clip_weights``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.kinds.checkpoints import checkpoint_error, load_state_dict_file
from dancegrpo_rewards.kinds.options import OptionError, resolve_path

# OpenAI CLIP's normalisation constants (open_clip.constants.OPENAI_DATASET_MEAN/STD);
# hpsv2 normalises with these for ViT-H-14 too.
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
# Keys of OpenAI's TorchScript CLIP files that are attributes, not parameters
# (open_clip.factory.load_state_dict drops the same ones).
_TORCHSCRIPT_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")


def is_config_path(arch: str) -> bool:
    """Whether ``arch`` names a config JSON file rather than a built-in model name."""
    return arch.endswith(".json") or os.sep in arch or arch.startswith(("~", "$"))


def read_arch_config(key: str, arch: str) -> dict[str, Any]:
    """Reads and checks an open_clip model-config JSON; errors name ``key`` and the path."""
    path = resolve_path(key, arch)
    if not path.is_file():
        raise OptionError(key, f"open_clip model-config JSON not found: {path}")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise OptionError(key, f"cannot read open_clip model-config JSON {path}: {err}") from err
    if isinstance(cfg, dict) and "model_cfg" in cfg:
        cfg = cfg["model_cfg"]
    if not isinstance(cfg, dict) or not all(
        k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")
    ):
        raise OptionError(
            key, f"{path} is not an open_clip model config (needs embed_dim, vision_cfg, text_cfg)"
        )
    return cfg


def check_arch(key: str, arch: str) -> None:
    """Validates an ``arch`` option at construction (file readable / name known)."""
    if is_config_path(arch):
        read_arch_config(key, arch)
        return
    import open_clip

    if arch not in open_clip.list_models():
        raise OptionError(
            key,
            f"unknown open_clip model {arch!r}; use a name from open_clip.list_models() or a config JSON path",
        )


def arch_identity(key: str, arch: str) -> Any:
    """What ``arch`` means for a version digest: the name, or the config's contents."""
    return read_arch_config(key, arch) if is_config_path(arch) else arch


class _DropRandomInitWarnings(logging.Filter):
    """Hides open_clip's "no weights loaded" warnings: weights are loaded right after."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not message.startswith(
            ("No pretrained weights loaded", "Local config loaded, but no CLIP")
        )


def create_open_clip(
    arch: str, *, quick_gelu: bool
) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    """A random-weight open_clip model (fp32, CPU) and its tokenizer for ``arch``."""
    quiet = _DropRandomInitWarnings()
    logging.getLogger().addFilter(quiet)
    try:
        return _create_open_clip(arch, quick_gelu=quick_gelu)
    finally:
        logging.getLogger().removeFilter(quiet)


def _create_open_clip(
    arch: str, *, quick_gelu: bool
) -> tuple[torch.nn.Module, Callable[..., torch.Tensor]]:
    import open_clip

    kwargs: dict[str, Any] = dict(
        pretrained=None,
        load_weights=False,
        force_quick_gelu=quick_gelu,
        pretrained_image=False,
        pretrained_text=False,
    )
    if not is_config_path(arch):
        return open_clip.create_model(arch, **kwargs), open_clip.get_tokenizer(arch)
    cfg = read_arch_config("arch", arch)
    with tempfile.TemporaryDirectory(prefix="dancegrpo-open-clip-") as tmp:
        wrapped = {"model_cfg": cfg, "preprocess_cfg": cfg.get("preprocess_cfg", {})}
        (Path(tmp) / "open_clip_config.json").write_text(json.dumps(wrapped))
        name = f"local-dir:{tmp}"
        return open_clip.create_model(name, **kwargs), open_clip.get_tokenizer(name)


def load_open_clip_weights(
    model: torch.nn.Module,
    path: Path,
    *,
    arch: str,
    what: str,
    expected: str,
    docs_section: str,
    strict: bool = True,
) -> None:
    """Loads a checkpoint file into ``model``; a mismatch raises ``CheckpointError``.

    ``strict=False`` allows keys of the model to be absent from the file (a partial
    checkpoint on top of a base one) but never keys the model does not have.
    """
    state_dict = load_state_dict_file(path, what=what, expected=expected, docs_section=docs_section)
    for k in _TORCHSCRIPT_EXTRA_KEYS:
        state_dict.pop(k, None)
    own = model.state_dict()
    if "logit_scale" in state_dict and "logit_scale" in own:
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(own["logit_scale"].shape)
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong_shape = sorted(
        k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape
    )
    if (strict and missing) or unexpected or wrong_shape:
        problems = []
        for label, keys in (
            ("missing", missing if strict else []),
            ("unexpected", unexpected),
            ("wrong shape", wrong_shape),
        ):
            if keys:
                problems.append(f"{len(keys)} {label} keys (e.g. {', '.join(keys[:3])})")
        raise checkpoint_error(
            path,
            what,
            expected,
            docs_section,
            f"does not match arch {arch!r}: {'; '.join(problems)}",
        )
    model.load_state_dict(state_dict, strict=strict)


def open_clip_image_size(model: torch.nn.Module) -> int:
    """The square input size of an open_clip vision tower."""
    size = model.visual.image_size
    if isinstance(size, (tuple, list)):
        if size[0] != size[1]:
            raise ValueError(f"non-square open_clip image size {tuple(size)} is not supported")
        size = size[0]
    return int(size)


def hps_pixels(media: Sequence[np.ndarray], image_size: int) -> torch.Tensor:
    """hpsv2's evaluation preprocessing: ``[N, 3, S, S]`` float32, OpenAI-normalised.

    Mirrors ``hpsv2.src.open_clip.transform.image_transform(..., resize_longest_max=True)``
    (what ``hpsv2.img_score`` uses): ``ToTensor`` (uint8 → float in [0, 1], CHW) *first*,
    then ``ResizeMaxSize`` on that tensor — scale = S / max(H, W), new size
    ``round(dim * scale)`` (Python rounding), torchvision bicubic resize with antialias,
    zero-padding to a centred S×S square — then Normalize(OpenAI mean/std). No clamping
    after the bicubic resize, as in hpsv2. One deviation: hpsv2 skips the padding when the
    longest side already equals S (a non-square tensor would then crash the ViT); we pad.

    Args:
        media: ``uint8 [H, W, 3]`` images.
        image_size: S, the model's input size.
    """
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    mean = torch.tensor(OPENAI_MEAN).view(3, 1, 1)
    std = torch.tensor(OPENAI_STD).view(3, 1, 1)
    out = torch.empty(len(media), 3, image_size, image_size)
    for i, image in enumerate(media):
        x = (
            torch.from_numpy(np.ascontiguousarray(image))
            .permute(2, 0, 1)
            .to(torch.float32)
            .div(255)
        )
        height, width = x.shape[1:]
        scale = image_size / float(max(height, width))
        if scale != 1.0:
            new_size = [round(height * scale), round(width * scale)]
            x = TF.resize(x, new_size, InterpolationMode.BICUBIC, antialias=True)
        pad_h = image_size - x.shape[1]
        pad_w = image_size - x.shape[2]
        if pad_h or pad_w:
            x = TF.pad(x, [pad_w // 2, pad_h // 2, pad_w - pad_w // 2, pad_h - pad_h // 2], fill=0)
        out[i] = (x - mean) / std
    return out


@dataclasses.dataclass
class OpenClipEncoder:
    """A loaded open_clip model on its device/dtype with L2-normalised encoders.

    Attributes:
        model: the open_clip ``CLIP`` in eval mode.
        tokenizer: open_clip tokenizer, ``list[str] -> int64 [N, context_length]``.
        device, dtype: where and in which precision the model runs.
    """

    model: torch.nn.Module
    tokenizer: Callable[..., torch.Tensor]
    device: torch.device
    dtype: torch.dtype
    _transform: Callable[[Any], torch.Tensor] | None = dataclasses.field(
        default=None, init=False, repr=False
    )

    @property
    def image_size(self) -> int:
        """The model's square input size S."""
        return open_clip_image_size(self.model)

    @property
    def embed_dim(self) -> int:
        """The image feature dimension."""
        return int(self.model.visual.output_dim)

    def encode_images(self, media: Sequence[np.ndarray]) -> torch.Tensor:
        """``[N, D]`` features of ``uint8 [H, W, 3]`` images with open_clip's preprocessing."""
        return self.encode_pixels(self.standard_pixels(media))

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``[N, D]`` float32 L2-normalised text features."""
        tokens = self.tokenizer(prompts).to(self.device)
        features = self.model.encode_text(tokens).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[N, D]`` float32 L2-normalised image features of ``[N, 3, S, S]`` pixels."""
        features = self.model.encode_image(pixels.to(self.device, self.dtype)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    def standard_pixels(self, media: Sequence[np.ndarray]) -> torch.Tensor:
        """open_clip's own eval preprocessing (``preprocess_val``) of ``uint8 [H, W, 3]`` images.

        Built from the model's preprocess config (size, mean/std, interpolation, resize
        mode — for OpenAI/LAION ViTs: shortest side → S bicubic, centre crop, normalise),
        applied to PIL images exactly as ``open_clip.create_model_and_transforms`` does.
        """
        from PIL import Image

        if self._transform is None:
            import open_clip

            cfg = open_clip.get_model_preprocess_cfg(self.model)
            self._transform = open_clip.image_transform(
                self.image_size,
                is_train=False,
                mean=cfg.get("mean"),
                std=cfg.get("std"),
                interpolation=cfg.get("interpolation"),
                resize_mode=cfg.get("resize_mode"),
            )
        transform = self._transform
        return torch.stack([transform(Image.fromarray(np.ascontiguousarray(m))) for m in media])


def load_open_clip_encoder(
    *,
    arch: str,
    checkpoints: Sequence[tuple[Path, bool]],
    quick_gelu: bool,
    device: torch.device,
    dtype: torch.dtype,
    what: str,
    expected: str,
    docs_section: str,
) -> OpenClipEncoder:
    """Builds ``arch`` and loads ``checkpoints`` in order (``(path, strict)`` pairs)."""
    model, tokenizer = create_open_clip(arch, quick_gelu=quick_gelu)
    for path, strict in checkpoints:
        load_open_clip_weights(
            model,
            path,
            arch=arch,
            what=what,
            expected=expected,
            docs_section=docs_section,
            strict=strict,
        )
    model = model.to(device=device, dtype=dtype).eval()
    return OpenClipEncoder(model=model, tokenizer=tokenizer, device=device, dtype=dtype)
