"""Mixing rewards at inference: load tokens into a pipeline and turn a token spec into a prompt.

A token spec lists tokens with an optional repeat count and an optional embedding scale::

    "<picks> 3 <ocr> 2"          three <picks> and two <ocr> appended to the prompt
    "<picks>@0.5 <ocr>@1.5 2"    <picks> with its embeddings scaled by 0.5, <ocr> x1.5 repeated twice

Repeats strengthen a token through attention (more positions carry it); the scale changes the vector itself.
Both act only on the prompt: the model weights are untouched, so one pipeline serves every mix. Tokens are
appended after the prompt, the same place distillation put them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from mrlora.rate.encoders import add_token, installed_tokens, write_rows
from mrlora.rate.errors import TokenFileError
from mrlora.rate.spec import check_known, parse_token_spec
from mrlora.rate.token_file import RateToken, check_fits, load_token

_LOADED_ATTR = "_mrlora_rate_loaded"  # pipeline attribute: {token: RateToken}


def loaded_tokens(pipe: Any) -> dict[str, RateToken]:
    return getattr(pipe, _LOADED_ATTR, {})


def load_tokens(pipe: Any, tokens: Iterable[RateToken | str | Path]) -> dict[str, RateToken]:
    """Install ``tokens`` (objects or token-file paths) into ``pipe`` at scale 1; return every loaded token.

    Every token is checked against the pipeline before any is installed, so a bad file leaves ``pipe`` as it was.
    """
    resolved: list[tuple[RateToken, str]] = []
    for item in tokens:
        if isinstance(item, RateToken):
            resolved.append((item, ""))
        else:
            resolved.append((load_token(item), str(item)))
    loaded = dict(loaded_tokens(pipe))
    seen: dict[str, str] = {}
    for token, source in resolved:
        check_fits(token, pipe, source)
        if token.token in seen:
            raise TokenFileError(
                f"two token files define {token.token!r} ({seen[token.token] or 'object'} and {source or 'object'}); "
                f"load only one of them"
            )
        seen[token.token] = source
    for token, _ in resolved:
        if token.token not in installed_tokens(pipe):
            add_token(pipe, token.token)
        write_rows(pipe, token.token, token.vectors)
        loaded[token.token] = token
    setattr(pipe, _LOADED_ATTR, loaded)
    return loaded


def _as_token_list(tokens: Mapping[str, RateToken] | Sequence[RateToken | str | Path] | None) -> list:
    if tokens is None:
        return []
    if isinstance(tokens, Mapping):
        return list(tokens.values())
    if isinstance(tokens, (str, Path, RateToken)):
        return [tokens]
    return list(tokens)


def apply_token_spec(
    pipe: Any,
    tokens: Mapping[str, RateToken] | Sequence[RateToken | str | Path] | None,
    spec: str,
    prompt: str | list[str],
) -> str | list[str]:
    """Load ``tokens`` (if not yet loaded), set their embedding scales from ``spec``, return the prompt(s) to use.

    ``tokens``: token files, ``RateToken`` objects or a ``{token: RateToken}`` map (``None``: use what is already
    loaded). Tokens loaded but not named in ``spec`` are reset to scale 1 and not added to the prompt. A spec
    naming a token that is not loaded raises ``UnknownTokenError``; a malformed spec ``TokenSpecError``. The
    returned prompt is ``prompt`` followed by each token repeated its count, separated by spaces; pass it to the
    pipeline as usual (calling again with another spec re-scales the rows, so one pipeline serves every mix).
    """
    items = parse_token_spec(spec)
    pending = [
        t for t in _as_token_list(tokens) if not (isinstance(t, RateToken) and loaded_tokens(pipe).get(t.token) is t)
    ]
    if pending:
        load_tokens(pipe, pending)
    loaded = loaded_tokens(pipe)
    check_known(spec, items, loaded)
    scales = {item.token: item.scale for item in items}
    for name, token in loaded.items():
        write_rows(pipe, name, token.vectors, scales.get(name, 1.0))
    suffix = " ".join(" ".join([item.token] * item.count) for item in items)

    def extend(text: str) -> str:
        return f"{text} {suffix}" if suffix else text

    return extend(prompt) if isinstance(prompt, str) else [extend(p) for p in prompt]
