"""The ``geneval`` kind on tiny random-weight models: detection → rules → ``correct``.

The detector's forward is replaced by chosen logits where the outcome must be known, so
the image processor, the Hugging Face post-processing, box extraction, the colour crops
and CLIP all run for real; elsewhere the tiny random Mask2Former runs as is.
"""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from dancegrpo_proto.client import RewardServiceError
from dancegrpo_rewards.base import RewardBatch, RewardConfigError, SampleError
from dancegrpo_rewards.kinds import geneval_detector
from dancegrpo_rewards.kinds import geneval_rules as rules
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.geneval import (
    COLOR_TEMPLATES,
    ColorRequest,
    GenEvalOptions,
    GenEvalReward,
    clip_window,
    object_crop,
)
from dancegrpo_rewards.kinds.geneval_detector import (
    geneval_class_map,
    resized_input_size,
    same_size_chunks,
)
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models, geneval_models
from dancegrpo_testing.reward_checks import assert_serves_like_local, served_reward

DOG, CAT = 16, 15  # COCO label ids
GRID = 16  # mask-logit resolution of the fake detector
SIZE = 64  # test images are SIZE x SIZE


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> geneval_models.TinyGenEvalFiles:
    return geneval_models.write_tiny_geneval_files(tmp_path_factory.mktemp("tiny_geneval"))


def options_for(files: geneval_models.TinyGenEvalFiles, **extra: object) -> dict:
    return {
        "detector_path": str(files.detector),
        "clip_checkpoint": str(files.clip_checkpoint),
        "clip_arch": str(files.clip_config),
        "detector_shortest_edge": SIZE,
        "detector_longest_edge": 96,
        **extra,
    }


@pytest.fixture(scope="module")
def reward(files: geneval_models.TinyGenEvalFiles) -> GenEvalReward:
    reward = GenEvalReward("geneval", options_for(files))
    reward.load()
    return reward


def meta(tag: str, include: list[dict], exclude: list[dict] | None = None) -> dict:
    return {"geneval": {"tag": tag, "include": include, "exclude": exclude or []}}


def batch_of(images: list[np.ndarray], metadata: list[dict]) -> RewardBatch:
    n = len(images)
    return RewardBatch([""] * n, images, [None] * n, metadata)


# ---------------------------------------------------------------------------- fake detector


def fake_outputs(objects: list[tuple[int, float, tuple[int, int, int, int]]], queries: int = 8):
    """Detector outputs with one query per ``(label, no_object_logit, (r0, r1, c0, c1))``:
    class logit 30 for ``label`` (probability ~1, or 1/2 when ``no_object_logit`` is 30
    too), mask logits +30 on grid cells ``[r0, r1) x [c0, c1)`` and -30 elsewhere; the
    remaining queries are "no object"."""
    classes = torch.full((1, queries, 81), -30.0)
    classes[0, :, 80] = 30.0
    masks = torch.full((1, queries, GRID, GRID), -30.0)
    for q, (label, no_object, (r0, r1, c0, c1)) in enumerate(objects):
        classes[0, q, label] = 30.0
        classes[0, q, 80] = no_object
        masks[0, q, r0:r1, c0:c1] = 30.0
    return types.SimpleNamespace(class_queries_logits=classes, masks_queries_logits=masks)


@pytest.fixture
def fake_detector(reward: GenEvalReward, monkeypatch: pytest.MonkeyPatch):
    """``set(objects)`` makes the detector's forward return ``fake_outputs(objects)``."""

    def install(objects: list[tuple[int, float, tuple[int, int, int, int]]]) -> None:
        outputs = fake_outputs(objects)

        def forward(pixel_values: torch.Tensor, **_: object) -> types.SimpleNamespace:
            n = pixel_values.shape[0]  # the same outputs for every image of the batch
            return types.SimpleNamespace(
                class_queries_logits=outputs.class_queries_logits.expand(n, -1, -1),
                masks_queries_logits=outputs.masks_queries_logits.expand(n, -1, -1, -1),
            )

        monkeypatch.setattr(reward.detector.model, "forward", forward)

    return install


LEFT_CELLS, RIGHT_CELLS = (4, 12, 1, 5), (4, 12, 10, 14)  # grid cells; 4 px each at SIZE 64
SURE, HALF = -30.0, 30.0  # no-object logits: class probability ~1 or 1/2


def blank() -> np.ndarray:
    return np.full((SIZE, SIZE, 3), 200, np.uint8)


def test_registry_resolves_geneval() -> None:
    assert reward_class("geneval") is GenEvalReward


def test_detect_post_processes_masks_boxes_and_scores(reward, fake_detector) -> None:
    fake_detector([(DOG, SURE, LEFT_CELLS), (CAT, HALF, RIGHT_CELLS), (DOG, HALF, RIGHT_CELLS)])
    found = reward.detector.detect(blank(), 0.3)
    assert set(found) == {"dog", "cat"}
    dog, second = found["dog"]
    assert dog.score > 0.95 and 0.45 < found["cat"][0].score < 0.5 and second.score < 0.5
    # grid cells [1, 5) x [4, 12) are pixels [4, 20) x [16, 48): bilinear 16 -> 64 puts the
    # zero crossing between cells 0 and 1 at pixel 3.5, between 4 and 5 at 19.5
    assert dog.box == (4, 16, 20, 48) and found["cat"][0].box == (40, 16, 56, 48)
    # the mask is box-sized; bilinear interpolation rounds off the rectangle's corners
    assert dog.mask.shape == (32, 16) and dog.mask.dtype == bool
    assert dog.mask[1:-1].all() and not dog.mask[0, 0] and dog.mask.sum() == 32 * 16 - 4


def test_single_and_two_object(reward, fake_detector) -> None:
    fake_detector([(DOG, SURE, LEFT_CELLS), (CAT, SURE, RIGHT_CELLS)])
    specs = [
        meta("single_object", [{"class_name": "dog", "count": 1}]),
        meta("single_object", [{"class_name": "horse", "count": 1}]),
        meta("two_object", [{"class_name": "dog", "count": 1}, {"class_name": "cat", "count": 1}]),
        meta("two_object", [{"class_name": "dog", "count": 2}, {"class_name": "cat", "count": 1}]),
    ]
    out = reward.score(batch_of([blank()] * 4, specs))
    np.testing.assert_array_equal(out["correct"], [1, 0, 1, 0])
    assert out["correct"].dtype == np.float32


def test_counting_uses_the_higher_threshold(reward, fake_detector) -> None:
    fake_detector([(DOG, SURE, LEFT_CELLS), (DOG, HALF, RIGHT_CELLS)])
    two_dogs = [{"class_name": "dog", "count": 2}]
    one_dog = [{"class_name": "dog", "count": 1}]
    specs = [
        meta("counting", two_dogs, [{"class_name": "dog", "count": 3}]),
        meta("counting", one_dog, [{"class_name": "dog", "count": 2}]),
        meta("two_object", two_dogs),  # 0.3: both dogs count
    ]
    out = reward.score(batch_of([blank()] * 3, specs))
    np.testing.assert_array_equal(out["correct"], [0, 1, 1])


def test_position(reward, fake_detector) -> None:
    fake_detector([(DOG, SURE, LEFT_CELLS), (CAT, SURE, RIGHT_CELLS)])
    specs = [
        meta(
            "position",
            [
                {"class_name": "dog", "count": 1},
                {"class_name": relation_obj, "position_relation": rel, "position_reference": 0},
            ],
        )
        for relation_obj, rel in [("cat", "right of"), ("cat", "left of"), ("cat", "above")]
    ]
    out = reward.score(batch_of([blank()] * 3, specs))
    np.testing.assert_array_equal(out["correct"], [1, 0, 0])


def full_mask(detection: rules.Detection, shape: tuple[int, int]) -> np.ndarray:
    """The detector's box-sized mask placed in an image-sized one (GenEval's layout)."""
    x1, y1, x2, y2 = (int(v) for v in detection.box)
    mask = np.zeros(shape, bool)
    mask[y1:y2, x1:x2] = detection.mask
    return mask


def reference_colour(files: geneval_models.TinyGenEvalFiles, image, mask, box, name) -> str:
    """GenEval's colour step written out with PIL and open_clip (independent of the kind)."""
    import open_clip
    from PIL import Image

    model = clip_models.build_open_clip_model(files.clip_config, seed=1)
    pil = Image.fromarray(image)
    grey = Image.new("RGB", pil.size, color="#999")
    crop = Image.composite(pil, grey, Image.fromarray(mask)).crop(tuple(box))
    transform = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        image_features = torch.nn.functional.normalize(
            model.encode_image(transform(crop)[None]), dim=-1
        )
        columns = []
        for colour in rules.COLORS:
            texts = [t.format(color=colour, object=name) for t in COLOR_TEMPLATES]
            emb = torch.nn.functional.normalize(
                model.encode_text(open_clip.tokenize(texts)), dim=-1
            )
            mean = emb.mean(dim=0)
            columns.append(mean / mean.norm())
        logits = 100.0 * image_features @ torch.stack(columns, dim=1)
    return rules.COLORS[int(logits.argmax())]


def test_colour_follows_genevals_masked_crop_and_clip(reward, fake_detector, files) -> None:
    fake_detector([(DOG, SURE, LEFT_CELLS), (CAT, SURE, RIGHT_CELLS)])
    image = np.random.default_rng(3).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
    found = reward.detector.detect(image, 0.3)
    dog, cat = found["dog"][0], found["cat"][0]
    dog_colour = reference_colour(files, image, full_mask(dog, image.shape[:2]), dog.box, "dog")
    cat_colour = reference_colour(files, image, full_mask(cat, image.shape[:2]), cat.box, "cat")
    assert reward.colors.classify(image, "dog", [dog]) == [dog_colour]
    other = next(c for c in rules.COLORS if c != dog_colour)
    specs = [
        meta("colors", [{"class_name": "dog", "count": 1, "color": dog_colour}]),
        meta("colors", [{"class_name": "dog", "count": 1, "color": other}]),
        meta(
            "color_attr",
            [
                {"class_name": "dog", "count": 1, "color": dog_colour},
                {"class_name": "cat", "count": 1, "color": cat_colour},
            ],
        ),
    ]
    out = reward.score(batch_of([image] * 3, specs))
    np.testing.assert_array_equal(out["correct"], [1, 0, 1])


def test_object_crop_equals_pil_composite_and_crop() -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    mask = np.zeros((20, 30), bool)
    mask[5:12, 3:9] = True
    mask[7, 10] = True
    detection = rules.Detection(0.9, (3.0, 5.0, 11.0, 12.0), mask=mask)
    pil = Image.fromarray(image)
    expected = Image.composite(pil, Image.new("RGB", pil.size, "#999"), Image.fromarray(mask))
    np.testing.assert_array_equal(
        object_crop(image, detection), np.asarray(expected.crop((3, 5, 11, 12)))
    )
    no_mask = rules.Detection(0.9, (3.0, 5.0, 11.0, 12.0))
    np.testing.assert_array_equal(object_crop(image, no_mask), image[5:12, 3:11])
    # the detector's box-sized mask gives the same crop
    boxed = rules.Detection(0.9, (3.0, 5.0, 11.0, 12.0), mask=mask[5:12, 3:11])
    np.testing.assert_array_equal(object_crop(image, boxed), object_crop(image, detection))
    assert object_crop(image, boxed).dtype == np.uint8
    with pytest.raises(ValueError, match="fits neither"):
        object_crop(image, rules.Detection(0.9, (3.0, 5.0, 11.0, 12.0), mask=mask[:3, :3]))


def test_clip_window_trims_only_very_thin_crops() -> None:
    crop = np.arange(1 * 4000 * 3, dtype=np.int64).reshape(1, 4000, 3) % 251
    window = clip_window(crop.astype(np.uint8))
    assert window.shape == (1, 32, 3)
    np.testing.assert_array_equal(window, crop[:, 1984:2016].astype(np.uint8))  # the centre
    assert clip_window(np.zeros((4000, 2, 3), np.uint8)).shape == (64, 2, 3)
    normal = np.zeros((10, 320, 3), np.uint8)  # exactly 32:1 is left alone
    assert clip_window(normal) is normal


def test_colours_of_many_requests_equal_one_request_at_a_time(reward, fake_detector) -> None:
    fake_detector([(DOG, SURE, LEFT_CELLS), (CAT, SURE, RIGHT_CELLS), (DOG, SURE, RIGHT_CELLS)])
    rng = np.random.default_rng(7)
    images = [rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8) for _ in range(7)]
    requests = []
    for image in images:
        found = reward.detector.detect(image, 0.3)
        requests += [ColorRequest(image, "dog", found["dog"]), ColorRequest(image, "cat", [])]
        requests.append(ColorRequest(image, "cat", found["cat"]))
    together = reward.colors.classify_many(requests)  # 21 crops: a chunk of 16, then 5
    alone = [reward.colors.classify(r.image, r.class_name, r.detections) for r in requests]
    assert together == alone and [len(c) for c in together[:3]] == [2, 0, 1]


# ---------------------------------------------------------------------------- post-processing


def mmdet_instances(
    class_logits: torch.Tensor,
    mask_logits: torch.Tensor,
    input_size: tuple[int, int],
    image_size: tuple[int, int],
) -> list[tuple[int, float, tuple[float, ...], np.ndarray]]:
    """mmdetection 2.x written out, every one of the top 100 pairs at full resolution:
    ``MaskFormerHead.simple_test`` resizes the mask logits to the (unpadded) input,
    ``MaskFormerFusionHead.simple_test`` to the image, ``instance_postprocess`` scores
    (class probability x mean probability over the mask ``> 0``) and boxes (``mask2bbox``)."""
    interpolate = torch.nn.functional.interpolate
    masks = interpolate(mask_logits[None], size=input_size, mode="bilinear", align_corners=False)
    masks = interpolate(masks[0][:, None], size=image_size, mode="bilinear", align_corners=False)
    masks = masks[:, 0]
    probs = class_logits.softmax(dim=-1)[:, :-1]
    top, flat = probs.flatten().topk(100, sorted=False)
    picked = masks[flat // probs.shape[1]]
    binary = (picked > 0).float()
    mask_scores = (picked.sigmoid() * binary).flatten(1).sum(1) / (binary.flatten(1).sum(1) + 1e-6)
    instances = []
    for label, score, mask in zip(
        (flat % probs.shape[1]).tolist(),
        (top * mask_scores).tolist(),
        binary.bool().numpy(),
        strict=True,
    ):
        ys, xs = np.nonzero(mask)
        box = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) if len(xs) else (0, 0, 0, 0)
        instances.append((label, score, tuple(float(v) for v in box), mask))
    return instances


@pytest.mark.parametrize("chunk_elements", [geneval_detector.MASK_CHUNK_ELEMENTS, 1])
@pytest.mark.parametrize("min_score", [0.0, 0.05, 0.3])
def test_postprocess_equals_mmdetection_without_the_shortcut(
    reward, monkeypatch: pytest.MonkeyPatch, min_score: float, chunk_elements: int
) -> None:
    """Only pairs with class probability > min_score get full-resolution masks (the mean
    mask probability is < 1): exactly mmdetection's instances above min_score, chunked or not."""
    monkeypatch.setattr(geneval_detector, "MASK_CHUNK_ELEMENTS", chunk_elements)
    gen = torch.Generator().manual_seed(0)
    queries = 20
    class_logits = torch.randn(queries, 81, generator=gen) * 2
    class_logits[torch.arange(queries), torch.randint(0, 80, (queries,), generator=gen)] += 7
    mask_logits = torch.randn(queries, 16, 24, generator=gen) * 4
    sizes = {"input_size": (64, 96), "image_size": (50, 75)}
    found = reward.detector.postprocess(class_logits, mask_logits, min_score=min_score, **sizes)
    names = reward.detector.class_names
    expected = sorted(
        (names[label], score, box, mask)
        for label, score, box, mask in mmdet_instances(class_logits, mask_logits, **sizes)
        if score > min_score
    )
    got = sorted(
        (name, d.score, d.box, full_mask(d, (50, 75))) for name in found for d in found[name]
    )
    assert len(got) == len(expected) >= 5
    for (name, score, box, mask), (e_name, e_score, e_box, e_mask) in zip(
        got, expected, strict=True
    ):
        assert (name, box) == (e_name, e_box) and score == pytest.approx(e_score, abs=1e-6)
        np.testing.assert_array_equal(mask, e_mask)


def test_resized_input_size_is_the_processors_and_never_zero(files) -> None:
    from transformers import Mask2FormerImageProcessor

    processor = Mask2FormerImageProcessor.from_pretrained(str(files.detector))
    edges = {"shortest_edge": 800, "longest_edge": 1333}
    for height, width in [(64, 64), (48, 80), (512, 512), (1024, 768), (333, 1000), (37, 3000)]:
        pixels = processor(
            images=[np.zeros((height, width, 3), np.uint8)],
            size=edges,
            input_data_format="channels_last",
            return_tensors="pt",
        )["pixel_values"]
        ours = resized_input_size(height, width, **edges, size_divisor=32)
        assert ours == tuple(pixels.shape[-2:]), (height, width)
    # transformers computes a 0-pixel side here (and raises); ours keeps at least 1, then 32
    assert resized_input_size(1, 4000, **edges, size_divisor=32) == (32, 1344)
    assert resized_input_size(4000, 1, **edges, size_divisor=0) == (1333, 1)


def test_same_size_chunks_group_by_size_in_order() -> None:
    sizes = [(48, 80), (64, 64), (48, 80), (48, 80), (64, 64), (48, 80), (48, 80), (1, 1)]
    assert same_size_chunks(sizes, 2) == [[0, 2], [3, 5], [6], [1, 4], [7]]
    assert same_size_chunks(sizes, 8) == [[0, 2, 3, 5, 6], [1, 4], [7]]
    assert same_size_chunks([], 4) == []
    with pytest.raises(ValueError, match="batch_size"):
        same_size_chunks(sizes, 0)


# ---------------------------------------------------------------------------- robustness


@pytest.fixture(scope="module")
def sensitive(files: geneval_models.TinyGenEvalFiles) -> GenEvalReward:
    """The real tiny model with a threshold its random detections (~0.008) pass."""
    reward = GenEvalReward("geneval", options_for(files, threshold=0.0075))
    reward.load()
    return reward


COLOUR_AND_POSITION = [
    meta("colors", [{"class_name": "toilet", "color": "red"}]),
    meta(
        "position",
        [
            {"class_name": "cat", "color": "blue"},
            {"class_name": "toilet", "position_relation": "below", "position_reference": 0},
        ],
    ),
]


@pytest.mark.parametrize(
    ("shape", "fill"),
    [((1, 1), None), ((1, 4000), None), ((4000, 1), None), ((2, 3), None), ((3, 2000), None)]
    + [((1100, 900), None), ((64, 64), 0), ((700, 500), 0)],
)
def test_unusual_images_are_scored(sensitive, shape: tuple[int, int], fill: int | None) -> None:
    """Tiny, thin, large and all-black images go through the real tiny detector and CLIP
    (transformers' own resize fails on 1 x 4000: a 0-pixel side)."""
    rng = np.random.default_rng(0)
    image = (
        np.full((*shape, 3), fill, np.uint8)
        if fill is not None
        else rng.integers(0, 256, (*shape, 3), dtype=np.uint8)
    )
    found = sensitive.detector.detect(image, 0.0075)
    assert sum(len(d) for d in found.values()) > 0
    for dets in found.values():
        for d in dets:
            x1, y1, x2, y2 = d.box
            assert 0 <= x1 < x2 <= shape[1] and 0 <= y1 < y2 <= shape[0]
            assert d.mask.shape == (y2 - y1, x2 - x1) and d.mask.any()
    out = sensitive.score(batch_of([image, image], COLOUR_AND_POSITION))["correct"]
    assert out.shape == (2,) and set(out) <= {0.0, 1.0}


@pytest.mark.parametrize("shape", [(1, 4000), (4000, 1), (2500, 3500)])
def test_objects_filling_thin_or_large_images_get_a_colour(reward, fake_detector, shape) -> None:
    """A detection as large as the image: a 1 x 4000 crop reaches CLIP as its centre."""
    fake_detector([(DOG, SURE, (0, GRID, 0, GRID)), (CAT, SURE, (0, GRID, 0, GRID // 2))])
    image = np.random.default_rng(1).integers(0, 256, (*shape, 3), dtype=np.uint8)
    found = reward.detector.detect(image, 0.3)
    assert found["dog"][0].box == (0, 0, shape[1], shape[0])
    (colour,) = reward.colors.classify(image, "dog", found["dog"])
    specs = [meta("colors", [{"class_name": "dog", "color": colour}])] + COLOUR_AND_POSITION
    out = reward.score(batch_of([image] * 3, specs))["correct"]
    assert out[0] == 1.0 and out.shape == (3,)


def test_nothing_detected_scores_zero_without_asking_colours(reward, fake_detector, monkeypatch):
    fake_detector([])
    asked: list[int] = []
    classify_many = reward.colors.classify_many
    monkeypatch.setattr(
        reward.colors, "classify_many", lambda r: asked.append(len(r)) or classify_many(r)
    )
    specs = [*MIXED_SPECS, *COLOUR_AND_POSITION]
    assert reward.detector.detect(blank(), 0.0) == {}  # no query has a class
    out = reward.score(batch_of([blank()] * len(specs), specs))["correct"]
    np.testing.assert_array_equal(out, np.zeros(len(specs)))
    assert asked == [0]


def test_specs_with_many_objects(reward, fake_detector) -> None:
    fake_detector([(DOG, SURE, LEFT_CELLS), (CAT, SURE, RIGHT_CELLS)])
    dog = {"class_name": "dog", "color": "red"}
    cats = [
        {"class_name": "cat", "position_relation": "right of", "position_reference": i}
        for i in range(rules.MAX_SPEC_OBJECTS - 1)
    ]
    crowded = meta("position", [dog, *cats], [{"class_name": "cat", "count": 2}] * 32)
    huge_count = meta("counting", [{"class_name": "dog", "count": 2**32 - 1}])
    out = reward.score(batch_of([blank()] * 2, [crowded, huge_count]))["correct"]
    assert out[1] == 0.0 and out.shape == (2,)
    too_many = meta("position", [dog, *cats, cats[0]])
    with pytest.raises(SampleError) as err:
        reward.score(batch_of([blank()] * 2, [huge_count, too_many]))
    assert err.value.index == 1 and err.value.field == "metadata.geneval.include"


# ---------------------------------------------------------------------------- batched detection


def detection_list(found: dict) -> list[tuple[str, rules.Detection]]:
    return [(name, d) for name in sorted(found) for d in found[name]]


def test_batched_detection_equals_one_image_at_a_time(files, monkeypatch) -> None:
    """Same-size images share forwards; each image's detections match its own forward.

    Tolerances: batched and single float32 forwards differ by rounding only (<= 4e-7 on
    the logits of the tiny model); softmax and sigmoid pass at most twice that on as a
    relative change, so scores agree to rtol 1e-5. A mask pixel (and so a box edge) could
    only flip where its logit is within that of 0: boxes within 1 px, masks in >= 99.9%
    of their pixels. (On this model and CPU they come out identical.)"""
    reward = GenEvalReward("geneval", options_for(files))
    rng = np.random.default_rng(5)
    wide = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(6)]
    square = [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(3)]
    images = [wide[0], square[0], wide[1], wide[2], square[1], wide[3], wide[4], square[2]]
    images.append(wide[5])
    forwards: list[int] = []
    forward = reward.detector.model.forward

    def counting_forward(pixel_values: torch.Tensor, **kwargs: object):
        forwards.append(pixel_values.shape[0])
        return forward(pixel_values=pixel_values, **kwargs)

    monkeypatch.setattr(reward.detector.model, "forward", counting_forward)
    with torch.inference_mode():
        together = reward.detector.detect_many(images, [0.0] * 9, batch_size=4)
        assert forwards == [4, 2, 3]
        alone = [reward.detector.detect(image, 0.0) for image in images]
    for batched, single in zip(together, alone, strict=True):
        pairs = list(zip(detection_list(batched), detection_list(single), strict=True))
        assert len(pairs) == 100  # the tiny model: 100 (query, class) pairs, all non-empty
        for (name, b), (single_name, s) in pairs:
            assert name == single_name
            assert b.score == pytest.approx(s.score, rel=1e-5)
            np.testing.assert_allclose(b.box, s.box, atol=1)
            if b.mask.shape == s.mask.shape:
                assert np.mean(b.mask != s.mask) <= 1e-3


def test_batched_scores_equal_scoring_each_image_alone(files) -> None:
    """``correct`` is the same whatever the batch, given no score within rounding of the
    threshold: the threshold is put in the middle of a gap between the tiny model's scores."""
    rng = np.random.default_rng(6)
    images = [rng.integers(0, 256, (48, 80, 3), dtype=np.uint8) for _ in range(8)]
    probe = GenEvalReward("geneval", options_for(files))
    with torch.inference_mode():
        scores = np.sort(
            [d.score for im in images for _, d in detection_list(probe.detector.detect(im, 0.0))]
        )
    middle = scores[len(scores) // 4 : 3 * len(scores) // 4]
    gap = int(np.argmax(np.diff(middle)))
    threshold = float(middle[gap] + middle[gap + 1]) / 2
    assert middle[gap + 1] - middle[gap] > 1e-6  # far beyond rounding (~1e-9 on these scores)
    batch = batch_of(images, MIXED_SPECS)
    options = options_for(files, threshold=threshold)
    batched = GenEvalReward("batched", {**options, "detector_batch_size": 8}).score(batch)
    single = GenEvalReward("single", {**options, "detector_batch_size": 1})
    alone = np.concatenate([single.score(batch.select([i]))["correct"] for i in range(8)])
    np.testing.assert_array_equal(batched["correct"], alone)
    assert 0 < alone.sum() < 8


# ---------------------------------------------------------------------------- the real tiny model


MIXED_SPECS = [
    meta("single_object", [{"class_name": "toilet"}]),
    meta("two_object", [{"class_name": "cat"}, {"class_name": "boat"}]),
    meta(
        "counting", [{"class_name": "person", "count": 2}], [{"class_name": "person", "count": 3}]
    ),
    meta("colors", [{"class_name": "toilet", "color": "red"}]),
    meta(
        "position",
        [
            {"class_name": "toilet"},
            {"class_name": "cat", "position_relation": "left of", "position_reference": 0},
        ],
    ),
    meta("color_attr", [{"class_name": "cat", "color": "blue"}, {"class_name": "boat"}]),
    meta("single_object", [{"class_name": "dining table"}], [{"class_name": "person"}]),
    meta("colors", [{"class_name": "cat", "color": "green"}]),
]


def test_real_tiny_model_is_binary_and_batch_invariant(files) -> None:
    # The random detector's scores are ~0.008: a threshold just below that lets
    # detections through so every rule path runs.
    reward = GenEvalReward("geneval", options_for(files, threshold=0.0083))
    images = clip_models.random_images(8, seed=4, min_size=40, max_size=72)
    batch = batch_of(images, MIXED_SPECS)
    together = reward.score(batch)["correct"]
    alone = np.concatenate([reward.score(batch.select([i]))["correct"] for i in range(8)])
    assert together.shape == (8,) and together.dtype == np.float32
    assert set(np.unique(together)) <= {0.0, 1.0}
    assert 0 < together.sum() < 8
    np.testing.assert_array_equal(together, alone)


def test_hf_clip_colour_backbone_runs(files, tmp_path: Path) -> None:
    folder = clip_models.write_hf_clip_folder(tmp_path / "clip-hf")
    options = {k: v for k, v in options_for(files).items() if not k.startswith("clip_")}
    reward = GenEvalReward("geneval", {**options, "clip_hf_path": str(folder), "threshold": 0.0083})
    out = reward.score(batch_of(clip_models.random_images(2, seed=4), MIXED_SPECS[3:5]))
    assert out["correct"].shape == (2,)


def test_warmup_runs(reward) -> None:
    reward.warmup()


# ---------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("geneval", "field", "message"),
    [
        (None, "metadata.geneval", "required"),
        ({"tag": "count", "include": [{"class_name": "dog"}]}, "metadata.geneval.tag", "count"),
        (
            {"tag": "two_object", "include": [{"class_name": "dog"}, {"class_name": "keyboard"}]},
            "metadata.geneval.include[1].class_name",
            "computer keyboard",
        ),
        (
            {"tag": "colors", "include": [{"class_name": "dog", "color": "cyan"}]},
            "metadata.geneval.include[0].color",
            "cyan",
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class_name": "dog"},
                    {"class_name": "cat", "position_relation": "near", "position_reference": 0},
                ],
            },
            "metadata.geneval.include[1].position_relation",
            "near",
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class_name": "dog"},
                    {"class_name": "cat", "position_relation": "above", "position_reference": 5},
                ],
            },
            "metadata.geneval.include[1].position_reference",
            "earlier",
        ),
        (
            {
                "tag": "counting",
                "include": [{"class_name": "dog"}],
                "exclude": [{"class_name": "motorbike"}],
            },
            "metadata.geneval.exclude[0].class_name",
            "motorcycle",
        ),
    ],
)
def test_invalid_specs_name_the_field(reward, geneval, field: str, message: str) -> None:
    metadata = {"geneval": geneval, "attributes": {}}
    with pytest.raises(SampleError, match=message) as err:
        reward.validate_sample(3, "", blank(), metadata)
    assert err.value.index == 3 and err.value.field == field
    assert str(err.value).startswith(f"samples[3].{field}: ")


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({}, "detector_path"),
        ({"detector_path": "d"}, "clip_checkpoint"),
        ({"detector_path": "d", "clip_checkpoint": "c", "clip_hf_path": "h"}, "clip_checkpoint"),
        ({"detector_path": "d", "clip_hf_path": "h", "clip_arch": "ViT-L-14"}, "clip_arch"),
        ({"detector_path": "d", "clip_checkpoint": "c", "clip_arch": "ViT-Q-99"}, "clip_arch"),
        ({"detector_path": "d", "clip_checkpoint": "c", "threshold": 1.5}, "threshold"),
        (
            {"detector_path": "d", "clip_checkpoint": "c", "counting_threshold": -1},
            "counting_threshold",
        ),
        ({"detector_path": "d", "clip_checkpoint": "c", "max_overlap": 0}, "max_overlap"),
        ({"detector_path": "d", "clip_checkpoint": "c", "max_objects": 0}, "max_objects"),
        (
            {"detector_path": "d", "clip_checkpoint": "c", "position_threshold": -0.1},
            "position_threshold",
        ),
        (
            {"detector_path": "d", "clip_checkpoint": "c", "detector_longest_edge": 10},
            "detector_longest_edge",
        ),
        (
            {"detector_path": "d", "clip_checkpoint": "c", "detector_dtype": "int8"},
            "detector_dtype",
        ),
        ({"detector_path": "d", "clip_checkpoint": "c", "threshold": "high"}, "threshold"),
        ({"detector_path": "d", "clip_checkpoint": "c", "nms": 0.5}, "nms"),
        (
            {"detector_path": "d", "clip_checkpoint": "c", "detector_batch_size": 0},
            "detector_batch_size",
        ),
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        GenEvalReward("geneval", options)


def test_detector_batch_size_defaults_by_device() -> None:
    """Unset: 1 on the CPU (batched forwards measured no faster there), 8 elsewhere."""
    base = {"detector_path": "d", "clip_checkpoint": "c"}
    assert GenEvalOptions(**base).effective_detector_batch_size == 1
    assert GenEvalOptions(**base, device="cuda:1").effective_detector_batch_size == 8
    assert GenEvalOptions(**base, detector_batch_size=4).effective_detector_batch_size == 4


def test_missing_detector_folder_names_path_layout_and_docs(files, tmp_path: Path) -> None:
    missing = tmp_path / "mask2former-swin-small-coco-instance"
    with pytest.raises(CheckpointError, match="folder not found") as err:
        GenEvalReward("geneval", {**options_for(files), "detector_path": str(missing)})
    text = str(err.value)
    assert str(missing) in text and "preprocessor_config.json" in text
    assert "docs/rewards.md" in text and "'geneval'" in text


@pytest.mark.parametrize("key", ["clip_checkpoint", "clip_hf_path"])
def test_missing_colour_clip_files_name_genevals_option(files, tmp_path: Path, key: str) -> None:
    options = {**options_for(files), key: str(tmp_path / "nothing-here")}
    if key == "clip_hf_path":
        options = {k: v for k, v in options.items() if k not in ("clip_checkpoint", "clip_arch")}
    with pytest.raises(CheckpointError, match=f"option '{key}'"):
        GenEvalReward("geneval", options)


def copy_folder(source: Path, target: Path, *, skip: tuple[str, ...] = ()) -> Path:
    target.mkdir()
    for path in source.iterdir():
        if path.name not in skip:
            (target / path.name).write_bytes(path.read_bytes())
    return target


def test_detector_folder_without_weights_or_with_other_labels_is_rejected(files, tmp_path) -> None:
    no_weights = copy_folder(files.detector, tmp_path / "a", skip=("model.safetensors",))
    with pytest.raises(CheckpointError, match="no model weights"):
        GenEvalReward("geneval", {**options_for(files), "detector_path": str(no_weights)})
    ade = copy_folder(files.detector, tmp_path / "b")
    config = json.loads((ade / "config.json").read_text())
    config["id2label"]["0"] = "wall"
    (ade / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="'wall'.*'person'|wall.*person"):
        GenEvalReward("geneval", {**options_for(files), "detector_path": str(ade)})


def test_detector_weights_missing_from_the_file_fail_at_load(files, tmp_path) -> None:
    from safetensors.torch import load_file, save_file

    partial = copy_folder(files.detector, tmp_path / "partial")
    weights = load_file(str(partial / "model.safetensors"))
    kept = {k: v for k, v in weights.items() if not k.startswith("class_predictor.")}
    save_file(kept, str(partial / "model.safetensors"), metadata={"format": "pt"})
    reward = GenEvalReward("geneval", {**options_for(files), "detector_path": str(partial)})
    with pytest.raises(CheckpointError, match="lacks 2 weights.*class_predictor"):
        reward.load()


def test_detector_checkpoints_with_or_without_the_loss_buffer_load(files, tmp_path) -> None:
    """``criterion.empty_weight`` (the training loss's config-derived buffer) is optional."""
    from safetensors.torch import load_file, save_file

    without = copy_folder(files.detector, tmp_path / "without-loss")
    weights = load_file(str(without / "model.safetensors"))
    assert "criterion.empty_weight" in weights  # transformers saves it
    del weights["criterion.empty_weight"]
    save_file(weights, str(without / "model.safetensors"), metadata={"format": "pt"})
    for folder in (files.detector, without):
        reward = GenEvalReward("geneval", {**options_for(files), "detector_path": str(folder)})
        reward.load()
        assert reward.detector.model.criterion.empty_weight[-1] == pytest.approx(0.1)


def test_hugging_face_coco_labels_map_onto_genevals_names() -> None:
    mapping = geneval_class_map(geneval_models.COCO_ID2LABEL)
    assert mapping[64] == "computer mouse" and mapping[65] == "tv remote"
    assert mapping[66] == "computer keyboard" and mapping[3] == "motorcycle"
    assert [mapping[i] for i in range(80)] == list(rules.GENEVAL_CLASSES)
    voc_style = {**geneval_models.COCO_ID2LABEL, 3: "motorbike", 60: "diningtable"}
    assert geneval_class_map(voc_style) == mapping
    with pytest.raises(ValueError, match="without a label: dog"):
        geneval_class_map({k: v for k, v in geneval_models.COCO_ID2LABEL.items() if v != "dog"})


def test_version_is_stable_and_tracks_options(files) -> None:
    a = GenEvalReward("a", options_for(files)).version
    assert a.startswith("geneval-") and a == GenEvalReward("b", options_for(files)).version
    assert a != GenEvalReward("c", options_for(files, threshold=0.4)).version
    # like device, the batch size only changes float rounding
    assert a == GenEvalReward("d", options_for(files, detector_batch_size=1)).version


# ---------------------------------------------------------------------------- server


def test_geneval_through_a_real_server(files) -> None:
    options = options_for(files, threshold=0.0083)
    config = {
        "server": {"host": "127.0.0.1"},
        "rewards": {"geneval": {"kind": "geneval", "options": options}},
    }
    images = clip_models.random_images(4, seed=4, min_size=40, max_size=72)
    metadata = MIXED_SPECS[:4]
    local = GenEvalReward("geneval", options)
    assert local.output_names == ("correct",)
    with served_reward(config, startup_timeout_s=120) as client:
        assert_serves_like_local(client, "geneval", local, batch_of(images, metadata), atol=0)
        (info,) = client.list_rewards()
        assert info.requires_metadata
        bad = meta("two_object", [{"class_name": "dog"}, {"class_name": "mouse"}])
        with pytest.raises(RewardServiceError) as err:
            client.score("geneval", images=images[:2], metadata=[metadata[0], bad])
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert "samples[1].metadata.geneval.include[1].class_name" in err.value.details
