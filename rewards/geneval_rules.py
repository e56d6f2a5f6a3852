"""GenEval scoring rules on top of any object detector (docs/design.md section 8).

Kept free of torch and of any particular detector so the rules can be tested exhaustively with synthetic
detections and reused unchanged by the in-process scorer, the scoring server and eval.

Per image and metadata line ``{"tag", "include": [{"class", "count", "color"?, "position"?: [relation, i]}],
"exclude"?: [{"class", "count"}]}``:

- detections are kept when ``score > 0.3`` (``> 0.9`` for the ``counting`` tag; strict, as GenEval's
  ``evaluate_images.py``), at most 16 per class, most confident first with ties in the order
  ``np.argsort(scores)[::-1]`` gives (:func:`select_detections`);
- ``correct`` (the official GenEval rule): every include clause finds at least ``count`` objects; colour
  clauses need the ``count`` most confident of them to be classified as the colour; position clauses need every
  one of them to stand in the relation to every object of include clause ``i`` (which must itself be matched);
  no exclude clause reaches its count;
- ``strict_correct``: the same with exact counts (``n == count``);
- ``score``: the partial-credit training reward, the mean of a list of credits. Default
  ``partial_credit="reward_server"`` is what Flow-GRPO and MapReduce-LoRA train on (reward-server's
  ``evaluate_reward``), clause by clause: append ``1 - |n - k|/k`` (not clipped: negative when far too many
  objects are found); if ``n != k`` append one 0 when the clause has a colour or a position, and stop there;
  else a colour clause appends ``1 - |k - m|/k`` (m of the n objects classified as the colour), and a position
  clause is scored only if the clause is still matched (no colour failure): 0 when its target clause did not
  match, else every object is checked against every target object and a failed pair appends 0 *and then 1*
  (the published code appends 1 after its loop whether or not the check failed; reproduced on purpose, so a
  failed position is worth 1/2, not 0), a passing check appends 1. Exclude clauses give no credit.
  ``partial_credit="clipped"`` (our own, off by default): per include clause ``max(0, 1 - |n - k|/k)``, per colour
  clause ``m / k`` (m right-coloured among the top min(n, k)), per position clause 1 if all pairs hold (0 if
  either side found nothing), per exclude clause on a class no include clause counts 1 if respected else 0.

Position (:func:`relative_position`): offset of box centres, each component shrunk towards 0 by
0.1 x (sum of the two boxes' sizes on that axis), divided by the length of the raw offset; a component below
-0.5 / above 0.5 means left of / right of (x) or above / below (y, image coordinates grow downwards).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

COLORS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
RELATIONS = ("left of", "right of", "above", "below")
TAGS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
THRESHOLD = 0.3
COUNTING_THRESHOLD = 0.9
MAX_OBJECTS = 16
POSITION_THRESHOLD = 0.1
PARTIAL_CREDITS = ("reward_server", "clipped")

# The 80 COCO instance classes in COCO order, spelled as GenEval metadata spells them.
COCO_CLASSES = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "airplane",
    "bus",
    "train",
    "truck",
    "boat",
    "traffic light",
    "fire hydrant",
    "stop sign",
    "parking meter",
    "bench",
    "bird",
    "cat",
    "dog",
    "horse",
    "sheep",
    "cow",
    "elephant",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "umbrella",
    "handbag",
    "tie",
    "suitcase",
    "frisbee",
    "skis",
    "snowboard",
    "sports ball",
    "kite",
    "baseball bat",
    "baseball glove",
    "skateboard",
    "surfboard",
    "tennis racket",
    "bottle",
    "wine glass",
    "cup",
    "fork",
    "knife",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "hot dog",
    "pizza",
    "donut",
    "cake",
    "chair",
    "couch",
    "potted plant",
    "bed",
    "dining table",
    "toilet",
    "tv",
    "laptop",
    "computer mouse",
    "tv remote",
    "computer keyboard",
    "cell phone",
    "microwave",
    "oven",
    "toaster",
    "sink",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "scissors",
    "teddy bear",
    "hair drier",
    "toothbrush",
)

# Detector label spellings (COCO / Hugging Face / VOC-style) -> GenEval class names.
LABEL_ALIASES = {
    "mouse": "computer mouse",
    "remote": "tv remote",
    "keyboard": "computer keyboard",
    "tvmonitor": "tv",
    "tv monitor": "tv",
    "motorbike": "motorcycle",
    "aeroplane": "airplane",
    "sofa": "couch",
    "diningtable": "dining table",
    "pottedplant": "potted plant",
    "hair dryer": "hair drier",
    "doughnut": "donut",
    "cellphone": "cell phone",
    "sportsball": "sports ball",
}


def canonical_class(label: str) -> str:
    """Map a detector's label to the GenEval class name (lower case, underscores/dashes as spaces)."""
    name = " ".join(label.replace("_", " ").replace("-", " ").lower().split())
    return LABEL_ALIASES.get(name, name)


class GenEvalMetadataError(ValueError):
    """A metadata line does not follow the GenEval format."""


@dataclass(frozen=True)
class Detection:
    """One detected object: GenEval class name, confidence, box (x0, y0, x1, y1) in pixels, optional mask."""

    class_name: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        box = tuple(float(v) for v in self.box)
        if len(box) != 4:
            raise ValueError(f"Detection.box must be (x0, y0, x1, y1), got {self.box!r}")
        object.__setattr__(self, "box", box)
        object.__setattr__(self, "score", float(self.score))
        if self.mask is not None:
            object.__setattr__(self, "mask", np.asarray(self.mask, dtype=bool))


@dataclass(frozen=True)
class GenEvalResult:
    """The verdict for one image. ``counts`` is how many objects of each class were kept."""

    correct: bool
    strict_correct: bool
    score: float
    reasons: tuple[str, ...] = ()
    counts: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "correct": bool(self.correct),
            "strict_correct": bool(self.strict_correct),
            "score": float(self.score),
            "reasons": list(self.reasons),
            "counts": {k: int(v) for k, v in self.counts.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> "GenEvalResult":
        return cls(
            correct=bool(data["correct"]),
            strict_correct=bool(data["strict_correct"]),
            score=float(data["score"]),
            reasons=tuple(str(r) for r in data.get("reasons", ())),
            counts={str(k): int(v) for k, v in data.get("counts", {}).items()},
        )


def validate_metadata(metadata: dict, where: str = "metadata") -> None:
    """Raise :class:`GenEvalMetadataError` (naming ``where``) unless ``metadata`` is a usable GenEval line."""
    if not isinstance(metadata, dict):
        raise GenEvalMetadataError(f"{where}: expected a JSON object, got {type(metadata).__name__}")
    include = metadata.get("include")
    if not isinstance(include, list) or not include:
        raise GenEvalMetadataError(f"{where}: needs a non-empty 'include' list of {{'class', 'count'}} clauses")
    for kind in ("include", "exclude"):
        for j, clause in enumerate(metadata.get(kind, []) or []):
            if not isinstance(clause, dict) or not isinstance(clause.get("class"), str):
                raise GenEvalMetadataError(f"{where}: {kind}[{j}] needs a string 'class'")
            count = clause.get("count")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise GenEvalMetadataError(f"{where}: {kind}[{j}] needs an integer 'count' >= 1, got {count!r}")
            if kind == "exclude":
                continue
            if "color" in clause and clause["color"] not in COLORS:
                raise GenEvalMetadataError(f"{where}: include[{j}] colour {clause['color']!r} is not one of {COLORS}")
            if "position" in clause:
                pos = clause["position"]
                if not (
                    isinstance(pos, (list, tuple))
                    and len(pos) == 2
                    and pos[0] in RELATIONS
                    and isinstance(pos[1], int)
                    and 0 <= pos[1] < j
                ):
                    raise GenEvalMetadataError(
                        f"{where}: include[{j}] position must be [relation, index] with relation in {RELATIONS} "
                        f"and index of an earlier include clause, got {pos!r}"
                    )


def select_detections(
    detections: Sequence[Detection],
    tag: str | None,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_per_class: int = MAX_OBJECTS,
) -> dict[str, list[Detection]]:
    """Keep confident detections (``score > threshold``, or ``counting_threshold`` for the counting tag),
    at most ``max_per_class`` per class, each class's list most confident first.

    As GenEval: per class, in detector order, ``np.argsort(scores)[::-1]`` orders them (so equal scores come
    out as numpy's sort leaves them, reversed), then the strict threshold, then the cap.
    """
    cut = counting_threshold if tag == "counting" else threshold
    by_class: dict[str, list[Detection]] = {}
    for det in detections:
        by_class.setdefault(det.class_name, []).append(det)
    kept = {}
    for name, dets in by_class.items():
        order = np.argsort(np.array([d.score for d in dets], dtype=np.float64))[::-1]
        chosen = [dets[i] for i in order if dets[i].score > cut][:max_per_class]
        if chosen:
            kept[name] = chosen
    return kept


def relative_position(box_a: Sequence[float], box_b: Sequence[float]) -> set[str]:
    """Relations of A to B ("left of", "right of", "above", "below"), allowing for the objects' sizes."""
    boxes = np.asarray([box_a, box_b], dtype=np.float64).reshape(2, 2, 2)  # (object, corner, xy)
    center_a, center_b = boxes.mean(axis=1)
    size_a, size_b = np.abs(boxes[:, 1] - boxes[:, 0])
    offset = center_a - center_b
    revised = np.maximum(np.abs(offset) - POSITION_THRESHOLD * (size_a + size_b), 0.0) * np.sign(offset)
    if np.all(np.abs(revised) < 1e-3):
        return set()
    dx, dy = revised / np.linalg.norm(offset)
    relations = set()
    if dx < -0.5:
        relations.add("left of")
    if dx > 0.5:
        relations.add("right of")
    if dy < -0.5:
        relations.add("above")
    if dy > 0.5:
        relations.add("below")
    return relations


ColourFn = Callable[[str, list[Detection]], list[str]]


def _position_ok(objs: list[Detection], targets: list[Detection], relation: str) -> bool:
    return all(relation in relative_position(o.box, t.box) for o in objs for t in targets)


def evaluate(
    objects: dict[str, list[Detection]], metadata: dict, colours_of: ColourFn, partial_credit: str = "reward_server"
) -> GenEvalResult:
    """Apply the GenEval rules to the kept detections of one image.

    ``colours_of(class_name, detections)`` returns one colour name per detection; it is called only for colour
    clauses, on the most confident min(n, count) detections (the expensive CLIP step runs only when needed).
    ``partial_credit`` picks the training score's rule (module docstring).
    """
    if partial_credit not in PARTIAL_CREDITS:
        raise ValueError(f"partial_credit must be one of {PARTIAL_CREDITS}, got {partial_credit!r}")
    validate_metadata(metadata)
    correct = strict = True
    reasons: list[str] = []
    credits: list[float] = []
    official_groups: list[list[Detection] | None] = []
    strict_groups: list[list[Detection] | None] = []
    top_groups: list[list[Detection]] = []
    clause_colours: list[list[str] | None] = []

    for clause in metadata["include"]:
        name, k = clause["class"], clause["count"]
        found = objects.get(name, [])
        n = len(found)
        top = found[:k]
        ok, strict_ok = n >= k, n == k
        credits.append(max(0.0, 1.0 - abs(n - k) / k))
        if not ok:
            reasons.append(f"expected {name}>={k}, found {n}")
        elif not strict_ok:
            reasons.append(f"expected exactly {k} {name}, found {n}")
        got = None
        if "color" in clause:
            colour = clause["color"]
            got = list(colours_of(name, top)) if top else []
            m = got.count(colour)
            credits.append(m / k)
            if m < k:
                if ok:
                    reasons.append(f"expected {colour} {name}>={k}, found {m} {colour} (colours: {', '.join(got)})")
                ok = strict_ok = False
        clause_colours.append(got)
        if "position" in clause:
            relation, index = clause["position"]
            targets = top_groups[index]
            credits.append(1.0 if top and targets and _position_ok(top, targets, relation) else 0.0)
            if ok and official_groups[index] is None:
                reasons.append(f"no target for {name} to be {relation}")
            elif ok and not _position_ok(top, official_groups[index], relation):
                reasons.append(f"expected {name} {relation} {metadata['include'][index]['class']}")
            ok = ok and official_groups[index] is not None and _position_ok(top, official_groups[index], relation)
            strict_ok = (
                strict_ok and strict_groups[index] is not None and _position_ok(top, strict_groups[index], relation)
            )
        correct &= ok
        strict &= strict_ok
        official_groups.append(top if ok else None)
        strict_groups.append(top if strict_ok else None)
        top_groups.append(top)

    included = {clause["class"] for clause in metadata["include"]}
    for clause in metadata.get("exclude", []) or []:
        name, k = clause["class"], clause["count"]
        n = len(objects.get(name, []))
        if n >= k:
            correct = strict = False
            reasons.append(f"expected {name}<{k}, found {n}")
        if name not in included:
            credits.append(0.0 if n >= k else 1.0)

    if partial_credit == "reward_server":
        score = reward_server_credit(objects, metadata, clause_colours)
    else:
        score = float(np.mean(credits))  # never empty: validate_metadata requires an include clause
    counts = {name: len(dets) for name, dets in objects.items()}
    return GenEvalResult(
        correct=bool(correct), strict_correct=bool(strict), score=score, reasons=tuple(reasons), counts=counts
    )


def reward_server_credit(
    objects: dict[str, list[Detection]], metadata: dict, clause_colours: Sequence[list[str] | None]
) -> float:
    """reward-server's ``evaluate_reward`` score (what the published GenEval experts train on), quirks included.

    ``clause_colours[i]`` is the colour of each of include clause i's top ``count`` objects (``None`` without a
    colour clause); it is only read when exactly ``count`` objects were found, when those are all of them.
    """
    credits: list[float] = []
    matched_groups: list[list[Detection] | None] = []
    for clause, colours in zip(metadata["include"], clause_colours):
        name, k = clause["class"], clause["count"]
        found = objects.get(name, [])
        credits.append(1.0 - abs(k - len(found)) / k)  # not clipped: too many objects go below 0
        matched = len(found) == k
        if not matched:
            if "color" in clause or "position" in clause:
                credits.append(0.0)
        else:
            if "color" in clause:
                right = list(colours or []).count(clause["color"])
                credits.append(1.0 - abs(k - right) / k)
                matched = right == k
            if "position" in clause and matched:  # skipped after a colour failure
                relation, index = clause["position"]
                targets = matched_groups[index]
                if targets is None:
                    matched = False
                    credits.append(0.0)
                else:
                    if not all(relation in relative_position(o.box, t.box) for o in found for t in targets):
                        matched = False
                        credits.append(0.0)
                    credits.append(1.0)  # appended after the check even when it failed, as published
        matched_groups.append(found if matched else None)
    return sum(credits) / len(credits) if credits else 0.0
