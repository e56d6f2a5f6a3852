"""Model-free rewards: sign conventions, units and known values."""

import io

import numpy as np
import pytest
from PIL import Image

from rewards import build_reward


def noise(seed=0, size=128):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8))


def test_jpeg_rewards_are_kilobytes_with_opposite_signs():
    flat, busy = Image.new("RGB", (128, 128), "gray"), noise()
    comp = build_reward("jpeg_compressibility")([flat, busy], ["", ""])
    incomp = build_reward("jpeg_incompressibility")([flat, busy], ["", ""])
    buffer = io.BytesIO()
    busy.save(buffer, format="JPEG", quality=95)
    assert incomp.scores[1] == pytest.approx(buffer.tell() / 1000)
    assert np.allclose(comp.scores, -incomp.scores)
    assert comp.scores[0] > comp.scores[1]  # the flat image compresses better
    assert np.allclose(incomp.details["jpeg_kb"], incomp.scores)


def test_brightness_range():
    reward = build_reward("brightness", device="cpu")
    out = reward([Image.new("RGB", (16, 16), c) for c in ("black", "white", (128, 128, 128))], [""] * 3)
    assert out.scores.tolist() == pytest.approx([0.0, 1.0, 128 / 255], abs=1e-6)


def test_colourfulness_hasler_suesstrunk():
    reward = build_reward("colourfulness")
    grey, red = Image.new("RGB", (8, 8), (90, 90, 90)), Image.new("RGB", (8, 8), (255, 0, 0))
    half = np.zeros((8, 8, 3), np.uint8)
    half[:, :4] = (255, 0, 0)
    out = reward([grey, red, Image.fromarray(half)], [""] * 3)
    # Pure red: rg = 255, yb = 127.5, no spread -> 0.3 * sqrt(255^2 + 127.5^2).
    assert out.scores[0] == 0.0
    assert out.scores[1] == pytest.approx(0.3 * np.hypot(255, 127.5), rel=1e-5)
    # Half red, half black: std of rg = 127.5, of yb = 63.75; means are half of the red values.
    assert out.scores[2] == pytest.approx(np.hypot(127.5, 63.75) + 0.3 * np.hypot(127.5, 63.75), rel=1e-5)
