"""Project-wide pytest fixtures: the real local Slurm cluster.

Why a fixture that starts a real cluster: the launcher's job graph (arrays, afterok chains,
kill-on-invalid-dep, multi-node tasks, sacct states) is only tested honestly against real Slurm daemons.
``tests/cluster/slurm-up.sh`` starts one on this machine in a few seconds and is idempotent, so the
fixture simply runs it once per session.

How tests get the cluster
-------------------------
* Mark the test ``@pytest.mark.slurm``. An autouse fixture (``_slurm_for_marked_tests``) sees the marker
  and requests ``slurm_cluster`` for it, so a marked test never runs against a missing cluster.
* Or request ``slurm_cluster`` directly to use its helpers (``wait_for_job``, ``sacct``).

``slurm_cluster`` sets ``SLURM_CONF`` in ``os.environ`` for the rest of the session (sbatch, sacct and
submitit all read it) and leaves the cluster running afterwards: bringing it up again is cheap and a person
may be using it. Set ``MRLORA_SLURM_TEARDOWN=1`` to stop it when the session ends.

Skips and errors: starting the daemons needs root. As a non-root user the fixture uses a cluster that is
already running (someone ran ``sudo bash tests/cluster/slurm-up.sh``), otherwise the test is skipped with
that instruction. As root, a failing slurm-up.sh is an error, never a skip.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest
from prerequisites import missing_prerequisite

# Session fixtures for the tiny models (tiny_sd3_dir, tiny_flux_dir) live in their own module.
pytest_plugins = ["fixtures_models"]

REPO_ROOT = Path(__file__).resolve().parents[1]
CLUSTER_SCRIPTS = REPO_ROOT / "tests" / "cluster"
DEFAULT_SLURM_HOME = Path("/var/tmp/mrlora-slurm")

# sacct states after which a job will not run again by itself (requeued jobs go back to PENDING).
TERMINAL_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "REVOKED",
        "TIMEOUT",
    }
)


@dataclass(frozen=True)
class SacctRecord:
    """One allocation line of ``sacct -X`` (a job, or one task of a job array)."""

    job_id: str
    state: str
    start: datetime | None
    end: datetime | None
    exit_code: str
    node_list: str

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES and "[" not in self.job_id


def _parse_time(text: str) -> datetime | None:
    if text in ("", "None", "Unknown"):
        return None
    return datetime.fromisoformat(text)


@dataclass(frozen=True)
class SlurmCluster:
    """The running local cluster: where its files are, and sacct helpers for tests."""

    home: Path
    conf: Path

    @property
    def log_dir(self) -> Path:
        return self.home / "log"

    def sacct(self, job_id: str) -> dict[str, SacctRecord]:
        """Allocation records of ``job_id`` keyed by job id (``<array>_<task>`` for array tasks).

        A pending array not yet split into tasks appears as one ``<array>_[0-2]`` record.
        """
        proc = subprocess.run(
            [
                "sacct",
                "-X",
                "-n",
                "-P",
                "-j",
                str(job_id),
                "-o",
                "JobID,State,Start,End,ExitCode,NodeList",
            ],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "SLURM_CONF": str(self.conf)},
        )
        if proc.returncode != 0:
            raise RuntimeError(
                f"sacct -j {job_id} failed ({proc.returncode}): {proc.stderr.strip()}; see {self.log_dir}/slurmdbd.log"
            )
        records: dict[str, SacctRecord] = {}
        for line in proc.stdout.splitlines():
            if not line.strip():
                continue
            jid, state, start, end, exit_code, nodes = line.split("|")
            records[jid] = SacctRecord(
                job_id=jid,
                # "CANCELLED by 0" -> "CANCELLED"
                state=state.split()[0] if state else "",
                start=_parse_time(start),
                end=_parse_time(end),
                exit_code=exit_code,
                node_list=nodes,
            )
        return records

    def wait_for_job(
        self, job_id: str, timeout: float = 60.0, array_size: int | None = None, poll: float = 0.5
    ) -> dict[str, SacctRecord]:
        """Poll sacct until the job, or all ``array_size`` tasks of a job array, are in a terminal state.

        ``array_size`` is required for arrays: slurmdbd learns of array tasks seconds after they run, and
        meanwhile reports the array's last task under the bare array id. Raises ``TimeoutError`` naming
        the states seen last, so a stuck test says why.
        """
        job_id = str(job_id)
        if array_size is None:
            expected = {job_id}
        else:
            expected = {f"{job_id}_{i}" for i in range(array_size)}
        deadline = time.monotonic() + timeout
        while True:
            records = self.sacct(job_id)
            if expected <= records.keys() and all(records[j].terminal for j in expected):
                return {j: records[j] for j in sorted(expected)}
            if time.monotonic() >= deadline:
                seen = {jid: r.state for jid, r in records.items()} or "no sacct record"
                raise TimeoutError(
                    f"job {job_id} not finished after {timeout:.0f} s (waiting for {sorted(expected)}; "
                    f"sacct shows {seen}); see `squeue` and {self.log_dir}/slurmctld.log"
                )
            time.sleep(poll)


def _slurm_home() -> Path:
    return Path(os.environ.get("MRLORA_SLURM_HOME", str(DEFAULT_SLURM_HOME)))


def _cluster_answers(conf: Path) -> bool:
    if not conf.is_file() or shutil.which("scontrol") is None:
        return False
    proc = subprocess.run(
        ["scontrol", "ping"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "SLURM_CONF": str(conf)},
    )
    return proc.returncode == 0 and "UP" in proc.stdout


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """Start (or confirm) the local Slurm cluster once per session; see the module docstring."""
    home = _slurm_home()
    conf = home / "etc" / "slurm.conf"
    if platform.system() != "Linux" or shutil.which("bash") is None:
        missing_prerequisite(f"the local Slurm cluster needs Linux and bash (this is {platform.system()})")
    if os.geteuid() != 0:
        if not _cluster_answers(conf):
            missing_prerequisite(
                "the local Slurm cluster is not running and starting it needs root: "
                "run `sudo bash tests/cluster/slurm-up.sh`"
            )
    else:
        proc = subprocess.run(
            ["bash", str(CLUSTER_SCRIPTS / "slurm-up.sh")],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=900,
        )
        if proc.returncode != 0:
            pytest.fail(
                f"tests/cluster/slurm-up.sh failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}",
                pytrace=False,
            )
    previous = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(conf)
    yield SlurmCluster(home=home, conf=conf)
    if os.environ.get("MRLORA_SLURM_TEARDOWN") == "1" and os.geteuid() == 0:
        subprocess.run(["bash", str(CLUSTER_SCRIPTS / "slurm-down.sh")], stdin=subprocess.DEVNULL, check=False)
    if previous is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = previous


@pytest.fixture(autouse=True)
def _slurm_for_marked_tests(request: pytest.FixtureRequest) -> None:
    """Give every ``@pytest.mark.slurm`` test the running cluster (or its skip/error)."""
    if request.node.get_closest_marker("slurm") is not None:
        request.getfixturevalue("slurm_cluster")
