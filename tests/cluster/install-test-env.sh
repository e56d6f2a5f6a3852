#!/usr/bin/env bash
# Prepare a machine to run mrlora's test suite: the Python stack, then the local Slurm cluster.
#
# Why torch first: `pip install -e .` would otherwise pull the default (CUDA) torch wheel from PyPI. On a
# CPU machine the suite runs against the torch 2.13.0 CPU wheel (DESIGN.md section 10), so it is installed
# first, and only when the installed torch is not already 2.13.0 (never upgraded or replaced otherwise).
#
# Environment:
#   PYTHON           interpreter to install into (default: python)
#   TORCH_INDEX_URL  optional index for the torch wheel (e.g. PyTorch's CPU index on a machine whose pip
#                    does not already resolve torch==2.13.0 to a CPU build); unset: pip's own configuration
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PY="${PYTHON:-python}"
TORCH_VERSION=2.13.0

have=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null || true)
if [[ ${have%%+*} == "$TORCH_VERSION" ]]; then
    echo "[install-test-env] torch $have already installed"
else
    echo "[install-test-env] installing torch==$TORCH_VERSION (CPU wheel; found: ${have:-none})"
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then
        "$PY" -m pip install "torch==$TORCH_VERSION" --index-url "$TORCH_INDEX_URL"
    else
        "$PY" -m pip install "torch==$TORCH_VERSION"
    fi
fi

echo "[install-test-env] pip install -e .[test]"
"$PY" -m pip install -e ".[test]"

# Headless Chromium renders the eval report in tests/test_eval_end_to_end.py (that test skips without it).
if ! command -v chromium >/dev/null 2>&1 && [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
    echo "[install-test-env] apt-get install chromium (renders the HTML eval report in a test)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
fi

echo "[install-test-env] starting the local Slurm cluster"
bash tests/cluster/slurm-up.sh
