"""Generate images with a token mix: the inference half of RaTE, used by ``python -m mrlora.rate generate``.

Sampling is the project's ODE sampler (``mrlora.sampling.sample`` with ``noise_level=0``); eval uses the
diffusers pipeline call with the same token mix (``eval.rate.mixed_prompts``). Both are the Euler ODE on the
same schedule from the same per-seed noise, so an image made here for a seed is the image an eval job makes for
that seed, up to float rounding (a few ops are ordered differently: tests/test_rate_tokens.py checks at most
1/255 on under 0.1% of the pixels).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from mrlora.rate.compose import apply_token_spec

ARCH_DEFAULTS = {"sd3": {"steps": 40, "guidance_scale": 4.5}, "flux": {"steps": 28, "guidance_scale": 3.5}}


def generate_with_tokens(
    pipe: Any,
    tokens: Sequence[Any] | None,
    spec: str,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int],
    steps: int,
    guidance_scale: float,
    resolution: int,
    max_sequence_length: int = 256,
) -> list:
    """PIL images for ``prompts`` with the token mix ``spec`` appended (one image per prompt and seed)."""
    from mrlora.sampling import sample

    full = apply_token_spec(pipe, tokens, spec, list(prompts))
    result = sample(
        pipe,
        full,
        seeds=list(seeds),
        num_steps=steps,
        guidance_scale=guidance_scale,
        resolution=resolution,
        noise_level=0.0,
        max_sequence_length=max_sequence_length,
        decode=True,
    )
    return result.images


def save_image(image: Any, path: str | Path) -> Path:
    """Write a PIL image atomically; the format follows the extension (png when there is none)."""
    from mrlora.runstore import atomic_file

    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}.get(path.suffix.lower(), "PNG")
    with atomic_file(path) as tmp:
        image.save(tmp, format=fmt)
    return path
