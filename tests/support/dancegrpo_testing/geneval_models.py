"""Tiny random-weight GenEval models for tests (no downloads).

- ``write_mask2former_folder``: a Hugging Face Mask2Former folder in the layout of
  ``facebook/mask2former-swin-small-coco-instance`` (``config.json`` with the 80 COCO
  labels, ``model.safetensors``, ``preprocessor_config.json``) for a tiny Swin backbone
  (one block per stage, 32-d features) and a few queries.
- ``write_tiny_geneval_files``: that folder plus a tiny open_clip colour classifier
  (``clip_models``' config and weights).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from dancegrpo_testing import clip_models

#: COCO's 80 instance labels as in the Hugging Face label file
#: ``huggingface/label-files/coco-detection-mmdet-id2label.json`` used by the Mask2Former
#: COCO-instance conversions (note ``mouse``, ``remote``, ``keyboard``).
COCO_ID2LABEL: dict[int, str] = dict(
    enumerate(
        (
            "person",
            "bicycle",
            "car",
            "motorcycle",
            "airplane",
            "bus",
            "train",
            "truck",
            "boat",
            "traffic light",
            "fire hydrant",
            "stop sign",
            "parking meter",
            "bench",
            "bird",
            "cat",
            "dog",
            "horse",
            "sheep",
            "cow",
            "elephant",
            "bear",
            "zebra",
            "giraffe",
            "backpack",
            "umbrella",
            "handbag",
            "tie",
            "suitcase",
            "frisbee",
            "skis",
            "snowboard",
            "sports ball",
            "kite",
            "baseball bat",
            "baseball glove",
            "skateboard",
            "surfboard",
            "tennis racket",
            "bottle",
            "wine glass",
            "cup",
            "fork",
            "knife",
            "spoon",
            "bowl",
            "banana",
            "apple",
            "sandwich",
            "orange",
            "broccoli",
            "carrot",
            "hot dog",
            "pizza",
            "donut",
            "cake",
            "chair",
            "couch",
            "potted plant",
            "bed",
            "dining table",
            "toilet",
            "tv",
            "laptop",
            "mouse",
            "remote",
            "keyboard",
            "cell phone",
            "microwave",
            "oven",
            "toaster",
            "sink",
            "refrigerator",
            "book",
            "clock",
            "vase",
            "scissors",
            "teddy bear",
            "hair drier",
            "toothbrush",
        )  # fmt: skip
    )
)


def tiny_mask2former_config(*, num_queries: int = 8, id2label: dict[int, str] | None = None) -> Any:
    """A ``Mask2FormerConfig``: 4-stage Swin (16-d, one block each), 32-d decoders."""
    from transformers import Mask2FormerConfig, SwinConfig

    labels = COCO_ID2LABEL if id2label is None else id2label
    backbone = SwinConfig(
        image_size=64,
        patch_size=4,
        embed_dim=16,
        depths=[1, 1, 1, 1],
        num_heads=[1, 1, 1, 1],
        window_size=2,
        out_features=["stage1", "stage2", "stage3", "stage4"],
    )
    return Mask2FormerConfig(
        backbone_config=backbone,
        feature_size=32,
        mask_feature_size=32,
        hidden_dim=32,
        encoder_feedforward_dim=32,
        dim_feedforward=32,
        encoder_layers=1,
        decoder_layers=2,
        num_attention_heads=2,
        num_queries=num_queries,
        num_labels=len(labels),
        id2label=dict(labels),
        label2id={v: k for k, v in labels.items()},
    )


def build_mask2former(config: Any, *, seed: int = 0) -> Any:
    """A random-weight ``Mask2FormerForUniversalSegmentation`` in eval mode."""
    import torch
    from transformers import Mask2FormerForUniversalSegmentation

    torch.manual_seed(seed)
    return Mask2FormerForUniversalSegmentation(config).eval()


def write_mask2former_folder(
    directory: str | Path,
    *,
    seed: int = 0,
    num_queries: int = 8,
    id2label: dict[int, str] | None = None,
    shortest_edge: int = 64,
    longest_edge: int = 96,
) -> Path:
    """Saves a tiny Mask2Former + ``Mask2FormerImageProcessor`` folder (``save_pretrained``)."""
    from transformers import Mask2FormerImageProcessor

    directory = Path(directory)
    model = build_mask2former(
        tiny_mask2former_config(num_queries=num_queries, id2label=id2label), seed=seed
    )
    model.save_pretrained(directory)
    processor = Mask2FormerImageProcessor(
        size={"shortest_edge": shortest_edge, "longest_edge": longest_edge},
        size_divisor=32,
        ignore_index=255,
        num_labels=len(model.config.id2label),
    )
    processor.save_pretrained(directory)
    return directory


@dataclasses.dataclass(frozen=True)
class TinyGenEvalFiles:
    """Paths written by ``write_tiny_geneval_files``."""

    detector: Path
    clip_config: Path
    clip_checkpoint: Path


def write_tiny_geneval_files(directory: str | Path) -> TinyGenEvalFiles:
    """Writes a tiny detector folder (``mask2former-tiny/``) and a tiny open_clip colour
    classifier (``tiny_vit.json`` + ``clip_tiny.bin``) into ``directory``."""
    directory = Path(directory)
    config = clip_models.write_open_clip_config(directory / "tiny_vit.json")
    return TinyGenEvalFiles(
        detector=write_mask2former_folder(directory / "mask2former-tiny"),
        clip_config=config,
        clip_checkpoint=clip_models.write_open_clip_checkpoint(
            config, directory / "clip_tiny.bin", seed=1, fmt="bare"
        ),
    )
