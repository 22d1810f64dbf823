"""Tiny random-weight Wan components and pipelines for tests (offline, CPU, milliseconds).

One builder per released layout, shapes kept to the smallest that still run the real code
paths (diffusers' own Wan fast tests use the same kind of configs):

- ``WanTransformer3DModel``: 2 blocks, 2 heads × 12 (RoPE 4 + 4 + 4), ``patch_size (1, 2, 2)``
  as the real models, text dim 32, 4 latent channels. I2V (Wan2.1 and Wan2.2 A14B) takes
  ``4 + 4 + 4 = 12`` input channels (noise latents, the 4-channel first-frame mask, image
  latents); Wan2.1 I2V also reads CLIP image tokens (``image_dim`` 32).
- ``AutoencoderKLWan``: 4 levels of 4 channels, the real compression (8× space, 4× time:
  ``num_frames = 4k + 1``) and per-channel ``latents_mean`` / ``latents_std`` (the first 4
  of Wan2.1's); the Wan2.2 TI2V VAE variant patchifies 2×2 first (``is_residual``, 16× space).
- Text: a 2-layer ``UMT5EncoderModel`` (d_model 32) behind the offline T5 unigram tokenizer
  of :mod:`dancegrpo_testing.diffusion_models`. Image (Wan2.1 I2V): a 2-layer
  ``CLIPVisionModel`` (32 px, patch 8 → 17 tokens) with its ``CLIPImageProcessor``.
- Scheduler: the checkpoints' ``UniPCMultistepScheduler`` (flow prediction, flow sigmas,
  ``flow_shift``), which the adapters read the shift from.

Wan2.2 A14B builders hold two experts (different seeds) and the released
``boundary_ratio`` (0.875 T2V, 0.9 I2V); TI2V-5B sets ``expand_timesteps``. Save any
pipeline with :func:`dancegrpo_testing.diffusion_models.save_pipeline`.
"""

from __future__ import annotations

from typing import Any

import torch

from dancegrpo_testing.diffusion_models import t5_tokenizer

TINY_WAN_TEXT_DIM = 32
#: Prompt tokens (``max_sequence_length`` in the tests; real models: 512).
TINY_WAN_MAX_LENGTH = 16
TINY_WAN_LATENT_CHANNELS = 4
TINY_WAN_IMAGE_DIM = 32
#: The text length Wan2.1 I2V's transformer requires (diffusers' ``WanAttnProcessor``
#: takes the tokens past the last 512 of the context as image tokens).
WAN21_I2V_TEXT_LENGTH = 512
#: Wan2.1's latent normalisation, first four channels (so the tiny VAE's is not trivial).
_LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075]
_LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558]
#: Released boundaries (diffusers ``model_index.json``, Wan2.2 ``configs/wan_*_A14B.py``).
T2V_BOUNDARY_RATIO = 0.875
I2V_BOUNDARY_RATIO = 0.9


def tiny_umt5_encoder(seed: int = 0, vocab_size: int | None = None):
    """A 2-layer ``UMT5EncoderModel`` (d_model 32) sized for the tiny T5 tokenizer."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=vocab_size if vocab_size is not None else len(t5_tokenizer()),
        d_model=TINY_WAN_TEXT_DIM,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
    )
    torch.manual_seed(seed)
    return UMT5EncoderModel(config).eval()


def tiny_wan_transformer(
    seed: int = 0,
    *,
    in_channels: int = TINY_WAN_LATENT_CHANNELS,
    image_dim: int | None = None,
):
    """A 2-block ``WanTransformer3DModel`` predicting ``TINY_WAN_LATENT_CHANNELS``;
    ``in_channels=12`` is the I2V layout, ``image_dim`` adds Wan2.1 I2V's image tokens and
    their own key/value projections (``added_kv_proj_dim`` = the model width, as released;
    diffusers then splits the image tokens off assuming 512 text tokens, so a Wan2.1 I2V
    model needs ``max_sequence_length`` 512, see ``WAN21_I2V_TEXT_LENGTH``)."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    width = 2 * 12
    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=TINY_WAN_LATENT_CHANNELS,
        text_dim=TINY_WAN_TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        added_kv_proj_dim=width if image_dim is not None else None,
        rope_max_seq_len=32,
    )


def tiny_wan_vae(seed: int = 0, *, wan22: bool = False):
    """A 4-level ``AutoencoderKLWan``: Wan2.1's layout (8× space, 4× time), or
    (``wan22``) the Wan2.2 TI2V VAE's (2×2 patchify + residual blocks: 16× space)."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(seed)
    extra: dict[str, Any] = {}
    if wan22:
        extra = dict(
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            scale_factor_spatial=16,
        )
    return AutoencoderKLWan(
        base_dim=4,
        z_dim=TINY_WAN_LATENT_CHANNELS,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=_LATENTS_MEAN,
        latents_std=_LATENTS_STD,
        scale_factor_temporal=4,
        **extra,
    ).eval()


def tiny_clip_vision(seed: int = 0):
    """A 2-layer ``CLIPVisionModel`` (hidden 32, 32 px images, patch 8) and the
    ``CLIPImageProcessor`` that resizes and centre-crops to 32 px."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    config = CLIPVisionConfig(
        hidden_size=TINY_WAN_IMAGE_DIM,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
        projection_dim=TINY_WAN_IMAGE_DIM,
    )
    torch.manual_seed(seed)
    processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    return CLIPVisionModel(config).eval(), processor


def wan_unipc_scheduler(flow_shift: float = 3.0):
    """The ``UniPCMultistepScheduler`` the diffusers Wan checkpoints ship (flow prediction,
    flow sigmas, ``flow_shift``; 3.0 is Wan2.1-T2V-1.3B's)."""
    from diffusers import UniPCMultistepScheduler

    return UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=flow_shift,
        solver_order=2,
    )


def _text_components(seed: int) -> dict[str, Any]:
    tokenizer = t5_tokenizer()
    return {
        "tokenizer": tokenizer,
        "text_encoder": tiny_umt5_encoder(seed, vocab_size=len(tokenizer)),
    }


def _finish(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_wan_t2v_pipeline(seed: int = 0, *, flow_shift: float = 3.0):
    """Wan2.1 T2V (1.3B / 14B layout): one transformer, ``WanPipeline``."""
    from diffusers import WanPipeline

    return _finish(
        WanPipeline(
            transformer=tiny_wan_transformer(seed),
            vae=tiny_wan_vae(seed + 1),
            scheduler=wan_unipc_scheduler(flow_shift),
            **_text_components(seed + 2),
        )
    )


def tiny_wan_i2v_pipeline(seed: int = 0, *, flow_shift: float = 3.0):
    """Wan2.1 I2V (14B layout): one transformer taking noise + mask + image latents and CLIP
    image tokens, ``WanImageToVideoPipeline`` with its image encoder and processor."""
    from diffusers import WanImageToVideoPipeline

    encoder, processor = tiny_clip_vision(seed + 3)
    c = TINY_WAN_LATENT_CHANNELS
    return _finish(
        WanImageToVideoPipeline(
            transformer=tiny_wan_transformer(seed, in_channels=3 * c, image_dim=TINY_WAN_IMAGE_DIM),
            vae=tiny_wan_vae(seed + 1),
            scheduler=wan_unipc_scheduler(flow_shift),
            image_encoder=encoder,
            image_processor=processor,
            **_text_components(seed + 2),
        )
    )


def tiny_wan22_t2v_pipeline(seed: int = 0, *, flow_shift: float = 12.0):
    """Wan2.2 T2V-A14B: ``transformer`` (high-noise expert) and ``transformer_2`` (low-noise
    expert), ``boundary_ratio`` 0.875, ``WanPipeline``."""
    from diffusers import WanPipeline

    return _finish(
        WanPipeline(
            transformer=tiny_wan_transformer(seed),
            transformer_2=tiny_wan_transformer(seed + 10),
            boundary_ratio=T2V_BOUNDARY_RATIO,
            vae=tiny_wan_vae(seed + 1),
            scheduler=wan_unipc_scheduler(flow_shift),
            **_text_components(seed + 2),
        )
    )


def tiny_wan22_i2v_pipeline(seed: int = 0, *, flow_shift: float = 5.0):
    """Wan2.2 I2V-A14B: two experts on noise + mask + image latents (no image encoder),
    ``boundary_ratio`` 0.9, ``WanImageToVideoPipeline``."""
    from diffusers import WanImageToVideoPipeline

    c = TINY_WAN_LATENT_CHANNELS
    return _finish(
        WanImageToVideoPipeline(
            transformer=tiny_wan_transformer(seed, in_channels=3 * c),
            transformer_2=tiny_wan_transformer(seed + 10, in_channels=3 * c),
            boundary_ratio=I2V_BOUNDARY_RATIO,
            vae=tiny_wan_vae(seed + 1),
            scheduler=wan_unipc_scheduler(flow_shift),
            image_encoder=None,
            image_processor=None,
            **_text_components(seed + 2),
        )
    )


def tiny_wan22_ti2v_pipeline(seed: int = 0, *, image: bool = False, flow_shift: float = 5.0):
    """Wan2.2 TI2V-5B: one transformer on the 16×-space VAE's latents, ``expand_timesteps``;
    ``WanPipeline`` (text) or, with ``image``, ``WanImageToVideoPipeline`` over the same
    components (as diffusers loads the one checkpoint both ways)."""
    from diffusers import WanImageToVideoPipeline, WanPipeline

    components = dict(
        transformer=tiny_wan_transformer(seed),
        vae=tiny_wan_vae(seed + 1, wan22=True),
        scheduler=wan_unipc_scheduler(flow_shift),
        expand_timesteps=True,
        **_text_components(seed + 2),
    )
    if image:
        return _finish(
            WanImageToVideoPipeline(**components, image_encoder=None, image_processor=None)
        )
    return _finish(WanPipeline(**components))
