"""RaTE jobs on the real local Slurm cluster: the RaTE array of cycle C starts only after every expert of cycle C
ended, the chain does not wait for it, and status shows its row (stand-in entry points keep it fast)."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from test_launch_slurm import REWARDS, cli, start, wait_until

from launch import slurm
from launch.journal import read_records
from launch.runs import rate_dir

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]


def spans(run) -> dict[tuple[int, str, str], tuple[dt.datetime, dt.datetime]]:
    """(cycle, kind, reward or "merge") -> (start, end) of the last allocation that ran it (from sacct)."""
    records = read_records(run)

    def accounted():
        acct = {a.job_id: a for a in slurm.sacct_jobs([r.job_id for r in records])}
        ran = [a for a in acct.values() if a.start not in ("", "Unknown", "None")]
        return acct if ran and all(a.end not in ("", "Unknown") for a in ran) else None

    acct = wait_until(accounted, 60, "sacct to record every job's end")
    out = {}
    for rec in records:
        units = [("merge", rec.job_id)] if rec.kind == "merge" else [(r, rec.task_id(r)) for r in rec.rewards]
        for unit, jid in units:
            a = acct.get(jid)
            if a is not None and a.start not in ("", "Unknown", "None"):
                out[(rec.cycle, rec.kind, unit)] = (
                    dt.datetime.fromisoformat(a.start),
                    dt.datetime.fromisoformat(a.end),
                )
    return out


def test_rate_array_waits_for_the_experts_of_its_cycle_and_runs_beside_the_chain(tmp_path, monkeypatch):
    monkeypatch.setenv("MRLORA_JOB_ENTRYPOINTS", "test_launch_fake_entrypoints")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(REPO / "tests"), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("FAKE_STEP_S", "0.5")
    # experts: 4 steps (~2 s); RaTE: 60 steps (~30 s), long enough for cycle 2 to start while it runs
    run = start(
        tmp_path, "--cycles", "2", "--rate-after-cycle", "1", "--set", "train.steps=4", "--set", "rate.steps=60", gpus=0
    )
    keys = [r.key for r in read_records(run)]
    assert keys == ["c0001-experts", "c0001-merge", "c0001-rate", "c0002-experts", "c0002-merge"], keys
    rate_rec = next(r for r in read_records(run) if r.key == "c0001-rate")
    assert rate_rec.array and rate_rec.rewards == tuple(REWARDS)
    assert rate_rec.name == f"mrlora-{run.run_ts}-c0001-rate"

    out_root = str(tmp_path / "out")
    rate_rows: list[str] = []

    def poll():
        text = cli("launch.status", run.run_ts, "--out-root", out_root).stdout
        rate_rows.extend(line for line in text.splitlines() if line.startswith(" RaTE "))
        return not slurm.run_jobs_in_queue(run.run_ts) and text

    final = wait_until(poll, 600, "the run and its RaTE jobs to finish", poll=2.0)
    assert any("RUNNING" in row for row in rate_rows), rate_rows
    assert "every RaTE token distilled" in final and "DONE 60/60" in final, final
    assert run.scan(REWARDS).last_complete_cycle == 2
    for r in REWARDS:
        assert (rate_dir(run, 1, r) / "DONE.json").exists() and (rate_dir(run, 1, r) / "token.safetensors").exists()
    s = spans(run)
    experts_end = max(s[(1, "expert", r)][1] for r in REWARDS)
    for r in REWARDS:
        assert s[(1, "rate", r)][0] >= experts_end, f"RaTE {r} started before the experts of cycle 1 ended"
    rate_end = max(s[(1, "rate", r)][1] for r in REWARDS)
    cycle2_start = min(s[(2, "expert", r)][0] for r in REWARDS)
    assert cycle2_start < rate_end, "cycle 2 waited for the RaTE jobs; nothing in the chain should"
