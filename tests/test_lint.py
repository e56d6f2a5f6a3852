"""The code stays formatted, lint-clean and type-checked: ruff (format + lint) over the tree, mypy over the
torch-free packages that run on login nodes. Part of the README's test command, so CI enforces it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What runs on a login node and must stay importable without torch: checked with mypy (settings in pyproject).
TYPED = [
    "launch",
    "configs",
    "mrlora/cli.py",
    "mrlora/commands.py",
    "mrlora/config.py",
    "mrlora/runstore.py",
    "mrlora/claim.py",
    "mrlora/memory_plan.py",
    "mrlora/tracking.py",
]


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *cmd], cwd=REPO, capture_output=True, text=True, timeout=600)


def _need(module: str) -> None:
    if shutil.which(module) is None and _run(module, "--version").returncode != 0:
        pytest.fail(f"{module} is not installed: pip install -c constraints.txt -e '.[dev]'")


def test_ruff_finds_nothing_to_fix():
    _need("ruff")
    proc = _run("ruff", "check", ".")
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]


def test_the_tree_is_formatted():
    _need("ruff")
    proc = _run("ruff", "format", "--check", ".")
    assert proc.returncode == 0, "run `ruff format .`:\n" + proc.stdout[-4000:]


def test_the_login_node_packages_type_check():
    _need("mypy")
    proc = _run("mypy", *TYPED)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
