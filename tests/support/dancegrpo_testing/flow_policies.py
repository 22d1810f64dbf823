"""Every rectified-flow adapter of the trainer as a tiny random-weight policy on CPU (16 px,
5 frames for video; 32 px for Wan2.2 TI2V-5B, whose VAE is 16x), built from the tiny diffusers
pipelines of ``diffusion_models``, ``video_models``, ``qwen_image_models`` and ``wan_models``:
for tests that must hold on every flow policy kind."""

from __future__ import annotations

from typing import Any

import torch

#: The flow adapters (``model.kind``) :func:`tiny_flow_policy` builds (``wan_t2v``: Wan2.1,
#: one transformer; ``wan_i2v``: Wan2.1 I2V; ``wan_ti2v``: Wan2.2 TI2V-5B from an image).
FLOW_KINDS = (
    "tiny_flow",
    "flux",
    "hunyuan_video",
    "skyreels_i2v",
    "sd3",
    "flux_kontext",
    "qwen_image",
    "qwen_image_edit",
    "qwen_image_edit_plus",
    "wan_t2v",
    "wan_i2v",
    "wan_ti2v",
)
#: A builder name beside the kinds: Wan2.2 T2V-A14B (``model.kind`` ``wan_t2v``), two experts
#: with :meth:`Policy.step_groups`.
TWO_EXPERT_WAN = "wan22_t2v_a14b"
#: Kinds conditioned on one image per prompt (I2V, editing).
IMAGE_KINDS = (
    "skyreels_i2v",
    "flux_kontext",
    "qwen_image_edit",
    "qwen_image_edit_plus",
    "wan_i2v",
    "wan_ti2v",
)


def tiny_flow_policy(kind: str, **options: Any) -> Any:
    """The tiny ``kind`` policy (``options`` override its config: e.g. ``true_cfg_scale``)."""
    if kind == "tiny_flow":
        from dancegrpo_trainer.policies.tiny_flow import TinyFlowPolicy

        torch.manual_seed(0)
        return TinyFlowPolicy(
            8, 8, latent_size=4, channels=8, embed_dim=16, num_blocks=1, **options
        )
    from dancegrpo_testing import diffusion_models as dm
    from dancegrpo_testing import video_models as vm

    if kind == "flux":
        from dancegrpo_trainer.policies.flux import FluxConfig, FluxPolicy

        config = FluxConfig(
            resolution=16, device="cpu", max_sequence_length=dm.TINY_T5_MAX_LENGTH, **options
        )
        return FluxPolicy.from_pipeline(dm.tiny_flux_pipeline(), config, copy=True)
    if kind == "flux_kontext":
        from dancegrpo_trainer.policies.flux_kontext import FluxKontextConfig, FluxKontextPolicy

        config = FluxKontextConfig(
            resolution=16, device="cpu", max_sequence_length=dm.TINY_T5_MAX_LENGTH, **options
        )
        return FluxKontextPolicy.from_pipeline(dm.tiny_flux_kontext_pipeline(), config, copy=True)
    if kind == "sd3":
        from dancegrpo_trainer.policies.sd3 import StableDiffusion3Config, StableDiffusion3Policy

        config = StableDiffusion3Config(
            **{
                "resolution": 16,
                "device": "cpu",
                "max_sequence_length": dm.TINY_T5_MAX_LENGTH,
                "guidance_scale": 3.0,
                **options,
            }
        )
        return StableDiffusion3Policy.from_pipeline(dm.tiny_sd3_pipeline(), config, copy=True)
    video = dict(resolution=16, num_frames=5, device="cpu", crop_start=None)
    if kind == "hunyuan_video":
        from dancegrpo_trainer.policies.hunyuan_video import (
            HunyuanVideoConfig,
            HunyuanVideoPolicy,
        )

        config = HunyuanVideoConfig(
            **video, max_sequence_length=vm.TINY_LLAMA_MAX_LENGTH, **options
        )
        return HunyuanVideoPolicy.from_pipeline(vm.tiny_hunyuan_video_pipeline(), config, copy=True)
    if kind == "skyreels_i2v":
        from dancegrpo_trainer.policies.skyreels_i2v import SkyReelsI2VConfig, SkyReelsI2VPolicy

        config = SkyReelsI2VConfig(
            **{**video, "max_sequence_length": 16, "true_cfg_scale": 3.0, **options}
        )
        return SkyReelsI2VPolicy.from_pipeline(vm.tiny_skyreels_i2v_pipeline(), config, copy=True)
    if kind.startswith("qwen_image"):
        return _qwen_image_policy(kind, options)
    if kind.startswith("wan") or kind == TWO_EXPERT_WAN:
        return _wan_policy(kind, options)
    raise ValueError(f"unknown flow kind {kind!r}: choose from {FLOW_KINDS + (TWO_EXPERT_WAN,)}")


def _qwen_image_policy(kind: str, options: dict[str, Any]) -> Any:
    """Qwen-Image (true CFG 3), Edit or Edit-Plus at 16 px (small source-image areas)."""
    from dancegrpo_testing import qwen_image_models as qm
    from dancegrpo_trainer.policies import qwen_image as qi
    from dancegrpo_trainer.policies import qwen_image_edit as edit

    common = {
        "resolution": 16,
        "device": "cpu",
        "prompt_template_encode_start_idx": None,  # count with the tiny tokenizer
        "true_cfg_scale": 3.0,
        "negative_prompt": "blurry",
    }
    if kind == "qwen_image":
        config = qi.QwenImageConfig(**{**common, "max_sequence_length": 48, **options})
        return qi.QwenImagePolicy.from_pipeline(qm.tiny_qwen_image_pipeline(), config, copy=True)
    if kind not in ("qwen_image_edit", "qwen_image_edit_plus"):
        raise ValueError(f"unknown flow kind {kind!r}: choose from {FLOW_KINDS}")
    plus = kind == "qwen_image_edit_plus"
    common["condition_image_area"] = 32 * 32
    if plus:
        common["vl_image_area"] = 56 * 56
    cls = edit.QwenImageEditPlusPolicy if plus else edit.QwenImageEditPolicy
    config_cls = edit.QwenImageEditPlusConfig if plus else edit.QwenImageEditConfig
    pipe = qm.tiny_qwen_image_edit_pipeline(plus=plus)
    return cls.from_pipeline(pipe, config_cls(**{**common, **options}), copy=True)


def _wan_policy(kind: str, options: dict[str, Any]) -> Any:
    """Wan2.1 T2V / I2V, Wan2.2 T2V-A14B (two experts) or TI2V-5B (image mode), CFG 5."""
    from dancegrpo_testing import wan_models as wm
    from dancegrpo_trainer.policies.wan import WanConfig, WanPolicy
    from dancegrpo_trainer.policies.wan_i2v import WanI2VPolicy

    builds = {
        "wan_t2v": (wm.tiny_wan_t2v_pipeline, WanPolicy, 16, wm.TINY_WAN_MAX_LENGTH),
        TWO_EXPERT_WAN: (wm.tiny_wan22_t2v_pipeline, WanPolicy, 16, wm.TINY_WAN_MAX_LENGTH),
        "wan_i2v": (wm.tiny_wan_i2v_pipeline, WanI2VPolicy, 16, wm.WAN21_I2V_TEXT_LENGTH),
        "wan_ti2v": (
            lambda: wm.tiny_wan22_ti2v_pipeline(image=True),
            WanI2VPolicy,
            32,  # VAE 16x, patch 2
            wm.TINY_WAN_MAX_LENGTH,
        ),
    }
    if kind not in builds:
        raise ValueError(f"unknown flow kind {kind!r}: choose from {FLOW_KINDS}")
    build, cls, size, text_length = builds[kind]
    config = WanConfig(
        **{
            "resolution": size,
            "num_frames": 5,
            "device": "cpu",
            "max_sequence_length": text_length,
            "shift": 3.0,
            "guidance_scale": 5.0,
            **options,
        }
    )
    return cls.from_pipeline(build(), config, copy=True)


def condition_images(kind: str, n: int, seed: int = 0) -> torch.Tensor | None:
    """``uint8 [n, 20, 24, 3]`` source images for the image-conditioned kinds, else ``None``."""
    if kind not in IMAGE_KINDS:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 20, 24, 3), generator=g, dtype=torch.uint8)
