"""The GenEval reward: object presence, counts, colours and positions checked by a detector.

The scorer is either in-process (:class:`rewards.geneval_detector.GenEvalScorer`) or a remote server
(:class:`rewards.geneval_client.GenEvalClient`); both map images + metadata to
:class:`rewards.geneval_rules.GenEvalResult`. ``scores`` is the partial-credit training reward by default
(``signal="score"``); ``"strict_correct"`` or ``"correct"`` train on the 0/1 verdicts instead. Every verdict is
also in ``details``, so eval reads the official accuracy from the same call.

``jpeg_quality``: Flow-GRPO's GenEval reward JPEG-encodes every image (PIL's default quality, 75) before the
detector sees it, so the published experts learn from slightly compressed images; the training config sets 75.
Official eval scores the images as generated (eval builds this reward without it).
"""

from __future__ import annotations

import io

import numpy as np

from rewards.base import Reward, RewardError, RewardOutput
from rewards.geneval_rules import GenEvalMetadataError, validate_metadata

SIGNALS = ("score", "strict_correct", "correct")


class GenEvalReward(Reward):
    """Details: ``correct`` (official), ``strict_correct`` (exact counts), ``partial`` (training credit),
    ``num_objects`` (kept detections of any class)."""

    name = "geneval"
    higher_is_better = True

    def __init__(self, scorer, signal: str = "score", jpeg_quality: int | None = None) -> None:
        if signal not in SIGNALS:
            raise RewardError(f"geneval: signal must be one of {SIGNALS}, got {signal!r}")
        if jpeg_quality is not None and (
            isinstance(jpeg_quality, bool) or not isinstance(jpeg_quality, int) or not 1 <= jpeg_quality <= 100
        ):
            raise RewardError(f"geneval: jpeg_quality must be an integer in 1..100 or None, got {jpeg_quality!r}")
        self.scorer = scorer
        self.signal = signal
        self.jpeg_quality = jpeg_quality

    def score(self, images, prompts, metadata) -> RewardOutput:
        for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
            try:
                validate_metadata(meta, where=f"image {i} ({prompt[:60]!r})")
            except GenEvalMetadataError as exc:
                raise RewardError(
                    f"geneval: {exc}. The GenEval reward needs GenEval metadata per prompt: use a GenEval "
                    "metadata jsonl or gen:geneval:<n> as the prompt source."
                ) from None
        if self.jpeg_quality is not None:
            images = [jpeg_round_trip(im, self.jpeg_quality) for im in images]
        results = self.scorer.score(images, metadata)
        correct = np.array([r.correct for r in results], dtype=np.float32)
        strict = np.array([r.strict_correct for r in results], dtype=np.float32)
        partial = np.array([r.score for r in results], dtype=np.float32)
        objects = np.array([sum(r.counts.values()) for r in results], dtype=np.float32)
        scores = {"score": partial, "strict_correct": strict, "correct": correct}[self.signal]
        return RewardOutput(
            scores=scores,
            details={"correct": correct, "strict_correct": strict, "partial": partial, "num_objects": objects},
        )


def jpeg_round_trip(image, quality: int):
    """``image`` encoded as an RGB JPEG at ``quality`` and decoded again (what the published reward scores)."""
    from PIL import Image

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=int(quality))
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")
