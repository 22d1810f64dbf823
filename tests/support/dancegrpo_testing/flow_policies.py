"""Every rectified-flow adapter of the trainer as a tiny random-weight policy on CPU (16 px,
5 frames for video), built from the tiny diffusers pipelines of ``diffusion_models`` and
``video_models``: for tests that must hold on every flow policy kind."""

from __future__ import annotations

from typing import Any

import torch

#: The flow adapters (``model.kind``) :func:`tiny_flow_policy` builds.
FLOW_KINDS = ("tiny_flow", "flux", "hunyuan_video", "skyreels_i2v", "sd3", "flux_kontext")
#: Kinds conditioned on one image per prompt (I2V, editing).
IMAGE_KINDS = ("skyreels_i2v", "flux_kontext")


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
    raise ValueError(f"unknown flow kind {kind!r}: choose from {FLOW_KINDS}")


def condition_images(kind: str, n: int, seed: int = 0) -> torch.Tensor | None:
    """``uint8 [n, 20, 24, 3]`` source images for the image-conditioned kinds, else ``None``."""
    if kind not in IMAGE_KINDS:
        return None
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 20, 24, 3), generator=g, dtype=torch.uint8)
