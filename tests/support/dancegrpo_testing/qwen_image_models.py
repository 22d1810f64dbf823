"""Tiny random-weight Qwen-Image components and pipelines (text-to-image, Edit, Edit-Plus) for
tests (offline, CPU, seconds).

Shapes follow diffusers' own Qwen-Image fast tests (``tests/pipelines/qwenimage``), kept to
the smallest that still exercise the real code paths, with the real model's geometry where
it matters:

- ``QwenImageTransformer2DModel``: 2 dual-stream blocks, 2 heads x 16 (RoPE axes 8+4+4),
  ``in_channels`` 16 = 4 latent channels x 2x2 packing, ``joint_attention_dim`` 32 (the text
  encoder's hidden size).
- ``AutoencoderKLQwenImage``: z_dim 4, ``dim_mult`` [1, 2, 4, 4] with
  ``temperal_downsample`` [False, True, True] as the released VAE (so spatial factor 8 and
  pixel sizes multiples of 16), 8 base channels, and a non-trivial ``latents_mean`` /
  ``latents_std`` so the (de)normalisation is exercised.
- Text: a 2-layer, 32-wide ``Qwen2_5_VLForConditionalGeneration`` with a 2-block vision tower
  (14-pixel patches, 2x2 merge, 2-frame temporal patches as the real model), behind an
  offline byte-level BPE ``Qwen2Tokenizer`` that knows Qwen2-VL's chat and vision tokens;
  the Edit pipelines get a ``Qwen2VLProcessor`` (small pixel budget) around it.
- ``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's scheduler config (dynamic exponential
  shift, ``max_shift`` 0.9, ``max_image_seq_len`` 8192, ``shift_terminal`` 0.02).

The pipelines drop ``prompt_template_encode_start_idx`` template tokens from the front of
the text encoder's hidden states: 34 (text-to-image) and 64 (Edit) for the real tokenizer.
The tiny tokenizer need not split the templates as Qwen's does (it happens to give the same
34 and 64), so the builders set the attribute to the tiny tokenizer's count of the
template's system part (what the adapters compute with ``prompt_template_encode_start_idx:
null``).
"""

from __future__ import annotations

from typing import Any

import torch

from dancegrpo_testing.tokenizers import train_byte_level_bpe

TINY_TEXT_HIDDEN = 32
TINY_Z_DIM = 4
#: Non-trivial per-channel latent statistics (the real VAE has 16 of each).
TINY_LATENTS_MEAN = [0.3, -0.2, 0.1, -0.4]
TINY_LATENTS_STD = [1.5, 0.8, 1.2, 2.0]
#: Pixels of the VL-encoder image the tiny processor accepts (28 px per merged token).
TINY_VL_MIN_PIXELS = 28 * 28
TINY_VL_MAX_PIXELS = 28 * 28 * 16

#: Qwen2-VL's chat and vision special tokens (ids 0..6 in the tiny vocabulary).
QWEN2_VL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
#: Qwen-Image's scheduler/scheduler_config.json (Qwen/Qwen-Image, also Qwen-Image-Edit).
QWEN_IMAGE_SCHEDULER_CONFIG = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
_WORDS = (
    "a photo of the cat dog red blue green car street house tree bird small large on in "
    "with make it turn into add remove change colour color background sky picture image "
    "person wearing hat sign that says hello world painting style"
)


def qwen_tokenizer(vocab_size: int = 600):
    """An offline byte-level BPE ``Qwen2Tokenizer`` (deterministic) with Qwen2-VL's special
    tokens; ``<|endoftext|>`` pads (right side, as the Qwen2 tokenizers)."""
    from transformers import Qwen2Tokenizer

    from dancegrpo_trainer.policies.qwen_image import (
        EDIT_PLUS_PROMPT_TEMPLATE,
        EDIT_PROMPT_TEMPLATE,
        PROMPT_TEMPLATE,
    )

    corpus = [_WORDS, PROMPT_TEMPLATE, EDIT_PROMPT_TEMPLATE, EDIT_PLUS_PROMPT_TEMPLATE]
    bpe = train_byte_level_bpe(corpus, list(QWEN2_VL_TOKENS), vocab_size=vocab_size)
    return Qwen2Tokenizer(tokenizer_object=bpe, padding_side="right")


def qwen_processor(tokenizer: Any | None = None):
    """A ``Qwen2VLProcessor`` around :func:`qwen_tokenizer` with Qwen2-VL's patch geometry
    (14 px patches, 2x2 merge) and a small pixel budget."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = {"min_pixels": TINY_VL_MIN_PIXELS, "max_pixels": TINY_VL_MAX_PIXELS}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer if tokenizer is not None else qwen_tokenizer(),
        video_processor=Qwen2VLVideoProcessor(**pixels),
    )


def tiny_qwen_text_encoder(tokenizer: Any, seed: int = 0):
    """A 2-layer, 32-wide ``Qwen2_5_VLForConditionalGeneration`` (2-block vision tower) whose
    special-token ids come from ``tokenizer``."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_TOKENS}
    config = Qwen2_5_VLConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": TINY_TEXT_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # head_dim 8 → 4 rotary frequencies split over (t, h, w) as Qwen2.5-VL's [16, 24, 24].
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 1000000.0,
                "mrope_section": [2, 1, 1],
            },
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": 2,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_heads": 2,
            "out_hidden_size": TINY_TEXT_HIDDEN,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 56,
            "fullatt_block_indexes": [1],
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def tiny_qwen_image_transformer(seed: int = 0, *, zero_cond_t: bool = False):
    """A 2-block ``QwenImageTransformer2DModel`` (2 heads x 16, RoPE axes 8+4+4) on 4 latent
    channels packed 2x2; ``zero_cond_t`` as Qwen-Image-Edit-2511's transformer."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=4 * TINY_Z_DIM,
        out_channels=TINY_Z_DIM,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_TEXT_HIDDEN,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
        zero_cond_t=zero_cond_t,
    )


def tiny_qwen_image_vae(seed: int = 0):
    """An ``AutoencoderKLQwenImage`` with the released VAE's 8x spatial compression."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(
        base_dim=8,
        z_dim=TINY_Z_DIM,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=list(TINY_LATENTS_MEAN),
        latents_std=list(TINY_LATENTS_STD),
    ).eval()


def qwen_image_scheduler():
    """``FlowMatchEulerDiscreteScheduler`` with Qwen-Image's scheduler config."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER_CONFIG)


def template_drop_count(tokenizer: Any, template: str) -> int:
    """Tokens of ``template``'s system part (through ``<|im_start|>user\\n``): what the
    pipelines' ``prompt_template_encode_start_idx`` (34 / 64 for the real tokenizer) drops."""
    from dancegrpo_trainer.policies.qwen_image import template_system_prefix

    return len(tokenizer(template_system_prefix(template)).input_ids)


def tiny_qwen_image_components(seed: int = 0, *, edit: bool = False) -> dict[str, Any]:
    """``transformer``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (and for
    ``edit`` a ``processor``) for a tiny Qwen-Image model."""
    tokenizer = qwen_tokenizer()
    parts = {
        "transformer": tiny_qwen_image_transformer(seed),
        "vae": tiny_qwen_image_vae(seed + 1),
        "text_encoder": tiny_qwen_text_encoder(tokenizer, seed + 2),
        "tokenizer": tokenizer,
        "scheduler": qwen_image_scheduler(),
    }
    if edit:
        parts["processor"] = qwen_processor(tokenizer)
    return parts


def tiny_qwen_image_pipeline(seed: int = 0):
    """A diffusers ``QwenImagePipeline`` from :func:`tiny_qwen_image_components`, its
    template drop count set for the tiny tokenizer. Save it with
    :func:`dancegrpo_testing.diffusion_models.save_pipeline` for ``from_pretrained``."""
    from diffusers import QwenImagePipeline

    pipe = QwenImagePipeline(**tiny_qwen_image_components(seed))
    pipe.prompt_template_encode_start_idx = template_drop_count(
        pipe.tokenizer, pipe.prompt_template_encode
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_qwen_image_edit_pipeline(seed: int = 0, *, plus: bool = False):
    """A diffusers ``QwenImageEditPipeline`` (``plus``: ``QwenImageEditPlusPipeline``, the
    Qwen-Image-Edit-2509 layout) from the tiny parts, with a processor, its template drop
    count set for the tiny tokenizer."""
    from diffusers import QwenImageEditPipeline, QwenImageEditPlusPipeline

    cls = QwenImageEditPlusPipeline if plus else QwenImageEditPipeline
    pipe = cls(**tiny_qwen_image_components(seed, edit=True))
    pipe.prompt_template_encode_start_idx = template_drop_count(
        pipe.tokenizer, pipe.prompt_template_encode
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
