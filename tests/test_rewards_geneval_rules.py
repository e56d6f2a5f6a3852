"""GenEval rules on synthetic detections: every tag, counts, colours, positions, excludes, thresholds."""

import json
from pathlib import Path

import pytest

from rewards.geneval_rules import (
    COCO_CLASSES,
    COLORS,
    Detection,
    GenEvalMetadataError,
    GenEvalResult,
    canonical_class,
    evaluate,
    relative_position,
    select_detections,
    validate_metadata,
)

REAL_METADATA = Path("/work/shared/data/prompts/geneval_test_metadata.jsonl")


class Colours:
    """Colour stub: the colour of a detection is looked up by its box; records every call."""

    def __init__(self, by_box=None):
        self.by_box = dict(by_box or {})
        self.calls = []

    def __call__(self, name, dets):
        self.calls.append((name, len(dets)))
        return [self.by_box.get(d.box, "red") for d in dets]


def det(name, box=(0, 0, 10, 10), score=0.99):
    return Detection(name, score, box)


def run(objects, meta, colours=None, partial_credit="reward_server"):
    return evaluate(select_detections(objects, meta.get("tag")), meta, colours or Colours(), partial_credit)


def row(n, name="dog", y=0, score=0.99):
    """n boxes of one class side by side."""
    return [det(name, (20 * i, y, 20 * i + 10, y + 10), score) for i in range(n)]


# ---- single_object / two_object ---------------------------------------------------------------------------------

SINGLE = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}
TWO = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1}]}


def test_single_object_found_is_correct():
    r = run(row(1), SINGLE)
    assert (r.correct, r.strict_correct, r.score) == (True, True, 1.0)
    assert r.counts == {"dog": 1}


def test_zero_objects_fails_everything():
    r = run([], SINGLE)
    assert (r.correct, r.strict_correct, r.score) == (False, False, 0.0)
    assert "expected dog>=1, found 0" in r.reasons


def test_other_class_does_not_count():
    r = run(row(1, "cat"), SINGLE)
    assert not r.correct and r.score == 0.0


def test_at_least_vs_exact_count():
    r = run(row(2), SINGLE)  # two dogs for "a dog"
    assert r.correct is True  # official rule: at least `count`
    assert r.strict_correct is False  # strict rule: exactly `count`
    assert r.score == 0.0  # 1 - |2 - 1| / 1


def test_two_object_both_and_one_missing():
    assert run(row(1, "dog") + row(1, "cat", y=50), TWO).correct
    r = run(row(1, "dog"), TWO)
    assert not r.correct and not r.strict_correct and r.score == pytest.approx(0.5)


def test_two_clauses_of_one_class_share_detections():
    meta = {"tag": "two_object", "include": [{"class": "dog", "count": 1}, {"class": "dog", "count": 1}]}
    r = run(row(1), meta)
    assert r.correct and r.strict_correct  # clauses are independent, as in GenEval


# ---- counting ---------------------------------------------------------------------------------------------------

COUNT3 = {"tag": "counting", "include": [{"class": "cup", "count": 3}], "exclude": [{"class": "cup", "count": 4}]}


@pytest.mark.parametrize(
    "n, correct, strict, score",
    [
        (3, True, True, 1.0),
        (2, False, False, 2 / 3),
        (4, False, False, 2 / 3),
        (0, False, False, 0.0),
        (6, False, False, 0.0),
        (9, False, False, -1.0),
    ],
)
def test_counting_exact_with_exclude(n, correct, strict, score):
    r = run(row(n, "cup"), COUNT3)
    assert (r.correct, r.strict_correct) == (correct, strict)
    assert r.score == pytest.approx(score)  # reward-server: 1 - |n - k| / k, not clipped, exclude ignored
    assert run(row(n, "cup"), COUNT3, partial_credit="clipped").score == pytest.approx(max(score, 0.0))


def test_counting_uses_the_09_threshold():
    objects = row(3, "cup", score=0.95) + [det("cup", (0, 50, 10, 60), score=0.85)]
    assert run(objects, COUNT3).correct  # the 0.85 detection is ignored for counting prompts
    two = {"tag": "two_object", "include": [{"class": "cup", "count": 4}]}
    assert run(objects, two).correct  # ...but kept (>= 0.3) for other tags


def test_counting_without_exclude_is_at_least():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 2}]}
    r = run(row(3, "cup"), meta)
    assert r.correct and not r.strict_correct and r.score == pytest.approx(0.5)


# ---- thresholds and caps ----------------------------------------------------------------------------------------


def test_select_detections_threshold_is_strict_sorted_and_capped():
    dets = [det("dog", (i, 0, i + 1, 1), score=s) for i, s in enumerate([0.3, 0.2999, 0.5, 0.9, 0.31, 0.91])]
    kept = select_detections(dets, "single_object")
    assert [d.score for d in kept["dog"]] == [0.91, 0.9, 0.5, 0.31]  # GenEval keeps score > 0.3, not >=
    assert [d.score for d in select_detections(dets, "counting")["dog"]] == [0.91]
    many = [det("dog", (i, 0, i + 1, 1), score=0.4 + i / 100) for i in range(20)]
    capped = select_detections(many, "single_object")["dog"]
    assert len(capped) == 16 and capped[0].score == pytest.approx(0.59) and capped[-1].score == pytest.approx(0.44)


def test_counting_caps_at_16_per_class():
    meta = {"tag": "counting", "include": [{"class": "cup", "count": 4}], "exclude": [{"class": "cup", "count": 17}]}
    r = run(row(20, "cup"), meta)
    assert r.counts == {"cup": 16} and r.correct  # 20 found, 16 kept: the exclude count of 17 is never reached


# ---- colours ----------------------------------------------------------------------------------------------------

COLOR = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}]}


def test_colour_match_and_mismatch():
    car = det("car", (0, 0, 10, 10))
    assert run([car], COLOR, Colours({car.box: "blue"})).correct
    r = run([car], COLOR, Colours({car.box: "green"}))
    assert not r.correct and not r.strict_correct
    assert r.score == pytest.approx(0.5)  # count credit 1, colour credit 0
    assert any("expected blue car" in reason for reason in r.reasons)


def test_colour_checked_only_on_most_confident_objects():
    good = det("car", (0, 0, 10, 10), score=0.9)
    worse = det("car", (50, 0, 60, 10), score=0.5)
    colours = Colours({good.box: "blue", worse.box: "green"})
    r = run([worse, good], COLOR, colours)
    assert r.correct and not r.strict_correct  # two cars: at least one, not exactly one
    assert colours.calls == [("car", 1)]  # only the top-1 was classified


def test_colour_classifier_not_called_without_colour_clause_or_objects():
    colours = Colours()
    run(row(1), SINGLE, colours)
    run([], COLOR, colours)
    assert colours.calls == []


def test_color_attr_partial_credit():
    meta = {
        "tag": "color_attr",
        "include": [{"class": "car", "count": 1, "color": "blue"}, {"class": "bench", "count": 1, "color": "white"}],
    }
    car, bench = det("car", (0, 0, 10, 10)), det("bench", (50, 0, 60, 10))
    assert run([car, bench], meta, Colours({car.box: "blue", bench.box: "white"})).correct
    r = run([car, bench], meta, Colours({car.box: "blue", bench.box: "black"}))
    assert not r.correct and r.score == pytest.approx(3 / 4)
    swapped = run([car, bench], meta, Colours({car.box: "white", bench.box: "blue"}))
    assert not swapped.correct and swapped.score == pytest.approx(1 / 2)


def test_multi_instance_colour_credit_is_fraction():
    meta = {"tag": "colors", "include": [{"class": "car", "count": 2, "color": "red"}]}
    cars = row(2, "car")
    r = run(cars, meta, Colours({cars[0].box: "red", cars[1].box: "blue"}))
    assert not r.correct and r.score == pytest.approx((1 + 0.5) / 2)


# ---- positions --------------------------------------------------------------------------------------------------

CENTRE = (100, 100, 140, 140)
PLACES = {
    "left of": (20, 100, 60, 140),
    "right of": (180, 100, 220, 140),
    "above": (100, 20, 140, 60),
    "below": (100, 180, 140, 220),
}


@pytest.mark.parametrize("relation", list(PLACES))
def test_each_position_relation(relation):
    meta = {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": [relation, 0]}],
    }
    assert relative_position(PLACES[relation], CENTRE) == {relation}
    r = run([det("dog", CENTRE), det("cat", PLACES[relation])], meta)
    assert (r.correct, r.strict_correct, r.score) == (True, True, 1.0)
    for other, box in PLACES.items():
        if other != relation:
            wrong = run([det("dog", CENTRE), det("cat", box)], meta)
            # reward-server appends 0 and then 1 for a failed position: (1 + 1 + 0 + 1) / 4
            assert not wrong.correct and not wrong.strict_correct and wrong.score == pytest.approx(3 / 4)
            clipped = run([det("dog", CENTRE), det("cat", box)], meta, partial_credit="clipped")
            assert clipped.score == pytest.approx(2 / 3)


def test_position_margin_rule():
    # Boxes 40 px wide: margin 0.1 * (40 + 40) = 8 px. Centres 20 px apart: (20 - 8) / 20 = 0.6 > 0.5 -> left of.
    assert relative_position((0, 0, 40, 40), (20, 0, 60, 40)) == {"left of"}
    # 12 px apart: (12 - 8) / 12 = 0.33, not beyond 0.5 -> no relation.
    assert relative_position((0, 0, 40, 40), (12, 0, 52, 40)) == set()
    # 6 px apart: the margin swallows the offset entirely.
    assert relative_position((0, 0, 40, 40), (6, 0, 46, 40)) == set()
    # Equal diagonal offsets: both components 0.707 > 0.5 -> two relations.
    assert relative_position((0, 0, 10, 10), (100, 100, 110, 110)) == {"left of", "above"}
    # Mostly horizontal with a small vertical offset: only the horizontal relation.
    assert relative_position((200, 30, 210, 40), (0, 0, 10, 10)) == {"right of"}
    assert relative_position((0, 0, 10, 10), (0, 0, 10, 10)) == set()


def test_position_without_target_fails():
    meta = {
        "tag": "position",
        "include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
    }
    r = run([det("cat", PLACES["left of"])], meta)
    assert not r.correct and "no target for cat to be left of" in r.reasons
    assert r.score == pytest.approx(1 / 3)  # dog count 0, cat count 1, position 0


def test_position_checks_every_pair():
    meta = {
        "tag": "position",
        "include": [{"class": "dog", "count": 2}, {"class": "cat", "count": 1, "position": ["left of", 0]}],
    }
    dogs = [det("dog", CENTRE), det("dog", (300, 100, 340, 140))]
    assert run(dogs + [det("cat", PLACES["left of"])], meta).correct
    assert not run(dogs + [det("cat", PLACES["right of"])], meta).correct  # right of one dog, left of the other


# ---- excludes, validation, serialisation ------------------------------------------------------------------------


def test_exclude_on_other_class():
    meta = {
        "tag": "single_object",
        "include": [{"class": "dog", "count": 1}],
        "exclude": [{"class": "cat", "count": 1}],
    }
    assert run(row(1), meta).correct
    r = run(row(1) + row(1, "cat", y=50), meta)
    assert not r.correct and not r.strict_correct
    assert r.score == 1.0  # reward-server's training score ignores exclude clauses
    assert run(row(1) + row(1, "cat", y=50), meta, partial_credit="clipped").score == pytest.approx(0.5)


@pytest.mark.parametrize(
    "meta, message",
    [
        ({"tag": "x"}, "include"),
        ({"include": [{"class": "dog"}]}, "count"),
        ({"include": [{"class": "dog", "count": 1, "color": "teal"}]}, "colour"),
        ({"include": [{"class": "dog", "count": 1, "position": ["left of", 0]}]}, "earlier"),
        (
            {"include": [{"class": "dog", "count": 1}, {"class": "cat", "count": 1, "position": ["near", 0]}]},
            "relation",
        ),
    ],
)
def test_bad_metadata_is_rejected(meta, message):
    with pytest.raises(GenEvalMetadataError, match=message):
        validate_metadata(meta, where="line 3")


def test_result_round_trips_through_dict():
    r = run(row(2), SINGLE)
    assert GenEvalResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r


def test_detector_labels_map_to_geneval_names():
    assert canonical_class("keyboard") == "computer keyboard"
    assert canonical_class("remote") == "tv remote"
    assert canonical_class("dining_table") == "dining table"
    assert len(set(COCO_CLASSES)) == 80 and len(COLORS) == 10


@pytest.mark.skipif(not REAL_METADATA.exists(), reason="real GenEval metadata not available")
def test_real_metadata_format_is_understood():
    colours = Colours()
    tags = set()
    for line in REAL_METADATA.read_text().splitlines():
        meta = json.loads(line)
        tags.add(meta["tag"])
        validate_metadata(meta)
        objects = [
            det(c["class"], (40 * i, 0, 40 * i + 10, 10))
            for i, c in enumerate(meta["include"])
            for _ in range(c["count"])
        ]
        r = run(objects, meta, colours)
        assert not run([], meta).correct
        if meta["tag"] in ("single_object", "two_object", "counting"):
            assert r.correct and r.strict_correct, meta
    assert tags == {"single_object", "two_object", "counting", "colors", "position", "color_attr"}
