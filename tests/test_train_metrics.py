"""metrics.jsonl: one appended line per step; a resumed job first trims it back to its checkpoint's step."""

from __future__ import annotations

import json

from mrlora.training.metrics import MetricsLog


def _steps(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_resume_trims_later_steps_and_a_torn_line_then_appends(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 0.1 * s}) + "\n" for s in (1, 2, 3)) + '{"step": 4, "lo')
    log = MetricsLog(path, resume_step=2, enabled=True)
    assert [r["step"] for r in log.records] == [1, 2]
    assert _steps(path) == [1, 2]  # trimmed before the first new step is logged
    inode = path.stat().st_ino
    for step in (3, 4):
        log.log({"step": step, "loss": 1.0})
        assert _steps(path) == list(range(1, step + 1))
    assert path.stat().st_ino == inode  # appended in place, not rewritten each step
    log.close()
    assert [r["step"] for r in log.records] == [1, 2, 3, 4]


def test_disabled_log_writes_nothing(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl", resume_step=0, enabled=False)
    log.log({"step": 1})
    log.close()
    assert not (tmp_path / "metrics.jsonl").exists()
