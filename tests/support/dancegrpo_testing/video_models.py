"""Tiny random-weight HunyuanVideo components and pipelines (T2V, and SkyReels-V1 I2V built
from the same parts) for tests (offline, CPU, seconds).

Shapes follow diffusers' own HunyuanVideo fast tests (``tests/pipelines/hunyuan_video``),
kept to the smallest that still exercise the real code paths:

- ``HunyuanVideoTransformer3DModel``: 1 dual-stream + 1 single-stream block, 1 token-refiner
  block, 2 heads × 10 (RoPE axes 2+4+4), ``patch_size=2`` as the real model (so pixels must be
  multiples of 8·2 = 16), 4 latent channels, guidance embedding on; SkyReels I2V's takes
  8 input channels (noise + reference-image latents) and predicts 4.
- ``AutoencoderKLHunyuanVideo``: 4 levels of 8 channels, the real compression (spatial 8,
  temporal 4: ``num_frames = 4k + 1``) and the real ``scaling_factor`` 0.476986.
- Text: a 3-layer ``LlamaModel`` (hidden 16, so ``hidden_states[-3]`` is a real layer's
  output) behind an offline byte-level BPE tokenizer that knows Llama-3's header tokens,
  and the tiny CLIP text model of :mod:`dancegrpo_testing.diffusion_models` (pooled 32).
- ``FlowMatchEulerDiscreteScheduler(shift=7.0)``, the scheduler config of the diffusers
  HunyuanVideo checkpoints.

The BPE tokenizer is trained on a fixed word list and HunyuanVideo's prompt template at
build time (deterministic, ~0.1 s); any text still tokenizes, since every byte is in its
alphabet.
"""

from __future__ import annotations

from typing import Any

import torch

from dancegrpo_testing.diffusion_models import _T5_WORDS, TINY_HIDDEN, tiny_clip_text_model
from dancegrpo_testing.tokenizers import train_byte_level_bpe

#: Prompt tokens after the template (``max_sequence_length`` in the tests; real model: 256).
TINY_LLAMA_MAX_LENGTH = 16
TINY_LLAMA_HIDDEN = 16
TINY_LATENT_CHANNELS = 4

#: Llama-3's special tokens used by HunyuanVideo's prompt template (diffusers
#: ``pipeline_hunyuan_video.DEFAULT_PROMPT_TEMPLATE``), each kept as one token.
LLAMA3_SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def llama_tokenizer(model_max_length: int = 512):
    """An offline byte-level BPE tokenizer in Llama-3's format (``PreTrainedTokenizerFast``):
    ``<|begin_of_text|>`` prepended, Llama-3's header/eot tokens atomic, right padding with
    ``<|end_of_text|>`` (as the HunyuanVideo tokenizer, whose attention mask the transformer
    reads as right-padded)."""
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    corpus = [" ".join(_T5_WORDS), DEFAULT_PROMPT_TEMPLATE["template"]]
    tok = train_byte_level_bpe(corpus, LLAMA3_SPECIAL_TOKENS, vocab_size=400)
    bos = LLAMA3_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        padding_side="right",
        model_max_length=model_max_length,
    )


def tiny_llama_text_encoder(seed: int = 0, vocab_size: int | None = None):
    """A 3-layer ``LlamaModel`` (hidden 16) sized for :func:`llama_tokenizer`."""
    from transformers import LlamaConfig, LlamaModel

    config = LlamaConfig(
        vocab_size=vocab_size if vocab_size is not None else len(llama_tokenizer()),
        hidden_size=TINY_LLAMA_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    torch.manual_seed(seed)
    return LlamaModel(config).eval()


def tiny_hunyuan_video_transformer(
    seed: int = 0, *, guidance_embeds: bool = True, in_channels: int = TINY_LATENT_CHANNELS
):
    """A 1 + 1 block ``HunyuanVideoTransformer3DModel`` (2 heads × 10, ``patch_size=2``)
    predicting ``TINY_LATENT_CHANNELS``; ``in_channels`` twice that is SkyReels I2V's
    layout (noise + image latents stacked on channels, ``image_condition_type`` unset)."""
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=in_channels,
        out_channels=TINY_LATENT_CHANNELS,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=1,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=guidance_embeds,
        text_embed_dim=TINY_LLAMA_HIDDEN,
        pooled_projection_dim=TINY_HIDDEN,
        rope_axes_dim=(2, 4, 4),
    )


def tiny_hunyuan_video_vae(seed: int = 0):
    """A 4-level ``AutoencoderKLHunyuanVideo`` (8 channels) with the real compression ratios
    (spatial 8, temporal 4) and scaling factor."""
    from diffusers import AutoencoderKLHunyuanVideo

    torch.manual_seed(seed)
    block = ("HunyuanVideoDownBlock3D",) * 4
    return AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=TINY_LATENT_CHANNELS,
        down_block_types=block,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    ).eval()


def hunyuan_video_scheduler(shift: float = 7.0):
    """The ``FlowMatchEulerDiscreteScheduler`` config of the diffusers HunyuanVideo
    checkpoints (static ``shift`` 7.0, no dynamic shifting)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)


def tiny_hunyuan_video_components(seed: int = 0, *, shift: float = 7.0) -> dict[str, Any]:
    """``transformer``, ``vae``, ``text_encoder`` (Llama), ``tokenizer``, ``text_encoder_2``
    (CLIP), ``tokenizer_2``, ``scheduler`` for a tiny HunyuanVideo model."""
    from dancegrpo_testing.tokenizers import clip_tokenizer

    tokenizer = llama_tokenizer()
    return {
        "transformer": tiny_hunyuan_video_transformer(seed),
        "vae": tiny_hunyuan_video_vae(seed + 1),
        "text_encoder": tiny_llama_text_encoder(seed + 2, vocab_size=len(tokenizer)),
        "tokenizer": tokenizer,
        "text_encoder_2": tiny_clip_text_model(seed + 3),
        "tokenizer_2": clip_tokenizer(),
        "scheduler": hunyuan_video_scheduler(shift),
    }


def tiny_hunyuan_video_pipeline(seed: int = 0, *, shift: float = 7.0):
    """A diffusers ``HunyuanVideoPipeline`` from :func:`tiny_hunyuan_video_components`.

    Save it with :func:`dancegrpo_testing.diffusion_models.save_pipeline` to get a
    diffusers folder for ``HunyuanVideoPolicy.from_pretrained``.
    """
    from diffusers import HunyuanVideoPipeline

    pipe = HunyuanVideoPipeline(**tiny_hunyuan_video_components(seed, shift=shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_skyreels_i2v_pipeline(seed: int = 0, *, shift: float = 7.0):
    """A diffusers ``HunyuanSkyreelsImageToVideoPipeline``: the tiny HunyuanVideo parts of
    :func:`tiny_hunyuan_video_components` with a transformer taking ``2 × 4`` input channels
    (noise latents + VAE latents of the reference image, as SkyReels-V1's 32 = 16 + 16) and
    predicting 4. Save it with :func:`dancegrpo_testing.diffusion_models.save_pipeline` for
    ``SkyReelsI2VPolicy.from_pretrained``.
    """
    from diffusers import HunyuanSkyreelsImageToVideoPipeline

    components = tiny_hunyuan_video_components(seed, shift=shift)
    components["transformer"] = tiny_hunyuan_video_transformer(
        seed, in_channels=2 * TINY_LATENT_CHANNELS
    )
    pipe = HunyuanSkyreelsImageToVideoPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    return pipe
