"""RaTE: reward-aware token embeddings (one learned token per reward and text encoder).

After the Map step has trained a LoRA expert per reward, RaTE distils each expert into a new token whose
embeddings steer the *unchanged* base model toward that expert. Users then mix rewards at inference by adding
tokens to the prompt (``"<picks> 3 <ocr> 2"``), with no retraining and no weight merging.

Public API (imported lazily, so ``import mrlora.rate`` stays cheap):

- ``distill_in_run(run_root, cycle, reward, token=None, overrides=None) -> dict``: the launcher's job.
- ``distill_token(pipe, prompts, settings, out_dir, expert=..., base_id=...)``: the loop (``DistillSettings``).
- ``attach_expert(transformer, expert_dir, arch, base_spec)``: the teacher LoRA.
- ``apply_token_spec(pipe, tokens, spec, prompt) -> prompt``: load tokens and set a mix (what eval calls).
- ``load_tokens``, ``parse_token_spec``, ``RateToken``, ``save_token``, ``load_token``.
- Errors (torch-free): ``RateError`` and its subclasses.
"""

from __future__ import annotations

import importlib
from typing import Any

from mrlora.rate.errors import (
    RateError,
    TeacherMismatchError,
    TokenExistsError,
    TokenFileError,
    TokenSpecError,
    UnknownTokenError,
)

_LAZY = {
    "distill_in_run": "mrlora.rate.job",
    "rate_dir": "mrlora.rate.job",
    "distill_token": "mrlora.rate.distill",
    "DistillSettings": "mrlora.rate.distill",
    "attach_expert": "mrlora.rate.teacher",
    "apply_token_spec": "mrlora.rate.compose",
    "load_tokens": "mrlora.rate.compose",
    "parse_token_spec": "mrlora.rate.spec",
    "RateToken": "mrlora.rate.token_file",
    "save_token": "mrlora.rate.token_file",
    "load_token": "mrlora.rate.token_file",
    "generate_with_tokens": "mrlora.rate.generate",
}

__all__ = [
    "RateError",
    "TeacherMismatchError",
    "TokenExistsError",
    "TokenFileError",
    "TokenSpecError",
    "UnknownTokenError",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mrlora.rate' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
