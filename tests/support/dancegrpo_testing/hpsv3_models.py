"""Tiny random-weight HPSv3 checkpoints in the official file layout (no downloads).

HPSv3 (github.com/MizzenAI/HPSv3) ships ``HPSv3.safetensors``: the full state dict of its
``Qwen2VLRewardModelBT`` as transformers 4.45 names it (``model.embed_tokens``,
``model.layers.*``, ``model.norm``, ``visual.*``, ``lm_head``, and the ``rm_head.{0,3,5}``
ranknet head), with embeddings resized to Qwen2-VL-7B-Instruct's tokenizer plus
``<|Reward|>``. The base folder (Qwen2-VL-7B-Instruct) provides config, tokenizer, processor
and chat template. ``write_hpsv3_files`` writes both:

```
<dir>/HPSv3.safetensors
<dir>/Qwen2-VL-7B-Instruct/   config.json, tokenizer, preprocessor_config.json, chat template
```

The model is ``videoalign_models``' tiny Qwen2-VL (2 layers, 32 wide, 2-block vision tower
at Qwen2-VL's patch geometry) with untied ``lm_head`` as in the 7B model; the tokenizer is
an offline byte-level BPE trained on HPSv3's instruction so that a sample is ~600 tokens;
the processor keeps Qwen2-VL-7B's pixel bounds (3136 to 12845056).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dancegrpo_testing.tokenizers import train_byte_level_bpe
from dancegrpo_testing.videoalign_models import QWEN2_VL_TOKENS, tiny_config

#: Qwen2-VL-7B-Instruct's ``chat_template`` (its ``chat_template.json``): the reference
#: tests render HPSv3's messages with it as the official ``prepare_batch`` does.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
#: Qwen2-VL-7B-Instruct's ``preprocessor_config.json`` pixel bounds.
QWEN2_VL_MIN_PIXELS, QWEN2_VL_MAX_PIXELS = 56 * 56, 28 * 28 * 16384
#: Rows the tiny base config has beyond its tokenizer (Qwen2-VL-7B: 152064 > 151657).
BASE_VOCAB_SLACK = 8


def tiny_tokenizer(vocab_size: int = 1500):
    """A byte-level BPE ``Qwen2Tokenizer`` (Qwen2-VL special tokens, no ``<|Reward|>``)."""
    from transformers import Qwen2Tokenizer

    from dancegrpo_rewards.kinds.hpsv3 import CHAT_FORMAT, DEFAULT_PROMPT_TEMPLATE

    corpus = [DEFAULT_PROMPT_TEMPLATE, CHAT_FORMAT]
    bpe = train_byte_level_bpe(corpus, list(QWEN2_VL_TOKENS), vocab_size=vocab_size)
    return Qwen2Tokenizer(tokenizer_object=bpe)


def tiny_processor(tokenizer: Any):
    """A ``Qwen2VLProcessor`` with Qwen2-VL-7B's pixel bounds and chat template."""
    from transformers import Qwen2VLImageProcessor, Qwen2VLProcessor, Qwen2VLVideoProcessor

    pixels = {"min_pixels": QWEN2_VL_MIN_PIXELS, "max_pixels": QWEN2_VL_MAX_PIXELS}
    return Qwen2VLProcessor(
        image_processor=Qwen2VLImageProcessor(**pixels),
        tokenizer=tokenizer,
        video_processor=Qwen2VLVideoProcessor(**pixels),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )


def base_config(tokenizer: Any) -> Any:
    """The tiny base config: untied ``lm_head``, a few spare embedding rows."""
    config = tiny_config(tokenizer, len(tokenizer) + BASE_VOCAB_SLACK)
    config.tie_word_embeddings = False
    return config


def legacy_key(key: str) -> str:
    """transformers-5 Qwen2-VL key → the transformers-4.45 name HPSv3's file uses."""
    if key.startswith("model.language_model."):
        return "model." + key[len("model.language_model.") :]
    if key.startswith("model.visual."):
        return key[len("model.") :]
    return key


def random_state_dict(config: Any, rows: int, *, seed: int = 0) -> dict[str, Any]:
    """The official layout's state dict: Qwen2-VL with ``rows`` embedding rows (the tokenizer
    with ``<|Reward|>``), weights at std 0.2 (a 2-layer model's rewards then depend on the
    input), and a random ranknet head (weights at 1.5/√fan_in) ``hidden → 1024 → 16 → 2``."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).eval()
    model.resize_token_embeddings(rows)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("weight") and param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    state = {legacy_key(k): v.contiguous() for k, v in model.state_dict().items()}
    hidden = config.text_config.hidden_size
    head = torch.nn.Sequential(
        torch.nn.Linear(hidden, 1024),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.05),
        torch.nn.Linear(1024, 16),
        torch.nn.ReLU(),
        torch.nn.Linear(16, 2),
    )
    for key, value in head.state_dict().items():
        # Weights at 1.5/sqrt(fan_in): μ and log σ of O(1) that differ between inputs.
        scale = 1.5 / value.shape[-1] ** 0.5 if value.ndim == 2 else 0.1
        state[f"rm_head.{key}"] = torch.randn(value.shape, generator=generator) * scale
    return state


@dataclasses.dataclass(frozen=True)
class TinyHPSv3Files:
    """Paths of a tiny HPSv3 release."""

    checkpoint: Path
    base: Path


def write_hpsv3_files(directory: str | Path, *, seed: int = 0) -> TinyHPSv3Files:
    """Writes ``HPSv3.safetensors`` and the ``Qwen2-VL-7B-Instruct/`` base folder."""
    from safetensors.torch import save_file

    from dancegrpo_rewards.kinds.hpsv3 import REWARD_TOKEN

    directory = Path(directory)
    base = directory / "Qwen2-VL-7B-Instruct"
    tokenizer = tiny_tokenizer()
    config = base_config(tokenizer)
    config.save_pretrained(base)
    tiny_processor(tokenizer).save_pretrained(base)
    rows = len(tokenizer) + 1  # create_model_and_processor: resize to the tokenizer + <|Reward|>
    assert REWARD_TOKEN not in tokenizer.get_vocab()
    checkpoint = directory / "HPSv3.safetensors"
    save_file(random_state_dict(config, rows, seed=seed), str(checkpoint), {"format": "pt"})
    return TinyHPSv3Files(checkpoint, base)
