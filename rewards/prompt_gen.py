"""Generators for the project's own prompt sets (training and held-out test prompts).

GenEval-style metadata is produced from templates over the 80 COCO classes, the 10 GenEval colours, counts
2-4 and the four position relations, covering all six tags in equal shares; OCR prompts put 1-3 words from
our own word list between double quotes inside scene templates; "simple" prompts are short generic
descriptions for the model-free rewards. Everything is a pure function of (n, seed), so a config naming
``gen:geneval:2000`` with a seed always trains on the same prompts.
"""

from __future__ import annotations

import random

from rewards.geneval_rules import COCO_CLASSES, COLORS, RELATIONS, TAGS

NUMBERS = {2: "two", 3: "three", 4: "four"}
_PLURALS = {
    "person": "people",
    "sheep": "sheep",
    "skis": "pairs of skis",
    "scissors": "pairs of scissors",
    "knife": "knives",
    "computer mouse": "computer mice",
    "broccoli": "heads of broccoli",
}
_SINGULAR_PHRASES = {"skis": "a pair of skis", "scissors": "a pair of scissors", "broccoli": "a head of broccoli"}
_PHOTO_PREFIXES = ("a photo of", "an image of", "a picture of")


def plural(name: str) -> str:
    if name in _PLURALS:
        return _PLURALS[name]
    if name.endswith(("s", "x", "ch", "sh")):
        return name + "es"
    if name.endswith("y") and name[-2:-1] not in "aeiou":
        return name[:-1] + "ies"
    return name + "s"


def with_article(phrase: str) -> str:
    """``"apple" -> "an apple"``; fixed phrases for nouns that take no plain article (``"a pair of skis"``)."""
    if phrase in _SINGULAR_PHRASES:
        return _SINGULAR_PHRASES[phrase]
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _coloured(colour: str, name: str) -> str:
    if name in _SINGULAR_PHRASES:  # "a pair of red skis"
        head, _, noun = _SINGULAR_PHRASES[name].rpartition(" ")
        return f"{head} {colour} {noun}"
    return with_article(f"{colour} {name}")


def geneval_item(tag: str, rng: random.Random) -> dict:
    """One GenEval metadata line of the given tag (``prompt`` included, as in the GenEval files)."""
    prefix = rng.choice(_PHOTO_PREFIXES)
    a, b = rng.sample(COCO_CLASSES, 2)
    if tag == "single_object":
        include, text = [{"class": a, "count": 1}], with_article(a)
        return {"tag": tag, "include": include, "prompt": f"{prefix} {text}"}
    if tag == "two_object":
        include = [{"class": a, "count": 1}, {"class": b, "count": 1}]
        return {"tag": tag, "include": include, "prompt": f"{prefix} {with_article(a)} and {with_article(b)}"}
    if tag == "counting":
        k = rng.choice(sorted(NUMBERS))
        return {
            "tag": tag,
            "include": [{"class": a, "count": k}],
            "exclude": [{"class": a, "count": k + 1}],
            "prompt": f"{prefix} {NUMBERS[k]} {plural(a)}",
        }
    if tag == "colors":
        colour = rng.choice(COLORS)
        return {
            "tag": tag,
            "include": [{"class": a, "count": 1, "color": colour}],
            "prompt": f"{prefix} {_coloured(colour, a)}",
        }
    if tag == "position":
        relation = rng.choice(RELATIONS)
        include = [{"class": a, "count": 1}, {"class": b, "count": 1, "position": [relation, 0]}]
        return {"tag": tag, "include": include, "prompt": f"{prefix} {with_article(b)} {relation} {with_article(a)}"}
    if tag == "color_attr":
        ca, cb = rng.sample(COLORS, 2)
        include = [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]
        return {"tag": tag, "include": include, "prompt": f"{prefix} {_coloured(ca, a)} and {_coloured(cb, b)}"}
    raise ValueError(f"unknown GenEval tag {tag!r}; choose from {TAGS}")


def generate_geneval(n: int, seed: int = 0) -> list[dict]:
    """``n`` metadata lines, tags in equal shares (shuffled), reproducible from ``seed``."""
    rng = random.Random(f"geneval:{seed}")
    tags = [TAGS[i % len(TAGS)] for i in range(n)]
    rng.shuffle(tags)
    return [geneval_item(tag, rng) for tag in tags]


OCR_TEMPLATES = (
    'A sign that says "{t}"',
    'A wooden sign at a trailhead reading "{t}"',
    'A neon sign glowing in a rainy alley, spelling "{t}"',
    'A chalkboard menu outside a cafe with "{t}" written on it',
    'A storefront window painted with the words "{t}"',
    'A birthday cake with "{t}" written in icing',
    'A t-shirt printed with the slogan "{t}"',
    'A protest banner held high that says "{t}"',
    'A vintage poster with the headline "{t}"',
    'A coffee mug with "{t}" printed on the side',
    'A road sign on a desert highway that reads "{t}"',
    'A handwritten note on a fridge saying "{t}"',
    'A book cover titled "{t}"',
    'A billboard above a city street showing "{t}"',
    'A license plate that reads "{t}"',
    'A doormat with the word "{t}"',
    'A sticky note on a laptop screen saying "{t}"',
    'A hot air balloon with "{t}" painted across it',
    'A street mural with the phrase "{t}" in bold letters',
    'A museum plaque engraved with "{t}"',
)

OCR_WORDS = (
    "open",
    "closed",
    "welcome",
    "hello",
    "coffee",
    "bakery",
    "garden",
    "river",
    "forest",
    "market",
    "library",
    "station",
    "harbor",
    "museum",
    "theater",
    "studio",
    "exit",
    "entrance",
    "parking",
    "sale",
    "fresh",
    "bread",
    "pizza",
    "tacos",
    "noodles",
    "juice",
    "tea",
    "books",
    "music",
    "dance",
    "smile",
    "dream",
    "believe",
    "hope",
    "peace",
    "love",
    "friends",
    "family",
    "home",
    "sweet",
    "happy",
    "birthday",
    "winter",
    "summer",
    "spring",
    "autumn",
    "sunrise",
    "sunset",
    "moon",
    "stars",
    "ocean",
    "mountain",
    "valley",
    "island",
    "desert",
    "city",
    "village",
    "north",
    "south",
    "east",
    "west",
    "stop",
    "go",
    "slow",
    "caution",
    "danger",
    "quiet",
    "please",
    "thank you",
    "good luck",
    "bon voyage",
    "keep out",
    "no entry",
    "free wifi",
    "live music",
    "daily special",
    "best seller",
    "grand opening",
    "last chance",
    "come in",
    "lost and found",
    "help wanted",
    "now hiring",
    "back soon",
    "gone fishing",
    "think big",
    "stay curious",
    "be kind",
    "never give up",
    "make art",
    "drink water",
    "read more",
    "save the bees",
    "plant trees",
    "clean energy",
    "robot repair",
    "pixel lab",
    "moon base",
    "star cafe",
    "blue whale",
    "red panda",
    "green tea",
    "gold rush",
    "silver lake",
    "iron works",
    "paper boat",
    "velvet room",
    "echo park",
    "maple street",
    "ocean view",
    "river bend",
    "cloud nine",
    "zero waste",
    "open late",
    "hot soup",
    "cold drinks",
    "ice cream",
    "fish market",
    "flower shop",
    "bike rental",
    "tax free",
    "since 1987",
    "room 42",
    "gate 7",
    "route 66",
    "level 3",
    "aisle 12",
    "platform 9",
)


def generate_ocr(n: int, seed: int = 0) -> list[str]:
    """``n`` prompts each with one quoted target of 1-2 entries from :data:`OCR_WORDS` (title-cased or upper)."""
    rng = random.Random(f"ocr:{seed}")
    prompts = []
    for _ in range(n):
        words = " ".join(rng.sample(OCR_WORDS, rng.choice((1, 1, 2))))
        text = rng.choice((words.title(), words.upper(), words.capitalize()))
        prompts.append(rng.choice(OCR_TEMPLATES).format(t=text))
    return prompts


_SUBJECTS = (
    "a cat",
    "a dog",
    "a house",
    "a tree",
    "a flower",
    "a car",
    "a bird",
    "a mountain",
    "a lake",
    "a city street",
    "a bowl of fruit",
    "a boat",
    "a castle",
    "a robot",
    "a teapot",
    "a bicycle",
    "a lighthouse",
    "an owl",
    "a fox",
    "a forest path",
    "a cup of coffee",
    "a violin",
    "a snowman",
)
_STYLES = (
    "",
    "at sunset",
    "in the snow",
    "in watercolor",
    "as an oil painting",
    "in bright colors",
    "at night",
    "on a sunny day",
    "in a minimalist style",
    "in pencil sketch",
    "under a blue sky",
)


def generate_simple(n: int, seed: int = 0) -> list[str]:
    """``n`` short generic prompts (subject + optional setting/style) for the model-free rewards."""
    rng = random.Random(f"simple:{seed}")
    return [" ".join(filter(None, (rng.choice(_SUBJECTS), rng.choice(_STYLES)))) for _ in range(n)]
