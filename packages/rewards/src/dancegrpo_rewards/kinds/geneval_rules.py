"""GenEval's correctness rules (Ghosh et al. 2023), as pure functions of detections.

No I/O, no torch (numpy for float32 arithmetic): detections in, ``Verdict(correct, reason)`` out. The ``geneval`` kind
(``geneval.py``) supplies the detections (Mask2Former) and the colour classifier (CLIP).

Facts below come from the reference implementation, github.com/djghosh13/geneval:
``evaluation/evaluate_images.py`` (thresholds, detection filtering, ``relative_position``,
``evaluate``), ``prompts/create_prompts.py`` (tags, colours, positions, how counting
prompts encode "exactly N") and ``evaluation/object_names.txt`` (the 80 class names).

Semantics, per image:

1. Detections of each class are sorted by score (highest first), those with
   ``score > threshold`` are kept — ``counting_threshold`` (0.9) instead of ``threshold``
   (0.3) when the tag is ``counting`` — then at most ``max_objects`` (16) per class, then
   greedy non-maximum suppression at IoU ``max_overlap`` (1.0 disables it, the default).
   The score test is float32 against float32, as GenEval's: mmdetection's scores are a
   float32 array and numpy compares it with a Python-float threshold in float32, so a
   score equal to ``float32(0.3)`` is *not* above 0.3 (in float64 it would be).
2. Every include object needs ``count`` detections of its class ("at least"; only the
   ``count`` best are looked at). If it names a colour, all of those ``count`` best must be
   classified as that colour. If it names a position relative to an earlier include
   object, every one of them must stand in that relation to every detection matched by
   the reference object; a reference that itself failed fails this object too.
3. An exclude object fails the image when its class has ``>= count`` detections. Counting
   prompts say "exactly N" as include ``count = N`` plus exclude ``count = N + 1``.
4. ``count = 0`` (the proto's "unset") means 1, i.e. "at least one" / "any at all".

Arithmetic follows GenEval's dtypes under the numpy its environment pins (1.23.1):
``relative_position`` in float32 (mmdetection's boxes are float32 arrays and every step
there is an array operation), ``box_iou`` with float64 areas (GenEval adds the Python
int ``1`` to float32 *scalars*, which numpy 1.x promotes to float64). Equal scores keep
their input order here; GenEval's order among them is that of ``np.argsort(...)[::-1]``
(docs/rewards.md lists what that gives).

The image is correct when no rule fails. GenEval's overall score is the mean over tags of
the per-tag fraction of correct images (``evaluation/summary_scores.py``); as a reward
each image's 0/1 is used directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

#: The 80 detector classes of GenEval, in the COCO / mmdetection class order of
#: ``evaluation/object_names.txt``. COCO's ``mouse``, ``remote`` and ``keyboard`` are
#: renamed there to ``computer mouse``, ``tv remote`` and ``computer keyboard``.
GENEVAL_CLASSES: tuple[str, ...] = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop",
    "computer mouse", "tv remote", "computer keyboard", "cell phone", "microwave", "oven",
    "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
#: GenEval's colour names (``COLORS`` in evaluate_images.py and create_prompts.py).
COLORS: tuple[str, ...] = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
)  # fmt: skip
#: Relations ``relative_position`` can return (``positions`` in create_prompts.py).
POSITIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: GenEval's task tags (create_prompts.py).
TAGS: tuple[str, ...] = (
    "single_object", "two_object", "counting", "colors", "position", "color_attr",
)  # fmt: skip
#: Other names of the same classes in detector label maps (COCO-2014/VOC spellings and
#: the unrenamed COCO-2017 names used by Hugging Face's Mask2Former COCO checkpoints).
CLASS_ALIASES: Mapping[str, str] = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "pottedplant": "potted plant",
    "diningtable": "dining table",
    "tvmonitor": "tv",
    "hair dryer": "hair drier",
}
_CLASS_SET = frozenset(GENEVAL_CLASSES)
#: Most objects an ``include`` or ``exclude`` list may hold. GenEval's prompts have at
#: most two include objects and one exclude object (``prompts/create_prompts.py``); the
#: cap bounds the work a single spec can cause (position checks are quadratic).
MAX_SPEC_OBJECTS = 32

#: A box ``(x1, y1, x2, y2)`` in pixels.
Box = tuple[float, float, float, float]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """GenEval's tunables; defaults are the reference's (``--options`` of evaluate_images.py).

    Attributes:
        threshold: minimum detection score (strictly greater), 0.3.
        counting_threshold: the same for the ``counting`` tag, 0.9.
        max_objects: detections kept per class after thresholding, 16.
        max_overlap: NMS IoU; a detection overlapping a better one of its class with
            ``IoU >= max_overlap`` is dropped. 1.0 (the default) disables NMS.
        position_threshold: fraction of the two objects' summed sizes an offset must
            exceed before it counts as a relation, 0.1.
    """

    threshold: float = 0.3
    counting_threshold: float = 0.9
    max_objects: int = 16
    max_overlap: float = 1.0
    position_threshold: float = 0.1

    def for_tag(self, tag: str) -> float:
        """The score threshold used for images of ``tag``."""
        return self.counting_threshold if tag == "counting" else self.threshold


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected instance.

    Attributes:
        score: detector confidence in [0, 1].
        box: ``(x1, y1, x2, y2)`` pixels, ``x2``/``y2`` exclusive as from a mask's extent.
        mask: optional ``bool`` instance mask (used to crop for colour), either over the
            whole image (``[H, W]``) or over the box only (``[y2 - y1, x2 - x1]``, what the
            detector gives: a box-sized mask costs far less memory on large images).
        color: optional precomputed colour name (used when no classifier is given).
    """

    score: float
    box: Box
    mask: Any = None
    color: str | None = None


#: ``(class_name, detections) -> one colour name per detection``.
ColorClassifier = Callable[[str, Sequence[Detection]], Sequence[str]]


@dataclasses.dataclass(frozen=True)
class ObjectSpec:
    """One include/exclude entry of a GenEval spec (validated).

    ``count`` is already the effective count (0 on the wire becomes 1); ``color`` and
    ``position_relation`` are ``None`` when unset.
    """

    class_name: str
    count: int = 1
    color: str | None = None
    position_relation: str | None = None
    position_reference: int = 0


@dataclasses.dataclass(frozen=True)
class GenEvalSpec:
    """A validated ``metadata.geneval``: tag, include and exclude objects."""

    tag: str
    include: tuple[ObjectSpec, ...]
    exclude: tuple[ObjectSpec, ...] = ()


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The outcome for one image: ``correct`` and why not (empty when correct)."""

    correct: bool
    reason: str = ""


class SpecError(ValueError):
    """A GenEval spec is invalid; ``field`` is relative to the spec (e.g. ``include[1].color``)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


# ---------------------------------------------------------------------------- spec parsing


def parse_spec(raw: Mapping[str, Any]) -> GenEvalSpec:
    """Validates the dict form of ``metadata.geneval`` (``dancegrpo_proto.codec``).

    ``raw`` is ``{"tag", "include": [obj, ...], "exclude": [obj, ...]}`` with objects
    ``{"class_name", "count", "color", "position_relation", "position_reference"}``
    (missing keys take the proto defaults). Raises ``SpecError`` naming the field.
    """
    if not isinstance(raw, Mapping):
        raise SpecError("", f"expected a mapping, got {type(raw).__name__}")
    tag = raw.get("tag") or ""
    if tag not in TAGS:
        raise SpecError("tag", f"unknown tag {tag!r}; GenEval's tags are {', '.join(TAGS)}")
    include = _parse_objects(raw.get("include") or (), "include")
    if not include:
        raise SpecError("include", "at least one object is required")
    exclude = _parse_objects(raw.get("exclude") or (), "exclude")
    for i, obj in enumerate(include):
        _check_reference(obj, i, f"include[{i}]")
    for i, obj in enumerate(exclude):
        if obj.color or obj.position_relation:
            raise SpecError(f"exclude[{i}]", "exclude objects take no color or position")
    return GenEvalSpec(tag=tag, include=include, exclude=exclude)


def _parse_objects(raw: Any, group: str) -> tuple[ObjectSpec, ...]:
    if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
        raise SpecError(group, f"expected a list of objects, got {type(raw).__name__}")
    if len(raw) > MAX_SPEC_OBJECTS:
        raise SpecError(group, f"{len(raw)} objects; at most {MAX_SPEC_OBJECTS} are accepted")
    return tuple(_parse_object(obj, f"{group}[{i}]") for i, obj in enumerate(raw))


def _parse_object(raw: Any, field: str) -> ObjectSpec:
    if not isinstance(raw, Mapping):
        raise SpecError(field, f"expected a mapping, got {type(raw).__name__}")
    class_name = raw.get("class_name") or ""
    if class_name not in _CLASS_SET:
        hint = (
            f"; did you mean {CLASS_ALIASES[class_name]!r}?" if class_name in CLASS_ALIASES else ""
        )
        raise SpecError(
            f"{field}.class_name",
            f"unknown class {class_name!r}: not one of GenEval's 80 COCO classes{hint}",
        )
    count = raw.get("count") or 0
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise SpecError(f"{field}.count", f"expected a non-negative integer, got {count!r}")
    color = raw.get("color") or None
    if color is not None and color not in COLORS:
        raise SpecError(
            f"{field}.color", f"unknown colour {color!r}; GenEval's colours: {', '.join(COLORS)}"
        )
    relation = raw.get("position_relation") or None
    if relation is not None and relation not in POSITIONS:
        raise SpecError(
            f"{field}.position_relation",
            f"unknown relation {relation!r}; expected one of {', '.join(POSITIONS)}",
        )
    reference = raw.get("position_reference") or 0
    if not isinstance(reference, int) or isinstance(reference, bool) or reference < 0:
        raise SpecError(
            f"{field}.position_reference", f"expected an include index, got {reference!r}"
        )
    if relation is None and reference:
        raise SpecError(f"{field}.position_reference", "set without position_relation")
    return ObjectSpec(class_name, max(count, 1), color, relation, reference)


def _check_reference(obj: ObjectSpec, index: int, field: str) -> None:
    # evaluate() reads matched_groups[reference], which holds only earlier include objects.
    if obj.position_relation is not None and obj.position_reference >= index:
        raise SpecError(
            f"{field}.position_reference",
            f"{obj.position_reference} must name an earlier include object (0..{index - 1}); "
            "GenEval checks include objects in order",
        )


# ---------------------------------------------------------------------------- geometry


def box_iou(box_a: Box, box_b: Box) -> float:
    """IoU with GenEval's inclusive-pixel areas (``(x2 - x1 + 1) * (y2 - y1 + 1)``).

    In float64: GenEval's ``compute_iou`` (evaluate_images.py:130-137) adds the int ``1`` to
    float32 scalars, which numpy 1.23 promotes to float64 (numpy 2's NEP 50 would keep
    float32; this follows GenEval's pinned environment). Box differences are exact either
    way for integer pixel boxes below 2^24.
    """

    def area(x1: float, y1: float, x2: float, y2: float) -> float:
        return max(x2 - x1 + 1, 0) * max(y2 - y1 + 1, 0)

    inter = area(
        max(box_a[0], box_b[0]),
        max(box_a[1], box_b[1]),
        min(box_a[2], box_b[2]),
        min(box_a[3], box_b[3]),
    )
    union = area(*box_a) + area(*box_b) - inter
    return inter / union if union else 0.0


def relative_position(box_a: Box, box_b: Box, position_threshold: float = 0.1) -> frozenset[str]:
    """Where A is relative to B: a subset of ``POSITIONS`` (GenEval's ``relative_position``).

    Offset of the box centres, each axis shrunk towards 0 by ``position_threshold`` times
    the sum of the two boxes' sizes on that axis, then divided by the length of the
    *unshrunk* offset; a relation holds when its axis component exceeds 0.5 in magnitude
    (y grows downwards, so negative dy is "above"). No relation when both shrunk
    components are below 1e-3.

    Every step in float32, as GenEval computes it on mmdetection's float32 boxes
    (evaluate_images.py:140-157: array means, differences, the threshold scaled as
    ``float32(position_threshold)``, float32 norm and division), so decisions exactly on
    the 0.5 boundary round as there (e.g. threshold 0.21, dx = 0.5 exactly in real
    numbers: 0.50000006 in float32, a relation; 0.5 in float64, none). The norm is
    ``sqrt(ox² + oy²)`` summed in float32; GenEval's BLAS dot could round it differently
    only where the squares are not exact in float32 (offsets beyond ~2048 px for integer
    boxes).
    """
    f32 = np.float32
    a, b = [f32(v) for v in box_a], [f32(v) for v in box_b]
    offset = [(a[k] + a[k + 2]) / f32(2) - (b[k] + b[k + 2]) / f32(2) for k in (0, 1)]
    shrink = [
        f32(position_threshold) * (abs(a[k + 2] - a[k]) + abs(b[k + 2] - b[k])) for k in (0, 1)
    ]
    revised = [max(abs(o) - t, f32(0)) * np.sign(o) for o, t in zip(offset, shrink, strict=True)]
    if all(abs(r) < f32(1e-3) for r in revised):
        return frozenset()
    norm = np.sqrt(offset[0] * offset[0] + offset[1] * offset[1])
    dx, dy = revised[0] / norm, revised[1] / norm
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return frozenset(relations)


# ---------------------------------------------------------------------------- rules


def filter_detections(
    detections: Mapping[str, Sequence[Detection]], tag: str, thresholds: Thresholds
) -> dict[str, list[Detection]]:
    """Step 1: per class, best first, ``score > threshold``, ``max_objects``, then NMS.

    Scores are compared as float32 with the threshold as float32 (GenEval,
    evaluate_images.py:233: mmdetection's float32 score array ``> confidence_threshold``).
    Ties in (float32) score keep their input order. Classes left without detections are
    dropped.
    """
    threshold = np.float32(thresholds.for_tag(tag))
    kept: dict[str, list[Detection]] = {}
    for class_name, dets in detections.items():
        scored = sorted(((np.float32(d.score), d) for d in dets), key=lambda pair: -pair[0])
        candidates = [d for score, d in scored if score > threshold][: thresholds.max_objects]
        chosen: list[Detection] = []
        while candidates:
            best = candidates.pop(0)
            chosen.append(best)
            if thresholds.max_overlap < 1:
                candidates = [
                    d for d in candidates if box_iou(best.box, d.box) < thresholds.max_overlap
                ]
        if chosen:
            kept[class_name] = chosen
    return kept


def colour_requests(
    spec: GenEvalSpec, detected: Mapping[str, Sequence[Detection]]
) -> dict[str, int]:
    """Which colours ``evaluate`` will ask for: ``{class_name: k}``, the ``k`` best detections.

    ``evaluate`` classifies the ``count`` best detections of an include object that names
    a colour and has at least ``count`` detections, independently of the other objects'
    outcomes; ``k`` is the largest such ``count`` per class, so classifying the ``k`` best
    once answers every call (each asks for a prefix of them). Lets a caller classify the
    colours of a whole batch of images in a few CLIP forwards.
    """
    needed: dict[str, int] = {}
    for obj in spec.include:
        if obj.color is not None and len(detected.get(obj.class_name, ())) >= obj.count:
            needed[obj.class_name] = max(needed.get(obj.class_name, 0), obj.count)
    return needed


def _precomputed_colors(class_name: str, detections: Sequence[Detection]) -> list[str]:
    colors = [d.color for d in detections]
    if None in colors:
        raise ValueError(f"no colour classifier given and a {class_name!r} detection has no color")
    return [str(c) for c in colors]


def _check_include(
    obj: ObjectSpec,
    found: list[Detection],
    matched: list[list[Detection] | None],
    classify: ColorClassifier,
    position_threshold: float,
) -> str | None:
    """Why ``obj`` fails given its ``found`` best detections, or ``None`` when it holds."""
    if len(found) < obj.count:
        return f"expected {obj.class_name} >= {obj.count}, found {len(found)}"
    if obj.color is not None:
        colors = list(classify(obj.class_name, found))
        hits = colors.count(obj.color)
        if hits < obj.count:
            seen = ", ".join(f"{colors.count(c)} {c}" for c in COLORS if c in colors)
            return f"expected {obj.count} {obj.color} {obj.class_name}, classified as {seen}"
    if obj.position_relation is not None:
        targets = matched[obj.position_reference]
        if targets is None:
            return f"no reference object for {obj.class_name} to be {obj.position_relation}"
        for det in found:
            for target in targets:
                relations = relative_position(det.box, target.box, position_threshold)
                if obj.position_relation not in relations:
                    shown = " and ".join(sorted(relations)) or "overlapping"
                    return (
                        f"expected {obj.class_name} {obj.position_relation} the reference, "
                        f"found {shown}"
                    )
    return None


def evaluate(
    spec: GenEvalSpec,
    detected: Mapping[str, Sequence[Detection]],
    classify_colors: ColorClassifier | None = None,
    *,
    position_threshold: float = 0.1,
) -> Verdict:
    """Steps 2–3 on already filtered detections (``filter_detections``).

    Args:
        spec: the validated spec.
        detected: per class the kept detections, best first.
        classify_colors: called only for include objects that name a colour and have
            enough detections, with the ``count`` best; ``None`` uses ``Detection.color``.
        position_threshold: see ``Thresholds``.
    """
    classify = classify_colors or _precomputed_colors
    reasons: list[str] = []
    matched: list[list[Detection] | None] = []
    for obj in spec.include:
        found = list(detected.get(obj.class_name, ()))[: obj.count]
        failure = _check_include(obj, found, matched, classify, position_threshold)
        matched.append(found if failure is None else None)
        if failure is not None:
            reasons.append(failure)
    for obj in spec.exclude:
        present = len(detected.get(obj.class_name, ()))
        if present >= obj.count:
            reasons.append(f"expected {obj.class_name} < {obj.count}, found {present}")
    return Verdict(correct=not reasons, reason="; ".join(reasons))


def judge(
    spec: GenEvalSpec,
    detections: Mapping[str, Sequence[Detection]],
    classify_colors: ColorClassifier | None = None,
    thresholds: Thresholds = Thresholds(),
) -> Verdict:
    """The whole rule set on raw detections: ``filter_detections`` then ``evaluate``."""
    detected = filter_detections(detections, spec.tag, thresholds)
    return evaluate(
        spec, detected, classify_colors, position_threshold=thresholds.position_threshold
    )
