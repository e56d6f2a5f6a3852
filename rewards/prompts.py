"""Prompt sources for training and eval: files or generated sets, as ``PromptItem(prompt, metadata)``.

A config names a prompt source per reward (``prompts.<reward>``) as either

- a file: ``*.jsonl`` holds one JSON object per line with a ``"prompt"`` string; the object is the metadata
  (GenEval metadata lines are validated as such); any other extension is a plain list, one prompt per line
  (blank lines skipped), metadata ``{}``;
- ``gen:geneval:<n>``, ``gen:ocr:<n>``, ``gen:simple:<n>``: generated from the project's templates
  (:mod:`rewards.prompt_gen`), reproducible from ``seed``.

Errors name the file and the line. The CLI writes a generated set to a file:
``python -m rewards.prompts --kind geneval --n 100 --out prompts/geneval_train.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from mrlora.cli import add_version_flag, main_entry
from mrlora.runstore import atomic_write_text
from rewards.base import RewardError
from rewards.geneval_rules import GenEvalMetadataError, validate_metadata
from rewards.prompt_gen import generate_geneval, generate_ocr, generate_simple

GENERATED_KINDS = ("geneval", "ocr", "simple")


class PromptSourceError(RewardError):
    """A prompt source spec or file is unusable; the message names the file and line."""


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    metadata: dict = field(default_factory=dict)


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise PromptSourceError(f"prompt file {str(path)!r} does not exist (or is not a file)")
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        line = path.read_bytes()[: exc.start].count(b"\n") + 1
        raise PromptSourceError(f"{path}:{line}: not valid UTF-8 ({exc.reason})") from None


def load_jsonl_prompts(path: str | Path) -> list[PromptItem]:
    """Load ``{"prompt": ..., ...}`` lines; lines with ``include`` must be valid GenEval metadata."""
    path = Path(path)
    items = []
    for lineno, line in enumerate(_read_lines(path), start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PromptSourceError(f"{path}:{lineno}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), str) or not data["prompt"].strip():
            raise PromptSourceError(f'{path}:{lineno}: expected a JSON object with a non-empty "prompt" string')
        if "include" in data or "tag" in data:
            try:
                validate_metadata(data, where=f"{path}:{lineno}")
            except GenEvalMetadataError as exc:
                raise PromptSourceError(str(exc)) from None
        items.append(PromptItem(prompt=data["prompt"], metadata=data))
    if not items:
        raise PromptSourceError(f"{path}: no prompts in file")
    return items


def load_geneval_metadata(path: str | Path) -> list[PromptItem]:
    """Load a GenEval metadata jsonl; every line must be GenEval metadata (``tag`` + ``include``)."""
    items = load_jsonl_prompts(path)
    for lineno, item in enumerate(items, start=1):
        if "include" not in item.metadata:
            raise PromptSourceError(f"{path}: prompt {lineno} ({item.prompt[:60]!r}) has no GenEval 'include'")
    return items


def load_prompt_list(path: str | Path) -> list[PromptItem]:
    """Load a plain text file, one prompt per line (blank lines skipped)."""
    path = Path(path)
    items = [PromptItem(line.strip()) for line in _read_lines(path) if line.strip()]
    if not items:
        raise PromptSourceError(f"{path}: no prompts in file")
    return items


def generate_prompt_items(kind: str, n: int, seed: int = 0) -> list[PromptItem]:
    if n < 1:
        raise PromptSourceError(f"gen:{kind}:{n}: the number of prompts must be >= 1")
    if kind == "geneval":
        return [PromptItem(m["prompt"], m) for m in generate_geneval(n, seed)]
    if kind == "ocr":
        return [PromptItem(p) for p in generate_ocr(n, seed)]
    if kind == "simple":
        return [PromptItem(p) for p in generate_simple(n, seed)]
    raise PromptSourceError(f"unknown generated prompt kind {kind!r}; choose from {', '.join(GENERATED_KINDS)}")


def load_prompt_source(spec: str, seed: int = 0) -> list[PromptItem]:
    """Prompts for ``spec``: a file path or ``gen:<geneval|ocr|simple>:<n>`` (``seed`` only affects the latter)."""
    spec = str(spec)
    if spec.startswith("gen:"):
        parts = spec.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise PromptSourceError(
                f"bad prompt source {spec!r}: expected gen:<kind>:<n> with kind in {', '.join(GENERATED_KINDS)}"
            )
        return generate_prompt_items(parts[1], int(parts[2]), seed)
    path = Path(os.path.expanduser(spec))
    if path.suffix == ".jsonl":
        return load_jsonl_prompts(path)
    return load_prompt_list(path)


def write_prompt_items(items: list[PromptItem], out: Path, as_jsonl: bool) -> None:
    """Write atomically: a failed run leaves no half-written prompt file."""
    atomic_write_text(out, "".join((json.dumps(item.metadata) if as_jsonl else item.prompt) + "\n" for item in items))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rewards.prompts", description="Write a generated prompt set to a file."
    )
    parser.add_argument(
        "--kind",
        required=True,
        choices=GENERATED_KINDS,
        help="geneval: GenEval metadata jsonl; ocr / simple: one prompt per line",
    )
    parser.add_argument("--n", type=int, required=True, help="number of prompts")
    parser.add_argument("--seed", type=int, default=0, help="generator seed (use different seeds for train/test)")
    parser.add_argument("--out", required=True, help="output file (.jsonl for geneval, .txt otherwise)")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    out = Path(args.out)
    as_jsonl = args.kind == "geneval"
    if as_jsonl != (out.suffix == ".jsonl"):
        print(
            f"error: --kind {args.kind} writes {'a .jsonl' if as_jsonl else 'a plain (.txt)'} file; rename --out {out}",
            file=sys.stderr,
        )
        return 2
    try:
        items = generate_prompt_items(args.kind, args.n, args.seed)
        write_prompt_items(items, out, as_jsonl)
    except OSError as exc:
        raise PromptSourceError(f"cannot write {out}: {exc}") from exc
    print(f"wrote {len(items)} {args.kind} prompts to {out}")
    return 0


if __name__ == "__main__":
    main_entry(main, prog="rewards.prompts")
