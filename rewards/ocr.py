"""OCR reward: does the image show the text the prompt asked for?

Rule (as in Flow-GRPO's flow_grpo/ocr.py; docs/recipe.md): the target is what follows the first double quote up
to the next one (``prompt.split('"')[1]``: with an unmatched quote, the rest of the prompt); prompts with only
typographic quotes (\u201c...\u201d), on which the reference fails, use the text between those. The recognised
text is every line the OCR engine read, concatenated. Both are normalised: spaces removed (only ' ', as the
reference; ``whitespace="all"`` removes every whitespace character), lower case. The distance d is 0 when the
target is a substring of the recognition, else the Levenshtein distance, capped at len(target);
reward = 1 - d / len(target), so it lies in [0, 1].

Engine input: the reference hands PaddleOCR ``np.array(pil_image)``, an RGB array, where PaddleOCR (like
OpenCV) reads arrays as BGR; ``engine_input="rgb"`` (default) reproduces that, ``"bgr"`` swaps the channels
into the order the engine expects. An engine error on one image scores that image 0, as the reference does,
instead of failing the batch; each such failure is logged and counted (``details["engine_error"]``,
``OcrReward.engine_errors``).

Backends: ``rapidocr`` runs the PP-OCR detection + recognition ONNX models that ship inside the
rapidocr-onnxruntime wheel, fully offline on CPU (the default, and what the tests exercise); ``paddleocr``
uses PaddleOCR 2.x (what the reference code uses) when it is installed with its models; ``auto`` prefers
PaddleOCR when it is importable and can reach its models, else rapidocr. Both read images one at a time (the
engines are not batched); the reward itself takes a batch.
"""

from __future__ import annotations

import importlib.util
import logging
import re
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from rewards.base import Reward, RewardError, RewardOutput
from rewards.hub import hub_offline

ON_MISSING_POLICIES = ("error", "zero", "skip-nan")
WHITESPACE_RULES = ("space", "all")
ENGINE_INPUTS = ("rgb", "bgr")
_TYPOGRAPHIC = re.compile(r"\u201c(.*?)\u201d", re.DOTALL)
_WHITESPACE = re.compile(r"\s+")
log = logging.getLogger(__name__)


def extract_target(prompt: str) -> str | None:
    """The reference's target, ``prompt.split('"')[1]``; else text between typographic quotes; else None."""
    if '"' in prompt:
        return prompt.split('"')[1]
    match = _TYPOGRAPHIC.search(prompt)
    return None if match is None else match.group(1)


def normalise(text: str, whitespace: str = "space") -> str:
    """The comparison form, lower case: ``"space"`` removes ' ' only (the reference), ``"all"`` every whitespace."""
    if whitespace == "space":
        return text.replace(" ", "").lower()
    if whitespace == "all":
        return _WHITESPACE.sub("", text).lower()
    raise ValueError(f"whitespace must be one of {WHITESPACE_RULES}, got {whitespace!r}")


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions each cost 1)."""
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def ocr_distance(target: str, recognised: str, whitespace: str = "space") -> int:
    """0 if normalised ``target`` occurs in normalised ``recognised``, else Levenshtein capped at len(target)."""
    t, r = normalise(target, whitespace), normalise(recognised, whitespace)
    if not t:
        raise ValueError("OCR target is empty after normalisation")
    if t in r:
        return 0
    return min(levenshtein(t, r), len(t))


def ocr_score(target: str, recognised: str, whitespace: str = "space") -> float:
    """1 - d / len(target) on normalised text; 1.0 means the target was read exactly."""
    return 1.0 - ocr_distance(target, recognised, whitespace) / len(normalise(target, whitespace))


class OcrBackend(Protocol):
    name: str

    def read(self, images: Sequence) -> list[str]:
        """The recognised text of each image (all lines concatenated, in reading order)."""


def engine_array(image, engine_input: str = "rgb") -> np.ndarray:
    """The array an engine gets: the RGB array as the reference passes it, or channel-swapped to BGR."""
    _check_engine_input(engine_input)
    rgb = np.asarray(image.convert("RGB"))
    return np.ascontiguousarray(rgb if engine_input == "rgb" else rgb[:, :, ::-1])


def _check_engine_input(engine_input: str) -> None:
    if engine_input not in ENGINE_INPUTS:
        raise RewardError(f"ocr: engine_input must be one of {ENGINE_INPUTS}, got {engine_input!r}")


class RapidOcrBackend:
    """PP-OCRv4 det + rec (ONNX, bundled in the rapidocr-onnxruntime wheel); no network, no model download."""

    name = "rapidocr"

    def __init__(self, min_confidence: float = 0.0, engine_input: str = "rgb", **engine_kwargs) -> None:
        _check_engine_input(engine_input)
        self.engine_input = engine_input
        try:
            from rapidocr_onnxruntime import RapidOCR
        except ImportError as exc:
            raise RewardError(
                "OCR backend 'rapidocr' needs the rapidocr-onnxruntime package: pip install rapidocr-onnxruntime"
            ) from exc
        self._engine = RapidOCR(**engine_kwargs)
        self.min_confidence = float(min_confidence)

    def read(self, images: Sequence) -> list[str]:
        texts = []
        for image in images:
            result, _ = self._engine(engine_array(image, self.engine_input), use_det=True, use_cls=False, use_rec=True)
            lines = [text for _box, text, conf in (result or []) if float(conf) > self.min_confidence]
            texts.append(" ".join(lines))
        return texts


class PaddleOcrBackend:
    """PaddleOCR 2.x, as the reference uses it (``use_angle_cls=False``, English, lines with confidence > 0).

    PaddleOCR downloads its models on first use; on an offline node pass ``det_model_dir`` /
    ``rec_model_dir`` (and any other PaddleOCR constructor argument) through ``paddle_kwargs``.
    """

    name = "paddleocr"

    def __init__(
        self, min_confidence: float = 0.0, use_gpu: bool = False, engine_input: str = "rgb", **paddle_kwargs
    ) -> None:
        _check_engine_input(engine_input)
        self.engine_input = engine_input
        try:
            from paddleocr import PaddleOCR
        except ImportError as exc:
            raise RewardError(
                "OCR backend 'paddleocr' needs paddleocr and paddlepaddle: pip install 'mrlora[paddleocr]', "
                "or use backend='rapidocr' for the same PP-OCR models offline"
            ) from exc
        kwargs = {"use_angle_cls": False, "lang": "en", "use_gpu": use_gpu, "show_log": False}
        kwargs.update(paddle_kwargs)
        self._engine = PaddleOCR(**kwargs)
        self.min_confidence = float(min_confidence)

    def read(self, images: Sequence) -> list[str]:
        texts = []
        for image in images:
            result = self._engine.ocr(engine_array(image, self.engine_input), cls=False)
            page = result[0] if result else None
            lines = [text for _box, (text, conf) in (page or []) if float(conf) > self.min_confidence]
            texts.append(" ".join(lines))
        return texts


def make_backend(
    backend: str = "auto", min_confidence: float = 0.0, paddle_kwargs: dict | None = None, engine_input: str = "rgb"
):
    """Build an OCR backend by name: ``rapidocr``, ``paddleocr`` or ``auto``."""
    paddle_kwargs = dict(paddle_kwargs or {})
    if backend == "auto":
        paddle_usable = importlib.util.find_spec("paddleocr") is not None and (
            not hub_offline() or {"det_model_dir", "rec_model_dir"} <= set(paddle_kwargs)
        )
        backend = "paddleocr" if paddle_usable else "rapidocr"
    if backend == "rapidocr":
        return RapidOcrBackend(min_confidence=min_confidence, engine_input=engine_input)
    if backend == "paddleocr":
        return PaddleOcrBackend(min_confidence=min_confidence, engine_input=engine_input, **paddle_kwargs)
    raise RewardError(f"unknown OCR backend {backend!r}; choose 'rapidocr', 'paddleocr' or 'auto'")


@dataclass(frozen=True)
class _Target:
    index: int
    text: str


class OcrReward(Reward):
    """Score = 1 - capped_edit_distance / len(target), in [0, 1].

    ``on_missing`` decides what happens to a prompt without quoted text: ``"error"`` (default) raises before
    any OCR runs, ``"zero"`` scores it 0, ``"skip-nan"`` scores it NaN (excluded from means by the caller).
    ``whitespace``: ``"space"`` (reference) or ``"all"`` (module docstring). Details: ``distance`` (capped, NaN when
    skipped or when the engine failed), ``target_length`` (normalised characters, 0 when none), ``exact`` (1.0 when
    the target was read exactly), ``engine_error`` (1.0 where the OCR engine raised; that image scores 0).
    """

    name = "ocr"
    higher_is_better = True

    def __init__(
        self, backend: OcrBackend, on_missing: str = "error", batch_size: int = 8, whitespace: str = "space"
    ) -> None:
        if on_missing not in ON_MISSING_POLICIES:
            raise RewardError(f"ocr: on_missing must be one of {ON_MISSING_POLICIES}, got {on_missing!r}")
        if whitespace not in WHITESPACE_RULES:
            raise RewardError(f"ocr: whitespace must be one of {WHITESPACE_RULES}, got {whitespace!r}")
        self.backend = backend
        self.on_missing = on_missing
        self.batch_size = max(1, int(batch_size))
        self.whitespace = whitespace
        self.engine_errors = 0  # images whose OCR raised, over this reward's lifetime

    def _targets(self, prompts: list[str]) -> list[_Target | None]:
        targets: list[_Target | None] = []
        for i, prompt in enumerate(prompts):
            raw = extract_target(prompt)
            if raw is None or not normalise(raw, self.whitespace):
                if self.on_missing == "error":
                    raise RewardError(
                        f"ocr: prompt {i} has no text between double quotes ({prompt[:80]!r}); the OCR reward "
                        'needs prompts like: A sign that says "OPEN". Fix the prompt set or set '
                        "reward_models.ocr.on_missing to 'zero' or 'skip-nan'."
                    )
                targets.append(None)
            else:
                targets.append(_Target(i, raw))
        return targets

    def score(self, images: list, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        targets = self._targets(prompts)
        n = len(images)
        scores = np.full(n, np.nan if self.on_missing == "skip-nan" else 0.0, dtype=np.float32)
        distance = np.full(n, np.nan, dtype=np.float32)
        length = np.zeros(n, dtype=np.float32)
        failed = np.zeros(n, dtype=np.float32)
        todo = [t for t in targets if t is not None]
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start : start + self.batch_size]
            texts = self._read([images[t.index] for t in chunk], [t.index for t in chunk])
            for target, text in zip(chunk, texts):
                length[target.index] = len(normalise(target.text, self.whitespace))
                if text is None:  # the engine raised on this image: score 0, as the reference does
                    failed[target.index] = 1.0
                    scores[target.index] = 0.0
                    continue
                d = ocr_distance(target.text, text, self.whitespace)
                distance[target.index] = d
                scores[target.index] = 1.0 - d / length[target.index]
        exact = np.where(np.isnan(distance), np.nan, (distance == 0).astype(np.float32))
        details = {"distance": distance, "target_length": length, "exact": exact, "engine_error": failed}
        return RewardOutput(scores=scores, details=details)

    def _read(self, batch: list, indices: list[int]) -> list[str | None]:
        """The engine's text per image; None for an image the engine raised on (logged and counted)."""
        try:
            return list(self.backend.read(batch))
        except Exception:  # find the image(s) at fault, so one bad image does not take the batch with it
            pass
        texts: list[str | None] = []
        for image, index in zip(batch, indices):
            try:
                texts.extend(self.backend.read([image]))
            except Exception as exc:
                self.engine_errors += 1
                log.warning(
                    "ocr: the %s engine failed on image %d of the batch (%s: %s); it scores 0 "
                    "(%d such failures so far)",
                    self.backend.name,
                    index,
                    type(exc).__name__,
                    exc,
                    self.engine_errors,
                )
                texts.append(None)
        return texts


def build_ocr(
    backend: str = "auto",
    on_missing: str = "error",
    batch_size: int = 8,
    min_confidence: float = 0.0,
    paddle_kwargs: dict | None = None,
    device: str | None = None,
    whitespace: str = "space",
    engine_input: str = "rgb",
) -> OcrReward:
    """OCR: 1 - capped edit distance / len(quoted target) between the prompt's quoted text and what is read.

    ``backend``: ``"rapidocr"`` (offline PP-OCR ONNX), ``"paddleocr"`` or ``"auto"``; ``on_missing``:
    ``"error"`` | ``"zero"`` | ``"skip-nan"`` for prompts without quoted text. ``whitespace``: ``"space"``
    (reference) | ``"all"``; ``engine_input``: ``"rgb"`` (reference) | ``"bgr"`` (module docstring). ``device`` is
    accepted for config symmetry (PaddleOCR uses the GPU when it is cuda). Registered as the ``ocr`` reward by
    rewards.builtin.
    """
    if whitespace not in WHITESPACE_RULES:
        raise RewardError(f"ocr: whitespace must be one of {WHITESPACE_RULES}, got {whitespace!r}")
    if backend == "paddleocr" or backend == "auto":
        paddle_kwargs = dict(paddle_kwargs or {})
        if device is not None:
            paddle_kwargs.setdefault("use_gpu", str(device).startswith("cuda"))
    return OcrReward(
        make_backend(backend, min_confidence, paddle_kwargs, engine_input),
        on_missing=on_missing,
        batch_size=batch_size,
        whitespace=whitespace,
    )
