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
"""

from __future__ import annotations

import dataclasses
import functools
import logging
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
    Mask2FormerDetector,
    check_detector_folder,
    load_mask2former,
)
from dancegrpo_rewards.kinds.options import (
    OptionError,
    check_device,
    check_dtype,
    parse_options,
    resolve_path,
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
    def effective_clip_arch(self) -> str | None:
        """``clip_arch``, defaulted for open_clip checkpoints; ``None`` for HF folders."""
        return None if self.clip_hf_path else (self.clip_arch or DEFAULT_CLIP_ARCH)


def object_crop(image: np.ndarray, detection: rules.Detection) -> np.ndarray:
    """What GenEval shows CLIP for one object: ``uint8 [h, w, 3]``.

    Pixels outside the detection's mask (if it has one) become ``CROP_BACKGROUND``, then
    the image is cropped to the box (rounded like PIL's ``Image.crop``, kept inside the
    image and at least one pixel wide).
    """
    if detection.mask is not None:
        image = np.where(np.asarray(detection.mask, bool)[..., None], image, CROP_BACKGROUND)
        image = image.astype(np.uint8)
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (int(round(v)) for v in detection.box)
    x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
    x2, y2 = max(min(x2, width), x1 + 1), max(min(y2, height), y1 + 1)
    return np.ascontiguousarray(image[y1:y2, x1:x2])


class ColorClassifier:
    """CLIP zero-shot colour classification of detected objects, as GenEval does it.

    Text classifiers are built once per class name and kept (at most 80).
    """

    def __init__(self, encoder: ClipEncoder) -> None:
        self.encoder = encoder
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
        if not detections:
            return []
        crops = [object_crop(image, d) for d in detections]
        image_features = self.encoder.encode_images(crops)
        logits = image_features @ self.text_classifier(class_name).T
        return [rules.COLORS[int(i)] for i in logits.argmax(dim=1)]


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
        self.detector_path = resolve_path("detector_path", self.config.detector_path)
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

    def judge(self, image: np.ndarray, spec: rules.GenEvalSpec) -> rules.Verdict:
        """The verdict for one ``uint8 [H, W, 3]`` image (``correct`` and the reason)."""
        detections = self.detector.detect(image, self.thresholds.for_tag(spec.tag))
        classify = functools.partial(self.colors.classify, image)
        return rules.judge(spec, detections, classify, self.thresholds)

    @torch.inference_mode()
    def score(self, batch: RewardBatch) -> dict[str, np.ndarray]:
        """``correct`` (1.0/0.0) per image; each image is judged on its own (batch-invariant)."""
        specs = [self.spec(i, meta) for i, meta in enumerate(batch.metadata)]
        correct = np.zeros(len(batch), np.float32)
        for i, (image, spec) in enumerate(zip(batch.media, specs, strict=True)):
            verdict = self.judge(image, spec)
            correct[i] = float(verdict.correct)
            logger.debug("geneval %s sample %d: %s", self.name, i, verdict.reason or "correct")
        return {"correct": correct}
