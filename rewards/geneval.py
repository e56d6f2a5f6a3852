"""The GenEval reward: object presence, counts, colours and positions checked by a detector.

The scorer is either in-process (:class:`rewards.geneval_detector.GenEvalScorer`) or a remote server
(:class:`rewards.geneval_client.GenEvalClient`); both map images + metadata to
:class:`rewards.geneval_rules.GenEvalResult`. ``scores`` is the partial-credit training reward by default
(``signal="score"``); ``"strict_correct"`` or ``"correct"`` train on the 0/1 verdicts instead. Every verdict is
also in ``details``, so eval reads the official accuracy from the same call.
"""

from __future__ import annotations

import numpy as np

from rewards.base import Reward, RewardError, RewardOutput
from rewards.geneval_rules import GenEvalMetadataError, validate_metadata

SIGNALS = ("score", "strict_correct", "correct")


class GenEvalReward(Reward):
    """Details: ``correct`` (official), ``strict_correct`` (exact counts), ``partial`` (training credit),
    ``num_objects`` (kept detections of any class)."""

    name = "geneval"
    higher_is_better = True

    def __init__(self, scorer, signal: str = "score") -> None:
        if signal not in SIGNALS:
            raise RewardError(f"geneval: signal must be one of {SIGNALS}, got {signal!r}")
        self.scorer = scorer
        self.signal = signal

    def score(self, images, prompts, metadata) -> RewardOutput:
        for i, (prompt, meta) in enumerate(zip(prompts, metadata)):
            try:
                validate_metadata(meta, where=f"image {i} ({prompt[:60]!r})")
            except GenEvalMetadataError as exc:
                raise RewardError(
                    f"geneval: {exc}. The GenEval reward needs GenEval metadata per prompt: use a GenEval "
                    "metadata jsonl or gen:geneval:<n> as the prompt source."
                ) from None
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
