"""The object detector of the ``geneval`` kind: Mask2Former from a Hugging Face folder.

GenEval runs mmdetection's COCO Mask2Former Swin-S (``mask2former_swin-s-p4-w7-224_lsj_
8x2_50e_coco``; github.com/djghosh13/geneval ``evaluation/download_models.sh``). Here the
same architecture comes as a transformers ``Mask2FormerForUniversalSegmentation`` folder
(``facebook/mask2former-swin-small-coco-instance``, converted from the original Mask2Former
release), loaded with ``local_files_only=True``.

Pre-processing: the folder's image processor resizes every image to ``resized_input_size``
— shortest edge ``shortest_edge``, longest at most ``longest_edge`` (default 800/1333,
mmdetection's test scale ``img_scale=(1333, 800)`` in ``configs/mask2former/
mask2former_r50_lsj_8x2_50e_coco.py``), each side rounded up to the processor's
``size_divisor`` (32) — and normalises it.

Batching: images of the same size go through the model together, up to ``batch_size`` at
a time (``same_size_chunks``); same-size images resize to the same input size, so a batch
needs no padding and nothing of one image enters another's masks. Post-processing is per
image. Batched and single forwards differ only by float32 rounding (~1e-7 on the logits).

Post-processing (``Mask2FormerDetector.postprocess``) is mmdetection 2.x's, not
transformers' ``post_process_instance_segmentation`` (which thresholds masks at a fixed
384x384 and resizes all 100 of them to the image): ``MaskFormerFusionHead.
instance_postprocess`` keeps the top ``MAX_PER_IMAGE`` (100) (query, class) pairs by class
probability; ``MaskFormerHead.simple_test`` / ``MaskFormerFusionHead.simple_test`` resize
their mask logits bilinearly to the network input, then to the image; a mask is its
logits ``> 0``; the score is class probability × the mask's mean probability; the box is
``mask2bbox`` (``[x_min, y_min, x_max + 1, y_max + 1]``). Since the mean mask probability
is below 1, a pair whose class probability is not above ``min_score`` cannot score above
it, so only the other pairs' masks are computed at full resolution (an exact shortcut).

The model is transformers' ``Mask2FormerForUniversalSegmentation`` (its training loss,
built in ``__init__``, needs scipy; the loss's one buffer ``criterion.empty_weight`` is
derived from the config, so a folder saved without it still loads).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.kinds.checkpoints import (
    checkpoint_error,
    load_errors_as_checkpoint_error,
    require_dir,
)
from dancegrpo_rewards.kinds.geneval_rules import CLASS_ALIASES, GENEVAL_CLASSES, Detection

CONFIG_FILE = "config.json"
PROCESSOR_FILE = "preprocessor_config.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
EXPECTED = (
    "a Hugging Face Mask2Former COCO instance-segmentation folder, e.g. "
    "`huggingface-cli download facebook/mask2former-swin-small-coco-instance --local-dir DIR`: "
    f"{CONFIG_FILE} (model_type mask2former, the 80 COCO labels), {' or '.join(WEIGHT_FILES)}, "
    f"{PROCESSOR_FILE}"
)
#: (query, class) pairs kept per image: mmdetection's ``test_cfg.max_per_image`` (100).
MAX_PER_IMAGE = 100
#: Full-resolution mask logits of at most this many float32 values (256 MiB, plus as much
#: for their binary mask) exist at once: a 4096x4096 image post-processes its candidates
#: three at a time, a 1024x1024 one up to 39 at a time.
MASK_CHUNK_ELEMENTS = 1 << 26

#: ``{class name: detections}`` of one image.
Detections = dict[str, list[Detection]]


def geneval_class_map(id2label: Mapping[Any, str]) -> dict[int, str]:
    """Detector label id → GenEval class name; every GenEval class exactly once.

    Labels are matched by name, directly or through ``CLASS_ALIASES`` (e.g. COCO's
    ``mouse`` is GenEval's ``computer mouse``). Raises ``ValueError`` naming unknown
    labels and missing classes.
    """
    mapping: dict[int, str] = {}
    unknown = []
    for key, label in id2label.items():
        name = CLASS_ALIASES.get(label, label)
        if name in GENEVAL_CLASSES:
            mapping[int(key)] = name
        else:
            unknown.append(label)
    missing = sorted(set(GENEVAL_CLASSES) - set(mapping.values()))
    duplicated = len(mapping) != len(set(mapping.values()))
    if unknown or missing or duplicated:
        problems = []
        if unknown:
            problems.append(f"labels that are not GenEval classes: {', '.join(unknown[:5])}")
        if missing:
            problems.append(f"GenEval classes without a label: {', '.join(missing[:5])}")
        if duplicated:
            problems.append("several labels map to the same GenEval class")
        raise ValueError("; ".join(problems))
    return mapping


def check_detector_folder(path: Path, *, what: str, docs_section: str) -> dict[int, str]:
    """Checks a detector folder at construction; returns its label map (``geneval_class_map``)."""
    require_dir(
        path, [CONFIG_FILE, PROCESSOR_FILE], what=what, expected=EXPECTED, docs_section=docs_section
    )
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise checkpoint_error(path, what, EXPECTED, docs_section, "folder holds no model weights")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise checkpoint_error(
            path, what, EXPECTED, docs_section, f"has an unreadable {CONFIG_FILE} ({err})"
        ) from err
    if config.get("model_type") != "mask2former":
        problem = f"is not a Mask2Former folder (model_type {config.get('model_type')!r})"
        raise checkpoint_error(path, what, EXPECTED, docs_section, problem)
    try:
        return geneval_class_map(config.get("id2label") or {})
    except ValueError as err:
        problem = f"has labels that do not match GenEval's 80 COCO classes ({err})"
        raise checkpoint_error(path, what, EXPECTED, docs_section, problem) from err


def resized_input_size(
    height: int, width: int, *, shortest_edge: int, longest_edge: int, size_divisor: int
) -> tuple[int, int]:
    """The detector input ``(height, width)`` of an ``height x width`` image.

    transformers' ``get_size_with_aspect_ratio`` (what ``Mask2FormerImageProcessor`` uses
    for ``shortest_edge``/``longest_edge``): the short side becomes ``shortest_edge`` unless
    the long side would then exceed ``longest_edge``, in which case the long side becomes
    ``longest_edge``; the other side keeps the aspect ratio (truncated). Then each side is
    rounded up to a multiple of ``size_divisor``. One change: a side is at least 1 before
    that rounding (transformers computes 0 for a 1x4000 image and then fails).
    """
    if min(height, width) <= 0:
        raise ValueError(f"image has no pixels: {height}x{width}")
    size = shortest_edge
    raw_size = None
    short, long = min(height, width), max(height, width)
    if long / short * size > longest_edge:
        raw_size = longest_edge * short / long
        size = int(round(raw_size))
    if short == size:
        out_h, out_w = height, width
    elif width < height:
        out_w = size
        out_h = int((raw_size if raw_size is not None else size) * height / width)
    else:
        out_h = size
        out_w = int((raw_size if raw_size is not None else size) * width / height)
    out_h, out_w = max(out_h, 1), max(out_w, 1)
    if size_divisor > 0:
        out_h = math.ceil(out_h / size_divisor) * size_divisor
        out_w = math.ceil(out_w / size_divisor) * size_divisor
    return out_h, out_w


def same_size_chunks(sizes: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped by equal size, in chunks of at most ``batch_size``.

    Groups come in order of first appearance, indices ascending within a group.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    groups: dict[tuple[int, int], list[int]] = {}
    for index, size in enumerate(sizes):
        groups.setdefault((int(size[0]), int(size[1])), []).append(index)
    return [
        members[start : start + batch_size]
        for members in groups.values()
        for start in range(0, len(members), batch_size)
    ]


def mask_box(mask: torch.Tensor) -> tuple[float, float, float, float]:
    """mmdetection's ``mask2bbox`` of one non-empty ``[H, W]`` mask: ``(x0, y0, x1 + 1, y1 + 1)``."""
    xs = torch.nonzero(mask.any(dim=0)).flatten()
    ys = torch.nonzero(mask.any(dim=1)).flatten()
    return (float(xs[0]), float(ys[0]), float(xs[-1] + 1), float(ys[-1] + 1))


@dataclasses.dataclass
class Mask2FormerDetector:
    """A loaded Mask2Former with its image processor and GenEval label map.

    Attributes:
        model: the model in eval mode on ``device``/``dtype``.
        processor: the folder's ``Mask2FormerImageProcessor``.
        class_names: label id → GenEval class name.
        shortest_edge, longest_edge: the resize target of every image.
    """

    model: Any
    processor: Any
    class_names: dict[int, str]
    device: torch.device
    dtype: torch.dtype
    shortest_edge: int = 800
    longest_edge: int = 1333

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """The network input size of a ``height x width`` image (``resized_input_size``)."""
        return resized_input_size(
            height,
            width,
            shortest_edge=self.shortest_edge,
            longest_edge=self.longest_edge,
            size_divisor=int(getattr(self.processor, "size_divisor", 0) or 0),
        )

    def detect(self, image: np.ndarray, min_score: float) -> Detections:
        """Instances in one ``uint8 [H, W, 3]`` image scoring ``> min_score``, per class."""
        return self.detect_batch([image], [min_score])[0]

    def detect_many(
        self, images: Sequence[np.ndarray], min_scores: Sequence[float], *, batch_size: int
    ) -> list[Detections]:
        """``detect`` for each image; same-size images share forwards of ``batch_size``."""
        found: list[Detections | None] = [None] * len(images)
        for chunk in same_size_chunks([im.shape[:2] for im in images], batch_size):
            batch = self.detect_batch([images[i] for i in chunk], [min_scores[i] for i in chunk])
            for index, detections in zip(chunk, batch, strict=True):
                found[index] = detections
        return [f if f is not None else {} for f in found]

    @torch.inference_mode()
    def detect_batch(
        self, images: Sequence[np.ndarray], min_scores: Sequence[float]
    ) -> list[Detections]:
        """``detect`` for same-size ``uint8 [H, W, 3]`` images in one forward.

        Each ``Detection`` has its score, its box in image pixels and its mask as
        ``bool [y2 - y1, x2 - x1]`` (the mask inside its box).
        """
        if not images:
            return []
        height, width = images[0].shape[:2]
        if any(im.shape[:2] != (height, width) for im in images):
            raise ValueError("detect_batch takes images of one size; use detect_many")
        input_size = self.input_size(height, width)
        inputs = self.processor(
            images=[np.ascontiguousarray(im) for im in images],
            size={"height": input_size[0], "width": input_size[1]},
            input_data_format="channels_last",
            return_tensors="pt",
        )
        pixels = inputs["pixel_values"]
        if tuple(pixels.shape[-2:]) != input_size:  # a processor that resizes differently
            raise RuntimeError(f"processor made {tuple(pixels.shape)}, expected {input_size}")
        outputs = self.model(pixel_values=pixels.to(self.device, self.dtype))
        return [
            self.postprocess(
                outputs.class_queries_logits[i],
                outputs.masks_queries_logits[i],
                input_size=input_size,
                image_size=(height, width),
                min_score=min_scores[i],
            )
            for i in range(len(images))
        ]

    def postprocess(
        self,
        class_logits: torch.Tensor,
        mask_logits: torch.Tensor,
        *,
        input_size: tuple[int, int],
        image_size: tuple[int, int],
        min_score: float,
    ) -> Detections:
        """mmdetection's instance post-processing of one image (see the module docstring).

        Args:
            class_logits: ``[Q, C + 1]`` class logits (last: "no object").
            mask_logits: ``[Q, h, w]`` mask logits at the network's output resolution.
            input_size: ``(H', W')`` of the network input (no padding).
            image_size: ``(H, W)`` of the image.
            min_score: instances scoring ``<=`` this are dropped.

        Runs in float32 on the logits' device.
        """
        probs = class_logits.float().softmax(dim=-1)[:, :-1]
        num_classes = probs.shape[1]
        top, flat = probs.flatten().topk(min(MAX_PER_IMAGE, probs.numel()))
        keep = top > min_score  # the mask score is < 1: the others cannot pass
        top, flat = top[keep], flat[keep]
        labels, queries = (flat % num_classes).tolist(), flat // num_classes
        height, width = image_size
        chunk = max(1, MASK_CHUNK_ELEMENTS // (height * width + input_size[0] * input_size[1]))
        found: Detections = {}
        for start in range(0, len(labels), chunk):
            logits = mask_logits[queries[start : start + chunk]].float()[:, None]
            logits = torch.nn.functional.interpolate(
                logits, size=input_size, mode="bilinear", align_corners=False
            )
            logits = torch.nn.functional.interpolate(
                logits, size=image_size, mode="bilinear", align_corners=False
            )[:, 0]
            # mmdetection's float mask (logits > 0) and mean mask probability; sign/clamp
            # is the fastest float [logits > 0], and the big logits become probabilities
            # in place
            binary = logits.sign().clamp_(min=0)
            area = binary.flatten(1).sum(1)
            mask_scores = logits.sigmoid_().mul_(binary).flatten(1).sum(1) / (area + 1e-6)
            scores = (top[start : start + chunk] * mask_scores).tolist()
            for j, score in enumerate(scores):
                if not score > min_score:  # also drops empty masks (score 0)
                    continue
                mask = binary[j] > 0
                box = mask_box(mask)
                x1, y1, x2, y2 = (int(v) for v in box)
                detection = Detection(score=score, box=box, mask=mask[y1:y2, x1:x2].cpu().numpy())
                found.setdefault(self.class_names[labels[start + j]], []).append(detection)
        return found


def load_mask2former(
    path: Path,
    *,
    class_names: dict[int, str],
    device: torch.device,
    dtype: torch.dtype,
    shortest_edge: int,
    longest_edge: int,
    what: str,
    docs_section: str,
) -> Mask2FormerDetector:
    """Loads a checked folder (``check_detector_folder``); any missing weight is an error
    (except the loss's config-derived ``criterion.*`` buffer)."""
    from transformers import Mask2FormerForUniversalSegmentation, Mask2FormerImageProcessor

    with load_errors_as_checkpoint_error(
        path, what=what, expected=EXPECTED, docs_section=docs_section
    ):
        model, info = Mask2FormerForUniversalSegmentation.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True
        )
        processor = Mask2FormerImageProcessor.from_pretrained(str(path), local_files_only=True)
    missing = sorted(k for k in info.get("missing_keys") or [] if not k.startswith("criterion."))
    if missing:
        problem = f"lacks {len(missing)} weights of the model (e.g. {', '.join(missing[:3])})"
        raise checkpoint_error(path, what, EXPECTED, docs_section, problem)
    model = model.to(device=device, dtype=dtype).eval()
    return Mask2FormerDetector(
        model=model,
        processor=processor,
        class_names=class_names,
        device=device,
        dtype=dtype,
        shortest_edge=shortest_edge,
        longest_edge=longest_edge,
    )
