"""Device, dtype, loading and VAE helpers shared by the diffusers-based adapters (SD, FLUX,
and the models that follow): where each component lives, what precision it loads and runs
in, how images become latents and latents become ``uint8`` frames without holding a whole
batch of activations at once.
"""

from __future__ import annotations

import contextlib
import copy as _copy
import dataclasses
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def resolve_dtype(value: str | torch.dtype, field: str = "dtype") -> torch.dtype:
    """``"bfloat16"``/``"bf16"``/``torch.bfloat16`` → ``torch.bfloat16`` (and fp16, fp32)."""
    if isinstance(value, torch.dtype):
        return value
    try:
        return _DTYPES[str(value).lower()]
    except KeyError:
        raise ValueError(f"{field} must be one of {sorted(_DTYPES)}, got {value!r}") from None


@dataclasses.dataclass
class RuntimeConfig:
    """Placement and precision options common to every diffusers-based adapter.

    Attributes:
        device: device of the trainable model (UNet/transformer) and of the latents;
            ``None`` → ``"cuda"`` when available, else ``"cpu"``.
        dtype: weight dtype the components are loaded/cast to (``"float32"``,
            ``"bfloat16"``, ``"float16"``).
        autocast_dtype: mixed-precision dtype for the model forward on CUDA (``None`` turns
            autocast off; ignored on CPU). Step math is always float32.
        text_encoder_device: where the text encoders run (``None`` → ``device``); e.g.
            ``"cpu"`` to keep them off the training GPU.
        vae_device: where the VAE decodes (``None`` → ``device``).
        vae_decode_chunk_size: samples decoded per VAE call (bounds decode memory).
        load_text_encoders: ``False`` skips loading tokenizers and text encoders (use
            precomputed embeddings from :class:`dancegrpo_trainer.embedding_cache.EmbeddingCache`).
    """

    device: str | None = None
    dtype: str = "float32"
    autocast_dtype: str | None = "bfloat16"
    text_encoder_device: str | None = None
    vae_device: str | None = None
    vae_decode_chunk_size: int = 4
    load_text_encoders: bool = True

    def __post_init__(self) -> None:
        resolve_dtype(self.dtype, "dtype")
        if self.autocast_dtype is not None:
            resolve_dtype(self.autocast_dtype, "autocast_dtype")
        if self.vae_decode_chunk_size < 1:
            raise ValueError(
                f"vae_decode_chunk_size must be >= 1, got {self.vae_decode_chunk_size}"
            )
        for field in ("device", "text_encoder_device", "vae_device"):
            value = getattr(self, field)
            if value is not None:
                try:
                    torch.device(value)
                except RuntimeError as err:
                    raise ValueError(f"{field} is not a torch device: {value!r}") from err

    @property
    def torch_device(self) -> torch.device:
        if self.device is None:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    @property
    def torch_dtype(self) -> torch.dtype:
        return resolve_dtype(self.dtype)

    @property
    def text_device(self) -> torch.device:
        return (
            torch.device(self.text_encoder_device)
            if self.text_encoder_device
            else self.torch_device
        )

    @property
    def decode_device(self) -> torch.device:
        return torch.device(self.vae_device) if self.vae_device else self.torch_device

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast context for the model forward (active on CUDA with ``autocast_dtype``)."""
        device = self.torch_device
        if device.type != "cuda" or self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=resolve_dtype(self.autocast_dtype))


def parse_resolution(value: int | tuple[int, int] | list[int], multiple: int) -> tuple[int, int]:
    """``resolution`` (an int, or ``[height, width]``) → ``(height, width)`` in pixels,
    each a positive multiple of ``multiple`` (the latent → pixel factor of the model)."""
    if isinstance(value, int):
        height = width = value
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        height, width = int(value[0]), int(value[1])
    else:
        raise ValueError(f"resolution must be an int or [height, width], got {value!r}")
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        raise ValueError(
            f"resolution must be positive multiples of {multiple} for this model, "
            f"got {height}x{width}"
        )
    return height, width


def freeze(module: nn.Module | None) -> None:
    """Puts a frozen component (text encoder, VAE) in eval mode without gradients."""
    if module is not None:
        module.requires_grad_(False)
        module.eval()


def module_dtype(module: nn.Module) -> torch.dtype:
    """The dtype of a module's first floating-point parameter (float32 if it has none),
    skipping the layers a diffusers model keeps in float32 (``_keep_in_fp32_modules``, e.g.
    Wan's norms and time embedder), as diffusers' own ``ModelMixin.dtype`` does."""
    keep = _fp32_modules(module)
    for name, p in module.named_parameters():
        if p.is_floating_point() and not any(k in name for k in keep):
            return p.dtype
    return torch.float32


def _fp32_modules(module: nn.Module) -> list[str]:
    return list(getattr(module, "_keep_in_fp32_modules", None) or [])


def images_to_uint8(images: torch.Tensor) -> torch.Tensor:
    """VAE output in ``[-1, 1]``, ``[N, 3, H, W]`` → ``uint8`` ``[N, H, W, 3]`` on CPU.

    Same rounding as diffusers' ``VaeImageProcessor`` (``(x/2 + 0.5).clamp(0, 1)·255``,
    rounded).
    """
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    return (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()


def vae_decode(vae: nn.Module, latents: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Un-scales diffusers VAE latents (``/ scaling_factor + shift_factor``, as the SD and
    FLUX pipelines do) and decodes them on ``device`` to images in ``[-1, 1]``."""
    config = vae.config
    latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
    latents = latents.to(device, module_dtype(vae))
    return vae.decode(latents, return_dict=False)[0]


def vae_encode(vae: nn.Module, pixels: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Encodes images in ``[-1, 1]`` on ``device`` to float32 latents scaled as
    :func:`vae_decode` un-scales them: the posterior mode, ``(z − shift_factor) ·
    scaling_factor`` (the pipelines' ``retrieve_latents(..., sample_mode="argmax")``)."""
    posterior = vae.encode(pixels.to(device, module_dtype(vae))).latent_dist
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (posterior.mode().float() - shift) * vae.config.scaling_factor


def decode_to_uint8(
    decode_fn: Callable[[torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    chunk_size: int,
) -> torch.Tensor:
    """Decodes ``latents`` ``[N, ...]`` with ``decode_fn`` (images in ``[-1, 1]``,
    ``[n, 3, H, W]``) ``chunk_size`` rows at a time under ``no_grad``; each chunk becomes
    ``uint8`` (``images_to_uint8``) before the next is decoded, so only one chunk is ever
    held in float. Returns ``uint8`` ``[N, H, W, 3]`` on CPU."""
    outputs = []
    with torch.no_grad():
        for chunk in _chunks(latents, chunk_size):
            outputs.append(images_to_uint8(decode_fn(chunk)))
    return torch.cat(outputs)


def _chunks(x: torch.Tensor, size: int) -> Iterator[torch.Tensor]:
    for start in range(0, x.shape[0], size):
        yield x[start : start + size]


def transformers_dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """The ``from_pretrained`` dtype keyword for ``transformers`` models: ``dtype`` from
    4.56 on (``torch_dtype`` is deprecated there), ``torch_dtype`` before."""
    import transformers
    from packaging.version import Version

    if Version(transformers.__version__) >= Version("4.56"):
        return {"dtype": dtype}
    return {"torch_dtype": dtype}


def load_text_encoders(
    path: Path, dtype: torch.dtype, classes: Mapping[str, tuple[Any, Any]]
) -> dict[str, Any]:
    """Tokenizers and text encoders of a diffusers folder, keyed as the adapters'
    constructors take them: for each ``suffix`` of ``classes`` (``""``, ``"_2"``, ...),
    ``tokenizer<suffix>/`` with its tokenizer class and ``text_encoder<suffix>/`` with its
    ``transformers`` model class, in ``dtype``."""
    dtype_kwargs = transformers_dtype_kwargs(dtype)
    parts: dict[str, Any] = {}
    for suffix, (tokenizer_class, encoder_class) in classes.items():
        tokenizer, encoder = f"tokenizer{suffix}", f"text_encoder{suffix}"
        parts[tokenizer] = tokenizer_class.from_pretrained(path, subfolder=tokenizer)
        parts[encoder] = encoder_class.from_pretrained(path, subfolder=encoder, **dtype_kwargs)
    return parts


def place(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """Moves ``module`` to ``device`` and casts it to ``dtype`` only where it differs. The
    layers a diffusers model keeps in float32 (``_keep_in_fp32_modules``) stay float32, as
    ``from_pretrained(torch_dtype=...)`` leaves them."""
    module = module.to(device)
    if module_dtype(module) != dtype:
        nn.Module.to(module, dtype)  # (diffusers' own .to warns about the kept layers)
        keep = _fp32_modules(module)
        for name, p in module.named_parameters():
            if keep and any(k in name for k in keep) and p.is_floating_point():
                p.data = p.data.float()
    return module


def module_device(module: nn.Module) -> torch.device | None:
    """The device of a module's first parameter (``None`` if it has none)."""
    for p in module.parameters():
        return p.device
    return None


def _same_device(a: torch.device, b: torch.device) -> bool:
    if a.type != b.type:
        return False
    return a.index is None or b.index is None or a.index == b.index


def check_shared_placement(
    name: str, module: nn.Module, device: torch.device, dtype: torch.dtype
) -> None:
    """Raises unless a caller's ``module`` already sits on ``device`` in ``dtype``.

    ``from_pipeline`` shares the pipeline's modules and never moves or casts them: a
    mismatch would otherwise silently change the caller's pipeline.
    """
    where = module_device(module)
    if where is not None and not _same_device(where, device):
        raise ValueError(
            f"from_pipeline: the pipeline's {name} is on {where}, the config wants {device}; "
            "move the pipeline first (pipe.to(...)), set the config's device fields to match, "
            "or pass copy=True to place a copy"
        )
    have = module_dtype(module)
    if have != dtype:
        raise ValueError(
            f"from_pipeline: the pipeline's {name} is {have}, the config's dtype is {dtype}; "
            "set the config's dtype to match, or pass copy=True to cast a copy"
        )


def shared_or_copied(
    parts: dict[str, nn.Module | None],
    devices: Mapping[str, torch.device],
    dtype: torch.dtype,
    *,
    copy: bool,
) -> dict[str, nn.Module | None]:
    """A pipeline's modules as ``from_pipeline`` hands them to a policy's constructor: deep
    copies (``copy=True``; the constructor places, casts and freezes them), or the modules
    themselves after :func:`check_shared_placement` of each on ``devices[name]`` in
    ``dtype``."""
    if copy:
        return {k: _copy.deepcopy(v) if v is not None else None for k, v in parts.items()}
    for name, module in parts.items():
        if module is not None:
            check_shared_placement(name, module, devices[name], dtype)
    return parts


@contextlib.contextmanager
def preserved_module_state(modules: list[nn.Module | None]) -> Iterator[None]:
    """Restores each module's ``requires_grad`` flags and train/eval modes on exit, so a
    constructor that freezes its components leaves a caller's shared modules as they were
    (frozen parts run under ``torch.no_grad`` anyway)."""
    saved = [
        (m, [p.requires_grad for p in m.parameters()], [s.training for s in m.modules()])
        for m in modules
        if m is not None
    ]
    try:
        yield
    finally:
        for module, grads, modes in saved:
            for p, flag in zip(module.parameters(), grads, strict=True):
                p.requires_grad_(flag)
            for sub, mode in zip(module.modules(), modes, strict=True):
                sub.training = mode
