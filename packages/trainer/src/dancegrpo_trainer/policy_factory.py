"""Builds the policy named by ``model.kind`` (adapters are imported only when used)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dancegrpo_trainer.config import (
    CFG_WEIGHT_OPTIONS,
    HUNYUAN_VIDEO_KINDS,
    QWEN_IMAGE_KINDS,
    WAN_KINDS,
    ConfigError,
    ModelConfig,
    expand_env,
)
from dancegrpo_trainer.policies.base import Policy

_AUTOCAST_DTYPES = {"no": None, "bf16": "bfloat16", "fp16": "float16"}


def build_policy(
    cfg: ModelConfig,
    device: torch.device,
    *,
    load_text_encoders: bool = True,
    mixed_precision: str | None = None,
    cfg_free: bool = False,
) -> Policy:
    """Instantiates the adapter for ``cfg.kind`` on ``device``.

    ``cfg.options`` are passed to the adapter's config (SD/SD3/FLUX/FLUX.1-Kontext/HunyuanVideo/
    SkyReels I2V/Qwen-Image/Wan; the video ones also get ``cfg.num_frames``) or constructor
    (tiny_flow); ``load_text_encoders=False`` skips text encoders when an embedding cache is used.
    ``mixed_precision`` (``train.mixed_precision``: ``no``/``bf16``/``fp16``) sets the diffusers
    adapters' CUDA autocast so that ``no`` really runs the model in its weight dtype
    (an explicit ``options.autocast_dtype`` wins). ``cfg_free`` (``train.cfg_free``) sets
    the classifier-free guidance weights of an adapter with CFG to 1 (``CFG_WEIGHT_OPTIONS``:
    one conditional forward per step), over ``model.guidance_scale`` and ``options``.
    """
    if cfg_free and cfg.kind not in CFG_WEIGHT_OPTIONS:
        raise ConfigError(f"train.cfg_free: model.kind {cfg.kind} has no classifier-free guidance")
    options = dict(cfg.options)
    if cfg.kind == "tiny_flow":
        from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy

        try:
            return TinyFlowPolicy(cfg.height, cfg.width, device=device, **options)
        except TypeError as e:
            raise ConfigError(f"model.options: {e}") from e
    path = expand_env(cfg.path or "", "model.path")
    common = dict(
        resolution=[cfg.height, cfg.width],
        guidance_scale=cfg.guidance_scale,
        dtype=cfg.dtype,
        device=str(device),
        load_text_encoders=load_text_encoders,
    )
    if mixed_precision is not None:
        common["autocast_dtype"] = _AUTOCAST_DTYPES[mixed_precision]
    common.update(options)
    if cfg_free:
        common.update(dict.fromkeys(CFG_WEIGHT_OPTIONS[cfg.kind], 1.0))
    if cfg.kind == "stable_diffusion":
        from dancegrpo_trainer.policies.stable_diffusion import (
            StableDiffusionConfig,
            StableDiffusionPolicy,
        )

        return StableDiffusionPolicy.from_pretrained(path, _make(StableDiffusionConfig, common))
    if cfg.kind == "flux":
        from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy

        return FluxPolicy.from_pretrained(path, _make(FluxConfig, common))
    if cfg.kind == "flux_kontext":
        from dancegrpo_trainer.policies.flux_kontext import FluxKontextConfig, FluxKontextPolicy

        return FluxKontextPolicy.from_pretrained(path, _make(FluxKontextConfig, common))
    if cfg.kind == "sd3":
        from dancegrpo_trainer.policies.sd3 import StableDiffusion3Config, StableDiffusion3Policy

        return StableDiffusion3Policy.from_pretrained(path, _make(StableDiffusion3Config, common))
    if cfg.kind in HUNYUAN_VIDEO_KINDS:
        if "num_frames" in options:
            raise ConfigError("model.options.num_frames: set model.num_frames instead")
        return _build_video_policy(cfg.kind, path, {**common, "num_frames": cfg.num_frames})
    if cfg.kind in QWEN_IMAGE_KINDS:
        common.pop("guidance_scale")  # no guidance embedding (checked 1.0): true_cfg_scale
        return _build_qwen_image_policy(cfg.kind, path, common)
    if cfg.kind in WAN_KINDS:
        if "num_frames" in options:
            raise ConfigError("model.options.num_frames: set model.num_frames instead")
        return _build_wan_policy(cfg.kind, path, {**common, "num_frames": cfg.num_frames})
    raise ConfigError(f"model.kind: unknown adapter {cfg.kind!r}")


#: Adapters whose CFG weight option has a default of its own (not ``model.guidance_scale``):
#: ``(module under policies, config class)``, read only when the option is unset.
_CFG_DEFAULT_CONFIGS = {
    "skyreels_i2v": ("skyreels_i2v", "SkyReelsI2VConfig"),
    "qwen_image": ("qwen_image", "QwenImageConfig"),
    "qwen_image_edit": ("qwen_image_edit", "QwenImageEditConfig"),
    "qwen_image_edit_plus": ("qwen_image_edit", "QwenImageEditPlusConfig"),
}


def cfg_weights(cfg: ModelConfig, *, cfg_free: bool = False) -> dict[str, float]:
    """The classifier-free guidance weights :func:`build_policy` gives the adapter of
    ``cfg.kind`` (``CFG_WEIGHT_OPTIONS``), keyed by the config field that sets each
    (``model.guidance_scale`` or ``model.options.<name>``, where the adapter's own default
    applies when it is unset); ``{}`` for adapters without CFG. A weight above 1 runs a
    second, unconditional forward per step. Wan's ``guidance_scale_2`` left unset follows
    ``guidance_scale`` and is not listed; ``cfg_free`` (``train.cfg_free``) sets all to 1.
    """
    out: dict[str, float] = {}
    for name in CFG_WEIGHT_OPTIONS.get(cfg.kind, ()):
        field = f"model.options.{name}"
        if cfg_free:
            value = 1.0
        elif name in cfg.options:
            value = cfg.options[name]
        elif name == "guidance_scale":
            field, value = "model.guidance_scale", cfg.guidance_scale
        elif cfg.kind in _CFG_DEFAULT_CONFIGS:
            import dataclasses
            import importlib

            module, cls_name = _CFG_DEFAULT_CONFIGS[cfg.kind]
            cls = getattr(importlib.import_module(f"dancegrpo_trainer.policies.{module}"), cls_name)
            value = {f.name: f.default for f in dataclasses.fields(cls)}[name]
        else:
            value = None
        if value is not None:
            out[field] = float(value)
    return out


def _build_video_policy(kind: str, path: str, options: dict) -> Policy:
    """HunyuanVideo T2V or SkyReels I2V (the same loader and geometry; SkyReels adds the
    reference image and true CFG, ``options.true_cfg_scale`` / ``negative_prompt``)."""
    if kind == "skyreels_i2v":
        from dancegrpo_trainer.policies.skyreels_i2v import SkyReelsI2VConfig, SkyReelsI2VPolicy

        return SkyReelsI2VPolicy.from_pretrained(path, _make(SkyReelsI2VConfig, options))
    from dancegrpo_trainer.policies.hunyuan_video import HunyuanVideoConfig, HunyuanVideoPolicy

    return HunyuanVideoPolicy.from_pretrained(path, _make(HunyuanVideoConfig, options))


def _build_qwen_image_policy(kind: str, path: str, options: dict) -> Policy:
    """Qwen-Image (text-to-image), Qwen-Image-Edit or Qwen-Image-Edit-Plus."""
    if kind == "qwen_image":
        from dancegrpo_trainer.policies.qwen_image import QwenImageConfig, QwenImagePolicy

        return QwenImagePolicy.from_pretrained(path, _make(QwenImageConfig, options))
    from dancegrpo_trainer.policies import qwen_image_edit as edit

    if kind == "qwen_image_edit":
        return edit.QwenImageEditPolicy.from_pretrained(
            path, _make(edit.QwenImageEditConfig, options)
        )
    return edit.QwenImageEditPlusPolicy.from_pretrained(
        path, _make(edit.QwenImageEditPlusConfig, options)
    )


def _build_wan_policy(kind: str, path: str, options: dict) -> Policy:
    """Wan T2V (``wan_t2v``) or image-to-video (``wan_i2v``, and ``wan_ti2v``, which also
    runs from text alone); the checkpoint decides one or two experts and TI2V's layout."""
    from dancegrpo_trainer.policies.wan import WanConfig, WanPolicy
    from dancegrpo_trainer.policies.wan_i2v import WanI2VPolicy

    index_file = Path(path) / "model_index.json"
    if index_file.is_file():  # (a missing folder fails in from_pretrained, naming it)
        ti2v = bool(json.loads(index_file.read_text()).get("expand_timesteps", False))
        if kind == "wan_ti2v" and not ti2v:
            raise ConfigError(
                f"model.kind: {path} is not a Wan2.2 TI2V-5B checkpoint (no expand_timesteps "
                "in its model_index.json); use wan_t2v or wan_i2v"
            )
        if kind == "wan_i2v" and ti2v:
            raise ConfigError(f"model.kind: {path} is Wan2.2 TI2V-5B; use wan_ti2v")
    cls = WanPolicy if kind == "wan_t2v" else WanI2VPolicy
    return cls.from_pretrained(path, _make(WanConfig, options))


def _make(cls: type, kwargs: dict) -> object:
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.options: {e}") from e
