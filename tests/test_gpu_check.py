"""benchmarks/gpu_check.py documents its run and, on tiny models on CPU, runs every phase and every check."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def test_help_documents_the_run():
    proc = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for words in (
        "--quick",
        "under 5 minutes",
        "peak CUDA memory",
        "images per second",
        "40 ODE steps",
        "changes the LoRA weights and nothing else",
        "--device cpu --tiny",
    ):
        assert words in proc.stdout, words


@pytest.mark.slow
def test_tiny_cpu_smoke_runs_every_phase(tmp_path, mrlora_cache):
    proc = subprocess.run(
        [
            sys.executable,
            str(SCRIPT),
            "--device",
            "cpu",
            "--tiny",
            "--arch",
            "sd3",
            "--steps",
            "2",
            "--eval-steps",
            "2",
            "--resolution",
            "32",
            "--workdir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "log-probs float32 finite True" in out and "frozen tensors changed 0" in out
    assert "s/step" in out and "merge + materialise" in out and "2 ODE steps" in out
    assert out.strip().splitlines()[-1].startswith("gpu check: sd3 ok")
    assert (tmp_path / "sd3-exported" / "model_index.json").is_file()


def test_no_gpu_is_a_clear_error():
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--arch", "sd3"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--device cpu --tiny" in proc.stderr
