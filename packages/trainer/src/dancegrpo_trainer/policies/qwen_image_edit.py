"""Qwen-Image-Edit and Qwen-Image-Edit-Plus (2509 / 2511) image editing, sampled with the flow
SDE, as Policies.

The loops are diffusers' ``QwenImageEditPipeline`` and ``QwenImageEditPlusPipeline``
(diffusers 0.42) cut down to what GRPO needs; text-to-image Qwen-Image
(:mod:`.qwen_image`: transformer, VAE normalisation, packed latents, schedule, true CFG with
the norm rescale, decoding) plus the source image(s), which condition the model twice:

- **in the text encoder**: the prompt's chat template holds vision tokens and Qwen2.5-VL
  (through its ``Qwen2VLProcessor``) sees the image. Edit: one image, resized to
  ``condition_image_area`` pixels at its aspect ratio, its tokens inside the user turn;
  Edit-Plus: each image resized to ``vl_image_area`` (384² in diffusers) and announced as
  ``Picture k: <vision tokens>`` before the instruction. So the prompt embeddings (and the
  negative prompt's, which sees the image too) depend on the image;
- **in the sequence**: each image, resized to ``condition_image_area`` pixels (1024² in
  diffusers) at its aspect ratio (sides multiples of 32), VAE-encoded (posterior mode, as
  the pipelines' ``sample_mode="argmax"``), normalised and packed, is appended after the
  noisy latents' tokens; the transformer's RoPE gets every image's grid (``img_shapes``)
  and the velocity is read from the first ``L`` tokens.

Because the text embeddings depend on the image, an embedding cache (keyed by prompt, text
only) cannot serve these policies: the text encoder stays loaded (``text_encoder_device``
may put it on another GPU or the CPU).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from dancegrpo_trainer.policies.base import Conditioning
from dancegrpo_trainer.policies.condition_images import to_pil_images
from dancegrpo_trainer.policies.flux_latents import pack_latents
from dancegrpo_trainer.policies.qwen_image import (
    EDIT_PLUS_PROMPT_TEMPLATE,
    EDIT_PROMPT_TEMPLATE,
    EDIT_PROMPT_TEMPLATE_START_IDX,
    QwenImageBaseConfig,
    QwenImagePolicy,
    encode_chat,
    stack_rows,
)
from dancegrpo_trainer.policies.runtime import module_dtype

#: diffusers' ``VAE_IMAGE_SIZE`` (Edit-Plus) and the Edit pipeline's ``1024 * 1024``: pixels
#: of each VAE-encoded source image.
CONDITION_IMAGE_AREA = 1024 * 1024
#: diffusers' ``CONDITION_IMAGE_SIZE`` (Edit-Plus): pixels of each image the text encoder sees.
VL_IMAGE_AREA = 384 * 384
#: Edit-Plus's announcement of the ``k``-th image in the prompt.
PICTURE_PROMPT = "Picture {}: <|vision_start|><|image_pad|><|vision_end|>"
IMAGE_KEY = "image_latents"
SHAPES_KEY = "image_shapes"


def edit_dimensions(area: int, width: int, height: int) -> tuple[int, int]:
    """``(width, height)`` of about ``area`` pixels at the ``width / height`` aspect ratio,
    each rounded to a multiple of 32 (diffusers' Qwen-Image-Edit ``calculate_dimensions``)."""
    ratio = width / height
    new_width = math.sqrt(area * ratio)
    new_height = new_width / ratio
    return round(new_width / 32) * 32, round(new_height / 32) * 32


@dataclasses.dataclass
class QwenImageEditConfig(QwenImageBaseConfig):
    """Options of :class:`QwenImageEditPolicy` (Qwen-Image-Edit), those of
    :class:`QwenImageBaseConfig` with the Edit template, plus:

    Attributes:
        condition_image_area: pixels each source image is resized to (aspect kept, sides
            multiples of 32) before VAE encoding, and, for Edit, before the text encoder
            sees it; diffusers: 1024² (≈ 4096 extra tokens per image at every forward);
            Flow-Factory trains Edit-Plus with 384².

    ``max_sequence_length`` does not exist here: the Edit pipelines keep every prompt token
    (the vision tokens included); embeddings are padded to the batch's longest row.
    """

    prompt_template: str = EDIT_PROMPT_TEMPLATE
    prompt_template_encode_start_idx: int | None = EDIT_PROMPT_TEMPLATE_START_IDX
    condition_image_area: int = CONDITION_IMAGE_AREA

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.condition_image_area < 32 * 32:
            raise ValueError(
                f"condition_image_area must be >= 1024 pixels (32x32), got {self.condition_image_area}"
            )


@dataclasses.dataclass
class QwenImageEditPlusConfig(QwenImageEditConfig):
    """Options of :class:`QwenImageEditPlusPolicy` (Qwen-Image-Edit-2509 / 2511), those of
    :class:`QwenImageEditConfig` with the Edit-Plus template, plus:

    Attributes:
        vl_image_area: pixels each source image is resized to for the text encoder
            (diffusers: 384²).
    """

    prompt_template: str = EDIT_PLUS_PROMPT_TEMPLATE
    vl_image_area: int = VL_IMAGE_AREA

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.vl_image_area < 28 * 28:
            raise ValueError(
                f"vl_image_area must be >= 784 pixels (28x28), got {self.vl_image_area}"
            )


class QwenImageEditPolicy(QwenImagePolicy):
    """Qwen-Image-Edit transformer + flow SDE behind the :class:`Policy` interface: one source
    image per prompt.

    Latents are packed float32 ``[B, L, 4C]`` of the edited image. Conditioning tensors:
    ``prompt_embeds`` ``[B, S, D]`` / ``prompt_embeds_mask`` (template + vision tokens +
    instruction, padded to the batch's longest row), their ``negative_*`` twins with true
    CFG (the negative prompt with the same image), ``image_latents`` ``[B, L_c, 4C]`` (the
    packed, normalised source latents of every image of the row, in order) and
    ``image_shapes`` int64 ``[B, K, 2]`` (each image's packed grid, for RoPE). The
    ``tokenizer`` is the pipeline's ``Qwen2VLProcessor``: ``from_pretrained`` reads
    ``transformer/``, ``vae/``, ``text_encoder/`` and ``processor/`` of a diffusers folder
    (``Qwen/Qwen-Image-Edit``; Edit-Plus: ``Qwen/Qwen-Image-Edit-2509``).
    """

    config_class: ClassVar = QwenImageEditConfig
    config: QwenImageEditConfig
    #: Whether a prompt may come with several source images (Edit-Plus).
    multi_image: ClassVar[bool] = False

    def _init_geometry(self) -> None:
        super()._init_geometry()
        from diffusers.image_processor import VaeImageProcessor

        # The pipelines' image processor (resize with Lanczos, scale to [-1, 1]).
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor * 2)

    @classmethod
    def _load_tokenizer(cls, path: Path) -> Any:
        from transformers import Qwen2VLProcessor

        return Qwen2VLProcessor.from_pretrained(path, subfolder="processor")

    @classmethod
    def _pipeline_parts(cls, pipe: Any) -> Any:
        parts = super()._pipeline_parts(pipe)
        parts.tokenizer = pipe.processor
        return parts

    # ----------------------------------------------------------------- conditioning
    def encode_condition_images(self, condition_images: torch.Tensor) -> Conditioning:
        """Refused: the prompt embeddings depend on the image, so cached text cannot be
        combined with separately encoded images."""
        raise ValueError(
            f"{type(self).__name__}: Qwen-Image-Edit's text encoder sees the source image, so "
            "its prompt embeddings cannot come from an embedding cache (keyed by prompt text): "
            "unset data.embedding_cache and keep the text encoder loaded (text_encoder_device "
            "may place it on another GPU or the CPU)"
        )

    @torch.no_grad()
    def encode_prompts(self, prompts: Sequence[str], condition_images: Any = None) -> Conditioning:
        """Encodes ``N`` edit instructions with their source images.

        Args:
            prompts: ``N`` instructions.
            condition_images: the source images, ``uint8``: ``[N, H, W, 3]`` (one per
                prompt); Edit-Plus also takes ``[N, K, H, W, 3]`` or ``N`` sequences of
                ``[H, W, 3]`` images (``K`` per prompt, any sizes; every prompt's images must
                give the same latent sizes, so that the rows stack).

        Returns:
            the text (with true CFG the negative prompt's too, each row with its images) and
            the images' ``image_latents`` / ``image_shapes``, on ``device``.
        """
        prompts = list(prompts)
        if condition_images is None:
            raise ValueError(
                f"{type(self).__name__} edits images: every prompt needs its source image "
                "(condition_images; a .jsonl prompt file's condition_image)"
            )
        self._require_text_encoders()
        images = self._image_lists(condition_images, len(prompts))
        prepared = [[self._prepare_image(img) for img in row] for row in images]
        vl_images = [vl for row in prepared for vl, _ in row]
        rows = self._text_rows(prompts, [len(r) for r in prepared], vl_images)
        tensors: dict[str, torch.Tensor] = {}
        if self.config.do_true_cfg:
            negatives = [self.config.negative_prompt] * len(prompts)
            negative_rows = self._text_rows(negatives, [len(r) for r in prepared], vl_images)
            length = max(r.shape[0] for r in rows + negative_rows)
            neg_embeds, neg_mask = stack_rows(negative_rows, length)
            tensors["negative_prompt_embeds"], tensors["negative_prompt_embeds_mask"] = (
                neg_embeds,
                neg_mask,
            )
        else:
            length = max(r.shape[0] for r in rows)
        tensors["prompt_embeds"], tensors["prompt_embeds_mask"] = stack_rows(rows, length)
        tensors.update(self._image_tensors([[pixels for _, pixels in row] for row in prepared]))
        return Conditioning({k: v.to(self.device) for k, v in tensors.items()})

    def _image_lists(self, images: Any, n: int) -> list[list[torch.Tensor]]:
        """``condition_images`` as ``n`` lists of ``uint8 [H, W, 3]`` images."""
        if isinstance(images, (torch.Tensor, np.ndarray)):
            images = torch.as_tensor(images)
            if images.ndim == 4:
                images = images[:, None]
            if images.ndim != 5:
                raise ValueError(
                    "condition_images must be uint8 [N, H, W, 3] (or [N, K, H, W, 3]), got "
                    f"{images.dtype} {tuple(images.shape)}"
                )
            lists = [list(row) for row in images]
        else:
            lists = [[torch.as_tensor(img) for img in row] for row in images]
        if len(lists) != n:
            raise ValueError(f"{len(lists)} condition images for {n} prompts")
        for row in lists:
            if not row:
                raise ValueError("every prompt needs at least one condition image")
            if len(row) > 1 and not self.multi_image:
                raise ValueError(
                    f"{type(self).__name__} takes one source image per prompt, got {len(row)}; "
                    "Qwen-Image-Edit-Plus (model.kind qwen_image_edit_plus) takes several"
                )
            for img in row:
                if img.dtype != torch.uint8 or img.ndim != 3 or img.shape[-1] != 3:
                    raise ValueError(
                        "condition_images must be uint8 [H, W, 3] images, got "
                        f"{img.dtype} {tuple(img.shape)}"
                    )
        return lists

    def _prepare_image(self, image: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """One source image → (the PIL image the text encoder sees, VAE input
        ``[1, 3, h, w]`` in ``[-1, 1]``). Edit: both at ``condition_image_area`` (the pipeline
        resizes once and encodes the resized image twice)."""
        pil = to_pil_images(image[None])[0]
        width, height = edit_dimensions(self.config.condition_image_area, *pil.size)
        resized = self.image_processor.resize(pil, height, width)
        return resized, self.image_processor.preprocess(resized, height, width)

    def _chat_texts(self, prompts: list[str], counts: list[int]) -> list[str]:
        """Each prompt in the chat template (Edit: the template holds the vision tokens)."""
        return [self.config.prompt_template.format(p) for p in prompts]

    def _text_rows(
        self, prompts: list[str], counts: list[int], vl_images: list[Any]
    ) -> list[torch.Tensor]:
        """Per-row hidden states ``[S_i, D]`` of the templated prompts with their images, the
        template's system part dropped (diffusers' Edit ``_get_qwen_prompt_embeds``: the
        processor pads to the longest row; no truncation)."""
        inputs = self.tokenizer(
            text=self._chat_texts(prompts, counts),
            images=vl_images,
            padding=True,
            return_tensors="pt",
        )
        return encode_chat(self.text_encoder, inputs, self.template_drop, self.config.text_device)

    def _image_tensors(self, pixels: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Source pixels (``K`` per row) → ``image_latents`` ``[N, ΣL_k, 4C]`` and
        ``image_shapes`` ``[N, K, 2]``, checking every row has the same grids."""
        latents, shapes = [], []
        for row in pixels:
            encoded = [self._encode_image(p) for p in row]
            latents.append(torch.cat([pack_latents(e) for e in encoded], dim=1))
            shapes.append(torch.tensor([[e.shape[-2] // 2, e.shape[-1] // 2] for e in encoded]))
        if any(not torch.equal(s, shapes[0]) for s in shapes):
            sizes = [
                [
                    (2 * h * self.vae_scale_factor, 2 * w * self.vae_scale_factor)
                    for h, w in s.tolist()
                ]
                for s in shapes
            ]
            raise ValueError(
                "condition images encoded together must give the same sizes (the rows of a "
                f"batch stack); got (height, width) per prompt {sizes}: give the source "
                "images of one batch the same aspect ratio"
            )
        return {IMAGE_KEY: torch.cat(latents), SHAPES_KEY: torch.stack(shapes).to(torch.long)}

    def _encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``[1, 3, h, w]`` in ``[-1, 1]`` → normalised posterior-mode latents
        ``[1, C, h/8, w/8]`` float32 (``(mode − latents_mean) / latents_std``, the
        pipelines' ``_encode_vae_image``)."""
        vae = self.vae
        video = pixels[:, :, None].to(self.config.decode_device, module_dtype(vae))
        mode = vae.encode(video).latent_dist.mode().float()
        mean, std = self._latents_mean.to(mode.device), self._latents_std.to(mode.device)
        return ((mode - mean) / std)[:, :, 0].cpu()

    # ----------------------------------------------------------------- sampling
    def predict(
        self, latents: torch.Tensor, timestep: torch.Tensor | float, cond: Conditioning
    ) -> torch.Tensor:
        """Velocity for the edited image's packed ``latents`` ``[B, L, 4C]``: the transformer
        on ``[latents, source latents]`` (tokens), read at the first ``L`` tokens, with true
        CFG and the norm rescale in float32 when ``true_cfg_scale > 1``; differentiable."""
        tensors = cond.tensors
        if IMAGE_KEY not in tensors or SHAPES_KEY not in tensors:
            raise ValueError(
                f"{type(self).__name__} needs the source image: encode_prompts(prompts, "
                "condition_images=...)"
            )
        image = tensors[IMAGE_KEY].to(latents.device, latents.dtype)
        img_shapes = self._img_shapes(tensors)
        expected = sum(h * w for _, h, w in img_shapes[1:])
        if image.shape[0] != latents.shape[0] or image.shape[1] != expected:
            raise ValueError(
                f"image_latents {tuple(image.shape)} do not match latents "
                f"{tuple(latents.shape)} and image_shapes (expected {expected} tokens)"
            )
        return self._guided(latents, timestep, tensors, img_shapes, image)

    def _img_shapes(self, tensors: dict[str, torch.Tensor]) -> list[tuple[int, int, int]]:
        """The edited image's grid, then each source image's (the same for every row)."""
        shapes = tensors[SHAPES_KEY]
        if not bool((shapes == shapes[:1]).all()):
            raise ValueError("image_shapes differ between rows: encode rows of one size together")
        grids = [(1, int(h), int(w)) for h, w in shapes[0].tolist()]
        return [*super()._img_shapes(tensors), *grids]


class QwenImageEditPlusPolicy(QwenImageEditPolicy):
    """Qwen-Image-Edit-Plus (2509, 2511: ``zero_cond_t`` transformers too): as
    :class:`QwenImageEditPolicy`, with one or more source images per prompt, each announced
    as ``Picture k:`` in the prompt and shown to the text encoder at ``vl_image_area``."""

    config_class: ClassVar = QwenImageEditPlusConfig
    config: QwenImageEditPlusConfig
    multi_image: ClassVar[bool] = True

    def _prepare_image(self, image: torch.Tensor) -> tuple[Any, torch.Tensor]:
        """The text encoder's copy at ``vl_image_area``, the VAE's at
        ``condition_image_area``, both resized from the source (as the Edit-Plus pipeline)."""
        pil = to_pil_images(image[None])[0]
        vl_width, vl_height = edit_dimensions(self.config.vl_image_area, *pil.size)
        width, height = edit_dimensions(self.config.condition_image_area, *pil.size)
        vl_image = self.image_processor.resize(pil, vl_height, vl_width)
        return vl_image, self.image_processor.preprocess(pil, height, width)

    def _chat_texts(self, prompts: list[str], counts: list[int]) -> list[str]:
        """``Picture 1: <vision> ... Picture K: <vision>`` + the instruction, templated."""
        texts = []
        for prompt, count in zip(prompts, counts, strict=True):
            pictures = "".join(PICTURE_PROMPT.format(k + 1) for k in range(count))
            texts.append(self.config.prompt_template.format(pictures + prompt))
        return texts
