"""GenEval's training reward scores JPEG-compressed images (quality 75), as Flow-GRPO does; eval does not."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from rewards.base import RewardError, eval_kwargs
from rewards.geneval import GenEvalReward
from rewards.geneval_rules import GenEvalResult

META = {"tag": "single_object", "include": [{"class": "dog", "count": 1}], "prompt": "a photo of a dog"}


class RecordingScorer:
    def __init__(self):
        self.images = []

    def score(self, images, metadata):
        self.images.extend(images)
        return [GenEvalResult(True, True, 1.0) for _ in images]


def _noisy_image(seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


def _jpeg_like_pil_default(image):
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG")  # what the published reward does: PIL's default quality, 75
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("RGB"))


def test_training_reward_sees_the_image_after_a_quality_75_jpeg_round_trip():
    image = _noisy_image()
    scorer = RecordingScorer()
    GenEvalReward(scorer, jpeg_quality=75)([image], [META["prompt"]], [META])
    seen = np.asarray(scorer.images[0])
    assert np.array_equal(seen, _jpeg_like_pil_default(image))
    assert not np.array_equal(seen, np.asarray(image))  # it really was compressed
    plain = RecordingScorer()
    GenEvalReward(plain)([image], [META["prompt"]], [META])
    assert plain.images[0] is image  # without jpeg_quality the detector sees the image as generated


def test_eval_builds_geneval_without_the_jpeg_step():
    assert eval_kwargs("geneval", {"backend": "local", "jpeg_quality": 75}) == {"backend": "local"}
    assert eval_kwargs("pickscore", {"normalize_by": 26.0}) == {"normalize_by": 26.0}


@pytest.mark.parametrize("quality", [0, 101, 75.0, True])
def test_bad_jpeg_quality_is_refused(quality):
    with pytest.raises(RewardError, match="jpeg_quality"):
        GenEvalReward(RecordingScorer(), jpeg_quality=quality)
