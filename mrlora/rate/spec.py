"""The token-spec grammar of RaTE mixes, torch-free so login-node tools can check a spec before submitting.

A token spec lists tokens with an optional repeat count and an optional embedding scale::

    "<picks> 3 <ocr> 2"          three <picks> and two <ocr> appended to the prompt
    "<picks>@0.5 <ocr>@1.5 2"    <picks> with its embeddings scaled by 0.5, <ocr> x1.5 repeated twice
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

from mrlora.rate.errors import TokenSpecError, UnknownTokenError

_COUNT = re.compile(r"^\d+$")


@dataclass(frozen=True)
class SpecItem:
    token: str
    count: int = 1
    scale: float = 1.0


def parse_token_spec(spec: str) -> list[SpecItem]:
    """Parse ``"<a> 3 <b>@0.5 2"``; ``TokenSpecError`` for a malformed spec (e.g. a count before any token)."""
    items: list[SpecItem] = []
    counted: set[int] = set()
    for word in (spec or "").split():
        if _COUNT.match(word):
            if not items:
                raise TokenSpecError(f"token spec {spec!r} starts with a count ({word}); write '<token> {word}'")
            if len(items) - 1 in counted:
                raise TokenSpecError(f"token spec {spec!r} gives two counts for {items[-1].token!r}")
            count = int(word)
            if count < 1:
                raise TokenSpecError(
                    f"token spec {spec!r}: the count of {items[-1].token!r} must be >= 1 (drop the token instead)"
                )
            items[-1] = SpecItem(items[-1].token, count, items[-1].scale)
            counted.add(len(items) - 1)
            continue
        token, scale = word, 1.0
        if "@" in word:
            token, _, text = word.rpartition("@")
            try:
                scale = float(text)
            except ValueError:
                raise TokenSpecError(f"token spec {spec!r}: scale {text!r} of {token!r} is not a number") from None
            if not token or not math.isfinite(scale):
                raise TokenSpecError(f"token spec {spec!r}: bad item {word!r}; write '<token>@<scale>'")
        items.append(SpecItem(token, 1, scale))
    merged: dict[str, SpecItem] = {}
    for item in items:
        if item.token in merged:
            prev = merged[item.token]
            if prev.scale != item.scale:
                raise TokenSpecError(
                    f"token spec {spec!r} gives {item.token!r} two scales ({prev.scale} and {item.scale}); a token has "
                    f"one embedding, so use one scale and a repeat count"
                )
            merged[item.token] = SpecItem(item.token, prev.count + item.count, item.scale)
        else:
            merged[item.token] = item
    return list(merged.values())


def check_known(spec: str, items: Iterable[SpecItem], loaded: Iterable[str]) -> None:
    """Raise ``UnknownTokenError`` when ``spec`` names a token that is not among ``loaded``."""
    loaded = set(loaded)
    unknown = [item.token for item in items if item.token not in loaded]
    if unknown:
        known = ", ".join(sorted(loaded)) or "none"
        raise UnknownTokenError(
            f"token spec {spec!r} names {', '.join(repr(u) for u in unknown)}, which is not loaded (loaded: {known}); "
            f"pass its token file"
        )
