"""JPEG thumbnails for the report under a byte budget, each linked to its full-size image.

Why a budget: report.html embeds its images (one file to copy off a cluster), and a grid of 80 checkpoints x 8
prompts is 640 images; as full PNGs that is hundreds of MB, as 96-pixel JPEGs a few MB. The largest rung of
``LADDER`` (side, JPEG quality) whose embedded size fits the budget is used: estimated on a sample first (so
the sources are decoded once), then measured on the real encodings and stepped down until it fits.
"""

from __future__ import annotations

import base64
import functools
import io
import math
from dataclasses import dataclass
from pathlib import Path

# (longest side in pixels, JPEG quality), largest first
LADDER = ((256, 82), (192, 80), (160, 78), (128, 75), (112, 72), (96, 70), (80, 68), (64, 65), (48, 60), (32, 55))
DATA_URI_PREFIX = "data:image/jpeg;base64,"
_SAMPLE = 24
_MARGIN = 1.1  # estimate -> first try; the measured size decides


def data_uri_size(jpeg_bytes: int) -> int:
    """Characters a JPEG of that many bytes takes in the HTML as a base64 data URI."""
    return len(DATA_URI_PREFIX) + 4 * math.ceil(jpeg_bytes / 3)


def data_uri(jpeg: bytes) -> str:
    return DATA_URI_PREFIX + base64.b64encode(jpeg).decode("ascii")


def _encode(image, side: int, quality: int) -> bytes:
    from PIL import Image

    im = image.copy()
    im.thumbnail((side, side), Image.Resampling.LANCZOS)  # never enlarges
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=quality, optimize=True)
    return buf.getvalue()


def _open(path: Path, side: int):
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        im.thumbnail((side, side), Image.Resampling.LANCZOS)
        return im


# the caller retries with fewer images when a budget does not fit; the sample is mostly the same images
_open_sample = functools.lru_cache(maxsize=2 * _SAMPLE)(_open)


@dataclass(frozen=True)
class Thumbnails:
    """Encoded thumbnails in the order of the paths asked for, the rung used and their embedded size."""

    jpegs: list[bytes]
    widths: list[int]  # pixels of each thumbnail (a source smaller than the rung is never enlarged)
    side: int
    quality: int
    embedded_bytes: int


def estimate_rung(paths: list[Path], budget: int) -> int | None:
    """Index into LADDER of the largest rung a sample of ``paths`` predicts to fit ``budget``; None if none does."""
    if not paths:
        return 0
    step = max(1, len(paths) // _SAMPLE)
    sample = [_open_sample(p, LADDER[0][0]) for p in paths[::step][:_SAMPLE]]
    for k, (side, quality) in enumerate(LADDER):
        per_image = sum(data_uri_size(len(_encode(im, side, quality))) for im in sample) / len(sample)
        if per_image * len(paths) * _MARGIN <= budget:
            return k
    return None


def fit_thumbnails(paths: list[Path], budget: int) -> Thumbnails | None:
    """Thumbnails of every path whose data URIs total at most ``budget`` characters; None if the smallest rung
    does not fit (the caller shows fewer images)."""
    k = estimate_rung(paths, budget)
    if k is None:
        return None
    side, _ = LADDER[k]
    images = [_open(p, side) for p in paths]
    for side, quality in LADDER[k:]:
        jpegs = [_encode(im, side, quality) for im in images]
        total = sum(data_uri_size(len(j)) for j in jpegs)
        if total <= budget:
            return Thumbnails(jpegs, [min(side, im.width) for im in images], side, quality, total)
    return None
