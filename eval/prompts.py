"""Load the eval's prompt file through the rewards package's loaders, with the eval's error type.

Why not a loader of our own: training and eval must read GenEval metadata and plain prompt lists identically
(``rewards.prompts.load_prompt_source``), or an eval could silently score different prompts than a run trained
on. This module only adds what eval needs on top: a clear EvalError (the loader names the bad line) and the
metadata line of the official GenEval layout. (The file's sha256, recorded in the eval settings so shards of
one eval provably used the same prompts, is ``mrlora.runstore.file_digest``.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from eval.errors import EvalError


@dataclass(frozen=True)
class EvalPrompt:
    """One prompt of the eval: its text, its metadata (GenEval line or {}), its GenEval tag ("" if none)."""

    prompt: str
    metadata: dict

    @property
    def tag(self) -> str:
        return str(self.metadata.get("tag", "") or "")

    def metadata_line(self) -> str:
        """The line written to ``<index>/metadata.jsonl`` (official GenEval layout): metadata with the prompt."""
        return json.dumps({**self.metadata, "prompt": self.prompt}, sort_keys=True)


def load_prompts(path: str | Path) -> list[EvalPrompt]:
    """Every prompt of ``path`` in file order (GenEval metadata ``.jsonl`` or one prompt per line)."""
    from rewards.base import RewardError
    from rewards.prompts import load_prompt_source

    path = Path(path)
    if not path.is_file():
        raise EvalError(
            f"prompt file {path} does not exist; give a GenEval metadata .jsonl or a text file with one prompt per line"
        )
    try:
        items = load_prompt_source(str(path), 0)
    except RewardError as exc:  # PromptSourceError names the file and the line
        raise EvalError(str(exc)) from None
    if not items:
        raise EvalError(f"prompt file {path} holds no prompts")
    return [EvalPrompt(str(item.prompt), dict(item.metadata or {})) for item in items]
