#!/usr/bin/env bash
# Prepare a machine to run mrlora's test suite: the Python stack from the lock, then the local Slurm cluster.
#
# Everything is installed with `-c constraints.txt`, the exact versions the suite passes with (refreshed by
# tests/cluster/refresh-lock.sh), into whatever Python environment is active: .ci/run calls this inside a
# brand-new venv of its own, so a package left on the machine by hand cannot hide a missing dependency.
#
# Why torch first: `pip install -e .` would otherwise let pip pick a torch build on its own. On a CPU machine
# the suite runs against the CPU wheel of the torch release the lock pins; it is installed first, and only
# when the installed torch is not already that release (a CUDA build of the same release is kept).
#
# Environment:
#   PYTHON           interpreter to install into (default: python)
#   TORCH_INDEX_URL  optional index for the torch wheel (e.g. PyTorch's CPU index on a machine whose pip
#                    does not already resolve the pinned torch to a CPU build); unset: pip's own configuration
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PY="${PYTHON:-python}"
LOCK=constraints.txt
TORCH_VERSION=$(sed -n 's/^torch==\([^+ ]*\).*/\1/p' "$LOCK")
[[ -n $TORCH_VERSION ]] || { echo "[install-test-env] $LOCK pins no torch release" >&2; exit 1; }

have=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [[ ${have%%+*} == "$TORCH_VERSION" ]]; then
    echo "[install-test-env] torch $have already installed"
else
    echo "[install-test-env] installing torch==$TORCH_VERSION (CPU wheel; found: ${have:-none})"
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then
        "$PY" -m pip install -q "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
        "$PY" -m pip install -q -c "$LOCK" "torch==$TORCH_VERSION"
    fi
fi

echo "[install-test-env] pip install -c $LOCK -e .[dev] (the test stack, ruff and mypy)"
"$PY" -m pip install -q -c "$LOCK" -e ".[dev]"
"$PY" -m pip check

# Headless Chromium renders the eval report in tests/test_eval_end_to_end.py (that test skips without it).
if ! command -v chromium >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[install-test-env] apt-get install chromium (renders the HTML eval report in a test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "[install-test-env] starting the local Slurm cluster"
bash tests/cluster/slurm-up.sh
