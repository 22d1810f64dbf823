"""Tiny random-weight VideoAlign (VideoReward) checkpoints for tests (no downloads).

Everything is written in the layouts the ``videoalign`` kind loads in production:

- ``tiny_tokenizer``: an offline byte-level BPE (trained in milliseconds on VideoAlign's
  instruction text, so the default template stays short) wrapped as a transformers
  ``Qwen2Tokenizer`` with the Qwen2-VL special tokens (``<|endoftext|>`` pads,
  ``<|im_start|>``, ``<|im_end|>``, ``<|vision_start|>``, ``<|vision_end|>``,
  ``<|image_pad|>``, ``<|video_pad|>``); ``reward_tokens=True`` appends the three reward tokens.
- ``write_hf_folder``: a Hugging Face folder — a 2-layer, 32-wide Qwen2-VL with a 2-block
  vision tower (14-pixel patches, 2×2 merge, 2-frame temporal patches as the real model),
  ``rm_head.weight`` added to its ``model.safetensors``, tokenizer and ``Qwen2VLProcessor``.
- ``write_release``: a Qwen2-VL base folder plus a VideoReward release folder as
  VideoAlign's trainer writes it (``model_config.json``, ``checkpoint-<step>/model.pth``
  holding the PEFT-wrapped state dict with unmerged LoRA factors and transformers-4 key
  names). Needs ``peft``; the live LoRA model comes back as the reference to compare with.
  Two variants (``RELEASE_VARIANTS``): ``PUBLISHED``, shaped like KwaiVGI/VideoReward as the
  published ``train.sh`` trains it (1-output head read at the three reward tokens, LoRA
  r64/alpha128 on the language model's linear layers only, bf16 weights and
  ``torch_dtype: bfloat16``, ``config.json`` beside ``model_config.json``), and
  ``FULL_LORA`` (3-output head, rsLoRA r4/alpha8 on every Linear and Embedding outside the
  vision tower, ``rm_head``, ``lm_head`` and ``embed_tokens`` included, float32).
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any

from dancegrpo_testing.tokenizers import train_byte_level_bpe

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
HIDDEN_SIZE = 32
#: Rows the tiny base config has beyond its tokenizer, as Qwen2-VL-2B's 151936 > 151657.
BASE_VOCAB_SLACK = 8


@dataclasses.dataclass(frozen=True)
class ReleaseVariant:
    """How a tiny release was "trained" (the VideoAlign settings that shape its files).

    Attributes:
        name: a label for test ids.
        output_dim: ``rm_head`` outputs (``model_config.output_dim``).
        lora_r, lora_alpha, use_rslora: ``peft_lora_config``.
        lora_namespan_exclude: module-name substrings without LoRA, as ``train()`` leaves
            them (``"visual"`` appended when ``vision_lora`` is false).
        torch_dtype: ``model_config.torch_dtype``; ``"bfloat16"`` also stores ``model.pth``
            in bf16, as a bf16 training run saves it.
        write_config_json: write ``config.json`` into the release folder, as ``train()``'s
            final ``model.config.save_pretrained(output_dir)`` does.
    """

    name: str
    output_dim: int
    lora_r: int
    lora_alpha: int
    use_rslora: bool
    lora_namespan_exclude: tuple[str, ...]
    torch_dtype: str
    write_config_json: bool

    @property
    def lora_scaling(self) -> float:
        """peft's ``s``: ``alpha / r``, or ``alpha / √r`` with rsLoRA."""
        return self.lora_alpha / (self.lora_r**0.5 if self.use_rslora else self.lora_r)


#: KwaiVGI/VideoReward as the published train.sh trains it: ``--lora_r 64 --lora_alpha 128
#: --lora_namespan_exclude "['lm_head', 'rm_head', 'embed_tokens']" --vision_lora False
#: --torch_dtype bfloat16 --bf16 True``; its head has one output (read at each token).
PUBLISHED = ReleaseVariant(
    "published",
    1,
    64,
    128,
    False,
    ("lm_head", "rm_head", "embed_tokens", "visual"),
    "bfloat16",
    True,
)
#: Every other path of the loader: 3 outputs, rsLoRA, LoRA on embeddings, lm_head and rm_head.
FULL_LORA = ReleaseVariant("full_lora", 3, 4, 8, True, ("visual",), "float32", False)
RELEASE_VARIANTS = (PUBLISHED, FULL_LORA)


def tiny_tokenizer(*, reward_tokens: bool = False, vocab_size: int = 1500):
    """A byte-level BPE ``Qwen2Tokenizer`` built offline (deterministic)."""
    from transformers import Qwen2Tokenizer

    from dancegrpo_rewards.kinds.videoalign import CHAT_FORMAT, DEFAULT_PROMPT_TEMPLATE
    from dancegrpo_rewards.kinds.videoalign_weights import REWARD_TOKENS

    corpus = [DEFAULT_PROMPT_TEMPLATE, CHAT_FORMAT]
    bpe = train_byte_level_bpe(corpus, list(QWEN2_VL_TOKENS), vocab_size=vocab_size)
    tokenizer = Qwen2Tokenizer(tokenizer_object=bpe)
    if reward_tokens:
        tokenizer.add_special_tokens({"additional_special_tokens": list(REWARD_TOKENS)})
    return tokenizer


def tiny_processor(tokenizer: Any):
    """A ``Qwen2VLProcessor`` (image and video processors at Qwen2-VL's patch geometry)."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = {"min_pixels": 28 * 28, "max_pixels": 28 * 28 * 64}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
    )


def tiny_config(tokenizer: Any, vocab_size: int):
    """A tiny ``Qwen2VLConfig`` whose special-token ids come from ``tokenizer``."""
    from transformers import Qwen2VLConfig

    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN2_VL_TOKENS}
    return Qwen2VLConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": HIDDEN_SIZE,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 4096,
            # head_dim 8 → 4 rotary frequencies split over (t, h, w) as Qwen2-VL's [16, 24, 24].
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [2, 1, 1],
            },
            "pad_token_id": ids["<|endoftext|>"],
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
        },
        vision_config={
            "depth": 2,
            "embed_dim": 32,
            "hidden_size": HIDDEN_SIZE,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "in_channels": 3,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True,
    )


def _random_model(config: Any, seed: int):
    """A ``Qwen2VLForConditionalGeneration`` with every weight drawn at a visible scale.

    The default init (std 0.02) makes a 2-layer model's outputs nearly input-independent;
    std 0.2 keeps rewards clearly dependent on the video and the prompt.
    """
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def _add_rm_head(folder: Path, rm_head: Any) -> None:
    """Adds ``rm_head.weight`` to a single-file ``model.safetensors``."""
    from safetensors.torch import load_file, save_file

    weights = load_file(str(folder / "model.safetensors"))
    weights["rm_head.weight"] = rm_head.contiguous()
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})


def write_hf_folder(directory: str | Path, *, seed: int = 0, output_dim: int = 3) -> Path:
    """A tiny VideoAlign model as a Hugging Face folder (tokenizer has the reward tokens)."""
    import torch

    directory = Path(directory)
    tokenizer = tiny_tokenizer(reward_tokens=True)
    model = _random_model(tiny_config(tokenizer, len(tokenizer)), seed)
    model.save_pretrained(directory)
    generator = torch.Generator().manual_seed(seed + 1)
    _add_rm_head(directory, torch.randn(output_dim, HIDDEN_SIZE, generator=generator))
    tiny_processor(tokenizer).save_pretrained(directory)
    return directory


# --- VideoReward release ---------------------------------------------------------------


def _lora_target_names(model: Any, exclude: tuple[str, ...]) -> list[str]:
    """VideoAlign's ``find_target_linear_names``: every Linear and Embedding whose name
    contains none of ``exclude``."""
    import torch

    kinds = (torch.nn.Linear, torch.nn.Embedding)
    return [
        n
        for n, m in model.named_modules()
        if isinstance(m, kinds) and not any(word in n for word in exclude)
    ]


def _legacy_key(key: str) -> str:
    """transformers-5 → transformers-4 names, as the release was saved (transformers 4.45)."""
    key = re.sub(r"^base_model\.model\.model\.language_model\.", "base_model.model.model.", key)
    return re.sub(r"^base_model\.model\.model\.visual\.", "base_model.model.visual.", key)


def _lora_model(base: Any, tokenizer: Any, variant: ReleaseVariant, seed: int):
    """The trained VideoReward stand-in: reward tokens, resized embeddings, rm_head, LoRA.

    LoRA factors are drawn so that ``s·B·A`` has entries of std ~0.1 beside the base
    weights' 0.2 (visible, not dominant) whatever the rank and scaling.
    """
    import peft
    import torch

    base.resize_token_embeddings(len(tokenizer))
    generator = torch.Generator().manual_seed(seed + 2)
    base.rm_head = torch.nn.Linear(HIDDEN_SIZE, variant.output_dim, bias=False)
    config = peft.LoraConfig(
        target_modules=_lora_target_names(base, variant.lora_namespan_exclude),
        r=variant.lora_r,
        lora_alpha=variant.lora_alpha,
        lora_dropout=0.05,
        task_type="CAUSAL_LM",
        use_rslora=variant.use_rslora,
        bias="none",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns about LoRA on tied embeddings
        model = peft.get_peft_model(base, config)
    lora_std = (0.1 / (variant.lora_scaling * variant.lora_r**0.5)) ** 0.5
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * lora_std)
            elif "rm_head" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        if variant.torch_dtype == "bfloat16":
            # A bf16 run saves bf16 tensors: the live model keeps exactly those values.
            for param in model.parameters():
                param.copy_(param.bfloat16().float())
    return model.eval()


def _model_config(variant: ReleaseVariant) -> dict[str, Any]:
    """A ``model_config.json`` as VideoAlign's ``save_configs_to_json`` writes it (the
    blocks inference reads; ``training_args`` trimmed) plus the published ``inference_config``."""
    return {
        "data_config": {
            "meta_data": "/train/meta.csv",
            "data_dir": "/train",
            "max_frame_pixels": 200704,
            "num_frames": None,
            "fps": 2.0,
            "eval_dim": ["VQ", "MQ", "TA"],
            "prompt_template_type": "detailed_special",
            "sample_type": "uniform",
        },
        "training_args": {"output_dir": "rm_output", "bf16": variant.torch_dtype == "bfloat16"},
        "model_config": {
            "model_name_or_path": "/train/Qwen2-VL-2B-Instruct",
            "output_dim": variant.output_dim,
            "use_special_tokens": True,
            "torch_dtype": variant.torch_dtype,
            "reward_token": "special",
        },
        "peft_lora_config": {
            "lora_enable": True,
            "vision_lora": False,
            "lora_r": variant.lora_r,
            "lora_alpha": variant.lora_alpha,
            "lora_dropout": 0.05,
            "lora_namespan_exclude": list(variant.lora_namespan_exclude),
            "lora_task_type": "CAUSAL_LM",
            "use_rslora": variant.use_rslora,
            "num_lora_modules": -1,
        },
        "inference_config": {
            "VQ_mean": 3.6757,
            "VQ_std": 2.2476,
            "MQ_mean": 1.1646,
            "MQ_std": 1.3811,
            "TA_mean": 2.8105,
            "TA_std": 2.5121,
        },
    }


@dataclasses.dataclass
class TinyRelease:
    """What ``write_release`` wrote, and the live LoRA model checkpoint ``step`` holds.

    ``reference`` is the ``peft`` model (eval, float32): ``reference.base_model.model`` is
    the ``Qwen2VLForConditionalGeneration`` with LoRA layers active and the ``rm_head``.
    """

    base_model: Path
    release: Path
    step: int
    older_step: int
    reference: Any
    variant: ReleaseVariant


def write_release(
    directory: str | Path, *, seed: int = 0, variant: ReleaseVariant = PUBLISHED
) -> TinyRelease:
    """A Qwen2-VL base folder (``<dir>/Qwen2-VL-tiny``) and a VideoReward release
    (``<dir>/VideoReward``) with ``checkpoint-20`` (the reference) and an older
    ``checkpoint-10`` whose LoRA factors are zero."""
    import torch

    directory = Path(directory)
    base_dir, release = directory / "Qwen2-VL-tiny", directory / "VideoReward"
    tokenizer = tiny_tokenizer()
    base = _random_model(tiny_config(tokenizer, len(tokenizer) + BASE_VOCAB_SLACK), seed)
    base.save_pretrained(base_dir)
    tiny_processor(tokenizer).save_pretrained(base_dir)
    model = _lora_model(base, tiny_tokenizer(reward_tokens=True), variant, seed)
    dtype = torch.bfloat16 if variant.torch_dtype == "bfloat16" else torch.float32
    state = {_legacy_key(k): v.detach().to(dtype).clone() for k, v in model.state_dict().items()}
    for step, tensors in ((20, state), (10, _zero_lora(state))):
        (release / f"checkpoint-{step}").mkdir(parents=True)
        torch.save(tensors, release / f"checkpoint-{step}" / "model.pth")
    (release / "model_config.json").write_text(json.dumps(_model_config(variant), indent=2))
    if variant.write_config_json:
        model.base_model.model.config.save_pretrained(release)
    return TinyRelease(base_dir, release, 20, 10, model, variant)


def _zero_lora(state: dict[str, Any]) -> dict[str, Any]:
    return {k: (v * 0 if ".lora_" in k else v) for k, v in state.items()}


def random_videos(
    count: int,
    *,
    seed: int = 0,
    frames: tuple[int, int] = (3, 12),
    size: tuple[int, int] = (24, 90),
) -> list:
    """``count`` random ``uint8 [T, H, W, 3]`` videos of differing lengths and sizes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    videos = []
    for _ in range(count):
        t = int(rng.integers(*frames))
        h, w = (int(rng.integers(*size)) for _ in range(2))
        videos.append(rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8))
    return videos
