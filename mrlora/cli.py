"""The one CLI wrapper, exit-code table, user-error base and logging setup for every entry point and job.

Why one module: each command used to keep its own list of "errors the user can fix", its own exit codes and
its own logging call (or none, so a job's ``logging.info`` lines never reached its log). Here a mistake the
user can fix is any :class:`UserError` (every package's error base derives from it), it is printed as one
``error: ...`` line with exit status 2, Ctrl-C exits 130 and SIGTERM 143 as shells expect, and a closed pipe
(``... | head``) ends the command quietly. A real bug keeps its traceback.

Torch-free and stdlib-only: the login-node commands import it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Callable, NoReturn

EXIT_OK = 0
EXIT_FAILED = 1  # a job failed; its dependents must not run
EXIT_USER_ERROR = 2  # the user can fix it; the message says how
EXIT_INTERRUPTED = 3  # stopped on a signal after writing a checkpoint: run it again to continue
EXIT_SIGINT = 128 + signal.SIGINT  # 130
EXIT_SIGTERM = 128 + signal.SIGTERM  # 143
EXIT_SIGPIPE = 128 + signal.SIGPIPE  # 141

LOG_LEVEL_ENV = "MRLORA_LOG_LEVEL"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# Library warnings that every job would otherwise repeat in its log, with nothing for the user to act on.
_QUIET_WARNINGS = (
    r".*TypedStorage is deprecated.*",
    r".*`resume_download` is deprecated.*",
    r".*torch.utils._pytree._register_pytree_node is deprecated.*",
)


CODE_ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """``<package version>+g<git sha>`` of the code that runs (just the version outside a git checkout).

    Recorded in run.json and printed by every command's ``--version``, so a result can be traced to its code.
    """
    from mrlora import __version__ as version

    try:
        sha = subprocess.run(
            ["git", "-C", str(CODE_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        sha = ""
    return f"{version}+g{sha}" if sha else str(version)


class _VersionAction(argparse.Action):
    """``--version`` that asks git only when it is used, so other invocations pay nothing for it."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog} (mrlora) {code_version()}")
        parser.exit()


def add_version_flag(parser: argparse.ArgumentParser) -> None:
    """Give a command ``--version`` (the same line on every command)."""
    parser.add_argument("--version", action=_VersionAction, help="print mrlora's version and exit")


class UserError(Exception):
    """A mistake the user can fix (a path, a flag, a config value, a run in the wrong state).

    The message says what to do next. Every package's error base derives from this, so one ``except`` in
    :func:`run_cli` replaces the hand-kept lists of error types each command had.
    """

    exit_code = EXIT_USER_ERROR


def setup_logging(level: str | int | None = None) -> None:
    """Configure the root logger once: one format on stderr, level from ``MRLORA_LOG_LEVEL`` (default INFO).

    Called by every entry point and by every job wrapper, so library code only ever asks for
    ``logging.getLogger(__name__)``. Calling it again changes only the level.
    """
    chosen = level if level is not None else os.environ.get(LOG_LEVEL_ENV, "INFO")
    if isinstance(chosen, str):
        chosen = logging.getLevelName(chosen.upper())
        if not isinstance(chosen, int):
            chosen = logging.INFO
    root = logging.getLogger()
    if not any(getattr(h, "_mrlora", False) for h in root.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        handler._mrlora = True  # type: ignore[attr-defined]
        root.addHandler(handler)
        for pattern in _QUIET_WARNINGS:
            warnings.filterwarnings("ignore", message=pattern)
        logging.captureWarnings(True)
    root.setLevel(chosen)


def error_line(prog: str, exc: BaseException) -> str:
    """The one line a user error is reported as."""
    return f"{prog}: error: {exc}"


def run_cli(
    main: Callable[[list[str] | None], int | None], argv: list[str] | None = None, prog: str | None = None
) -> int:
    """Run ``main(argv)`` with the shared logging setup and return its exit status.

    A :class:`UserError` prints one ``error:`` line and returns its ``exit_code`` (2); Ctrl-C returns 130;
    a closed stdout pipe returns 141 without a traceback. Anything else propagates with its traceback.
    """
    setup_logging()
    prog = prog or os.path.basename(sys.argv[0]) or "mrlora"
    try:
        return int(main(argv) or 0)
    except UserError as exc:
        print(error_line(prog, exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_SIGINT
    except BrokenPipeError:
        # The reader went away (``| head``): stop writing, and keep Python from complaining at exit.
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_SIGPIPE


def main_entry(main: Callable[[list[str] | None], int | None], prog: str | None = None) -> NoReturn:
    """``if __name__ == "__main__": main_entry(main)``: :func:`run_cli`, then exit with its status."""
    sys.exit(run_cli(main, prog=prog))
