"""The object detector of the ``geneval`` kind: Mask2Former from a Hugging Face folder.

GenEval runs mmdetection's COCO Mask2Former Swin-S (``mask2former_swin-s-p4-w7-224_lsj_
8x2_50e_coco``; github.com/djghosh13/geneval ``evaluation/download_models.sh``). Here the
same architecture comes as a transformers ``Mask2FormerForUniversalSegmentation`` folder
(``facebook/mask2former-swin-small-coco-instance``, converted from the original Mask2Former
release), loaded with ``local_files_only=True``.

Per image (never batched, so a score cannot depend on the other images of a batch and no
padding enters the masks): the folder's image processor resizes the image to
``shortest_edge``/``longest_edge`` — default 800/1333, mmdetection's test scale
``img_scale=(1333, 800)`` in ``configs/mask2former/mask2former_r50_lsj_8x2_50e_coco.py``
— and normalises it; the model runs; ``post_process_instance_segmentation`` gives one
binary mask and score (class probability × mean mask probability, as mmdetection's
``MaskFormerFusionHead.instance_postprocess``) per instance among the top 100 (query,
class) pairs; boxes are the masks' extents as in mmdetection's ``mask2bbox``
(``[x_min, y_min, x_max + 1, y_max + 1]``).

The model is transformers' ``Mask2FormerForUniversalSegmentation`` (its training loss,
built in ``__init__``, needs scipy; the loss's one buffer ``criterion.empty_weight`` is
derived from the config, so a folder saved without it still loads).
"""

from __future__ import annotations

import dataclasses
import json
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.kinds.checkpoints import checkpoint_error, require_dir
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

    def detect(self, image: np.ndarray, min_score: float) -> dict[str, list[Detection]]:
        """Instances in ``uint8 [H, W, 3]`` ``image`` scoring ``>= min_score``, per class.

        Masks are ``bool [H, W]`` numpy arrays at the image's size; boxes in its pixels.
        """
        height, width = image.shape[:2]
        inputs = self.processor(
            images=[np.ascontiguousarray(image)],
            size={"shortest_edge": self.shortest_edge, "longest_edge": self.longest_edge},
            input_data_format="channels_last",
            return_tensors="pt",
        )
        outputs = self.model(pixel_values=inputs["pixel_values"].to(self.device, self.dtype))
        # Post-processing allocates its output on the CPU, so it runs there, in fp32.
        logits = types.SimpleNamespace(
            class_queries_logits=outputs.class_queries_logits.float().cpu(),
            masks_queries_logits=outputs.masks_queries_logits.float().cpu(),
        )
        (result,) = self.processor.post_process_instance_segmentation(
            logits,
            threshold=min_score,
            target_sizes=[(height, width)],
            return_binary_maps=True,
        )
        return self._detections(result)

    def _detections(self, result: Mapping[str, Any]) -> dict[str, list[Detection]]:
        found: dict[str, list[Detection]] = {}
        segments = result["segments_info"]
        if not segments:
            return found
        masks = result["segmentation"].bool()
        for segment, mask in zip(segments, masks, strict=True):
            name = self.class_names[int(segment["label_id"])]
            detection = Detection(
                score=float(segment["score"]), box=mask_box(mask), mask=mask.numpy()
            )
            found.setdefault(name, []).append(detection)
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

    try:
        model, info = Mask2FormerForUniversalSegmentation.from_pretrained(
            str(path), local_files_only=True, output_loading_info=True
        )
        processor = Mask2FormerImageProcessor.from_pretrained(str(path), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means a bad folder
        raise checkpoint_error(
            path, what, EXPECTED, docs_section, f"could not be loaded ({err})"
        ) from err
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
