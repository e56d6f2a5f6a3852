#!/usr/bin/env bash
# Rebuild constraints.txt: the exact versions of everything mrlora and its test/dev extras pull in.
#
# Why a lock: pyproject.toml keeps broad lower bounds so that mrlora installs into a user's own environment,
# but a fresh install with only lower bounds picks up whatever was released last week. The README's commands,
# tests/cluster/install-test-env.sh and .ci/run all install with `-c constraints.txt`, so what a newcomer gets
# is what the suite was run against.
#
# What it does: a brand-new virtual environment, torch (the CPU wheel, version from the current lock unless
# TORCH_VERSION is set), then the project with its dev extras at the newest versions the lower bounds allow,
# then `pip check`, then `pip freeze` written to constraints.txt. Run the suite against the new lock before
# committing it:  bash tests/cluster/refresh-lock.sh && bash .ci/run
#
# Environment:
#   PYTHON         interpreter for the new venv (default: python3)
#   TORCH_VERSION  torch release to pin (default: the one constraints.txt pins now)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

LOCK=constraints.txt
PY="${PYTHON:-python3}"
TORCH_VERSION="${TORCH_VERSION:-$(sed -n 's/^torch==\([^+ ]*\).*/\1/p' "$LOCK")}"
[[ -n $TORCH_VERSION ]] || { echo "refresh-lock: no torch pin in $LOCK; set TORCH_VERSION" >&2; exit 2; }

venv=$(mktemp -d "${TMPDIR:-/tmp}/mrlora-lock.XXXXXX")
trap 'rm -rf "$venv"' EXIT
"$PY" -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
python -m pip install -q --upgrade pip
python -m pip install -q "torch==$TORCH_VERSION"
python -m pip install -q ".[dev]"
python -m pip check

{
    echo "# Exact versions the test suite passes with (Python $(python -c 'import sys; print(".".join(map(str, sys.version_info[:2])))'), $(uname -s) $(uname -m))."
    echo "# Made by tests/cluster/refresh-lock.sh on $(date -u +%Y-%m-%d); used with pip's -c by the README's commands,"
    echo "# tests/cluster/install-test-env.sh and .ci/run. torch is pinned without a local label, so the CPU wheel"
    echo "# (torch==$TORCH_VERSION) and a CUDA build of the same release (e.g. $TORCH_VERSION+cu128) both satisfy it."
    python -m pip freeze --exclude-editable | grep -v '^mrlora' | sed 's/^torch==\([^+]*\)+.*/torch==\1/'
} > "$LOCK.tmp"
mv "$LOCK.tmp" "$LOCK"
echo "refresh-lock: wrote $LOCK ($(grep -vc '^#' "$LOCK") pins, torch==$TORCH_VERSION)"
