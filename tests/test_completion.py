"""``mrlora completion bash|zsh``: the script, sourced in a real bash, completes subcommands, flags and choices."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def completion(shell: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mrlora.commands", "completion", shell],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def bash_script(tmp_path_factory) -> Path:
    proc = completion("bash")
    assert proc.returncode == 0, proc.stderr
    path = tmp_path_factory.mktemp("completion") / "mrlora.bash"
    path.write_text(proc.stdout)
    return path


def complete(script: Path, *words: str) -> list[str]:
    """What bash's completion function offers for the command line ``words`` (the last one being typed)."""
    line = " ".join(f"'{w}'" for w in words)
    code = (
        f"source '{script}'\n"
        f"COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}\n"
        "[[ \"$(complete -p mrlora)\" == *'-F _mrlora'* ]] || exit 9\n"
        '_mrlora; printf "%s\\n" "${COMPREPLY[@]}"\n'
    )
    proc = subprocess.run(["bash", "--norc", "-c", code], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return [w for w in proc.stdout.splitlines() if w]


def test_bash_completes_subcommands_flags_and_choices(bash_script):
    assert complete(bash_script, "mrlora", "sta") == ["status"]
    assert complete(bash_script, "mrlora", "eval") == ["eval", "eval-submit"]
    assert complete(bash_script, "mrlora", "status", "--no-") == ["--no-slurm"]
    assert complete(bash_script, "mrlora", "merge", "ex") == ["export"]
    # the flags a second-level command adds, read from its own parser
    assert complete(bash_script, "mrlora", "merge", "export", "--push") == ["--push-to-hub"]
    assert complete(bash_script, "mrlora", "rate", "distill", "--tok") == ["--token"]
    assert complete(bash_script, "mrlora", "launch", "--mode", "") == ["parallel", "sequential"]
    assert complete(bash_script, "mrlora", "completion", "z") == ["zsh"]
    assert complete(bash_script, "mrlora", "status", "some") == []  # left to file name completion


def test_zsh_script_registers_the_same_function(bash_script):
    proc = completion("zsh")
    assert proc.returncode == 0, proc.stderr
    assert "autoload -U +X bashcompinit && bashcompinit" in proc.stdout
    assert proc.stdout.endswith(bash_script.read_text())


def test_an_unknown_shell_is_a_usage_error():
    proc = completion("fish")
    assert proc.returncode == 2 and "invalid choice: 'fish'" in proc.stderr
