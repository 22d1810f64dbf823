"""The shared offline CLIP tokenizer equals open_clip's tokenizer (OpenAI CLIP's BPE)."""

from __future__ import annotations

import open_clip
import pytest

from dancegrpo_testing.tokenizers import clip_tokenizer

PROMPTS = [
    "a photo of a cat",
    "Two dogs, playing in the SNOW!!",
    "héllo wörld 123 🙂 don't",
    "",
    "a very long prompt " * 30,
]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_offline_clip_tokenizer_ids_equal_open_clip(prompt: str) -> None:
    hf = clip_tokenizer()
    expected = open_clip.get_tokenizer("ViT-B-32")([prompt])[0].tolist()
    got = hf(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    # open_clip pads with 0, Hugging Face CLIP tokenizers (SD, FLUX) pad with <|endoftext|>;
    # the tokens up to and including the first <|endoftext|> must be identical.
    end = expected.index(49407) + 1
    assert got[:end] == expected[:end]
    assert len(got) == 77


def test_offline_clip_tokenizer_has_the_full_openai_vocabulary() -> None:
    tok = clip_tokenizer()
    assert len(tok) == 49408
    assert tok.convert_tokens_to_ids("<|startoftext|>") == 49406
    assert tok.pad_token == "<|endoftext|>"
