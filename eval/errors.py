"""Eval errors: one exception type the CLIs print without a traceback (torch-free, so launch/ can use it)."""

from __future__ import annotations

from mrlora.cli import UserError


class EvalError(UserError, RuntimeError):
    """A problem with the eval's inputs or output directory; the message says what to do next."""
