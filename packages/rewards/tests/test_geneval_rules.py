"""GenEval's rules (``geneval_rules``): spec validation, geometry, filtering, every tag.

The reference is GenEval's own ``evaluation/evaluate_images.py`` (github.com/djghosh13/geneval,
read, not imported: it needs mmdetection and CUDA at import); cases on float boundaries
state the line they follow and the arithmetic GenEval does there (mmdetection's boxes and
scores are float32 arrays; GenEval's environment pins numpy 1.23.1).
"""

from __future__ import annotations

import numpy as np
import pytest

from dancegrpo_rewards.kinds.geneval_rules import (
    COLORS,
    GENEVAL_CLASSES,
    MAX_SPEC_OBJECTS,
    Detection,
    GenEvalSpec,
    ObjectSpec,
    SpecError,
    Thresholds,
    box_iou,
    colour_requests,
    evaluate,
    filter_detections,
    judge,
    parse_spec,
    relative_position,
)


def det(score: float = 0.95, box: tuple = (0, 0, 10, 10), color: str | None = None) -> Detection:
    return Detection(score=score, box=tuple(float(v) for v in box), color=color)


def spec(tag: str, include: list[dict], exclude: list[dict] | None = None) -> GenEvalSpec:
    return parse_spec({"tag": tag, "include": include, "exclude": exclude or []})


# ---------------------------------------------------------------------------- constants


def test_class_and_colour_lists_are_genevals() -> None:
    assert len(GENEVAL_CLASSES) == 80 == len(set(GENEVAL_CLASSES))
    assert GENEVAL_CLASSES[0] == "person" and GENEVAL_CLASSES[-1] == "toothbrush"
    assert GENEVAL_CLASSES[64:67] == ("computer mouse", "tv remote", "computer keyboard")
    assert COLORS == (
        "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white",
    )  # fmt: skip
    assert Thresholds() == Thresholds(0.3, 0.9, 16, 1.0, 0.1)


# ---------------------------------------------------------------------------- parse_spec


def test_parse_spec_reads_the_codec_dict_form() -> None:
    parsed = parse_spec(
        {
            "tag": "position",
            "include": [
                {"class_name": "dog", "count": 1, "color": "", "position_relation": ""},
                {
                    "class_name": "cat",
                    "count": 0,
                    "color": "red",
                    "position_relation": "left of",
                    "position_reference": 0,
                },
            ],
            "exclude": [{"class_name": "dog", "count": 2}],
        }
    )
    assert parsed == GenEvalSpec(
        tag="position",
        include=(ObjectSpec("dog"), ObjectSpec("cat", 1, "red", "left of", 0)),
        exclude=(ObjectSpec("dog", 2),),
    )


@pytest.mark.parametrize(
    ("raw", "field", "message"),
    [
        ({"tag": "shapes"}, "tag", "unknown tag 'shapes'"),
        ({"tag": ""}, "tag", "unknown tag ''"),
        ({"tag": "counting", "include": []}, "include", "at least one"),
        (
            {"tag": "two_object", "include": [{"class_name": "dog"}, {"class_name": "mouse"}]},
            "include[1].class_name",
            "did you mean 'computer mouse'",
        ),
        (
            {"tag": "single_object", "include": [{"class_name": "unicorn"}]},
            "include[0].class_name",
            "unknown class 'unicorn'",
        ),
        (
            {"tag": "colors", "include": [{"class_name": "dog", "color": "teal"}]},
            "include[0].color",
            "unknown colour 'teal'",
        ),
        (
            {"tag": "counting", "include": [{"class_name": "dog", "count": -1}]},
            "include[0].count",
            "non-negative",
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class_name": "dog"},
                    {"class_name": "cat", "position_relation": "behind"},
                ],
            },
            "include[1].position_relation",
            "unknown relation 'behind'",
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class_name": "dog", "position_relation": "left of", "position_reference": 1},
                    {"class_name": "cat"},
                ],
            },
            "include[0].position_reference",
            "earlier include object",
        ),
        (
            {
                "tag": "position",
                "include": [
                    {"class_name": "dog"},
                    {"class_name": "cat", "position_relation": "above", "position_reference": 1},
                ],
            },
            "include[1].position_reference",
            "earlier include object",
        ),
        (
            {
                "tag": "position",
                "include": [{"class_name": "dog"}, {"class_name": "cat", "position_reference": 0}],
            },
            "include[1].position_reference",
            None,
        ),
        (
            {
                "tag": "position",
                "include": [{"class_name": "dog"}, {"class_name": "cat", "position_reference": 1}],
            },
            "include[1].position_reference",
            "without position_relation",
        ),
        (
            {
                "tag": "counting",
                "include": [{"class_name": "dog"}],
                "exclude": [{"class_name": "cat", "color": "red"}],
            },
            "exclude[0]",
            "no color or position",
        ),
        (
            {"tag": "counting", "include": [{"class_name": "dog"}], "exclude": [{"class": "cat"}]},
            "exclude[0].class_name",
            "unknown class ''",
        ),
    ],
)
def test_parse_spec_names_the_bad_field(raw: dict, field: str, message: str | None) -> None:
    if message is None:  # position_reference 0 without a relation is the proto default: fine
        parse_spec(raw)
        return
    with pytest.raises(SpecError, match=message) as err:
        parse_spec(raw)
    assert err.value.field == field


def test_parse_spec_caps_the_number_of_objects() -> None:
    many = [{"class_name": "dog"}] * MAX_SPEC_OBJECTS
    assert len(parse_spec({"tag": "counting", "include": many, "exclude": many}).exclude) == 32
    for group in ("include", "exclude"):
        raw = {"tag": "counting", "include": many, group: many + [{"class_name": "cat"}]}
        with pytest.raises(SpecError, match=f"33 objects; at most {MAX_SPEC_OBJECTS}") as err:
            parse_spec(raw)
        assert err.value.field == group


# ---------------------------------------------------------------------------- geometry


def test_box_iou_uses_inclusive_pixel_areas() -> None:
    assert box_iou((0, 0, 9, 9), (0, 0, 9, 9)) == 1.0
    assert box_iou((0, 0, 9, 9), (5, 0, 14, 9)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 9, 9), (20, 20, 29, 29)) == 0.0


@pytest.mark.parametrize(
    ("box_a", "box_b", "relations"),
    [
        ((0, 40, 20, 60), (40, 40, 60, 60), {"left of"}),
        ((40, 40, 60, 60), (0, 40, 20, 60), {"right of"}),
        ((40, 0, 60, 20), (40, 40, 60, 60), {"above"}),
        ((40, 40, 60, 60), (40, 0, 60, 20), {"below"}),
        ((60, 60, 80, 80), (0, 0, 20, 20), {"right of", "below"}),
        ((0, 0, 20, 20), (0, 0, 20, 20), set()),
        # centres 3 px apart, sizes 20 + 20: 3 < 0.1 * 40, so no relation at all
        ((0, 0, 20, 20), (3, 0, 23, 20), set()),
    ],
)
def test_relative_position(box_a: tuple, box_b: tuple, relations: set) -> None:
    assert relative_position(box_a, box_b) == relations


def test_relative_position_shrinks_offsets_by_the_threshold() -> None:
    # offset (-40, 12), sizes (40, 40): shrunk to (-36, 8) at 0.1 → dx = -36/41.8, dy = 8/41.8
    assert relative_position((0, 46, 20, 66), (40, 34, 60, 54), 0.1) == {"left of"}
    # at 1.0 the x offset 40 is not above 1.0 * 40: nothing is left
    assert relative_position((0, 46, 20, 66), (40, 34, 60, 54), 1.0) == set()
    # the shrunk dx is divided by the unshrunk length: 36 / 40 > 0.5, but 16 / 40 < 0.5
    assert relative_position((0, 0, 20, 20), (40, 0, 60, 20), 0.1) == {"left of"}
    assert relative_position((0, 0, 20, 20), (40, 0, 60, 20), 0.6) == set()


@pytest.mark.parametrize(
    ("box_a", "box_b", "threshold", "relations"),
    [
        # evaluate_images.py:140-157 runs on mmdetection's float32 box rows, all in float32.
        # Centres 50.5 and 19 (offset 31.5, 0), widths 37 + 38: the shrunk offset is
        # 31.5 - 0.21·75 = 15.75 = 31.5 / 2, dx exactly 0.5 in real numbers. float32(0.21)·75
        # rounds to 15.7499995, so dx = 0.50000006 > 0.5: "right of" in GenEval (float64
        # would give 15.75 and dx = 0.5: no relation).
        ((32, 0, 69, 2), (0, 0, 38, 2), 0.21, {"right of"}),
        ((0, 0, 38, 2), (32, 0, 69, 2), 0.21, {"left of"}),
        ((0, 32, 2, 69), (0, 0, 2, 38), 0.21, {"below"}),
        # the default 0.1 on an exact boundary: offset 2, sizes 5 + 5, 2 - 0.1·10 = 1 = 2 / 2;
        # float32(0.1)·10 rounds to exactly 1, dx = 0.5: no relation
        ((2, 0, 7, 2), (0, 0, 5, 2), 0.1, set()),
        # offset (6, 8), |offset| 10: dx = (6 - 1) / 10 = 0.5 (no), dy = (8 - 0.4) / 10 (below)
        ((6, 8, 11, 10), (0, 0, 5, 2), 0.1, {"below"}),
    ],
)
def test_relative_position_rounds_like_geneval_on_the_half_boundary(
    box_a: tuple, box_b: tuple, threshold: float, relations: set
) -> None:
    assert relative_position(box_a, box_b, threshold) == relations


# ---------------------------------------------------------------------------- filtering

#: evaluate_images.py:233 keeps ``bbox[index][ordering, 4] > confidence_threshold``: a
#: float32 score array against a Python-float threshold, which numpy (1.x value-based
#: casting and 2.x alike) compares in float32.
F32 = np.float32


def f32_up(value: float) -> float:
    """The next float32 above ``float32(value)``."""
    return float(np.nextafter(F32(value), F32(2)))


@pytest.mark.parametrize(
    ("score", "tag", "thresholds", "kept"),
    [
        # float32(0.3) = 0.30000001192... is above 0.3 in float64, not in float32
        (float(F32(0.3)), "single_object", Thresholds(), False),
        (0.3, "single_object", Thresholds(), False),  # mmdetection's score would be float32(0.3)
        (f32_up(0.3), "single_object", Thresholds(), True),
        (float(F32(0.9)), "counting", Thresholds(), False),
        (f32_up(0.9), "counting", Thresholds(), True),
        # float32(0.7) = 0.69999998... is below 0.7 in float64 too: not above either way
        (float(F32(0.7)), "colors", Thresholds(threshold=0.7), False),
        (f32_up(0.7), "colors", Thresholds(threshold=0.7), True),
        (0.25, "position", Thresholds(threshold=0.25), False),  # exact in both
        (0.2500001, "position", Thresholds(threshold=0.25), True),
    ],
)
def test_scores_equal_to_the_threshold_in_float32_are_not_above_it(
    score: float, tag: str, thresholds: Thresholds, kept: bool
) -> None:
    assert ("dog" in filter_detections({"dog": [det(score)]}, tag, thresholds)) is kept
    s = spec(tag, [{"class_name": "dog", "count": 1}])
    assert judge(s, {"dog": [det(score)]}, thresholds=thresholds).correct is kept


def test_filter_keeps_scores_strictly_above_the_threshold_best_first() -> None:
    dets = {"dog": [det(0.3), det(0.5), det(0.31), det(0.2)], "cat": [det(0.1)]}
    kept = filter_detections(dets, "single_object", Thresholds())
    assert [d.score for d in kept["dog"]] == [0.5, 0.31]
    assert "cat" not in kept


def test_counting_uses_the_counting_threshold() -> None:
    dets = {"dog": [det(0.95), det(0.9), det(0.5)]}
    assert len(filter_detections(dets, "counting", Thresholds())["dog"]) == 1
    assert len(filter_detections(dets, "two_object", Thresholds())["dog"]) == 3


def test_max_objects_is_applied_before_nms() -> None:
    far = [det(0.9 - i / 100, (100 * i, 0, 100 * i + 10, 10)) for i in range(20)]
    assert len(filter_detections({"dog": far}, "colors", Thresholds())["dog"]) == 16
    same = [det(0.9), det(0.8), det(0.7, (50, 50, 60, 60))]
    kept = filter_detections({"dog": same}, "colors", Thresholds(max_overlap=0.5))
    assert [d.score for d in kept["dog"]] == [0.9, 0.7]
    capped = filter_detections({"dog": same}, "colors", Thresholds(max_overlap=0.5, max_objects=2))
    assert [d.score for d in capped["dog"]] == [0.9]


def test_equal_scores_keep_their_input_order() -> None:
    """Ours: stable. GenEval's ``np.argsort(scores)[::-1]`` (evaluate_images.py:232) gives
    reverse input order for <= 16 detections under its numpy 1.23 and an order that depends
    on the values around them beyond that or with numpy 2's SIMD sorts (docs/rewards.md)."""
    a, b = det(0.5, (0, 0, 1, 1)), det(0.5, (5, 5, 6, 6))
    assert filter_detections({"dog": [a, b]}, "colors", Thresholds())["dog"] == [a, b]
    # equal in float32 is equal: 0.5 and the float64 just above it tie
    c = det(float(np.nextafter(0.5, 1.0)), (9, 9, 10, 10))
    assert float(F32(c.score)) == 0.5
    assert filter_detections({"dog": [a, c]}, "colors", Thresholds())["dog"] == [a, c]


# ---------------------------------------------------------------------------- tags


def test_single_object() -> None:
    s = spec("single_object", [{"class_name": "dog", "count": 1}])
    assert judge(s, {"dog": [det()]}).correct
    verdict = judge(s, {"cat": [det()], "dog": [det(0.2)]})
    assert not verdict.correct and verdict.reason == "expected dog >= 1, found 0"


def test_two_object() -> None:
    s = spec("two_object", [{"class_name": "dog", "count": 1}, {"class_name": "cat", "count": 1}])
    assert judge(s, {"dog": [det()], "cat": [det()]}).correct
    assert not judge(s, {"dog": [det(), det()]}).correct


def test_counting_is_exact_through_the_exclude_clause() -> None:
    s = spec(
        "counting",
        [{"class_name": "dog", "count": 3}],
        [{"class_name": "dog", "count": 4}],
    )
    assert judge(s, {"dog": [det()] * 3}).correct
    assert not judge(s, {"dog": [det()] * 2}).correct
    verdict = judge(s, {"dog": [det()] * 4})
    assert not verdict.correct and verdict.reason == "expected dog < 4, found 4"
    # a fourth dog below the counting threshold (0.9) is not counted
    assert judge(s, {"dog": [det()] * 3 + [det(0.85)]}).correct
    # ... and neither is a third one: only two confident dogs
    assert not judge(s, {"dog": [det()] * 2 + [det(0.85)]}).correct


def test_include_count_is_at_least_without_an_exclude() -> None:
    s = spec("two_object", [{"class_name": "dog", "count": 2}])
    assert judge(s, {"dog": [det()] * 5}).correct


def test_zero_count_means_one() -> None:
    """0 is the proto's "unset" (a JSONL ``count: 0`` arrives as 0 too). GenEval itself would
    take 0 literally: an include needs nothing (``[:0]`` then ``0 < 0`` is false) and an
    exclude fails every image (``len(...) >= 0``); its prompts always write count >= 1."""
    s = spec("single_object", [{"class_name": "dog", "count": 0}], [{"class_name": "cat"}])
    assert judge(s, {"dog": [det()]}).correct
    assert not judge(s, {"dog": [det()], "cat": [det()]}).correct
    assert not judge(s, {}).correct


def test_colors_checks_the_best_detections_only() -> None:
    s = spec("colors", [{"class_name": "car", "count": 1, "color": "red"}])
    assert judge(s, {"car": [det(0.9, color="red"), det(0.8, color="blue")]}).correct
    verdict = judge(s, {"car": [det(0.9, color="blue"), det(0.8, color="red")]})
    assert not verdict.correct
    assert verdict.reason == "expected 1 red car, classified as 1 blue"


def test_colors_needs_every_counted_object_in_the_colour() -> None:
    s = spec("colors", [{"class_name": "car", "count": 2, "color": "red"}])
    assert judge(s, {"car": [det(color="red"), det(color="red"), det(0.5, color="blue")]}).correct
    assert not judge(s, {"car": [det(color="red"), det(0.8, color="green")]}).correct


def test_colour_classifier_gets_the_counted_detections_and_only_when_needed() -> None:
    calls: list[tuple[str, list[float]]] = []

    def classify(class_name: str, dets: list[Detection]) -> list[str]:
        calls.append((class_name, [d.score for d in dets]))
        return ["green"] * len(dets)

    s = spec("colors", [{"class_name": "car", "count": 2, "color": "green"}])
    assert judge(s, {"car": [det(0.5), det(0.9), det(0.7)]}, classify).correct
    assert calls == [("car", [0.9, 0.7])]
    calls.clear()
    assert not judge(s, {"car": [det(0.9)]}, classify).correct
    assert calls == []  # too few cars: colour is never asked


@pytest.mark.parametrize(
    ("include", "detected", "expected"),
    [
        ([{"class_name": "car", "count": 2, "color": "red"}], {"car": 3}, {"car": 2}),
        ([{"class_name": "car", "count": 2, "color": "red"}], {"car": 1}, {}),  # too few
        ([{"class_name": "car", "count": 3}], {"car": 3}, {}),  # no colour named
        (
            [
                {"class_name": "car", "count": 1, "color": "red"},
                {"class_name": "bus", "count": 1, "color": "red"},
                {"class_name": "car", "count": 2, "color": "blue"},
            ],
            {"car": 5, "bus": 1},
            {"car": 2, "bus": 1},
        ),
        # a colour is asked even when an earlier object failed (GenEval does not stop)
        (
            [{"class_name": "cat", "count": 1}, {"class_name": "car", "color": "red"}],
            {"car": 1},
            {"car": 1},
        ),
    ],
)
def test_colour_requests_cover_every_classifier_call(
    include: list[dict], detected: dict[str, int], expected: dict[str, int]
) -> None:
    s = spec("color_attr", include)
    found = {name: [det(0.9 - i / 100) for i in range(n)] for name, n in detected.items()}
    assert colour_requests(s, found) == expected
    calls: list[tuple[str, int]] = []

    def classify(class_name: str, dets: list[Detection]) -> list[str]:
        calls.append((class_name, len(dets)))
        assert dets == found[class_name][: len(dets)]  # a prefix of the k best
        return ["red"] * len(dets)

    evaluate(s, found, classify)
    assert all(n <= expected[name] for name, n in calls)
    assert {name for name, _ in calls} == set(expected)


def test_precomputed_colours_must_be_present_without_a_classifier() -> None:
    s = spec("colors", [{"class_name": "car", "color": "red"}])
    with pytest.raises(ValueError, match="no colour classifier"):
        judge(s, {"car": [det()]})


def test_color_attr() -> None:
    s = spec(
        "color_attr",
        [
            {"class_name": "car", "count": 1, "color": "red"},
            {"class_name": "bus", "count": 1, "color": "yellow"},
        ],
    )
    assert judge(s, {"car": [det(color="red")], "bus": [det(color="yellow")]}).correct
    verdict = judge(s, {"car": [det(color="yellow")], "bus": [det(color="red")]})
    assert not verdict.correct and verdict.reason.count("expected") == 2


def position_spec(relation: str = "left of", color: str = "") -> GenEvalSpec:
    return spec(
        "position",
        [
            {"class_name": "dog", "count": 1, "color": color},
            {
                "class_name": "cat",
                "count": 1,
                "position_relation": relation,
                "position_reference": 0,
            },
        ],
    )


LEFT, RIGHT = (0, 40, 20, 60), (40, 40, 60, 60)


def test_position() -> None:
    assert judge(position_spec(), {"dog": [det(box=RIGHT)], "cat": [det(box=LEFT)]}).correct
    verdict = judge(position_spec(), {"dog": [det(box=LEFT)], "cat": [det(box=RIGHT)]})
    assert not verdict.correct
    assert verdict.reason == "expected cat left of the reference, found right of"
    assert judge(
        position_spec("right of"), {"dog": [det(box=LEFT)], "cat": [det(box=RIGHT)]}
    ).correct


def test_position_needs_a_matched_reference() -> None:
    verdict = judge(position_spec(), {"cat": [det(box=LEFT)]})
    assert not verdict.correct
    assert verdict.reason == "expected dog >= 1, found 0; no reference object for cat to be left of"
    # a reference with the wrong colour did not match either
    wrong = {"dog": [det(box=RIGHT, color="blue")], "cat": [det(box=LEFT)]}
    assert "no reference object" in judge(position_spec(color="red"), wrong).reason


def test_position_holds_against_every_reference_detection() -> None:
    s = spec(
        "position",
        [
            {"class_name": "dog", "count": 2},
            {"class_name": "cat", "position_relation": "above", "position_reference": 0},
        ],
    )
    cat = det(box=(40, 0, 60, 20))
    below_dogs = [det(box=(0, 60, 20, 80)), det(0.9, box=(80, 60, 100, 80))]
    assert judge(s, {"dog": below_dogs, "cat": [cat]}).correct
    beside_dog = [below_dogs[0], det(0.9, box=(80, 0, 100, 20))]
    assert not judge(s, {"dog": beside_dog, "cat": [cat]}).correct


def test_overlapping_objects_have_no_relation() -> None:
    verdict = judge(position_spec(), {"dog": [det(box=LEFT)], "cat": [det(box=LEFT)]})
    assert not verdict.correct and verdict.reason.endswith("found overlapping")


def test_exclude_fails_at_count() -> None:
    s = spec("counting", [{"class_name": "dog", "count": 1}], [{"class_name": "dog", "count": 2}])
    assert judge(s, {"dog": [det()]}).correct
    assert not judge(s, {"dog": [det(), det()]}).correct


def test_evaluate_takes_already_filtered_detections() -> None:
    s = spec("single_object", [{"class_name": "dog"}])
    assert evaluate(s, {"dog": [det(0.01)]}).correct  # no threshold at this step
    assert not judge(s, {"dog": [det(0.01)]}).correct
