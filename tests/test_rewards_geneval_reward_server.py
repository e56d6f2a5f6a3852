"""The default GenEval training score is reward-server's ``evaluate_reward``, quirks included.

Each case is a GenEval-format metadata line, the detections a detector might return, and the score worked
out by hand from the published rule (rewards.geneval_rules docstring, docs/recipe.md): per include clause
append 1 - |n - k|/k (unclipped); a wrong count appends one 0 for a colour or position and stops; a colour
appends 1 - |k - m|/k; a position is scored only on a still-matched clause, 0 without a matched target, and a
failed check appends 0 *and* 1; excludes give nothing. The mean of the list is the score.
"""

from __future__ import annotations

import pytest

from rewards.geneval_rules import Detection, evaluate, select_detections


def boxes(name, n, y=0, score=0.95, x0=0):
    return [Detection(name, score, (x0 + 60 * i, y, x0 + 60 * i + 40, y + 40)) for i in range(n)]


LAPTOP = Detection("laptop", 0.8, (200, 200, 260, 260))
COW_RIGHT = Detection("cow", 0.8, (400, 200, 460, 260))
COW_LEFT = Detection("cow", 0.8, (0, 200, 60, 260))

CASES = [
    # (metadata line, detections, colour of every detection of a class, expected score)
    (
        {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"},
        boxes("bowl", 1),
        {},
        1.0,
    ),
    # three bowls for one: 1 - 2/1 = -1 (reward-server does not clip)
    (
        {"tag": "single_object", "include": [{"class": "bowl", "count": 1}], "prompt": "a photo of a bowl"},
        boxes("bowl", 3),
        {},
        -1.0,
    ),
    (
        {
            "tag": "two_object",
            "include": [{"class": "toaster", "count": 1}, {"class": "bench", "count": 1}],
            "prompt": "a photo of a toaster and a bench",
        },
        boxes("toaster", 1),
        {},
        0.5,
    ),
    # two of three wine glasses: 1 - 1/3
    (
        {
            "tag": "counting",
            "include": [{"class": "wine glass", "count": 3}],
            "exclude": [{"class": "wine glass", "count": 4}],
            "prompt": "a photo of three wine glasses",
        },
        boxes("wine glass", 2),
        {},
        2 / 3,
    ),
    # nine stop signs for four: 1 - 5/4 = -0.25; the exclude clause is ignored
    (
        {
            "tag": "counting",
            "include": [{"class": "stop sign", "count": 4}],
            "exclude": [{"class": "stop sign", "count": 5}],
            "prompt": "a photo of four stop signs",
        },
        boxes("stop sign", 9),
        {},
        -0.25,
    ),
    # counting keeps score > 0.9 only: the 0.9 giraffe is not counted, 1 - 1/2
    (
        {
            "tag": "counting",
            "include": [{"class": "giraffe", "count": 2}],
            "exclude": [{"class": "giraffe", "count": 3}],
            "prompt": "a photo of two giraffes",
        },
        boxes("giraffe", 1) + boxes("giraffe", 1, y=100, score=0.9),
        {},
        0.5,
    ),
    (
        {
            "tag": "colors",
            "include": [{"class": "car", "count": 1, "color": "blue"}],
            "prompt": "a photo of a blue car",
        },
        boxes("car", 1),
        {"car": "blue"},
        1.0,
    ),
    # two umbrellas for one: count 1 - 1 = 0, and one 0 for the colour that is never checked
    (
        {
            "tag": "colors",
            "include": [{"class": "umbrella", "count": 1, "color": "purple"}],
            "prompt": "a photo of a purple umbrella",
        },
        boxes("umbrella", 2),
        {"umbrella": "purple"},
        0.0,
    ),
    # handbag right (1, 1), scissors found but white (1, 0)
    (
        {
            "tag": "color_attr",
            "include": [
                {"class": "handbag", "count": 1, "color": "pink"},
                {"class": "scissors", "count": 1, "color": "black"},
            ],
            "prompt": "a photo of a pink handbag and a black scissors",
        },
        boxes("handbag", 1) + boxes("scissors", 1, y=100),
        {"handbag": "pink", "scissors": "white"},
        0.75,
    ),
    # no handbag (0, 0), scissors right (1, 1)
    (
        {
            "tag": "color_attr",
            "include": [
                {"class": "handbag", "count": 1, "color": "pink"},
                {"class": "scissors", "count": 1, "color": "black"},
            ],
            "prompt": "a photo of a pink handbag and a black scissors",
        },
        boxes("scissors", 1, y=100),
        {"scissors": "black"},
        0.5,
    ),
    (
        {
            "tag": "position",
            "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a cow right of a laptop",
        },
        [LAPTOP, COW_RIGHT],
        {},
        1.0,
    ),
    # cow left of the laptop: laptop 1, cow 1, then 0 *and* 1 for the failed position: 3/4
    (
        {
            "tag": "position",
            "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a cow right of a laptop",
        },
        [LAPTOP, COW_LEFT],
        {},
        0.75,
    ),
    # two laptops: laptop 0 and unmatched, cow 1, position 0 (no target): 1/3
    (
        {
            "tag": "position",
            "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a cow right of a laptop",
        },
        [LAPTOP, Detection("laptop", 0.7, (600, 0, 660, 60)), COW_RIGHT],
        {},
        1 / 3,
    ),
    # no laptop: laptop 0, cow 1, position 0: 1/3
    (
        {
            "tag": "position",
            "include": [{"class": "laptop", "count": 1}, {"class": "cow", "count": 1, "position": ["right of", 0]}],
            "prompt": "a photo of a cow right of a laptop",
        },
        [COW_RIGHT],
        {},
        1 / 3,
    ),
    # a colour failure skips the position check entirely (dog 1, cat 1, colour 0): 2/3
    (
        {
            "tag": "position",
            "include": [
                {"class": "dog", "count": 1},
                {"class": "cat", "count": 1, "color": "black", "position": ["left of", 0]},
            ],
            "prompt": "a photo of a black cat left of a dog",
        },
        [Detection("dog", 0.9, (400, 0, 460, 60)), Detection("cat", 0.9, (0, 0, 60, 60))],
        {"cat": "white"},
        2 / 3,
    ),
]


@pytest.mark.parametrize(
    "meta, detections, colour_of, expected", CASES, ids=[f"{i:02d}-{c[0]['tag']}" for i, c in enumerate(CASES)]
)
def test_reward_server_partial_credit(meta, detections, colour_of, expected):
    kept = select_detections(detections, meta["tag"])
    result = evaluate(kept, meta, lambda name, dets: [colour_of.get(name, "red") for _ in dets])
    assert result.score == pytest.approx(expected)


def test_equal_scores_are_ordered_as_numpy_argsort_reversed():
    # GenEval orders by np.argsort(scores)[::-1]: of two equal-score cars the later one comes first, so the
    # colour check (on the top count=1) sees the green car, not the blue one listed first.
    blue, green = Detection("car", 0.6, (0, 0, 40, 40)), Detection("car", 0.6, (100, 0, 140, 40))
    kept = select_detections([blue, green], "colors")
    assert kept["car"] == [green, blue]
    meta = {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "blue"}]}
    colours = {blue.box: "blue", green.box: "green"}
    result = evaluate(kept, meta, lambda name, dets: [colours[d.box] for d in dets])
    assert not result.correct
