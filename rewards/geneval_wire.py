"""The GenEval server's wire format: JSON with base64-encoded PNG images. Never pickle.

The reference server unpickles request bodies, which lets anyone who can reach the port run code on the
scoring node. JSON + PNG carries exactly what scoring needs (pixels and metadata dicts) and nothing
executable; images are decoded with PNG as the only allowed format.

Request  ``POST /score``: ``{"version": 1, "images": ["<base64 png>", ...], "metadata": [{...}, ...]}``
Response 200: ``{"version": 1, "results": [{"correct", "strict_correct", "score", "reasons", "counts"}, ...]}``
Response 4xx/5xx: ``{"error": "<message>"}``. ``GET /health`` answers ``{"status": "ok", ...}``.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from typing import Sequence

from PIL import Image

from rewards.geneval_rules import GenEvalResult

WIRE_VERSION = 1
MAX_IMAGE_PIXELS = 4096 * 4096


class WireError(ValueError):
    """A request or response does not follow the wire format (the server answers 400 with the message)."""


def encode_image(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_image(data: str, where: str = "image") -> Image.Image:
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, TypeError, ValueError) as exc:
        raise WireError(f"{where}: not valid base64 ({exc})") from None
    try:
        image = Image.open(io.BytesIO(raw), formats=["PNG"])
        if image.width * image.height > MAX_IMAGE_PIXELS:
            raise WireError(f"{where}: {image.width}x{image.height} exceeds {MAX_IMAGE_PIXELS} pixels")
        image.load()
    except WireError:
        raise
    except Exception as exc:
        raise WireError(f"{where}: not a PNG image ({type(exc).__name__}: {exc})") from None
    return image.convert("RGB")


def encode_request(images: Sequence[Image.Image], metadata: Sequence[dict]) -> bytes:
    body = {"version": WIRE_VERSION, "images": [encode_image(im) for im in images], "metadata": list(metadata)}
    return json.dumps(body).encode("utf-8")


def decode_request(body: bytes) -> tuple[list[Image.Image], list[dict]]:
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise WireError(f"request body is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("version") != WIRE_VERSION:
        raise WireError(f"request must be a JSON object with version {WIRE_VERSION}")
    images, metadata = data.get("images"), data.get("metadata")
    if not isinstance(images, list) or not isinstance(metadata, list) or len(images) != len(metadata):
        raise WireError("request needs 'images' and 'metadata' lists of the same length")
    if not all(isinstance(m, dict) for m in metadata):
        raise WireError("every metadata entry must be a JSON object")
    return [decode_image(s, f"images[{i}]") for i, s in enumerate(images)], metadata


def encode_response(results: Sequence[GenEvalResult]) -> bytes:
    return json.dumps({"version": WIRE_VERSION, "results": [r.to_dict() for r in results]}).encode("utf-8")


def decode_response(body: bytes, expected: int) -> list[GenEvalResult]:
    try:
        data = json.loads(body.decode("utf-8"))
        results = [GenEvalResult.from_dict(r) for r in data["results"]]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise WireError(f"malformed response from GenEval server: {exc}") from None
    if len(results) != expected:
        raise WireError(f"GenEval server returned {len(results)} results for {expected} images")
    return results


def encode_error(message: str) -> bytes:
    return json.dumps({"error": message}).encode("utf-8")
