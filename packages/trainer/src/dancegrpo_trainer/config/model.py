"""``model:``: which generator to fine-tune (:class:`ModelConfig`) and the per-adapter
tables (kinds, pixel multiples, CFG weight options) that other sections check against."""

from __future__ import annotations

import dataclasses
from typing import Any

from dancegrpo_trainer.config.errors import _check, _check_multiple

#: Adapters built on HunyuanVideo's VAE and transformer (same frame/pixel geometry).
HUNYUAN_VIDEO_KINDS = ("hunyuan_video", "skyreels_i2v")
#: Wan adapters: Wan2.1 / Wan2.2-A14B text-to-video, their image-to-video models, and
#: Wan2.2 TI2V-5B (text or image); the pixel multiple of each (VAE factor × patch 2).
WAN_KINDS = {"wan_t2v": 16, "wan_i2v": 16, "wan_ti2v": 32}
#: Image adapters whose pixel sizes are multiples of 16 (VAE 8x, 2x2 patches or packing).
IMAGE_16_KINDS = ("sd3", "flux_kontext")
#: Adapters conditioned on one image per prompt (a ``.jsonl`` row's ``condition_image``);
#: ``wan_ti2v`` takes one when the rows carry it, text alone otherwise.
CONDITION_IMAGE_KINDS = ("skyreels_i2v", "flux_kontext", "wan_i2v")
#: Qwen-Image adapters (one Qwen2.5-VL text encoder, VAE 8x then 2x2 packing, true CFG).
QWEN_IMAGE_KINDS = ("qwen_image", "qwen_image_edit", "qwen_image_edit_plus")
#: Qwen-Image editing adapters: a source image per prompt, which the text encoder sees too.
QWEN_IMAGE_EDIT_KINDS = ("qwen_image_edit", "qwen_image_edit_plus")
#: Adapters with classifier-free guidance (a second, unconditional forward per step) and
#: the options holding its weights; ``train.cfg_free`` sets them to 1. Wan2.2 A14B has one
#: weight per expert (``guidance_scale`` high-noise, ``guidance_scale_2`` low-noise; Wan2.1
#: and TI2V-5B use the first). Qwen-Image's and SkyReels' true CFG is ``true_cfg_scale``.
#: FLUX, FLUX.1-Kontext and HunyuanVideo have a distilled guidance *embedding* instead (one
#: forward per step).
CFG_WEIGHT_OPTIONS: dict[str, tuple[str, ...]] = {
    "stable_diffusion": ("guidance_scale",),
    "sd3": ("guidance_scale",),
    "skyreels_i2v": ("true_cfg_scale",),
    **{kind: ("true_cfg_scale",) for kind in QWEN_IMAGE_KINDS},
    **{kind: ("guidance_scale", "guidance_scale_2") for kind in WAN_KINDS},
}
#: Pixel sizes must be multiples of this per adapter (VAE downsampling × patching/packing):
#: SD's VAE 8x; FLUX, Kontext, SD3, Qwen-Image: VAE 8x then 2x2 packing or patches;
#: HunyuanVideo/SkyReels: VAE 8x, patch 2; Wan: see ``WAN_KINDS`` (8x or 16x VAE, patch 2).
PIXEL_MULTIPLES = {
    "stable_diffusion": 8,
    "flux": 16,
    **{kind: 16 for kind in IMAGE_16_KINDS + QWEN_IMAGE_KINDS + HUNYUAN_VIDEO_KINDS},
    **WAN_KINDS,
}


@dataclasses.dataclass
class ModelConfig:
    """Which generator to fine-tune.

    Attributes:
        kind: adapter name: ``tiny_flow`` (the CPU demo policy), ``stable_diffusion``, ``flux``,
            ``hunyuan_video`` (text-to-video), ``skyreels_i2v`` (image-to-video: prompts
            come from a ``.jsonl`` file whose rows carry a ``condition_image``), ``sd3``
            (Stable Diffusion 3 / 3.5), ``flux_kontext`` (FLUX.1-Kontext image editing: each
            ``.jsonl`` row's ``condition_image`` is the source image), ``qwen_image``
            (text-to-image), ``qwen_image_edit`` / ``qwen_image_edit_plus`` (image editing,
            as ``flux_kontext``), ``wan_t2v`` (Wan2.1 T2V, Wan2.2 T2V-A14B), ``wan_i2v``
            (Wan2.1 I2V, Wan2.2 I2V-A14B; ``.jsonl`` prompts with images), ``wan_ti2v``
            (Wan2.2 TI2V-5B: text, or images when the prompt rows carry them).
        path: local diffusers-format folder; ``${ENV}`` references expand when the model
            is built (e.g. ``${DANCEGRPO_WEIGHTS}/flux-dev``). Unused by ``tiny_flow``.
        height, width: output resolution in pixels.
        num_frames: 1 for images; > 1 for video adapters (frames ``[N,T,H,W,3]``);
            ``hunyuan_video``, ``skyreels_i2v`` and the Wan kinds: ``4k + 1`` (e.g. 53, 81).
        guidance_scale: classifier-free (SD, SD3, Wan: the high-noise expert's for Wan2.2
            A14B, ``options.guidance_scale_2`` the other's) or embedded (FLUX,
            FLUX.1-Kontext, HunyuanVideo, SkyReels) guidance; SkyReels' and Qwen-Image's
            true CFG weight is ``options.true_cfg_scale`` (Qwen-Image has no guidance
            embedding: it stays 1).
        dtype: weight dtype of the frozen parts (``float32``, ``bfloat16``, ``float16``).
        options: adapter-specific keyword arguments, passed through verbatim.
        init_checkpoint: optional ``.safetensors`` of trainable-module weights loaded
            before training (the demo writes its pre-trained tiny policy here).
    """

    kind: str = "tiny_flow"
    path: str | None = None
    height: int = 16
    width: int = 16
    num_frames: int = 1
    guidance_scale: float = 1.0
    dtype: str = "float32"
    options: dict[str, Any] = dataclasses.field(default_factory=dict)
    init_checkpoint: str | None = None

    def validate(self) -> None:
        known = ("tiny_flow", "stable_diffusion", "flux", *HUNYUAN_VIDEO_KINDS)
        known += (*IMAGE_16_KINDS, *QWEN_IMAGE_KINDS, *WAN_KINDS)
        _check(self.kind in known, "model.kind", f"must be one of {known}, got {self.kind!r}")
        if self.kind in HUNYUAN_VIDEO_KINDS:
            self._validate_hunyuan_video()
        if self.kind in IMAGE_16_KINDS + QWEN_IMAGE_KINDS:
            self._validate_image_16()
        if self.kind in QWEN_IMAGE_KINDS:
            _check(
                self.guidance_scale == 1.0,
                "model.guidance_scale",
                f"must stay 1.0 for {self.kind} (Qwen-Image has no guidance embedding); set the "
                f"true CFG weight with model.options.true_cfg_scale, got {self.guidance_scale}",
            )
        if self.kind in WAN_KINDS:
            self._validate_wan()
        _check(
            self.kind == "tiny_flow" or bool(self.path),
            "model.path",
            f"is required for kind {self.kind!r}: set it to a local diffusers folder",
        )
        for name in ("height", "width", "num_frames"):
            _check(getattr(self, name) >= 1, f"model.{name}", "must be >= 1")
        _check(self.guidance_scale >= 0, "model.guidance_scale", "must be >= 0")
        dtypes = ("float32", "bfloat16", "float16")
        _check(self.dtype in dtypes, "model.dtype", f"must be one of {dtypes}")

    def _validate_hunyuan_video(self) -> None:
        """HunyuanVideo's geometry (SkyReels I2V shares its VAE and patching): the VAE keeps
        frame 0 and compresses time 4x (so ``4k + 1`` frames) and space 8x, and the
        transformer patches 2x2 latents (so pixel sizes are multiples of 16)."""
        _check(
            self.num_frames % 4 == 1,
            "model.num_frames",
            f"must be 4k + 1 for {self.kind} (e.g. 53 as DanceGRPO, 97 as SkyReels', 129 as "
            f"HunyuanVideo's default), got {self.num_frames}",
        )
        for name in ("height", "width"):
            _check_multiple(
                getattr(self, name), 16, f"model.{name}", f"{self.kind} (VAE 8x, patch 2)"
            )

    def _validate_wan(self) -> None:
        """Wan's geometry: the VAE keeps frame 0 and compresses time 4x (``4k + 1``
        frames), space 8x (Wan2.1 VAE) or 16x (Wan2.2 TI2V-5B VAE), and the transformer
        patches 2x2 latents (pixel sizes multiples of 16, or 32 for ``wan_ti2v``)."""
        _check(
            self.num_frames % 4 == 1,
            "model.num_frames",
            f"must be 4k + 1 for {self.kind} (e.g. 81 as Wan's default, 33, 121 for TI2V-5B), "
            f"got {self.num_frames}",
        )
        multiple = WAN_KINDS[self.kind]
        for name in ("height", "width"):
            _check_multiple(
                getattr(self, name),
                multiple,
                f"model.{name}",
                f"{self.kind} (VAE {multiple // 2}x, patch 2)",
            )

    def _validate_image_16(self) -> None:
        """SD3's and FLUX.1-Kontext's geometry: images (one frame) whose sides are multiples
        of 16 (VAE 8x, then 2x2 patches (SD3) or 2x2 packing (FLUX))."""
        _check(
            self.num_frames == 1,
            "model.num_frames",
            f"must be 1 for {self.kind} (an image model), got {self.num_frames}",
        )
        for name in ("height", "width"):
            _check_multiple(
                getattr(self, name), 16, f"model.{name}", f"{self.kind} (VAE 8x, 2x2 patches)"
            )
