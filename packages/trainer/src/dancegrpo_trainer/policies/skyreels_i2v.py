"""SkyReels-V1 image-to-video (a HunyuanVideo fine-tune) sampled with the flow SDE, as a Policy.

The sampling loop is diffusers' ``HunyuanSkyreelsImageToVideoPipeline`` (diffusers 0.42) cut
down to what GRPO needs. It is HunyuanVideo T2V (:mod:`.hunyuan_video`: same Llama + CLIP
prompt encoding, template, VAE, 5-D latents, shifted schedule, flow-SDE step, decoding) plus:

- the reference image, resized to the output size and VAE-encoded once per prompt, is
  concatenated channel-wise to the noisy latents at every step: first latent frame = image
  latents, the other ``T − 1`` frames zeros, so the transformer sees ``2C`` input channels
  (``in_channels`` 32 = 16 noise + 16 image for SkyReels-V1-Hunyuan-I2V) and predicts the
  ``C``-channel velocity (diffusers ``prepare_latents`` and the denoising loop);
- true classifier-free guidance ``v = v_u + s·(v_c − v_u)`` with a negative prompt when
  ``true_cfg_scale > 1``, run as one batched forward (negative rows first), beside the
  distilled guidance embedding (``guidance_scale`` 1.0, i.e. 1000 inside, for SkyReels).

The conditioning image is encoded with the VAE posterior's mean (diffusers draws one sample
from the posterior with the pipeline's generator; DanceGRPO's ``train_grpo_skyreels_i2v.py``
an unseeded one): deterministic image latents make a prompt's conditioning a pure function
of its image, whether encoded with its text or after a cached text lookup.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.condition_images import to_pil_images
from dancegrpo_trainer.policies.guidance import guided_velocity, negative, repeated_negatives
from dancegrpo_trainer.policies.hunyuan_video import HunyuanVideoConfig, HunyuanVideoPolicy
from dancegrpo_trainer.policies.runtime import vae_encode

#: The text-conditioning keys of HunyuanVideo; true CFG adds ``negative_<key>`` for each.
TEXT_KEYS = ("prompt_embeds", "prompt_attention_mask", "pooled_prompt_embeds")
#: Key of the encoded conditioning image, ``[B, C, 1, h, w]`` (padded with zeros in time at
#: each forward, so a rollout's conditioning stays one latent frame per sample).
IMAGE_KEY = "image_latents"


@dataclasses.dataclass
class SkyReelsI2VConfig(HunyuanVideoConfig):
    """Options of :class:`SkyReelsI2VPolicy` (defaults: DanceGRPO's SkyReels-I2V launch
    script, ``scripts/finetune/finetune_skyreels_i2v.sh`` with ``train_grpo_skyreels_i2v.py``:
    400×640, 53 frames, 16 steps, η 0.3, shift 7, true CFG 5 with an empty negative prompt,
    guidance embedding 1.0).

    Attributes:
        resolution, num_frames, num_steps, eta, noise_schedule, shift,
            max_sequence_length, prompt_template, crop_start, vae_tiling: as
            :class:`HunyuanVideoConfig` (diffusers' pipeline defaults are 544×960 and 97
            frames).
        guidance_scale: the distilled guidance embedding (× 1000 inside, as diffusers);
            SkyReels uses 1.0 (diffusers' pipeline default, DanceGRPO's ``guidance=1000``).
        true_cfg_scale: true classifier-free guidance weight ``s`` (``<= 1`` turns the
            unconditional pass off); diffusers' default 6.0, DanceGRPO's ``--cfg_infer 5.0``.
        negative_prompt: the unconditional prompt of true CFG (DanceGRPO: ``""``; SkyReels'
            own examples use a list of defects, e.g. ``"Aerial view, overexposed, low
            quality, deformation, ..."``).
    """

    resolution: int | list[int] = dataclasses.field(default_factory=lambda: [400, 640])
    guidance_scale: float = 1.0
    eta: float = 0.3
    shift: float = 7.0
    true_cfg_scale: float = 5.0
    negative_prompt: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.true_cfg_scale < 0:
            raise ValueError(
                f"true_cfg_scale must be >= 0 (<= 1 disables true CFG), got {self.true_cfg_scale}"
            )

    @property
    def do_true_cfg(self) -> bool:
        """Whether each step also runs the negative prompt (``true_cfg_scale > 1``)."""
        return self.true_cfg_scale > 1.0


class SkyReelsI2VPolicy(HunyuanVideoPolicy):
    """SkyReels-V1 I2V transformer + flow SDE behind the :class:`Policy` interface.

    Latents are float32 ``[B, C, T, h, w]`` (``C = in_channels / 2``). Conditioning tensors:
    HunyuanVideo's ``prompt_embeds`` / ``prompt_attention_mask`` / ``pooled_prompt_embeds``,
    their ``negative_*`` twins with true CFG (the negative prompt repeated per row), and
    ``image_latents`` ``[B, C, 1, h, w]``. ``encode_prompts`` without images gives the text
    part alone (what an embedding cache stores); :meth:`encode_condition_images` gives the
    image part, and the two merge into one :class:`Conditioning`. ``decode`` gives
    ``uint8 [N, F, H, W, 3]``. ``from_pretrained`` reads HunyuanVideo's folder layout with
    ``Skywork/SkyReels-V1-Hunyuan-I2V`` as ``transformer/``; ``from_pipeline`` wraps a
    diffusers ``HunyuanSkyreelsImageToVideoPipeline``.
    """

    config_class: ClassVar = SkyReelsI2VConfig
    config: SkyReelsI2VConfig

    def __init__(self, *, config: SkyReelsI2VConfig, **components: Any) -> None:
        """Takes :class:`HunyuanVideoPolicy`'s components (``transformer``: a
        ``HunyuanVideoTransformer3DModel`` with SkyReels' 2C input channels, ``vae``, the
        Llama/CLIP text encoders and tokenizers or none of them) and a SkyReels config."""
        if not isinstance(config, SkyReelsI2VConfig):
            raise TypeError(f"config must be a SkyReelsI2VConfig, got {type(config).__name__}")
        super().__init__(config=config, **components)

    def _init_geometry(self) -> None:
        """HunyuanVideo's geometry, with ``C`` the noise channels: the transformer takes the
        noisy latents and the image latents stacked on channels and predicts ``C``."""
        super()._init_geometry()
        tr_cfg, vae_channels = self.transformer.config, int(self.vae.config.latent_channels)
        in_channels = int(tr_cfg.in_channels)
        out_channels = int(tr_cfg.out_channels or in_channels)
        if in_channels != 2 * out_channels or out_channels != vae_channels:
            raise ValueError(
                "not a SkyReels I2V transformer: in_channels must be 2x out_channels = 2x the "
                f"VAE's latent channels (noise + image latents), got in_channels={in_channels}, "
                f"out_channels={out_channels}, VAE latent_channels={vae_channels}"
            )
        if getattr(tr_cfg, "image_condition_type", None) is not None:
            raise ValueError(
                f"image_condition_type={tr_cfg.image_condition_type!r} is Tencent's "
                "HunyuanVideo-I2V conditioning; SkyReels-V1 concatenates image latents "
                "without it (image_condition_type must be None)"
            )
        self.latent_channels = out_channels

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts as HunyuanVideo does, plus (true CFG) the negative prompt's
        ``negative_*`` tensors repeated ``N`` times, plus (given ``uint8 [N, H, W, 3]``
        ``condition_images``) their ``image_latents``.

        Without ``condition_images`` the result is text-only, for an embedding cache;
        sampling then needs :meth:`encode_condition_images` merged in.
        """
        prompts = list(prompts)
        tensors = dict(super().encode_prompts(prompts).tensors)
        if self.config.do_true_cfg:
            negative_prompt = super().encode_prompts([self.config.negative_prompt]).tensors
            tensors.update(repeated_negatives(negative_prompt, len(prompts)))
        return self._with_condition_images(Conditioning(tensors), condition_images)

    @torch.no_grad()
    def encode_condition_images(self, condition_images: torch.Tensor) -> Conditioning:
        """``uint8 [N, H, W, 3]`` images (any size) → ``image_latents`` float32
        ``[N, C, 1, h, w]`` on ``device``: resized to the output size as diffusers'
        ``VideoProcessor.preprocess`` does (PIL, Lanczos), scaled to ``[-1, 1]``, encoded one
        image at a time on ``vae_device`` as a one-frame video, posterior mean ×
        ``scaling_factor``."""
        pixels = self._preprocess_images(condition_images)  # [N, 3, H, W] in [-1, 1]
        # One image at a time, as a one-frame video [1, 3, 1, H, W].
        device = self.config.decode_device
        latents = [vae_encode(self.vae, p[None, :, None], device) for p in pixels]
        return Conditioning({IMAGE_KEY: torch.cat(latents).to(self.device)})

    def _preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """``uint8 [N, H, W, 3]`` → float ``[N, 3, height, width]`` in ``[-1, 1]``, through
        diffusers' ``VideoProcessor`` (what ``HunyuanSkyreelsImageToVideoPipeline`` calls)."""
        from diffusers.video_processor import VideoProcessor

        processor = VideoProcessor(vae_scale_factor=self.spatial_ratio)
        return processor.preprocess(to_pil_images(images), height=self.height, width=self.width)

    # ----------------------------------------------------------------- sampling
    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning
    ) -> torch.Tensor:
        """Velocity for ``latents`` ``[B, C, T, h, w]`` at ``timestep``: the transformer on
        ``[latents, image latents]`` (channels), with true CFG ``v_u + s·(v_c − v_u)`` in
        float32 when ``true_cfg_scale > 1`` (negative and positive rows in one forward);
        differentiable."""
        tensors = cond.tensors
        hidden = torch.cat([latents, self._image_condition(tensors, latents)], dim=1)
        if not self.config.do_true_cfg:
            return self._transformer_forward(hidden, timestep, tensors)
        text = {
            key: torch.cat([negative(tensors, key, "true_cfg_scale"), tensors[key]])
            for key in TEXT_KEYS
        }
        if isinstance(timestep, torch.Tensor) and timestep.ndim == 1:  # per-row timesteps
            timestep = torch.cat([timestep, timestep])
        out = self._transformer_forward(torch.cat([hidden, hidden]), timestep, text)
        uncond, cond_v = out.float().chunk(2)
        return guided_velocity(cond_v, uncond, self.config.true_cfg_scale)

    def _image_condition(
        self, tensors: dict[str, torch.Tensor], latents: torch.Tensor
    ) -> torch.Tensor:
        """``image_latents`` ``[B, C, 1, h, w]`` padded with zeros to ``latents``' ``T``
        frames, on ``latents``' device and dtype (diffusers ``prepare_latents``)."""
        if IMAGE_KEY not in tensors:
            raise ValueError(
                "SkyReels I2V needs the conditioning image: encode_prompts(prompts, "
                "condition_images=...) or merge encode_condition_images(images) into cached "
                "text embeddings"
            )
        image = tensors[IMAGE_KEY].to(latents.device, latents.dtype)
        b, c, t, h, w = latents.shape
        if image.shape != (b, c, 1, h, w):
            raise ValueError(
                f"image_latents {tuple(image.shape)} do not match latents {tuple(latents.shape)}"
                " (expected [B, C, 1, h, w]: encode the images with this policy's resolution)"
            )
        return torch.cat([image, image.new_zeros(b, c, t - 1, h, w)], dim=2)
