"""Qwen-Image (rectified flow, ``QwenImageTransformer2DModel``) sampled with the flow SDE, as a
Policy.

The sampling loop is diffusers' ``QwenImagePipeline`` (diffusers 0.42) cut down to what GRPO
needs:

- one text encoder, Qwen2.5-VL: the prompt goes into the pipeline's chat template, the last
  hidden state is read at the prompt's valid tokens and the template's system part
  (``prompt_template_encode_start_idx`` tokens, 34 for Qwen's tokenizer) is dropped; the
  embeddings are variable-length with a mask (here padded to ``max_sequence_length`` so an
  embedding cache can store them, and trimmed back to the batch's longest prompt at every
  forward);
- packed latents ``[B, (h/2)·(w/2), 4C]`` of the 16-channel ``AutoencoderKLQwenImage`` (8x),
  normalised with the VAE's per-channel ``latents_mean`` / ``latents_std``;
- true classifier-free guidance with a negative prompt, ``v = v_u + s·(v_c − v_u)``, then
  Qwen-Image's norm-preserving rescale: every token's guided velocity is scaled back to the
  norm of its conditional one (``v · ‖v_c‖ / ‖v‖`` over channels); both passes run as one
  batched forward;
- diffusers' Qwen-Image schedule: ``linspace(1, 1/n, n)`` shifted by the resolution-dependent
  exponential shift (``μ`` linear in the token count, Qwen-Image's ``max_shift`` 0.9 at
  8192 tokens) and stretched so the last non-zero sigma is ``shift_terminal`` (0.02);
- each step taken by :class:`FlowTransformerPolicy`'s flow-SDE ``denoise_step``.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from dancegrpo_trainer.core.schedules import shift_sigmas
from dancegrpo_trainer.policies.base import Conditioning, Schedule
from dancegrpo_trainer.policies.flow_transformer import P
from dancegrpo_trainer.policies.flux_latents import unpack_latents
from dancegrpo_trainer.policies.guidance import guided_velocity, negative, repeated_negatives
from dancegrpo_trainer.policies.packed_image import PackedImageConfig, PackedImagePolicy
from dancegrpo_trainer.policies.runtime import (
    freeze,
    module_dtype,
    place,
    transformers_dtype_kwargs,
)

#: Chat templates of diffusers' ``QwenImagePipeline``, ``QwenImageEditPipeline`` and
#: ``QwenImageEditPlusPipeline`` (``prompt_template_encode``, from Qwen's own inference code).
PROMPT_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, "
    "quantity, text, spatial relationships of the objects and background:<|im_end|>\n"
    "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
)
_EDIT_SYSTEM = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should alter "
    "or modify the image. Generate a new image that meets the user's requirements while "
    "maintaining consistency with the original input where appropriate.<|im_end|>\n"
)
EDIT_PROMPT_TEMPLATE = (
    _EDIT_SYSTEM + "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
EDIT_PLUS_PROMPT_TEMPLATE = _EDIT_SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"
#: Template tokens dropped from the front of the hidden states (the pipelines'
#: ``prompt_template_encode_start_idx``: the system part, for Qwen's tokenizer).
PROMPT_TEMPLATE_START_IDX = 34
EDIT_PROMPT_TEMPLATE_START_IDX = 64
#: Prompt tokens the pipelines' tokenizer call keeps (``tokenizer_max_length``).
TOKENIZER_MAX_LENGTH = 1024
_USER_TURN = "<|im_start|>user\n"

#: LoRA targets: the attention projections of both streams (``attn.add_*`` / ``to_add_out``
#: are the text stream's) and both streams' MLPs (Flow-Factory's Qwen-Image defaults, with
#: diffusers' module names: ``img_mlp.net.2`` is the MLP's output ``Linear``).
QWEN_IMAGE_LORA_TARGET_MODULES = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "img_mlp.net.0.proj",
    "img_mlp.net.2",
    "txt_mlp.net.0.proj",
    "txt_mlp.net.2",
]
#: Conditioning keys of the text; true CFG adds ``negative_<key>`` for each.
TEXT_KEYS = ("prompt_embeds", "prompt_embeds_mask")


def template_system_prefix(template: str) -> str:
    """The part of a Qwen-Image chat template up to the user's turn (system prompt and
    ``<|im_start|>user\\n``): what ``prompt_template_encode_start_idx`` tokens drop."""
    if _USER_TURN not in template:
        raise ValueError(f"prompt template has no {_USER_TURN!r} turn: {template!r}")
    return template[: template.index(_USER_TURN) + len(_USER_TURN)]


def qwen_image_sigmas(num_steps: int, shift: float, shift_terminal: float | None) -> torch.Tensor:
    """Qwen-Image's sampling sigmas ``[n + 1]`` (float32, ending at 0).

    diffusers ``QwenImagePipeline`` + ``FlowMatchEulerDiscreteScheduler.set_timesteps``:
    ``σ = linspace(1, 1/n, n)``; time shift ``σ' = sσ / (1 + (s−1)σ)`` (the exponential
    dynamic shift ``e^μ / (e^μ + 1/σ − 1)`` with ``s = e^μ``); then, with ``shift_terminal``,
    ``stretch_shift_to_terminal`` (from LTX-Video): ``1 − σ`` is rescaled so the last sigma
    equals ``shift_terminal``; a final 0 is appended. Computed in float64. A one-step
    schedule is ``[1, 0]`` (diffusers' stretch divides by zero there and gives NaN).
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    base = torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1]
    sigmas = shift_sigmas(base, shift)
    if shift_terminal and num_steps > 1:
        one_minus = 1.0 - sigmas
        sigmas = 1.0 - one_minus / (one_minus[-1] / (1.0 - shift_terminal))
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(torch.float32)


def true_cfg_velocity(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Qwen-Image's true CFG (diffusers ``QwenImagePipeline``, the ``do_true_cfg`` branch):
    ``v = v_u + s·(v_c − v_u)``, then ``v · ‖v_c‖ / ‖v‖`` with norms over the last (channel)
    dim of each packed token, so guidance changes a token's direction, not its length."""
    guided = guided_velocity(cond, uncond, scale)
    return guided * (cond.norm(dim=-1, keepdim=True) / guided.norm(dim=-1, keepdim=True))


def pad_text(
    embeds: torch.Tensor, mask: torch.Tensor, length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pads (zeros, mask 0) or cuts ``embeds`` ``[B, S, D]`` / ``mask`` ``[B, S]`` to
    ``length`` tokens."""
    extra = length - embeds.shape[1]
    if extra <= 0:
        return embeds[:, :length], mask[:, :length]
    return (
        torch.cat([embeds, embeds.new_zeros(embeds.shape[0], extra, embeds.shape[2])], dim=1),
        torch.cat([mask, mask.new_zeros(mask.shape[0], extra)], dim=1),
    )


def trim_text(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Cuts right padding shared by every row (the batch's longest prompt stays whole) and
    returns ``None`` for a mask with no padding left, as the pipeline passes it."""
    valid = mask.bool().any(dim=0).nonzero()
    length = int(valid.max()) + 1 if len(valid) else 1
    embeds, mask = embeds[:, :length], mask[:, :length]
    return embeds, (None if bool(mask.bool().all()) else mask)


def encode_chat(
    text_encoder: nn.Module,
    inputs: Any,
    drop: int,
    device: torch.device,
) -> list[torch.Tensor]:
    """Runs Qwen2.5-VL on tokenised chat ``inputs`` (a tokenizer's or processor's output,
    optionally with ``pixel_values`` / ``image_grid_thw``) and returns each row's last hidden
    state at its valid tokens, the first ``drop`` (template) tokens removed (diffusers
    ``_get_qwen_prompt_embeds`` / ``_extract_masked_hidden``)."""
    mask = inputs["attention_mask"].to(device)
    extra = {k: inputs[k].to(device) for k in ("pixel_values", "image_grid_thw") if k in inputs}
    if "pixel_values" in extra:
        extra["pixel_values"] = extra["pixel_values"].to(module_dtype(text_encoder))
    # The pipelines call the ...ForConditionalGeneration model, which also computes logits
    # over the 152k vocabulary for every token (~0.5 GB per 1.5k-token row in bf16); its
    # inner model gives the same hidden states without them.
    body = text_encoder.model if hasattr(text_encoder, "lm_head") else text_encoder
    hidden = body(
        input_ids=inputs["input_ids"].to(device),
        attention_mask=mask,
        output_hidden_states=True,
        **extra,
    ).hidden_states[-1]
    return [row[m.bool()][drop:] for row, m in zip(hidden, mask, strict=True)]


def stack_rows(rows: Sequence[torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row embeddings ``[S_i, D]`` → ``[N, length, D]`` (zero-padded, or cut to
    ``length``) and their int64 mask ``[N, length]``."""
    embeds = torch.zeros(len(rows), length, rows[0].shape[-1], dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        n = min(length, row.shape[0])
        embeds[i, :n] = row[:n].to("cpu")
        mask[i, :n] = 1
    return embeds, mask


@dataclasses.dataclass
class QwenImageBaseConfig(PackedImageConfig):
    """Options every Qwen-Image adapter shares (text-to-image and Edit); defaults:
    Flow-Factory's Qwen-Image GRPO examples (``examples/grpo/lora/qwen_image/default.yaml``:
    10 steps, CFG 4, Flow-GRPO's SDE) and diffusers' pipelines otherwise.

    Attributes:
        resolution: image size in pixels, an int or ``[height, width]`` (multiple of 16:
            VAE 8x, 2x2 packing).
        true_cfg_scale: true classifier-free guidance weight ``s`` (``<= 1`` turns the
            negative pass off); diffusers' default and Flow-Factory's value 4.0.
        negative_prompt: the unconditional prompt (Flow-Factory: ``""``; Qwen's examples
            use ``" "``).
        num_steps, eta, noise_schedule: see :class:`FlowTransformerConfig` (Flow-Factory
            samples with Flow-GRPO's SDE, ``noise_schedule: flow_grpo``).
        dynamic_shift, base_shift, max_shift, base_image_seq_len, max_image_seq_len: see
            :class:`PackedImageConfig` (defaults: Qwen-Image's scheduler config).
        shift_terminal: the last non-zero sigma the schedule is stretched to (Qwen-Image:
            0.02); ``None`` leaves the shifted schedule as it is.
        prompt_template: the chat template, ``{}`` marking the prompt.
        prompt_template_encode_start_idx: template tokens dropped from the front of the
            hidden states (the system part: 34 for Qwen's tokenizer and the text-to-image
            template, 64 for the Edit ones); ``None`` counts the tokens of the template's
            system part with the loaded tokenizer.
    """

    resolution: int | list[int] = 512
    true_cfg_scale: float = 4.0
    negative_prompt: str = ""
    num_steps: int = 10
    eta: float = 0.7
    noise_schedule: str = "flow_grpo"
    shift: float = 1.0
    dynamic_shift: bool = True
    max_shift: float = 0.9
    max_image_seq_len: int = 8192
    shift_terminal: float | None = 0.02
    prompt_template: str = PROMPT_TEMPLATE
    prompt_template_encode_start_idx: int | None = PROMPT_TEMPLATE_START_IDX

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.true_cfg_scale < 0:
            raise ValueError(
                f"true_cfg_scale must be >= 0 (<= 1 disables true CFG), got {self.true_cfg_scale}"
            )
        if self.shift_terminal is not None and not 0 <= self.shift_terminal < 1:
            raise ValueError(f"shift_terminal must be in [0, 1) or null, got {self.shift_terminal}")
        if self.prompt_template.count("{}") != 1:
            raise ValueError(
                "prompt_template must contain exactly one '{}' (where the prompt goes)"
            )
        template_system_prefix(self.prompt_template)
        start = self.prompt_template_encode_start_idx
        if start is not None and start < 0:
            raise ValueError(
                f"prompt_template_encode_start_idx must be >= 0 or null (count it), got {start}"
            )

    @property
    def do_true_cfg(self) -> bool:
        """Whether each step also runs the negative prompt (``true_cfg_scale > 1``)."""
        return self.true_cfg_scale > 1.0


@dataclasses.dataclass
class QwenImageConfig(QwenImageBaseConfig):
    """Options of :class:`QwenImagePolicy` (text-to-image; default resolution 512 px as
    Flow-Factory's LoRA example), those of :class:`QwenImageBaseConfig` plus:

    Attributes:
        max_sequence_length: prompt tokens kept after the template (diffusers' default 512,
            at most 1024); embeddings are stored padded to this length.
    """

    max_sequence_length: int = 512

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.max_sequence_length <= TOKENIZER_MAX_LENGTH:
            raise ValueError(
                f"max_sequence_length must be in [1, {TOKENIZER_MAX_LENGTH}], "
                f"got {self.max_sequence_length}"
            )


class QwenImagePolicy(PackedImagePolicy):
    """Qwen-Image transformer + flow SDE behind the :class:`Policy` interface.

    Latents are packed float32 ``[B, L, 4C]`` (``L = (H/16)·(W/16)``, ``C = 16`` for the
    released VAE) on ``config.device``. Conditioning tensors: ``prompt_embeds``
    ``[B, max_sequence_length, 3584]`` (Qwen2.5-VL's last hidden state, zero-padded) and
    ``prompt_embeds_mask`` ``[B, max_sequence_length]`` (int64), with true CFG their
    ``negative_*`` twins (the negative prompt repeated per row). ``decode`` gives
    ``uint8 [N, H, W, 3]``.

    One text encoder (``text_encoder``: ``Qwen2_5_VLForConditionalGeneration``, ``tokenizer``:
    ``Qwen2Tokenizer``); the second pair of :class:`FlowTransformerPolicy` stays ``None``.
    """

    modality: ClassVar = "image"
    config_class: ClassVar = QwenImageConfig
    config: QwenImageConfig
    default_lora_targets: ClassVar = QWEN_IMAGE_LORA_TARGET_MODULES
    #: The dual-stream transformer blocks.
    fsdp_blocks: ClassVar = (
        "diffusers.models.transformers.transformer_qwenimage:QwenImageTransformerBlock",
    )

    def __init__(
        self,
        *,
        transformer: nn.Module,
        vae: nn.Module,
        config: QwenImageBaseConfig,
        text_encoder: nn.Module | None = None,
        tokenizer: Any | None = None,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any | None = None,
    ) -> None:
        """Places the components per ``config`` and freezes the text encoder and VAE.

        Args:
            transformer: a diffusers ``QwenImageTransformer2DModel`` (the trainable module).
            vae: a diffusers ``AutoencoderKLQwenImage``.
            config: the policy options.
            text_encoder, tokenizer: Qwen2.5-VL and its tokenizer (Edit: its processor);
                both ``None`` when prompts come from an embedding cache.
            text_encoder_2, tokenizer_2: must be ``None`` (Qwen-Image has one text encoder;
                accepted so that :meth:`FlowTransformerPolicy.from_pipeline` can pass them).
        """
        if not isinstance(config, self.config_class):
            raise TypeError(
                f"config must be a {self.config_class.__name__}, got {type(config).__name__}"
            )
        if text_encoder_2 is not None or tokenizer_2 is not None:
            raise ValueError(
                "Qwen-Image has one text encoder: text_encoder_2/tokenizer_2 must be None"
            )
        if (text_encoder is None) != (tokenizer is None):
            raise ValueError("text_encoder and tokenizer must both be given (or neither)")
        super().__init__(transformer=transformer, vae=vae, config=config)
        self.tokenizer = tokenizer
        if text_encoder is not None:
            self.text_encoder = place(text_encoder, config.text_device, config.torch_dtype)
            freeze(self.text_encoder)
        self._init_geometry()
        self.template_drop = self._resolve_template_drop()

    def _init_geometry(self) -> None:
        """Pixel and latent sizes (read now: the trainer may later swap in a wrapped
        transformer)."""
        vae_cfg, tr_cfg = self.vae.config, self.transformer.config
        self.vae_scale_factor = 2 ** len(vae_cfg.temperal_downsample)
        self._set_image_size(self.vae_scale_factor, self.vae_scale_factor * 2)
        self.latent_channels = int(tr_cfg.in_channels) // 4
        if self.latent_channels != int(vae_cfg.z_dim):
            raise ValueError(
                f"transformer in_channels {tr_cfg.in_channels} is not 4x the VAE's z_dim "
                f"{vae_cfg.z_dim} (packed 2x2 latents)"
            )
        if getattr(tr_cfg, "guidance_embeds", False):
            raise ValueError(
                "guidance_embeds=True: no released Qwen-Image checkpoint has a guidance "
                "embedding and diffusers' transformer cannot run one; use true_cfg_scale"
            )
        mean = torch.tensor(vae_cfg.latents_mean, dtype=torch.float32)
        std = torch.tensor(vae_cfg.latents_std, dtype=torch.float32)
        self._latents_mean, self._latents_std = mean.view(1, -1, 1, 1, 1), std.view(1, -1, 1, 1, 1)

    def _resolve_template_drop(self) -> int:
        start = self.config.prompt_template_encode_start_idx
        if start is not None:
            return start
        if self.tokenizer is None:
            raise ValueError(
                "prompt_template_encode_start_idx: null needs the tokenizer to count the "
                "template's tokens; set it explicitly when text encoders are not loaded"
            )
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)  # a processor's
        prefix = template_system_prefix(self.config.prompt_template)
        return len(tokenizer(prefix).input_ids)

    @classmethod
    def from_pretrained(
        cls: type[P], path: str | Path, config: QwenImageBaseConfig | None = None
    ) -> P:
        """Loads ``transformer/``, ``vae/`` and (unless ``load_text_encoders`` is off)
        ``text_encoder/`` (Qwen2.5-VL) + ``tokenizer/`` from a local diffusers-format folder,
        e.g. ``Qwen/Qwen-Image``."""
        config = config or cls.config_class()
        path = Path(path)
        if not (path / "transformer").is_dir():
            raise FileNotFoundError(
                f"{path} is not a diffusers Qwen-Image folder (no transformer/)"
            )
        return cls(**cls._load_components(path, config), config=config)

    @classmethod
    def _load_components(cls, path: Path, config: QwenImageBaseConfig) -> dict[str, Any]:
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel

        dtype = config.torch_dtype
        parts: dict[str, Any] = {
            "transformer": QwenImageTransformer2DModel.from_pretrained(
                path, subfolder="transformer", torch_dtype=dtype
            ),
            "vae": AutoencoderKLQwenImage.from_pretrained(path, subfolder="vae", torch_dtype=dtype),
        }
        if config.load_text_encoders:
            from transformers import Qwen2_5_VLForConditionalGeneration

            parts["text_encoder"] = Qwen2_5_VLForConditionalGeneration.from_pretrained(
                path, subfolder="text_encoder", **transformers_dtype_kwargs(dtype)
            )
            parts["tokenizer"] = cls._load_tokenizer(path)
        return parts

    @classmethod
    def _load_tokenizer(cls, path: Path) -> Any:
        from transformers import Qwen2Tokenizer

        return Qwen2Tokenizer.from_pretrained(path, subfolder="tokenizer")

    @classmethod
    def from_pipeline(cls: type[P], pipe: Any, config: Any = None, **kwargs: Any) -> P:
        """Wraps the components of a loaded diffusers ``QwenImagePipeline`` (its
        ``transformer``, ``vae``, ``text_encoder`` and ``tokenizer``)."""
        if config is not None and not isinstance(config, cls.config_class):
            raise TypeError(
                f"config must be a {cls.config_class.__name__}, got {type(config).__name__}"
            )
        return super().from_pipeline(cls._pipeline_parts(pipe), config, **kwargs)

    @classmethod
    def _pipeline_parts(cls, pipe: Any) -> Any:
        """The pipeline as the shared :meth:`FlowTransformerPolicy.from_pipeline` reads it:
        one text encoder, no second pair."""
        return types.SimpleNamespace(
            transformer=pipe.transformer,
            vae=pipe.vae,
            text_encoder=pipe.text_encoder,
            tokenizer=pipe.tokenizer,
            text_encoder_2=None,
            tokenizer_2=None,
        )

    # ----------------------------------------------------------------- conditioning
    @torch.no_grad()
    def encode_prompts(
        self, prompts: Sequence[str], condition_images: torch.Tensor | None = None
    ) -> Conditioning:
        """Encodes ``N`` prompts as ``QwenImagePipeline.encode_prompt``: ``prompt_embeds``
        ``[N, max_sequence_length, D]`` (zero-padded) and ``prompt_embeds_mask``, plus (true
        CFG) the negative prompt's ``negative_*`` tensors repeated ``N`` times. Runs on
        ``text_encoder_device``; the result is on ``device``."""
        if condition_images is not None:
            raise ValueError("Qwen-Image is text-to-image; condition_images must be None")
        self._require_text_encoders()
        prompts = list(prompts)
        tensors = self._text_embeds(prompts)
        if self.config.do_true_cfg:
            negative_prompt = self._text_embeds([self.config.negative_prompt])
            tensors.update(repeated_negatives(negative_prompt, len(prompts)))
        return Conditioning({k: v.to(self.device) for k, v in tensors.items()})

    def _text_embeds(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        """Templated prompts → ``prompt_embeds`` ``[N, max_sequence_length, D]`` and
        ``prompt_embeds_mask`` (the
        pipeline tokenises with ``max_length = 1024 + drop``, keeps each row's valid tokens
        after the template's system part, then cuts to ``max_sequence_length``)."""
        c = self.config
        tokens = self.tokenizer(
            [c.prompt_template.format(p) for p in prompts],
            max_length=TOKENIZER_MAX_LENGTH + self.template_drop,
            padding=True,
            truncation=True,
            return_tensors="pt",
        )
        rows = encode_chat(self.text_encoder, tokens, self.template_drop, c.text_device)
        embeds, mask = stack_rows(rows, c.max_sequence_length)
        return {"prompt_embeds": embeds, "prompt_embeds_mask": mask}

    # ----------------------------------------------------------------- sampling
    def schedule(self, num_steps: int | None = None) -> Schedule:
        """Qwen-Image's sigmas (:func:`qwen_image_sigmas`) and ``timesteps = 1000·σ``."""
        n = num_steps or self.config.num_steps
        sigmas = qwen_image_sigmas(n, self.effective_shift, self.config.shift_terminal)
        return self.schedule_from_sigmas(sigmas)

    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning
    ) -> torch.Tensor:
        """Velocity ``v = ε − x0`` for packed ``latents`` ``[B, L, 4C]`` at ``timestep``
        (0..1000, a scalar or per-row ``[B]``), with true CFG and Qwen-Image's norm rescale
        (:func:`true_cfg_velocity`) in float32 when ``true_cfg_scale > 1``; differentiable."""
        return self._guided(latents, timestep, cond.tensors, self._img_shapes(cond.tensors), None)

    def _img_shapes(self, tensors: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
        """RoPE grid of each sample's image tokens: the generated image's ``(1, h/2, w/2)``."""
        return [(1, self.latent_height // 2, self.latent_width // 2)]

    def _guided(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor | float,
        tensors: dict[str, torch.Tensor],
        img_shapes: list[tuple[int, int, int]],
        extra_tokens: torch.Tensor | None,
    ) -> torch.Tensor:
        """The (guided) velocity of the first ``L`` tokens; ``extra_tokens`` ``[B, L_c, 4C]``
        (Edit's condition-image latents) are appended to the sequence."""
        batch, tokens = latents.shape[:2]
        hidden = latents if extra_tokens is None else torch.cat([latents, extra_tokens], dim=1)
        t = torch.as_tensor(timestep, device=self.device, dtype=torch.float32)
        t = t.expand(batch) if t.ndim == 0 else t.to(self.device)
        embeds, mask = tensors["prompt_embeds"], tensors["prompt_embeds_mask"]
        if not self.config.do_true_cfg:
            out = self._forward(hidden, t, embeds, mask, img_shapes)
            return out[:, :tokens].float()
        neg_embeds, neg_mask = (
            negative(tensors, "prompt_embeds", "true_cfg_scale"),
            negative(tensors, "prompt_embeds_mask", "true_cfg_scale"),
        )
        length = max(embeds.shape[1], neg_embeds.shape[1])
        neg_embeds, neg_mask = pad_text(neg_embeds, neg_mask, length)
        embeds, mask = pad_text(embeds, mask, length)
        out = self._forward(
            torch.cat([hidden, hidden]),
            torch.cat([t, t]),
            torch.cat([neg_embeds, embeds]),
            torch.cat([neg_mask, mask]),
            img_shapes,
        )
        uncond, cond_v = out[:, :tokens].float().chunk(2)
        return true_cfg_velocity(cond_v, uncond, self.config.true_cfg_scale)

    def _forward(
        self,
        hidden: torch.Tensor,
        t: torch.Tensor,
        embeds: torch.Tensor,
        mask: torch.Tensor,
        img_shapes: list[tuple[int, int, int]],
    ) -> torch.Tensor:
        """One transformer forward over ``hidden`` ``[B', L', 4C]`` with the text trimmed to
        the batch's longest prompt."""
        dtype = module_dtype(self.transformer)
        embeds, trimmed = trim_text(embeds.to(self.device), mask.to(self.device))
        with self.config.autocast():
            return self.transformer(
                hidden_states=hidden.to(self.device, dtype),
                timestep=(t / 1000).to(dtype),
                encoder_hidden_states=embeds.to(dtype),
                encoder_hidden_states_mask=trimmed,
                img_shapes=[img_shapes] * hidden.shape[0],
                return_dict=False,
            )[0]

    # ----------------------------------------------------------------- decoding
    def _decode_chunk(self, packed: torch.Tensor) -> torch.Tensor:
        """Packed latents → images in ``[-1, 1]``: un-normalised with the VAE's
        ``latents_mean`` / ``latents_std`` and decoded as one-frame videos (the pipeline's
        decoding)."""
        latents = unpack_latents(packed.float(), self.latent_height, self.latent_width)[:, :, None]
        latents = latents * self._latents_std.to(latents.device) + self._latents_mean.to(
            latents.device
        )
        latents = latents.to(self.config.decode_device, module_dtype(self.vae))
        return self.vae.decode(latents, return_dict=False)[0][:, :, 0]
