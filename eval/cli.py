"""Shared CLI plumbing: logging to stderr and user errors printed as one line with a non-zero exit.

Why: a user who mistyped a path should read one sentence saying what to do, not a traceback; a real bug
still shows its traceback.
"""

from __future__ import annotations

import logging
import sys
from typing import Callable

from eval.errors import EvalError
from mrlora.config import ConfigError
from mrlora.runstore import RunStoreError

EXIT_USER_ERROR = 2


def user_errors() -> tuple[type[BaseException], ...]:
    from mrlora.rate.errors import RateError  # torch-free

    errors: list[type[BaseException]] = [EvalError, ConfigError, RunStoreError, RateError]
    try:
        from mrlora.models.errors import ModelError

        errors.append(ModelError)
    except ImportError:
        pass
    try:
        from rewards.base import RewardError

        errors.append(RewardError)
    except ImportError:
        pass
    return tuple(errors)


def run_cli(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Run ``main(argv)``; print user errors as ``error: ...`` on stderr and return exit code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return main(argv)
    except user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
