"""PickScore on a tiny random CLIP saved to disk and loaded back through the reward's own loader."""

import numpy as np
import pytest
import torch
from PIL import Image

from rewards import build_reward
from rewards.tiny_models import save_tiny_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("tiny_clip"))


def images():
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (48 + 8 * i, 64, 3), dtype=np.uint8)) for i in range(5)]


PROMPTS = ["a cat", "a red car on a street", "two dogs", 'a sign that says "hello"', "an apple " * 40]


def test_score_is_logit_scale_times_cosine(clip_dir):
    from transformers import CLIPModel, CLIPProcessor

    reward = build_reward("pickscore", model=str(clip_dir), processor=str(clip_dir), device="cpu", batch_size=2)
    out = reward(images(), PROMPTS)
    # Independent computation: CLIPModel.forward's logits_per_image is logit_scale * cosine for every pair.
    model = CLIPModel.from_pretrained(clip_dir).eval()
    processor = CLIPProcessor.from_pretrained(clip_dir)
    inputs = processor(text=PROMPTS, images=images(), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.diagonal().numpy()
    assert out.scores.shape == (5,) and out.scores.dtype == np.float32
    np.testing.assert_allclose(out.scores, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(out.details["logit"], expected, rtol=1e-4, atol=1e-4)
    assert np.all(np.abs(out.details["cosine"]) <= 1.0)
    assert len(set(np.round(out.scores, 4))) == 5  # images and prompts really differ


def test_normalisation_and_batch_size_do_not_change_ranking(clip_dir):
    raw = build_reward("pickscore", model=str(clip_dir), processor=str(clip_dir), device="cpu", batch_size=8)
    scaled = build_reward(
        "pickscore", model=str(clip_dir), processor=str(clip_dir), device="cpu", batch_size=1, normalize_by=26
    )
    a, b = raw(images(), PROMPTS), scaled(images(), PROMPTS)
    np.testing.assert_allclose(b.scores, a.scores / 26, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(b.details["logit"], a.details["logit"], rtol=1e-4, atol=1e-4)
