"""Tracking across a run: one continuous TensorBoard curve per expert over every cycle, the same keys in an offline
W&B run, merges and evals on the same axis, and a clear line when a tracker package is missing."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mrlora.runstore import RunDir
from mrlora.tracking import Lineage, Tracker, wandb_run_id

REPO = Path(__file__).resolve().parents[1]
STEPS, CYCLES = 2, 3


def _scalars(folder: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline ``run-<id>.wandb`` file (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf, rows = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        elif kind in (3, 4):
            buf += chunk
        if kind in (1, 4) and buf:
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
            buf = b""
    return rows


@pytest.mark.slow
def test_a_three_cycle_run_draws_one_curve_per_expert_across_cycles(tmp_path, tiny_sd3_dir):
    out = tmp_path / "runs"
    env = {k: v for k, v in os.environ.items() if k not in ("SLURM_CONF", "WANDB_MODE")}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.mapreduce",
            "--model",
            "tiny-sd3",
            "--rewards",
            "brightness",
            "--cycles",
            str(CYCLES),
            "--executor",
            "local",
            "--out-root",
            str(out),
            "--set",
            f"train.steps={STEPS}",
            "--set",
            "logging.tensorboard=true",
            "--set",
            "logging.wandb=true",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    run = RunDir.find(out, "tiny-sd3")

    curves = _scalars(run.tracking_dir / "tensorboard" / "brightness")
    steps = [s for s, _ in curves["reward_mean"]]
    assert steps == list(range(1, CYCLES * STEPS + 1))  # one curve: cycle 2 continues where cycle 1 ended
    per_step = [
        json.loads(line)["reward_mean"]
        for c in range(1, CYCLES + 1)
        for line in run.metrics_path(c, "brightness").read_text().splitlines()
    ]
    assert [v for _, v in curves["reward_mean"]] == pytest.approx(per_step, rel=1e-6)

    merges = _scalars(run.tracking_dir / "tensorboard" / "merge")
    assert [s for s, _ in merges["update_norm"]] == [c * STEPS for c in range(1, CYCLES + 1)]
    assert all(v > 0 for _, v in merges["update_norm"]) and merges["weight/brightness"][0][1] == 1.0

    lineage = Lineage(run.tracking_dir, run.run_ts, "brightness")
    offline = sorted((run.tracking_dir / "wandb").glob(f"offline-run-*-{wandb_run_id(lineage)}"))
    assert len(offline) == CYCLES  # one offline segment per job, all of one W&B run id (wandb sync joins them)
    rows = [r for seg in offline for r in _wandb_history(next(seg.glob("run-*.wandb")))]
    assert [r["_step"] for r in rows] == steps
    assert {"reward_mean", "loss"} <= set(rows[0])


def test_a_missing_tracker_package_is_named_and_training_goes_on(tmp_path):
    code = (
        "import builtins, logging\nreal = builtins.__import__\n"
        "def fake(name, *a, **k):\n"
        "    if name in ('wandb', 'torch.utils.tensorboard'):\n        raise ImportError(name)\n"
        "    return real(name, *a, **k)\n"
        "builtins.__import__ = fake\n"
        "from mrlora.cli import setup_logging\nsetup_logging()\n"
        "from ml_collections import ConfigDict\nfrom pathlib import Path\n"
        "from mrlora.tracking import Lineage, open_tracker\n"
        f"t = open_tracker(ConfigDict({{'tensorboard': True, 'wandb': True, 'project': 'p'}}), "
        f"Lineage(Path({str(tmp_path)!r}), 'g', 'ocr'))\n"
        "t.log({'loss': 1.0}, 1)\nprint('enabled', t.enabled)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "enabled False" in proc.stdout
    assert "pip install 'mrlora[tensorboard]'" in proc.stderr and "pip install 'mrlora[wandb]'" in proc.stderr


def test_a_failing_tracker_is_dropped_not_fatal():
    class Broken:
        def log(self, metrics, step):
            raise OSError("disk full")

        def close(self):
            pass

    seen = []

    class Good:
        def log(self, metrics, step):
            seen.append((step, metrics))

        def close(self):
            pass

    tracker = Tracker(Lineage(Path("."), "g", "ocr", step_offset=10), [Broken(), Good()])
    tracker.log({"loss": 0.5, "note": "text", "flag": True}, 1)
    tracker.log({"loss": 0.25}, 2)
    assert seen == [(11, {"loss": 0.5}), (12, {"loss": 0.25})] and len(tracker.backends) == 1
