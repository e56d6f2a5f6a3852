"""Helpers shared by the expert-training tests (tests/test_train_*.py)."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def subprocess_env() -> dict:
    """The environment for a training subprocess: this checkout importable, this process's thread count."""
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


def kill_after_checkpoint(cmd: list[str], out: Path, step: int = 2, timeout: float = 240) -> None:
    """Run training ``cmd`` and SIGKILL it as soon as ``checkpoint-<step>`` is complete (before it finishes)."""
    proc = subprocess.Popen(cmd, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = Path(out) / f"checkpoint-{step}" / "COMPLETE.json"
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before its first checkpoint: {proc.stderr.read()}")
        assert time.monotonic() < deadline, f"no checkpoint-{step} within {timeout:.0f} s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (Path(out) / "DONE.json").exists(), "the run finished before it could be killed; the test proved nothing"


def tiny_run(tmp_path: Path, base: str, overrides: list[str], executor: str = "local"):
    """A tiny-sd3 run directory whose run.json holds the preset with ``model.pretrained=base`` + ``overrides``."""
    from mrlora.config import config_to_dict, load_config
    from mrlora.runstore import RunDir

    cfg = load_config("tiny-sd3", [f"model.pretrained={base}", *overrides])
    run = RunDir.create(tmp_path / "runs", "tiny-sd3")
    run.write_run_json(
        {
            "run_ts": run.run_ts,
            "model": "tiny-sd3",
            "created": dt.datetime.now().isoformat(),
            "code_version": "test",
            "config": config_to_dict(cfg),
            "cluster": {},
            "executor": executor,
            "history": [],
        }
    )
    return run
