"""HunyuanVideo text-to-video (rectified flow, ``HunyuanVideoTransformer3DModel``) sampled
with the flow SDE, as a Policy.

The sampling loop is diffusers' ``HunyuanVideoPipeline`` (diffusers 0.42) cut down to what
GRPO needs: Llama hidden states of the templated prompt (layer ``-3``, template tokens
cropped) + CLIP pooled embedding, 5-D video latents ``[B, 16, (F−1)/4 + 1, H/8, W/8]``
patched by the transformer itself (no packing here), the distilled guidance *embedding*
(``guidance_scale · 1000``; no unconditional pass), a statically shifted sigma schedule, and
each step taken by :func:`flow_sde_step` (DanceGRPO's HunyuanVideo recipe uses the same SDE
step as its FLUX one: ``train_grpo_hunyuan.py``, ``flux_step(..., sde_solver=True)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dancegrpo_trainer.core.schedules import flow_sigmas
from dancegrpo_trainer.policies.base import Conditioning, Schedule
from dancegrpo_trainer.policies.flow_transformer import (  # noqa: F401 - latent_num_frames: public here
    FlowTransformerConfig,
    FlowTransformerPolicy,
    P,
    latent_num_frames,
)
from dancegrpo_trainer.policies.runtime import load_text_encoders, module_dtype, vae_decode

#: HunyuanVideo's prompt template for the Llama encoder (diffusers
#: ``pipeline_hunyuan_video.DEFAULT_PROMPT_TEMPLATE``, from Tencent's HunyuanVideo repo).
DEFAULT_PROMPT_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the "
    "following aspects: "
    "1. The main content and theme of the video."
    "2. The color, shape, size, texture, quantity, text, and spatial relationships of the "
    "objects."
    "3. Actions, events, behaviors temporal relationships, physical movement changes of the "
    "objects."
    "4. background environment, light, style and atmosphere."
    "5. camera angles, movements, and transitions used in the video:<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
)
#: Template tokens (BOS included) the Llama-3 tokenizer gives before ``{}`` (diffusers'
#: ``DEFAULT_PROMPT_TEMPLATE["crop_start"]``).
DEFAULT_CROP_START = 95
#: HunyuanVideo reads the Llama hidden state two layers below the last one
#: (diffusers ``_get_llama_prompt_embeds(num_hidden_layers_to_skip=2)``).
LLAMA_LAYERS_TO_SKIP = 2
#: CLIP tokens for the pooled embedding (diffusers ``encode_prompt``: ``max_sequence_length=77``).
CLIP_MAX_LENGTH = 77

#: LoRA targets: the attention and MLP projections of the dual-stream blocks (diffusers
#: ``HunyuanVideoTransformerBlock``, the same names as FLUX's); ``attn.to_q/k/v/out.0`` also
#: match the single-stream and token-refiner blocks.
HUNYUAN_VIDEO_LORA_TARGET_MODULES = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
]


@dataclasses.dataclass
class HunyuanVideoConfig(FlowTransformerConfig):
    """Options of :class:`HunyuanVideoPolicy` (defaults: DanceGRPO's released HunyuanVideo
    recipe, ``scripts/finetune/finetune_hunyuan_grpo.sh``; the paper used 73 frames).

    Attributes:
        resolution: frame size in pixels, an int or ``[height, width]`` (multiple of 16:
            VAE factor 8 × transformer patch 2).
        num_frames: frames per video, ``4k + 1`` (the VAE keeps the first frame and
            compresses the rest 4× in time).
        guidance_scale: value fed (× 1000) to the distilled guidance embedding
            (diffusers' default 6.0; HunyuanVideo has no true CFG in this adapter).
        num_steps, eta, noise_schedule: see :class:`FlowTransformerConfig`.
        shift: static timestep shift ``s`` (``σ' = sσ/(1+(s−1)σ)``); the diffusers
            checkpoints' scheduler uses 7.0, DanceGRPO trains with 5.
        max_sequence_length: Llama prompt tokens after the template (diffusers: 256).
        prompt_template: the Llama prompt template, ``{}`` marking the prompt.
        crop_start: template tokens dropped from the front of the Llama embeddings (95
            for the default template and Llama-3's tokenizer); ``None`` counts the tokens of
            the template's text before ``{}`` with the loaded tokenizer.
        vae_tiling: decode in overlapping spatial tiles (diffusers ``enable_tiling``, as
            DanceGRPO's ``train_grpo_hunyuan.py``; diffusers always decodes long clips in
            overlapping frame windows).
        vae_decode_chunk_size: videos decoded per VAE call (one by default).
    """

    resolution: int | list[int] = 480
    num_frames: int = 53
    guidance_scale: float = 6.0
    eta: float = 0.25
    shift: float = 5.0
    max_sequence_length: int = 256
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    crop_start: int | None = DEFAULT_CROP_START
    vae_tiling: bool = True
    vae_decode_chunk_size: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_frames < 1 or (self.num_frames - 1) % 4:
            raise ValueError(
                f"num_frames must be 4k + 1 (e.g. 53, 61, 129): HunyuanVideo's VAE keeps the "
                f"first frame and compresses the rest 4x in time, got {self.num_frames}"
            )
        if self.guidance_scale < 0:
            raise ValueError(f"guidance_scale must be >= 0, got {self.guidance_scale}")
        if self.max_sequence_length < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {self.max_sequence_length}")
        if self.prompt_template.count("{}") != 1:
            raise ValueError(
                "prompt_template must contain exactly one '{}' (where the prompt goes)"
            )
        if self.crop_start is not None and self.crop_start < 0:
            raise ValueError(f"crop_start must be >= 0 or null (count it), got {self.crop_start}")


class HunyuanVideoPolicy(FlowTransformerPolicy):
    """HunyuanVideo transformer + flow SDE behind the :class:`Policy` interface.

    Latents are float32 ``[B, C, T, h, w]`` (``C = 16``, ``T = (F−1)/4 + 1``, ``h = H/8``,
    ``w = W/8`` for the released model) on ``config.device``. Conditioning tensors:
    ``prompt_embeds`` ``[B, S, 4096]`` (Llama layer −3), ``prompt_attention_mask``
    ``[B, S]`` (int64, right-padded) and ``pooled_prompt_embeds`` ``[B, 768]`` (CLIP).
    ``decode`` gives ``uint8 [N, F, H, W, 3]``.
    """

    modality: ClassVar = "video"
    config_class: ClassVar = HunyuanVideoConfig
    config: HunyuanVideoConfig
    default_lora_targets: ClassVar = HUNYUAN_VIDEO_LORA_TARGET_MODULES
    #: The dual- and single-stream transformer blocks.
    fsdp_blocks: ClassVar = (
        "diffusers.models.transformers.transformer_hunyuan_video:HunyuanVideoTransformerBlock",
        "diffusers.models.transformers.transformer_hunyuan_video:"
        "HunyuanVideoSingleTransformerBlock",
    )

    def __init__(
        self,
        *,
        transformer: nn.Module,
        vae: nn.Module,
        config: HunyuanVideoConfig,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any | None = None,
    ) -> None:
        """Places the components per ``config`` and freezes the text encoders and VAE.

        Args:
            transformer: a diffusers ``HunyuanVideoTransformer3DModel`` (the trainable module).
            vae: a diffusers ``AutoencoderKLHunyuanVideo``.
            config: the policy options.
            text_encoder, tokenizer: the Llama (Llava-Llama-3) model and its tokenizer.
            text_encoder_2, tokenizer_2: CLIP text model (pooled output) and its tokenizer.
                All four ``None`` when prompts come from an embedding cache.
        """
        super().__init__(
            transformer=transformer,
            vae=vae,
            config=config,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2,
            tokenizer_2=tokenizer_2,
        )
        if config.vae_tiling:
            self.vae.enable_tiling()
        self.crop_start = self._resolve_crop_start()
        self._init_geometry()

    def _init_geometry(self) -> None:
        """Pixel and latent sizes from the config and the VAE/transformer configs (read now:
        the trainer may later swap in a DDP/FSDP-wrapped transformer)."""
        vae_cfg, tr_cfg = self.vae.config, self.transformer.config
        self.spatial_ratio = int(vae_cfg.spatial_compression_ratio)
        self.temporal_ratio = int(vae_cfg.temporal_compression_ratio)
        self._set_image_size(self.spatial_ratio, self.spatial_ratio * int(tr_cfg.patch_size))
        self._set_frame_count(self.temporal_ratio, int(tr_cfg.patch_size_t))
        self.latent_channels = int(tr_cfg.in_channels)
        self.guidance_embeds = bool(tr_cfg.guidance_embeds)

    def _resolve_crop_start(self) -> int:
        """``config.crop_start``, or (``None``) the token count of the template's text before
        ``{}`` with the loaded tokenizer (BOS included, as the Llama-3 tokenizer adds it)."""
        if self.config.crop_start is not None:
            return self.config.crop_start
        if self.tokenizer is None:
            raise ValueError(
                "crop_start: null needs the tokenizer to count the template's tokens; set "
                "crop_start explicitly when text encoders are not loaded"
            )
        prefix = self.config.prompt_template.split("{}")[0]
        return len(self.tokenizer(prefix).input_ids)

    @classmethod
    def from_pretrained(
        cls: type[P], path: str | Path, config: HunyuanVideoConfig | None = None
    ) -> P:
        """Loads ``transformer/``, ``vae/`` and (unless ``load_text_encoders`` is off)
        ``text_encoder/`` + ``tokenizer/`` (Llava-Llama-3) and ``text_encoder_2/`` +
        ``tokenizer_2/`` (CLIP) from a local diffusers-format folder, e.g.
        ``hunyuanvideo-community/HunyuanVideo``."""
        from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel

        config = config or cls.config_class()
        path = Path(path)
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(
                f"{path} is not a diffusers HunyuanVideo folder (no transformer/)"
            )
        dtype = config.torch_dtype
        text = _load_text_encoders(path, dtype) if config.load_text_encoders else {}
        return cls(
            transformer=HunyuanVideoTransformer3DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype
            ),
            vae=AutoencoderKLHunyuanVideo.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
            config=config,
            **text,
        )

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts as ``HunyuanVideoPipeline.encode_prompt``:
        ``prompt_embeds`` ``[N, S, D_llama]`` (hidden state 2 layers below the top, template
        tokens cropped, ``S = max_sequence_length``), ``prompt_attention_mask`` ``[N, S]``
        and ``pooled_prompt_embeds`` ``[N, D_clip]`` (CLIP pooled output, 77 tokens). Runs on
        ``text_encoder_device``; the result is on ``device``."""
        if condition_images is not None:
            raise ValueError("HunyuanVideo T2V is text-to-video; condition_images must be None")
        self._require_text_encoders()
        prompts = list(prompts)
        embeds, mask = self._llama_embeds(prompts)
        pooled = self._clip_pooled(prompts)
        return Conditioning(
            {
                "prompt_embeds": embeds.to(self.device),
                "prompt_attention_mask": mask.to(self.device),
                "pooled_prompt_embeds": pooled.to(self.device),
            }
        )

    def _llama_embeds(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Templated prompts → Llama hidden state ``[N, S, D]`` and mask ``[N, S]``, both
        with the first ``crop_start`` (template) positions dropped."""
        c, device = self.config, self.config.text_device
        tokens = self.tokenizer(
            [c.prompt_template.format(p) for p in prompts],
            max_length=c.max_sequence_length + self.crop_start,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
            return_attention_mask=True,
        )
        mask = tokens.attention_mask.to(device)
        hidden = self.text_encoder(
            input_ids=tokens.input_ids.to(device), attention_mask=mask, output_hidden_states=True
        ).hidden_states[-(LLAMA_LAYERS_TO_SKIP + 1)]
        return hidden[:, self.crop_start :], mask[:, self.crop_start :]

    def _clip_pooled(self, prompts: list[str]) -> torch.Tensor:
        """Prompts → CLIP ``pooler_output`` ``[N, D]`` (77 tokens, truncated)."""
        tokens = self.tokenizer_2(
            prompts,
            padding="max_length",
            max_length=CLIP_MAX_LENGTH,
            truncation=True,
            return_tensors="pt",
        )
        return self.text_encoder_2(tokens.input_ids.to(self.config.text_device)).pooler_output

    # ----------------------------------------------------------------- sampling
    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Shifted ``sigmas`` ``[n + 1]`` from 1 to 0 and ``timesteps = 1000·sigmas[:-1]``
        (diffusers: ``sigmas = linspace(1, 0, n + 1)[:-1]`` through the static-shift
        ``FlowMatchEulerDiscreteScheduler``)."""
        sigmas = flow_sigmas(num_steps or self.config.num_steps, shift=self.config.shift)
        return self.schedule_from_sigmas(sigmas)

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning
    ) -> torch.Tensor:
        """The transformer's velocity ``v = ε − x0`` for ``latents`` ``[B, C, T, h, w]`` at
        ``timestep`` (0..1000 scale, passed unscaled as diffusers does), with the guidance
        embedding at ``guidance_scale · 1000``; differentiable."""
        return self._transformer_forward(latents, timestep, cond.tensors)

    def _transformer_forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float,
        tensors: dict[str, torch.Tensor],
    ) -> torch.Tensor:
        """One transformer forward on ``hidden_states`` ``[B, C_in, T, h, w]`` with the text
        conditioning ``tensors`` (``prompt_embeds``, ``prompt_attention_mask``,
        ``pooled_prompt_embeds``, ``B`` rows each) and the guidance embedding; returns the
        transformer's output ``[B, C_out, T, h, w]`` in its dtype (subclasses such as SkyReels
        I2V build ``hidden_states`` and ``tensors`` differently)."""
        dtype = module_dtype(self.transformer)
        batch = hidden_states.shape[0]
        t = torch.as_tensor(timestep, device=self.device, dtype=torch.float32).expand(batch)
        guidance = None
        if self.guidance_embeds:
            # diffusers multiplies in the transformer dtype (6000 rounds to 6016 in bf16).
            scale = torch.full(
                (batch,), self.config.guidance_scale, device=self.device, dtype=dtype
            )
            guidance = scale * 1000.0
        with self.config.autocast():
            return self.transformer(
                hidden_states=hidden_states.to(self.device, dtype),
                timestep=t,
                encoder_hidden_states=tensors["prompt_embeds"].to(self.device, dtype),
                encoder_attention_mask=tensors["prompt_attention_mask"].to(self.device, dtype),
                pooled_projections=tensors["pooled_prompt_embeds"].to(self.device, dtype),
                guidance=guidance,
                return_dict=False,
            )[0]

    # ----------------------------------------------------------------- decoding
    def _decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """``[n, C, T, h, w]`` → frames in ``[-1, 1]`` as ``[n·F, 3, H, W]`` (sample-major)."""
        video = vae_decode(self.vae, latents, self.config.decode_device)  # [n, 3, F, H, W]
        return video.permute(0, 2, 1, 3, 4).flatten(0, 1)


def _load_text_encoders(path: Path, dtype: torch.dtype) -> dict[str, Any]:
    """``text_encoder`` (``LlamaModel``), ``tokenizer``, ``text_encoder_2`` (``CLIPTextModel``)
    and ``tokenizer_2`` from a diffusers HunyuanVideo folder.

    The Llama tokenizer loads through ``AutoTokenizer``: it is a byte-level BPE
    (Llama-3), which transformers 5's ``LlamaTokenizer(Fast)`` class would rebuild as a
    SentencePiece-style tokenizer with different ids.
    """
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTokenizer, LlamaModel

    classes = {"": (AutoTokenizer, LlamaModel), "_2": (CLIPTokenizer, CLIPTextModel)}
    return load_text_encoders(path, dtype, classes)
