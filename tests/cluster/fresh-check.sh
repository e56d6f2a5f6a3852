#!/usr/bin/env bash
# Fresh-machine check: what a newcomer gets from the README, measured.
#
# Clones the repository's committed HEAD (uncommitted changes are not part of it) into a temporary directory,
# makes a brand-new virtual environment, and runs the README's two set-up commands exactly as written there
# (tests/cluster/readme_command.py reads them from the README): the demo first, then the test command.
# Prints the time each took and ends with one verdict line:
#   fresh-check: PASS (demo 95 s, tests 480 s)        or        fresh-check: FAIL (tests: exit 1; ...)
# Logs stay in the temporary directory when something failed (its path is printed); KEEP=1 keeps them always.
# The test command starts the local Slurm cluster, so run it as root on a machine where that is fine.
#
# Environment:
#   PYTHON  interpreter for the new venv (default: python3)
#   KEEP    1: keep the clone, venv and logs even when everything passed
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
work=$(mktemp -d "${TMPDIR:-/tmp}/mrlora-fresh.XXXXXX")
PY="${PYTHON:-python3}"

git clone -q "$repo" "$work/mrlora" || { echo "fresh-check: FAIL (git clone of $repo failed)"; exit 1; }
"$PY" -m venv "$work/venv" || { echo "fresh-check: FAIL ($PY -m venv failed)"; exit 1; }
cd "$work/mrlora"
echo "[fresh-check] clone of $(git rev-parse --short HEAD) in $work/mrlora, venv $work/venv"

verdict=PASS
figures=()
for name in demo test; do
    cmd=$("$PY" tests/cluster/readme_command.py "$name") || { verdict=FAIL; figures+=("$name: not in README"); continue; }
    echo "[fresh-check] $name: $cmd"
    start=$SECONDS
    # A new login shell's view: only the fresh venv on PATH, nothing inherited from an activated one.
    env -u VIRTUAL_ENV -u PYTHONPATH PATH="$work/venv/bin:$PATH" bash -c "$cmd" >"$work/$name.log" 2>&1
    rc=$?
    took=$((SECONDS - start))
    echo "[fresh-check] $name: exit $rc after $took s (log: $work/$name.log)"
    tail -n 5 "$work/$name.log" | sed 's/^/    /'
    if [[ $rc -ne 0 ]]; then
        verdict=FAIL
        figures+=("$name: exit $rc after $took s")
    else
        figures+=("$name $took s")
    fi
done

if [[ $verdict == PASS && ${KEEP:-0} != 1 ]]; then
    rm -rf "$work"
fi
summary=$(IFS=,; echo "${figures[*]}" | sed 's/,/, /g')
echo "fresh-check: $verdict ($summary)"
[[ $verdict == PASS ]]
