"""A RaTE token mix as an eval setting: which token files, which spec, and applying it while generating.

Why a mix is part of the eval settings and not of the checkpoint: RaTE tokens (docs/rate.md) steer an
*unchanged* model through the prompt only, so "base + ``<ocr> 2``" is the base checkpoint with another prompt
transform. Recording the token files (path + sha256, token name, reward) and the spec in ``eval.json`` makes a
rerun into the same ``--out`` with another mix, or a re-distilled token file, be refused like any other setting
change, and lets the report place the mix on the Pareto view as its own kind ("rate").

Only the prompt given to the pipeline carries the tokens. Everything that is scored or written (rewards,
``metadata.jsonl``, the HDF5 ``prompt`` column) sees the original prompt, so GenEval reads its metadata and
OCR its quoted target exactly as for any other checkpoint.

Torch-free at module level: ``launch.eval`` validates a mix on the login node. That check reads the token
files' safetensors headers (JSON) and the spec (RaTE's own torch-free grammar, ``mrlora.rate.spec``); the
check of arch and embedding widths against the pipeline runs in ``eval.run`` before anything is written.
"""

from __future__ import annotations

import json
import struct
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from eval.errors import EvalError
from mrlora.runstore import file_digest

TOKEN_FORMAT = "mrlora-rate-token"  # mrlora.rate.token_file.FORMAT (that module imports torch)
KIND = "rate"
_MAX_HEADER = 100 * 1024 * 1024


@dataclass(frozen=True)
class TokenRecord:
    """One token file of a mix, as recorded in ``eval.json``."""

    path: str
    sha256: str
    token: str
    reward: str
    arch: str
    base: str


@dataclass(frozen=True)
class RateMix:
    """The token files and the spec an eval generates with (``--rate-tokens`` / ``--rate-spec``)."""

    spec: str
    tokens: tuple[TokenRecord, ...]

    @property
    def paths(self) -> list[str]:
        return [t.path for t in self.tokens]

    def to_dict(self) -> dict:
        return {"spec": self.spec, "tokens": [asdict(t) for t in self.tokens]}

    @classmethod
    def from_dict(cls, data: dict) -> "RateMix":
        return cls(str(data["spec"]), tuple(TokenRecord(**t) for t in data["tokens"]))


def comparable(data: dict | None) -> dict | None:
    """A recorded mix as compared between reruns: the files by content (sha256), not by where they lie."""
    if data is None:
        return None
    return {
        "spec": " ".join(str(data["spec"]).split()),
        "tokens": sorted((t["token"], t["sha256"]) for t in data["tokens"]),
    }


def label(checkpoint_label: str, rate: dict) -> str:
    """``base + <ocr> 2``: the checkpoint's label and the spec (whitespace normalised)."""
    return f"{checkpoint_label} + {' '.join(str(rate['spec']).split())}"


def steers_a_base(checkpoint: dict) -> bool:
    """True when the checkpoint is a base model (``base``, or ``RUN_DIR:0``), the model RaTE tokens steer."""
    kind = checkpoint.get("kind")
    return kind == "base" or (kind == "merged" and checkpoint.get("cycle") == 0)


def checkpoint_note(checkpoint: dict) -> str | None:
    """The sentence recorded in summary.json when a mix is applied to something other than a base model."""
    if steers_a_base(checkpoint):
        return None
    return (
        f"RaTE tokens are distilled to steer a base model; this mix was applied to {checkpoint.get('label')!r} "
        f"(kind {checkpoint.get('kind')}), a model the tokens were not trained for"
    )


def _header_metadata(path: Path) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, read from its JSON header (no tensor library needed)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(8)
            if len(raw) != 8:
                raise ValueError("file shorter than a safetensors header")
            (size,) = struct.unpack("<Q", raw)
            if size > _MAX_HEADER:
                raise ValueError(f"header size {size} is implausible")
            header = json.loads(fh.read(size).decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise EvalError(
            f"--rate-tokens: {path} is not a readable safetensors file ({exc}); give RaTE token files "
            "(RUN/cycle_XXXX/rate/<reward>/token.safetensors)"
        ) from None
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return meta if isinstance(meta, dict) else {}


def resolve_mix(token_files: Sequence[str] | None, spec: str | None) -> RateMix | None:
    """Check ``--rate-tokens`` / ``--rate-spec`` without torch; return the mix (None when neither is given).

    Raises EvalError when only one flag is given, a file is missing or not a RaTE token file, two files define
    the same token, or the spec is empty; ``mrlora.rate.UnknownTokenError`` when the spec names a token that
    none of the files defines.
    """
    if not token_files and spec is None:
        return None
    if not token_files or spec is None:
        given, missing = ("--rate-tokens", "--rate-spec") if token_files else ("--rate-spec", "--rate-tokens")
        raise EvalError(
            f"{given} needs {missing}: give both (the token files to load and the mix to generate with, "
            "e.g. --rate-tokens RUN/cycle_0003/rate/ocr/token.safetensors --rate-spec '<ocr> 2') or "
            "neither"
        )
    if not spec.split():
        raise EvalError("--rate-spec is empty; name at least one token, e.g. --rate-spec '<ocr> 2'")
    records: list[TokenRecord] = []
    for item in token_files:
        path = Path(item).expanduser()
        if not path.is_file():
            raise EvalError(
                f"--rate-tokens: token file {path} does not exist; distill one with "
                "`python -m mrlora.rate distill` (in a run: RUN/cycle_XXXX/rate/<reward>/token.safetensors)"
            )
        meta = _header_metadata(path)
        if meta.get("format") != TOKEN_FORMAT or not meta.get("token"):
            raise EvalError(
                f"--rate-tokens: {path} is not a RaTE token file (metadata format="
                f"{meta.get('format')!r}); give the token.safetensors written by `python -m mrlora.rate`"
            )
        path = path.resolve()
        records.append(
            TokenRecord(
                str(path),
                file_digest(path),
                meta["token"],
                meta.get("reward", ""),
                meta.get("arch", ""),
                meta.get("base", ""),
            )
        )
    seen: dict[str, str] = {}
    for rec in records:
        if rec.token in seen:
            raise EvalError(
                f"--rate-tokens: two files define {rec.token!r} ({seen[rec.token]} and {rec.path}); "
                "load only one of them"
            )
        seen[rec.token] = rec.path
    from mrlora.rate.spec import check_known, parse_token_spec  # torch-free: the full check on the login node

    check_known(spec, parse_token_spec(spec), seen)
    return RateMix(spec, tuple(records))


def install_mix(pipe: Any, mix: RateMix) -> None:
    """Load the mix's tokens into ``pipe`` and set the spec's embedding scales (RaTE checks arch and widths)."""
    from mrlora.rate import apply_token_spec

    apply_token_spec(pipe, mix.paths, mix.spec, [])


def mixed_prompts(pipe: Any, spec: str, prompts: list[str]) -> list[str]:
    """The prompts the pipeline gets: each original prompt with the spec's tokens appended (tokens installed)."""
    from mrlora.rate import apply_token_spec

    return list(apply_token_spec(pipe, None, spec, list(prompts)))
