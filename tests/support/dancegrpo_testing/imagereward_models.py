"""Tiny random-weight ImageReward checkpoints in the official file layout (no downloads).

ImageReward (github.com/THUDM/ImageReward) ships ``ImageReward.pt`` (the ``state_dict`` of
its ``ImageReward`` module: ``blip.visual_encoder.*`` — BLIP's timm-style ViT —,
``blip.text_encoder.*`` — BLIP's ``med.py`` BERT with cross-attention —, ``blip.vision_proj``,
``blip.text_proj`` and the ``mlp.layers.*`` head) and ``med_config.json``; the tokenizer is
``bert-base-uncased``'s. ``write_imagereward_files`` writes all three:

```
<dir>/ImageReward.pt
<dir>/med_config.json
<dir>/bert-base-uncased/vocab.txt, tokenizer_config.json
```

The key names and shapes below are written out from the official modules
(``ImageReward/models/BLIP/vit.py``, ``med.py``, ``ImageReward.py``), independently of the
kind's own name mapping; the parity test loads this file into the official model with
``strict=True``, which proves the layout.

Sizes: the official ``ImageReward`` class hard-codes ``MLP(768)`` (text width 768), so the
text encoder keeps width 768 (12 heads of 64) with 2 layers and a ~1k-token vocabulary; the
ViT keeps 224-pixel inputs and 16-pixel patches at width 128 (2 heads of 64, as BLIP's
ViT-B/L use 64-wide heads), depth 2. About 10 M parameters (40 MB).
"""

from __future__ import annotations

import dataclasses
import json
import string
from pathlib import Path
from typing import Any

#: bert-base-uncased's special-token ids: [PAD]=0, [UNK]=100, [CLS]=101, [SEP]=102, [MASK]=103.
BERT_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103}
_WORD_LIST = (
    "a an the of on in with and at to is are by for from photo painting portrait picture "
    "red green blue yellow black white orange purple pink brown gold silver "
    "cat cats dog dogs horse bird fish fox cube ball table chair house tree trees city sky sea "
    "sunset sunrise mountain mountains river forest flower flowers fruit bowl car street "
    "astronaut riding man woman girl boy child people cute small big tall old new "
    "highly detailed digital art oil style trending artstation 8k 4k realistic cinematic "
    "lighting light dark night day snow rain water fire anime cartoon chibi smiling tail heart"
)
_WORDS = _WORD_LIST.split()


def bert_vocabulary() -> list[str]:
    """A WordPiece vocabulary in bert-base-uncased's layout (special tokens at their ids)."""
    vocab = [f"[unused{i}]" for i in range(104)]
    for token, index in BERT_SPECIAL_IDS.items():
        vocab[index] = token
    chars = list(string.ascii_lowercase + string.digits + string.punctuation)
    vocab += chars + [f"##{c}" for c in string.ascii_lowercase + string.digits]
    vocab += [w for w in dict.fromkeys(_WORDS) if w not in vocab]
    return vocab


def write_bert_tokenizer(directory: str | Path) -> Path:
    """Writes a ``bert-base-uncased``-style tokenizer folder (``vocab.txt`` + config)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.txt").write_text("\n".join(bert_vocabulary()) + "\n")
    config = {"do_lower_case": True, "model_max_length": 512, "tokenizer_class": "BertTokenizer"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def tiny_med_config(vocab_size: int) -> dict[str, Any]:
    """``med_config.json`` (the official file's keys) for a 2-layer, 768-wide text encoder.

    ``vocab_size`` is the tokenizer's length after ImageReward adds ``[DEC]`` and ``[ENC]``
    (30524 in the official file). ``encoder_width`` is overwritten by the ViT width at load,
    as the official code does.
    """
    return {
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": 768,
        "initializer_range": 0.02,
        "intermediate_size": 128,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": 64,
        "model_type": "bert",
        "num_attention_heads": 12,
        "num_hidden_layers": 2,
        "pad_token_id": 0,
        "type_vocab_size": 2,
        "vocab_size": vocab_size,
        "encoder_width": 768,
        "add_cross_attention": True,
    }


@dataclasses.dataclass(frozen=True)
class TinyViT:
    """The tiny BLIP ViT's sizes (the official ``VisionTransformer`` arguments)."""

    image_size: int = 224
    patch_size: int = 16
    width: int = 128
    depth: int = 2
    num_heads: int = 2
    mlp_ratio: float = 4.0


def official_shapes(vit: TinyViT, med: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key of the official ``ImageReward`` ``state_dict`` and its shape."""
    w, t = vit.width, med["hidden_size"]
    patches = (vit.image_size // vit.patch_size) ** 2
    hidden = int(w * vit.mlp_ratio)
    shapes: dict[str, tuple[int, ...]] = {}
    v = "blip.visual_encoder."
    shapes[v + "cls_token"] = (1, 1, w)
    shapes[v + "pos_embed"] = (1, patches + 1, w)
    shapes[v + "patch_embed.proj.weight"] = (w, 3, vit.patch_size, vit.patch_size)
    shapes[v + "patch_embed.proj.bias"] = (w,)
    for i in range(vit.depth):
        b = f"{v}blocks.{i}."
        for norm in ("norm1", "norm2"):
            shapes[b + norm + ".weight"] = shapes[b + norm + ".bias"] = (w,)
        shapes[b + "attn.qkv.weight"], shapes[b + "attn.qkv.bias"] = (3 * w, w), (3 * w,)
        shapes[b + "attn.proj.weight"], shapes[b + "attn.proj.bias"] = (w, w), (w,)
        shapes[b + "mlp.fc1.weight"], shapes[b + "mlp.fc1.bias"] = (hidden, w), (hidden,)
        shapes[b + "mlp.fc2.weight"], shapes[b + "mlp.fc2.bias"] = (w, hidden), (w,)
    shapes[v + "norm.weight"] = shapes[v + "norm.bias"] = (w,)
    e = "blip.text_encoder.embeddings."
    shapes[e + "position_ids"] = (1, med["max_position_embeddings"])
    shapes[e + "word_embeddings.weight"] = (med["vocab_size"], t)
    shapes[e + "position_embeddings.weight"] = (med["max_position_embeddings"], t)
    shapes[e + "LayerNorm.weight"] = shapes[e + "LayerNorm.bias"] = (t,)
    inter = med["intermediate_size"]
    for i in range(med["num_hidden_layers"]):
        layer = f"blip.text_encoder.encoder.layer.{i}."
        for block, kv_width in (("attention", t), ("crossattention", w)):
            a = layer + block + "."
            shapes[a + "self.query.weight"], shapes[a + "self.query.bias"] = (t, t), (t,)
            for name in ("key", "value"):
                shapes[f"{a}self.{name}.weight"] = (t, kv_width)
                shapes[f"{a}self.{name}.bias"] = (t,)
            shapes[a + "output.dense.weight"], shapes[a + "output.dense.bias"] = (t, t), (t,)
            shapes[a + "output.LayerNorm.weight"] = shapes[a + "output.LayerNorm.bias"] = (t,)
        shapes[layer + "intermediate.dense.weight"] = (inter, t)
        shapes[layer + "intermediate.dense.bias"] = (inter,)
        shapes[layer + "output.dense.weight"], shapes[layer + "output.dense.bias"] = (
            (t, inter),
            (t,),
        )
        shapes[layer + "output.LayerNorm.weight"] = shapes[layer + "output.LayerNorm.bias"] = (t,)
    # BLIP_Pretrain's contrastive projections (embed_dim 256): in the file, unused for scoring.
    shapes["blip.vision_proj.weight"], shapes["blip.vision_proj.bias"] = (256, w), (256,)
    shapes["blip.text_proj.weight"], shapes["blip.text_proj.bias"] = (256, t), (256,)
    sizes = [t, 1024, 128, 64, 16, 1]
    for index, (fan_in, fan_out) in zip(
        (0, 2, 4, 6, 7), zip(sizes[:-1], sizes[1:], strict=True), strict=True
    ):
        shapes[f"mlp.layers.{index}.weight"] = (fan_out, fan_in)
        shapes[f"mlp.layers.{index}.bias"] = (fan_out,)
    return shapes


def random_state_dict(vit: TinyViT, med: dict[str, Any], *, seed: int = 0) -> dict[str, Any]:
    """Random weights for every official key: scores of O(1) that differ between inputs."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, Any] = {}
    for key, shape in official_shapes(vit, med).items():
        if key.endswith("position_ids"):
            state[key] = torch.arange(shape[1]).unsqueeze(0)
        elif "norm" in key.lower() and key.endswith(".weight"):
            state[key] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif key.startswith("mlp.") and key.endswith(".weight"):
            state[key] = torch.randn(shape, generator=generator) / shape[1] ** 0.5
        elif key.endswith(("cls_token", "pos_embed")):
            state[key] = 0.5 * torch.randn(shape, generator=generator)
        else:
            state[key] = 0.05 * torch.randn(shape, generator=generator)
    return state


@dataclasses.dataclass(frozen=True)
class TinyImageRewardFiles:
    """Paths of a tiny ImageReward release (``checkpoint`` sits beside the other two)."""

    checkpoint: Path
    med_config: Path
    tokenizer: Path
    vit: TinyViT


def write_imagereward_files(directory: str | Path, *, seed: int = 0) -> TinyImageRewardFiles:
    """Writes ``ImageReward.pt``, ``med_config.json`` and ``bert-base-uncased/``."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = write_bert_tokenizer(directory / "bert-base-uncased")
    # ImageReward's init_tokenizer adds [DEC] and [ENC] after the vocabulary.
    med = tiny_med_config(len(bert_vocabulary()) + 2)
    med_path = directory / "med_config.json"
    med_path.write_text(json.dumps(med, indent=2))
    vit = TinyViT()
    checkpoint = directory / "ImageReward.pt"
    torch.save(random_state_dict(vit, med, seed=seed), checkpoint)
    return TinyImageRewardFiles(checkpoint, med_path, tokenizer, vit)
