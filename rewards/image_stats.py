"""Model-free rewards computed from pixels alone.

They exist so a tiny random model can be trained end to end on a laptop and the reward curve still means
something: compressibility, brightness and colourfulness respond to any generator within a few steps, need no
weights and cost microseconds.

Units:

- ``jpeg_compressibility`` = -(JPEG size in kB) and ``jpeg_incompressibility`` = +(JPEG size in kB), the image
  saved as RGB JPEG at quality 95, 1 kB = 1000 bytes (as in DDPO). Not bounded; scale depends on resolution.
- ``brightness``: mean ITU-R BT.601 luma in [0, 1].
- ``colourfulness``: Hasler & Suesstrunk (2003) M = sigma_rgyb + 0.3 * mu_rgyb on 0-255 channels
  (0 for a grey image; ~100+ for saturated images).
"""

from __future__ import annotations

import io

import numpy as np

from rewards.base import Reward, RewardOutput

JPEG_QUALITY = 95


def jpeg_size_kb(image, quality: int = JPEG_QUALITY) -> float:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.tell() / 1000.0


def brightness(image) -> float:
    return float(np.asarray(image.convert("L"), dtype=np.float64).mean() / 255.0)


def colourfulness(image) -> float:
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64)
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    rg = r - g
    yb = 0.5 * (r + g) - b
    sigma = np.sqrt(rg.std() ** 2 + yb.std() ** 2)
    mu = np.sqrt(rg.mean() ** 2 + yb.mean() ** 2)
    return float(sigma + 0.3 * mu)


class JpegSizeReward(Reward):
    """+/- JPEG size in kB at quality 95 (sign chosen by ``compressible``)."""

    higher_is_better = True

    def __init__(self, compressible: bool, quality: int = JPEG_QUALITY) -> None:
        self.compressible = compressible
        self.quality = int(quality)
        self.name = "jpeg_compressibility" if compressible else "jpeg_incompressibility"

    def score(self, images, prompts, metadata) -> RewardOutput:
        sizes = np.array([jpeg_size_kb(im, self.quality) for im in images], dtype=np.float32)
        return RewardOutput(scores=-sizes if self.compressible else sizes, details={"jpeg_kb": sizes})


class BrightnessReward(Reward):
    name = "brightness"
    higher_is_better = True

    def score(self, images, prompts, metadata) -> RewardOutput:
        return RewardOutput(scores=np.array([brightness(im) for im in images], dtype=np.float32))


class ColourfulnessReward(Reward):
    name = "colourfulness"
    higher_is_better = True

    def score(self, images, prompts, metadata) -> RewardOutput:
        return RewardOutput(scores=np.array([colourfulness(im) for im in images], dtype=np.float32))
