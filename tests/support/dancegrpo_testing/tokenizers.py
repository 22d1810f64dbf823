"""Offline tokenizers: CLIP's from open_clip's bundled BPE vocabulary, and small
byte-level BPEs trained on a few strings for models whose vocabulary is not bundled
anywhere (Llama-3 for HunyuanVideo, Qwen2 for VideoAlign).

open_clip ships ``bpe_simple_vocab_16e6.txt.gz`` (OpenAI's CLIP merges). The vocabulary
of OpenAI CLIP — and of every CLIP tokenizer on the hub (SD, FLUX, HunyuanVideo) — is
the 256 byte-level symbols, the same with ``</w>``, one entry per merge (first 48,894
merges), then ``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens. Writing that
out as ``vocab.json`` / ``merges.txt`` gives a Hugging Face ``CLIPTokenizer`` whose ids
equal open_clip's ``SimpleTokenizer``.
"""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path

NUM_MERGES = 49152 - 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2's reversible byte → printable-unicode table (used by CLIP's BPE).
    bs = list(range(ord("!"), ord("~") + 1))
    bs += list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def write_clip_tokenizer_files(directory: str | Path) -> Path:
    """Writes ``vocab.json`` and ``merges.txt`` for the CLIP tokenizer into ``directory``."""
    from open_clip.tokenizer import default_bpe

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = lines[1 : NUM_MERGES + 1]
    symbols = list(_bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols]
    vocab += ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(
        json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False)
    )
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return directory


@functools.lru_cache(maxsize=4)
def _cached_dir(model_max_length: int) -> str:
    import tempfile

    d = Path(tempfile.mkdtemp(prefix="dancegrpo-clip-tok-"))
    write_clip_tokenizer_files(d)
    return str(d)


def clip_tokenizer(model_max_length: int = 77):
    """A Hugging Face ``CLIPTokenizer`` identical to OpenAI CLIP's, built offline.

    ``pad_token`` is ``<|endoftext|>`` as in SD/FLUX tokenizers.
    """
    from transformers import CLIPTokenizer

    d = Path(_cached_dir(model_max_length))
    # from_pretrained on a local folder reads vocab.json/merges.txt in transformers 4 and 5.
    return CLIPTokenizer.from_pretrained(
        str(d), model_max_length=model_max_length, pad_token="<|endoftext|>"
    )


def train_byte_level_bpe(corpus: list[str], special_tokens: list[str], vocab_size: int):
    """A byte-level BPE ``tokenizers.Tokenizer`` (GPT-2/Llama-3/Qwen2 style: no prefix
    space, every byte representable) trained deterministically on ``corpus``, with
    ``special_tokens`` first in the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    return tok
