"""Tiny random-weight diffusion components and pipelines (Stable Diffusion, FLUX,
FLUX.1-Kontext, Stable Diffusion 3.5) for tests.

Every builder seeds ``torch`` before creating weights, so two calls give identical models,
and each runs in milliseconds on a CPU. Shapes are chosen to be the smallest that still
exercise the real code paths:

- Stable Diffusion: a 2-level UNet (``block_out_channels=(32, 64)``, ``sample_size=8``,
  ``cross_attention_dim=32``) and a 2-level VAE (scale factor 2) → 16×16 px images.
- FLUX: a 1+1-layer ``FluxTransformer2DModel`` (``in_channels=16`` = 4 latent channels
  packed 2×2, ``joint_attention_dim=32``, ``pooled_projection_dim=32``, guidance embedding)
  with a CLIP text model (pooled, hidden 32) and a tiny T5 encoder (d_model 32).
  FLUX.1-Kontext reuses these parts in a ``FluxKontextPipeline``.
- Stable Diffusion 3.5: a 2-block ``SD3Transformer2DModel`` (QK norm, one dual-attention
  block as SD3.5's MMDiT-X), SD3's VAE factors, two CLIP text models with projection and a
  T5 of width 64 (the joint attention dim).

The CLIP tokenizer is the real OpenAI vocabulary (:func:`dancegrpo_testing.tokenizers.clip_tokenizer`);
the T5 tokenizer is a small unigram model over a fixed word list, built offline.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any

import torch

CLIP_VOCAB_SIZE = 49408
TINY_HIDDEN = 32
TINY_T5_MAX_LENGTH = 16

_T5_WORDS = [
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "at",
    "to",
    "is",
    "are",
    "photo",
    "picture",
    "image",
    "painting",
    "cat",
    "cats",
    "dog",
    "dogs",
    "bird",
    "car",
    "tree",
    "house",
    "red",
    "green",
    "blue",
    "yellow",
    "black",
    "white",
    "sitting",
    "running",
    "table",
    "chair",
    "beautiful",
    "small",
    "large",
    "two",
    "three",
    "sky",
    "sun",
    "moon",
    "flower",
]


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


def t5_tokenizer():
    """A tiny offline ``T5TokenizerFast`` (unigram model, ``<pad>``=0, ``</s>``=1, ``<unk>``=2).

    Known words and single characters are in the vocabulary, so any lower-case ASCII text
    tokenizes without ``<unk>``; an ``</s>`` is appended as in the real T5 tokenizer.
    """
    from transformers import T5TokenizerFast

    special = ["<pad>", "</s>", "<unk>"]
    pieces = ["▁" + w for w in _T5_WORDS]
    pieces += ["▁"] + list(string.ascii_letters) + list(string.digits) + list(".,!?'-:;")
    # Whole words score higher than characters, so the unigram model prefers them.
    vocab = [(tok, 0.0) for tok in special]
    vocab += [(p, -1.0 - (len(p) == 1) * 5.0) for p in pieces]
    return T5TokenizerFast(vocab=vocab, extra_ids=0, model_max_length=TINY_T5_MAX_LENGTH)


def tiny_clip_text_model(
    seed: int = 0, *, with_projection: bool = False, hidden_size: int = TINY_HIDDEN
):
    """A 2-layer CLIP text encoder (hidden 32) over the full CLIP vocabulary.

    ``with_projection=True`` gives a ``CLIPTextModelWithProjection`` (``text_embeds``
    ``[B, hidden_size]``) instead of a ``CLIPTextModel`` (``pooler_output`` ``[B, hidden_size]``).
    """
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=hidden_size,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    _seeded(seed)
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return cls(config).eval()


def tiny_t5_encoder(seed: int = 0, vocab_size: int | None = None, *, d_model: int = TINY_HIDDEN):
    """A 2-layer ``T5EncoderModel`` (d_model 32 unless given) sized for :func:`t5_tokenizer`."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size if vocab_size is not None else len(t5_tokenizer()),
        d_model=d_model,
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
    _seeded(seed)
    return T5EncoderModel(config).eval()


#: ``(scaling_factor, shift_factor)`` of the real VAEs, so the adapters' latent
#: normalisation is exercised with each model's own values.
VAE_FACTORS = {"sd": (0.18215, None), "flux": (0.3611, 0.1159), "sd3": (1.5305, 0.0609)}


def tiny_vae(
    seed: int = 0, *, latent_channels: int = 4, flux: bool = False, factors: str | None = None
):
    """A 2-level ``AutoencoderKL`` (spatial scale factor 2).

    ``flux=True`` sets FLUX's ``scaling_factor``/``shift_factor`` (0.3611 / 0.1159) instead
    of SD's (0.18215, no shift); ``factors`` names any entry of :data:`VAE_FACTORS`
    (``"sd3"``: 1.5305 / 0.0609).
    """
    from diffusers import AutoencoderKL

    scaling, shift = VAE_FACTORS[factors or ("flux" if flux else "sd")]
    _seeded(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        norm_num_groups=8,
        latent_channels=latent_channels,
        sample_size=16,
        scaling_factor=scaling,
        shift_factor=shift,
    ).eval()


def tiny_unet(seed: int = 0):
    """A 2-level ``UNet2DConditionModel`` (32/64 channels, cross-attention dim 32, 8×8 latents)."""
    from diffusers import UNet2DConditionModel

    _seeded(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TINY_HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )


def tiny_flux_transformer(seed: int = 0, *, guidance_embeds: bool = True):
    """A 1 double + 1 single block ``FluxTransformer2DModel`` (2 heads × 16, RoPE axes 4+6+6)."""
    from diffusers import FluxTransformer2DModel

    _seeded(seed)
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=TINY_HIDDEN,
        pooled_projection_dim=TINY_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 6, 6),
    )


def ddim_scheduler(prediction_type: str = "epsilon"):
    """SD 1.x/2.x's DDIM configuration (scaled-linear betas, ``steps_offset=1``)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def flow_match_scheduler(*, dynamic_shift: bool = False, shift: float = 3.0):
    """FLUX.1-dev's ``FlowMatchEulerDiscreteScheduler`` config (dynamic shift optional)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=shift,
        use_dynamic_shifting=dynamic_shift,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def tiny_stable_diffusion_components(
    seed: int = 0, *, prediction_type: str = "epsilon"
) -> dict[str, Any]:
    """``unet``, ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` for a tiny SD model."""
    from dancegrpo_testing.tokenizers import clip_tokenizer

    return {
        "unet": tiny_unet(seed),
        "vae": tiny_vae(seed + 1),
        "text_encoder": tiny_clip_text_model(seed + 2),
        "tokenizer": clip_tokenizer(),
        "scheduler": ddim_scheduler(prediction_type),
    }


def tiny_stable_diffusion_pipeline(seed: int = 0, *, prediction_type: str = "epsilon"):
    """A ``StableDiffusionPipeline`` (DDIM scheduler, no safety checker) from tiny parts."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **tiny_stable_diffusion_components(seed, prediction_type=prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_components(seed: int = 0, *, dynamic_shift: bool = False) -> dict[str, Any]:
    """``transformer``, ``vae``, ``text_encoder`` (CLIP), ``tokenizer``, ``text_encoder_2``
    (T5), ``tokenizer_2``, ``scheduler`` for a tiny FLUX model."""
    from dancegrpo_testing.tokenizers import clip_tokenizer

    t5_tok = t5_tokenizer()
    return {
        "transformer": tiny_flux_transformer(seed),
        "vae": tiny_vae(seed + 1, flux=True),
        "text_encoder": tiny_clip_text_model(seed + 2),
        "tokenizer": clip_tokenizer(),
        "text_encoder_2": tiny_t5_encoder(seed + 3, vocab_size=len(t5_tok)),
        "tokenizer_2": t5_tok,
        "scheduler": flow_match_scheduler(dynamic_shift=dynamic_shift),
    }


def tiny_flux_pipeline(seed: int = 0, *, dynamic_shift: bool = False):
    """A ``FluxPipeline`` (FlowMatchEuler scheduler, static shift 3 unless ``dynamic_shift``)."""
    from diffusers import FluxPipeline

    pipe = FluxPipeline(**tiny_flux_components(seed, dynamic_shift=dynamic_shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_flux_kontext_pipeline(seed: int = 0, *, dynamic_shift: bool = True):
    """A ``FluxKontextPipeline`` on the tiny FLUX parts (FLUX.1-Kontext-dev has the FLUX.1-dev
    architecture; its scheduler uses the dynamic shift, on by default here)."""
    from diffusers import FluxKontextPipeline

    pipe = FluxKontextPipeline(**tiny_flux_components(seed, dynamic_shift=dynamic_shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


#: Width of the tiny SD3 T5 (= the transformer's ``joint_attention_dim``): at least the two
#: tiny CLIPs' hidden sizes side by side (32 + 32), which SD3 zero-pads to the T5 width.
TINY_SD3_T5_DIM = 64


def tiny_sd3_transformer(seed: int = 0):
    """A 2-block ``SD3Transformer2DModel`` in SD3.5's MMDiT-X form (QK RMS-norm, a dual
    attention block): 4 heads × 8, patch 2, 4 latent channels, joint attention dim 64
    (T5), pooled projection 64 (CLIP-L + CLIP-G pooled, 32 each)."""
    from diffusers import SD3Transformer2DModel

    _seeded(seed)
    return SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=TINY_SD3_T5_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TINY_HIDDEN,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )


def tiny_sd3_components(seed: int = 0, *, shift: float = 3.0) -> dict[str, Any]:
    """``transformer``, ``vae`` (SD3's scaling/shift factors), ``text_encoder`` (CLIP-L with
    projection), ``tokenizer``, ``text_encoder_2`` (CLIP-G with projection), ``tokenizer_2``,
    ``text_encoder_3`` (T5, d_model 64), ``tokenizer_3`` and ``scheduler`` (FlowMatchEuler,
    static shift 3 as SD3.5's) for a tiny Stable Diffusion 3.5."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from dancegrpo_testing.tokenizers import clip_tokenizer

    t5_tok = t5_tokenizer()
    return {
        "transformer": tiny_sd3_transformer(seed),
        "vae": tiny_vae(seed + 1, factors="sd3"),
        "text_encoder": tiny_clip_text_model(seed + 2, with_projection=True),
        "tokenizer": clip_tokenizer(),
        "text_encoder_2": tiny_clip_text_model(seed + 3, with_projection=True),
        "tokenizer_2": clip_tokenizer(),
        "text_encoder_3": tiny_t5_encoder(seed + 4, len(t5_tok), d_model=TINY_SD3_T5_DIM),
        "tokenizer_3": t5_tok,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
    }


def tiny_sd3_pipeline(seed: int = 0, *, shift: float = 3.0):
    """A ``StableDiffusion3Pipeline`` from :func:`tiny_sd3_components`."""
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed, shift=shift))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: Any, directory: str | Path) -> Path:
    """``save_pretrained`` a pipeline (safetensors) into ``directory``; returns the path."""
    directory = Path(directory)
    pipe.save_pretrained(directory, safe_serialization=True)
    return directory


def rollout_trajectory(policy, cond, num_steps: int, eta: float, seed: int, noise=None):
    """Samples ``len(cond)`` trajectories with ``policy`` (no grad) from a seeded generator
    (the initial noise too, unless ``noise`` gives it).

    Returns ``(schedule, [x_0 .. x_num_steps], log_probs [N, num_steps])``.
    """
    import torch

    generator = torch.Generator().manual_seed(seed)
    schedule = policy.schedule(num_steps)
    x = noise if noise is not None else policy.initial_noise(len(cond), generator=generator)
    trajectory, log_probs = [x], []
    with torch.no_grad():
        for i in range(num_steps):
            out = policy.denoise_step(x, i, schedule, cond, eta=eta, generator=generator)
            x = out.prev_sample
            trajectory.append(x)
            log_probs.append(out.log_prob)
    return schedule, trajectory, torch.stack(log_probs, dim=1)
