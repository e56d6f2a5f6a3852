"""``launch.status --json`` for scripts and ``--all`` for the list of runs, read the way a user's script would."""

from __future__ import annotations

import json

from test_launch_logs import _cli, _local_run


def test_status_json_and_the_list_of_runs(tmp_path):
    run = _local_run(tmp_path)
    where = ["--out-root", str(tmp_path / "out")]
    proc = _cli("launch.status", run.run_ts, *where, "--json", "--no-slurm")
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["run"] == run.run_ts and data["finished"] and data["last_merged"] == data["cycles"] == 1
    cell = data["rows"]["1"]["brightness"]
    assert cell["state"] == "DONE" and cell["steps"] == "2/2"
    assert data["disk_bytes"]["experts"] > 0 and data["disk_bytes"]["updates"] > 0

    listing = _cli("launch.status", *where, "--all")
    assert listing.returncode == 0, listing.stderr
    row = next(line for line in listing.stdout.splitlines() if line.startswith(run.run_ts))
    assert row.split()[1:4] == ["tiny-sd3", "1/1", "local"] and row.endswith("finished")
    runs = json.loads(_cli("launch.status", *where, "--all", "--json").stdout)
    assert [r["run"] for r in runs] == [run.run_ts] and runs[0]["disk_bytes"] > 0
