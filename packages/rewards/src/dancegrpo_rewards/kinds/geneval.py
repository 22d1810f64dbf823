"""``geneval``: GenEval's object-focused correctness (Ghosh et al. 2023), a sparse 0/1 reward.

Per image: a COCO Mask2Former instance segmenter finds objects (``geneval_detector``), CLIP
classifies the colour of the objects whose colour the spec names, and GenEval's rules
(``geneval_rules``) decide whether every include object is present with the right count,
colour and position and no exclude object is. Output ``correct``: 1.0 or 0.0.

The spec is ``metadata.geneval`` of each sample (``{"tag", "include", "exclude"}``, see
``geneval_rules.parse_spec``); the prompt itself is not read. Reference implementation:
github.com/djghosh13/geneval ``evaluation/evaluate_images.py``. Its colour step, kept here:
the object's pixels outside its mask are set to grey ``#999`` (the default ``bgcolor``),
the image is cropped to the object's box (default ``crop=1``), and CLIP ViT-L/14 (OpenAI
weights) picks the colour whose text embedding — the normalised mean of the normalised
embeddings of "a photo of a {c} {object}", "a photo of a {c}-colored {object}" and
"a photo of a {c} object" (clip_benchmark's ``zero_shot_classifier``) — is closest.

Throughput: same-size images share detector forwards (``detector_batch_size`` per
forward; by default 8 on accelerators and 1 on the CPU, where batching measured no
faster), and the colour crops of a whole batch go through CLIP ``COLOR_BATCH_SIZE`` at a
time. The rules still run per image, but a batched forward rounds differently from a
single one (~1e-7 in float32), so an image whose detection score, mask edge or colour
logits lie within that of a decision can flip with the batch around it;
``detector_batch_size: 1`` makes the detector strictly batch-invariant.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from dancegrpo_rewards.base import Reward, RewardBatch, SampleError
from dancegrpo_rewards.kinds import geneval_rules as rules
from dancegrpo_rewards.kinds import open_clip_common as oc
from dancegrpo_rewards.kinds.backbone import ClipEncoder, resolve_backbone
from dancegrpo_rewards.kinds.checkpoints import folder_digest, version_string
from dancegrpo_rewards.kinds.geneval_detector import (
    Detections,
    Mask2FormerDetector,
    check_detector_folder,
    load_mask2former,
)
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    option_path,
    parse_options,
)
from dancegrpo_rewards.kinds.runtime import torch_device, torch_dtype

logger = logging.getLogger(__name__)

DOCS_SECTION = "geneval"
#: open_clip arch of GenEval's colour classifier: ViT-L-14 with OpenAI weights, which
#: open_clip builds with QuickGELU.
DEFAULT_CLIP_ARCH = "ViT-L-14-quickgelu"
#: Prompt templates of GenEval's colour classifier (``color_classification``).
COLOR_TEMPLATES = (
    "a photo of a {color} {object}",
    "a photo of a {color}-colored {object}",
    "a photo of a {color} object",
)
#: Fill outside an object's mask before cropping: GenEval's default ``bgcolor`` ``#999``.
CROP_BACKGROUND = (153, 153, 153)
#: Colour crops per CLIP forward: GenEval's ``DataLoader(..., batch_size=16)``.
COLOR_BATCH_SIZE = 16
#: ``detector_batch_size`` when unset and ``device`` is not the CPU. On the CPU batched
#: forwards measured no faster (a tiny model got slower: larger working set), so it is 1.
ACCELERATOR_DETECTOR_BATCH_SIZE = 8
#: Crops longer than this many times their width (or the reverse) are trimmed to their
#: central part before CLIP, see ``clip_window``.
MAX_CROP_ASPECT = 32


def _check_fraction(key: str, value: float, *, low_open: bool = False) -> None:
    if not (0 < value <= 1 if low_open else 0 <= value <= 1):
        bounds = "(0, 1]" if low_open else "[0, 1]"
        raise OptionError(key, f"must be in {bounds}, got {value}")


def _check_clip_source(hf_path: str | None, checkpoint: str | None, arch: str | None) -> None:
    if bool(hf_path) == bool(checkpoint):
        raise OptionError(
            "clip_checkpoint",
            "give exactly one colour-classifier backbone: 'clip_checkpoint' (open_clip weights "
            "of OpenAI ViT-L/14) or 'clip_hf_path' (a CLIPModel folder)",
        )
    if hf_path and arch is not None:
        raise OptionError("clip_arch", "only used with 'clip_checkpoint'")
    if checkpoint:
        oc.check_arch("clip_arch", arch or DEFAULT_CLIP_ARCH)


@dataclasses.dataclass(frozen=True)
class GenEvalOptions:
    """Options of the ``geneval`` kind (defaults are GenEval's).

    Attributes:
        detector_path: Mask2Former COCO instance-segmentation folder (required).
        clip_checkpoint: open_clip weights of the colour classifier (OpenAI ViT-L/14), with
        clip_arch: its open_clip arch (default ``ViT-L-14-quickgelu``); or instead
        clip_hf_path: a Hugging Face ``CLIPModel`` folder (``openai/clip-vit-large-patch14``).
        clip_quick_gelu: force QuickGELU (open_clip only).
        threshold, counting_threshold, max_objects, max_overlap, position_threshold: the
            rule parameters, see ``geneval_rules.Thresholds``.
        detector_shortest_edge, detector_longest_edge: detector input resize (800/1333,
            mmdetection's Mask2Former test scale).
        detector_batch_size: most same-size images per detector forward; unset: 1 on the
            CPU, ``ACCELERATOR_DETECTOR_BATCH_SIZE`` (8) on other devices.
        device: where both models run.
        dtype: the colour classifier's precision; detector_dtype: the detector's.
    """

    detector_path: str | None = None
    clip_checkpoint: str | None = None
    clip_arch: str | None = None
    clip_hf_path: str | None = None
    clip_quick_gelu: bool = False
    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1
    detector_shortest_edge: int = 800
    detector_longest_edge: int = 1333
    detector_batch_size: int | None = None
    device: str = "cpu"
    dtype: str = "fp32"
    detector_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not self.detector_path:
            raise OptionError(
                "detector_path", "required: a Mask2Former COCO instance-segmentation folder"
            )
        _check_clip_source(self.clip_hf_path, self.clip_checkpoint, self.clip_arch)
        _check_fraction("threshold", self.threshold)
        _check_fraction("counting_threshold", self.counting_threshold)
        _check_fraction("max_overlap", self.max_overlap, low_open=True)
        if self.max_objects <= 0:
            raise OptionError("max_objects", f"must be > 0, got {self.max_objects}")
        if self.position_threshold < 0:
            raise OptionError("position_threshold", f"must be >= 0, got {self.position_threshold}")
        if self.detector_shortest_edge <= 0:
            raise OptionError(
                "detector_shortest_edge", f"must be > 0, got {self.detector_shortest_edge}"
            )
        if self.detector_longest_edge < self.detector_shortest_edge:
            raise OptionError(
                "detector_longest_edge",
                f"must be >= detector_shortest_edge ({self.detector_shortest_edge}), "
                f"got {self.detector_longest_edge}",
            )
        if self.detector_batch_size is not None and self.detector_batch_size <= 0:
            raise OptionError("detector_batch_size", f"must be > 0, got {self.detector_batch_size}")
        check_device("device", self.device)
        check_dtype("dtype", self.dtype)
        check_dtype("detector_dtype", self.detector_dtype)

    @property
    def thresholds(self) -> rules.Thresholds:
        """The rule parameters."""
        return rules.Thresholds(
            threshold=self.threshold,
            counting_threshold=self.counting_threshold,
            max_objects=self.max_objects,
            max_overlap=self.max_overlap,
            position_threshold=self.position_threshold,
        )

    @property
    def effective_detector_batch_size(self) -> int:
        """``detector_batch_size``, or its device-dependent default."""
        if self.detector_batch_size is not None:
            return self.detector_batch_size
        return 1 if self.device.split(":")[0] == "cpu" else ACCELERATOR_DETECTOR_BATCH_SIZE

    @property
    def effective_clip_arch(self) -> str | None:
        """``clip_arch``, defaulted for open_clip checkpoints; ``None`` for HF folders."""
        return None if self.clip_hf_path else (self.clip_arch or DEFAULT_CLIP_ARCH)


def object_crop(image: np.ndarray, detection: rules.Detection) -> np.ndarray:
    """What GenEval shows CLIP for one object: ``uint8 [h, w, 3]``.

    GenEval's ``ImageCrops``: pixels outside the detection's mask (if it has one) become
    ``CROP_BACKGROUND`` (``Image.composite``), then the image is cropped to the box
    (``Image.crop``). Here the crop comes first (the same pixels, without touching the rest
    of the image). The box is rounded like ``Image.crop`` does, kept inside the image and
    at least one pixel wide. The mask may cover the image or just the box
    (``rules.Detection``).
    """
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in detection.box)
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    x2, y2 = max(min(x2, width), x1 + 1), max(min(y2, height), y1 + 1)
    crop = image[y1:y2, x1:x2]
    if detection.mask is not None:
        mask = np.asarray(detection.mask, bool)
        if mask.shape == (height, width):
            mask = mask[y1:y2, x1:x2]
        elif mask.shape != crop.shape[:2]:
            raise ValueError(
                f"mask of shape {mask.shape} fits neither the image {(height, width)} "
                f"nor the box {crop.shape[:2]}"
            )
        crop = np.where(mask[..., None], crop, np.asarray(CROP_BACKGROUND, np.uint8))
    return np.ascontiguousarray(crop)


def clip_window(crop: np.ndarray, max_aspect: float = MAX_CROP_ASPECT) -> np.ndarray:
    """``crop``, or its central part when it is more than ``max_aspect`` times longer than wide.

    CLIP's preprocessing (OpenAI's, in open_clip and transformers) resizes the shortest
    side to S and keeps the central S x S square, so of a 1 x 4000 crop it sees only the
    middle pixel — after resizing the whole crop to S x 896000 (600 MB, seconds). Trimming
    the long side to ``max_aspect`` times the short one first keeps that centre, at a
    small resampling difference, and only for crops that thin; others are untouched.
    """
    height, width = crop.shape[:2]
    if height > max_aspect * width:
        keep = math.ceil(max_aspect * width)
        top = (height - keep) // 2
        return crop[top : top + keep]
    if width > max_aspect * height:
        keep = math.ceil(max_aspect * height)
        left = (width - keep) // 2
        return crop[:, left : left + keep]
    return crop


@dataclasses.dataclass(frozen=True)
class ColorRequest:
    """Colours wanted for ``detections`` of ``class_name`` in ``image`` (``uint8 [H, W, 3]``)."""

    image: np.ndarray
    class_name: str
    detections: Sequence[rules.Detection]


class ColorClassifier:
    """CLIP zero-shot colour classification of detected objects, as GenEval does it.

    Text classifiers are built once per class name and kept (at most 80).
    """

    def __init__(self, encoder: ClipEncoder, batch_size: int = COLOR_BATCH_SIZE) -> None:
        self.encoder = encoder
        self.batch_size = batch_size
        self._text: dict[str, torch.Tensor] = {}

    def text_classifier(self, class_name: str) -> torch.Tensor:
        """``[len(COLORS), D]`` float32: per colour the renormalised mean template embedding."""
        if class_name not in self._text:
            prompts = [
                template.format(color=color, object=class_name)
                for color in rules.COLORS
                for template in COLOR_TEMPLATES
            ]
            features = self.encoder.encode_text(prompts)  # L2-normalised
            per_color = features.view(len(rules.COLORS), len(COLOR_TEMPLATES), -1).mean(dim=1)
            self._text[class_name] = torch.nn.functional.normalize(per_color, dim=-1)
        return self._text[class_name]

    def classify(
        self, image: np.ndarray, class_name: str, detections: Sequence[rules.Detection]
    ) -> list[str]:
        """The colour name of each detection of ``class_name`` in ``image``."""
        return self.classify_many([ColorRequest(image, class_name, detections)])[0]

    @torch.inference_mode()
    def classify_many(self, requests: Sequence[ColorRequest]) -> list[list[str]]:
        """``classify`` for many requests, their crops ``batch_size`` per CLIP forward.

        Crops are made chunk by chunk, so at most ``batch_size`` exist at once.
        """
        items = [(r, d) for r, req in enumerate(requests) for d in range(len(req.detections))]
        colors: list[list[str]] = [[""] * len(req.detections) for req in requests]
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            crops = [
                clip_window(object_crop(requests[r].image, requests[r].detections[d]))
                for r, d in chunk
            ]
            features = self.encoder.encode_images(crops)
            for (r, d), feature in zip(chunk, features, strict=True):
                logits = self.text_classifier(requests[r].class_name) @ feature
                colors[r][d] = rules.COLORS[int(logits.argmax())]
        return colors


class GenEvalReward(Reward):
    """GenEval correctness of each image against its ``metadata.geneval``; output ``correct``."""

    kind = "geneval"
    modality = "image"
    description = (
        "GenEval (Ghosh et al. 2023): 1 if the image shows the spec's objects with the right "
        "counts, colours and positions and none of the excluded ones (Mask2Former + CLIP), else 0"
    )
    requires_metadata = True
    accepts_geneval = True

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        super().__init__(name, options)
        self.config = parse_options(GenEvalOptions, options, reward_name=name)
        self.thresholds = self.config.thresholds
        assert self.config.detector_path is not None
        self.detector_path = option_path(name, "detector_path", self.config.detector_path)
        self._detector_what = f"reward {name!r}: detector folder (option 'detector_path')"
        self._class_names = check_detector_folder(
            self.detector_path, what=self._detector_what, docs_section=DOCS_SECTION
        )
        self.backbone = resolve_backbone(
            reward_name=name,
            hf_path=self.config.clip_hf_path,
            checkpoint=self.config.clip_checkpoint,
            arch=self.config.effective_clip_arch,
            quick_gelu=self.config.clip_quick_gelu,
            docs_section=DOCS_SECTION,
            option_prefix="clip_",
        )
        self._version = self._make_version()
        self._detector: Mask2FormerDetector | None = None
        self._colors: ColorClassifier | None = None

    def _make_version(self) -> str:
        digests = {
            "detector_path": folder_digest(self.detector_path),
            **{f"clip_{k}": v for k, v in self.backbone.digests.items()},
        }
        cfg = self.config
        identity = {
            **{f"clip_{k}": v for k, v in self.backbone.identity.items()},
            **dataclasses.asdict(self.thresholds),
            "detector_edges": [cfg.detector_shortest_edge, cfg.detector_longest_edge],
            "dtype": cfg.dtype,
            "detector_dtype": cfg.detector_dtype,
        }
        return version_string(self.kind, digests, identity)

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("correct",)

    @property
    def version(self) -> str:
        return self._version

    def load(self) -> None:
        """Loads the detector and the colour classifier's CLIP on the configured device."""
        device = torch_device(self.config.device, reward_name=self.name)
        self._detector = load_mask2former(
            self.detector_path,
            class_names=self._class_names,
            device=device,
            dtype=torch_dtype(self.config.detector_dtype),
            shortest_edge=self.config.detector_shortest_edge,
            longest_edge=self.config.detector_longest_edge,
            what=self._detector_what,
            docs_section=DOCS_SECTION,
        )
        self._colors = ColorClassifier(self.backbone.load(device, torch_dtype(self.config.dtype)))

    @property
    def detector(self) -> Mask2FormerDetector:
        """The loaded detector (``load()`` runs on first use if the server did not call it)."""
        if self._detector is None:
            self.load()
        assert self._detector is not None
        return self._detector

    @property
    def colors(self) -> ColorClassifier:
        """The loaded colour classifier (loads on first use)."""
        if self._colors is None:
            self.load()
        assert self._colors is not None
        return self._colors

    def warmup_metadata(self) -> Mapping[str, Any] | None:
        """A two-object colour + position spec, so every rule path is compiled."""
        return {
            "geneval": {
                "tag": "color_attr",
                "include": [
                    {"class_name": "dog", "count": 1, "color": "red"},
                    {
                        "class_name": "cat",
                        "count": 1,
                        "color": "blue",
                        "position_relation": "left of",
                        "position_reference": 0,
                    },
                ],
                "exclude": [],
            }
        }

    @torch.inference_mode()
    def warmup(self) -> None:
        """The base warm-up, plus one colour classification (a blank image has no objects)."""
        super().warmup()
        blank = np.zeros((64, 64, 3), np.uint8)
        self.colors.classify(blank, "dog", [rules.Detection(1.0, (0.0, 0.0, 64.0, 64.0))])

    def spec(self, index: int, metadata: Mapping[str, Any] | None) -> rules.GenEvalSpec:
        """The validated spec of sample ``index``; ``SampleError`` names the bad field."""
        raw = (metadata or {}).get("geneval")
        if raw is None:
            raise SampleError(index, "metadata.geneval", f"required by reward {self.name!r}")
        try:
            return rules.parse_spec(raw)
        except rules.SpecError as err:
            field = f"metadata.geneval.{err.field}" if err.field else "metadata.geneval"
            raise SampleError(index, field, err.message) from None

    def validate_sample(self, index: int, prompt: str, media: np.ndarray, metadata: Any) -> None:
        """Rejects a missing or invalid ``metadata.geneval`` (unknown class, colour, ...)."""
        del prompt, media
        self.spec(index, metadata)

    def detect(
        self, images: Sequence[np.ndarray], specs: Sequence[rules.GenEvalSpec]
    ) -> list[Detections]:
        """Per image its detections after GenEval's filtering (``rules.filter_detections``).

        Same-size images share detector forwards (``detector_batch_size``).
        """
        raw = self.detector.detect_many(
            images,
            [self.thresholds.for_tag(spec.tag) for spec in specs],
            batch_size=self.config.effective_detector_batch_size,
        )
        return [
            rules.filter_detections(found, spec.tag, self.thresholds)
            for found, spec in zip(raw, specs, strict=True)
        ]

    def verdicts(
        self, images: Sequence[np.ndarray], specs: Sequence[rules.GenEvalSpec]
    ) -> list[rules.Verdict]:
        """The verdict (``correct`` and the reason) for each ``uint8 [H, W, 3]`` image.

        Detection (batched by size), then every colour the rules will ask about, for all
        images at once (``rules.colour_requests``, ``ColorClassifier.classify_many``), then
        the rules per image.
        """
        detected = self.detect(images, specs)
        keys: list[tuple[int, str]] = []
        requests: list[ColorRequest] = []
        for i, (found, spec) in enumerate(zip(detected, specs, strict=True)):
            for class_name, k in rules.colour_requests(spec, found).items():
                keys.append((i, class_name))
                requests.append(ColorRequest(images[i], class_name, found[class_name][:k]))
        colors: list[dict[str, list[str]]] = [{} for _ in images]
        for (i, class_name), names in zip(keys, self.colors.classify_many(requests), strict=True):
            colors[i][class_name] = names
        verdicts = []
        for i, (found, spec) in enumerate(zip(detected, specs, strict=True)):
            verdicts.append(
                rules.evaluate(
                    spec,
                    found,
                    _cached_colors(colors[i]),
                    position_threshold=self.thresholds.position_threshold,
                )
            )
        return verdicts

    def judge(self, image: np.ndarray, spec: rules.GenEvalSpec) -> rules.Verdict:
        """The verdict for one ``uint8 [H, W, 3]`` image."""
        return self.verdicts([image], [spec])[0]

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``correct`` (1.0/0.0) per image; the rules run per image (see the module docstring)."""
        specs = [self.spec(i, meta) for i, meta in enumerate(batch.metadata)]
        verdicts = self.verdicts(list(batch.media), specs)
        correct = np.zeros(len(batch), np.float32)
        for i, verdict in enumerate(verdicts):
            correct[i] = float(verdict.correct)
            logger.debug("geneval %s sample %d: %s", self.name, i, verdict.reason or "correct")
        return {"correct": correct}


def _cached_colors(colors: Mapping[str, list[str]]) -> rules.ColorClassifier:
    """A ``rules.ColorClassifier`` answering from colours classified beforehand."""

    def classify(class_name: str, detections: Sequence[rules.Detection]) -> list[str]:
        known = colors.get(class_name, [])
        if len(detections) > len(known):  # rules.colour_requests and evaluate disagree
            raise RuntimeError(f"{len(detections)} {class_name} colours asked, {len(known)} known")
        return known[: len(detections)]

    return classify
