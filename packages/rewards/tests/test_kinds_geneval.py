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

from dancegrpo_proto.client import RewardClient, RewardServiceError
from dancegrpo_rewards.base import RewardBatch, RewardConfigError, SampleError
from dancegrpo_rewards.kinds import geneval_rules as rules
from dancegrpo_rewards.kinds.checkpoints import CheckpointError
from dancegrpo_rewards.kinds.geneval import (
    COLOR_TEMPLATES,
    GenEvalReward,
    object_crop,
)
from dancegrpo_rewards.kinds.geneval_detector import geneval_class_map
from dancegrpo_rewards.registry import reward_class
from dancegrpo_testing import clip_models, geneval_models
from dancegrpo_testing.servers import running_reward_server

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
        monkeypatch.setattr(reward.detector.model, "forward", lambda **_: outputs)

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
    # grid cells [1, 5) x [4, 12) are pixels [4, 20) x [16, 48)
    np.testing.assert_allclose(dog.box, (4, 16, 20, 48), atol=1)
    np.testing.assert_allclose(found["cat"][0].box, (40, 16, 56, 48), atol=1)
    assert dog.mask.shape == (SIZE, SIZE) and dog.mask.dtype == bool
    assert dog.mask[32, 12] and not dog.mask[32, 48]


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
    dog_colour = reference_colour(files, image, dog.mask, dog.box, "dog")
    cat_colour = reference_colour(files, image, cat.mask, cat.box, "cat")
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
    ],
)
def test_bad_options_name_the_key(options: dict, key: str) -> None:
    with pytest.raises(RewardConfigError, match=f"'{key}'"):
        GenEvalReward("geneval", options)


def test_missing_detector_folder_names_path_layout_and_docs(files, tmp_path: Path) -> None:
    missing = tmp_path / "mask2former-swin-small-coco-instance"
    with pytest.raises(CheckpointError, match="folder not found") as err:
        GenEvalReward("geneval", {**options_for(files), "detector_path": str(missing)})
    text = str(err.value)
    assert str(missing) in text and "preprocessor_config.json" in text
    assert "docs/rewards.md" in text and "'geneval'" in text


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


# ---------------------------------------------------------------------------- server


def test_geneval_through_a_real_server(files) -> None:
    options = options_for(files, threshold=0.0083)
    config = {
        "server": {"host": "127.0.0.1"},
        "rewards": {"geneval": {"kind": "geneval", "options": options}},
    }
    images = clip_models.random_images(4, seed=4, min_size=40, max_size=72)
    metadata = MIXED_SPECS[:4]
    expected = GenEvalReward("local", options).score(batch_of(images, metadata))["correct"]
    server = running_reward_server(config, startup_timeout_s=120)
    with server as (target, _, _), RewardClient(target) as client:
        (info,) = client.list_rewards()
        assert info.kind == "geneval" and tuple(info.output_names) == ("correct",)
        assert info.requires_metadata
        out = client.score("geneval", images=images, prompts=["a photo"] * 4, metadata=metadata)
        np.testing.assert_array_equal(out["correct"], expected)
        bad = meta("two_object", [{"class_name": "dog"}, {"class_name": "mouse"}])
        with pytest.raises(RewardServiceError) as err:
            client.score("geneval", images=images[:2], metadata=[metadata[0], bad])
    assert err.value.code.name == "INVALID_ARGUMENT"
    assert "samples[1].metadata.geneval.include[1].class_name" in err.value.details
