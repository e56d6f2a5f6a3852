"""The local executor: the same plan, run on this machine in dependency order, with a progress display.

Where there is no Slurm (a laptop, CI, this machine), ``python -m launch.mapreduce`` runs the plan in the
foreground: one subprocess per task (``python -m launch.jobs ...``), exactly the job wrappers a cluster runs, so
the run directory has the same layout and ``--resume`` / ``launch.status`` work the same way. Tasks run one at a
time: the tiny presets fill a small machine with one process, and a failure stops the chain like
``kill-on-invalid-dep`` does on Slurm. RaTE tasks run right after their cycle's merge; as on Slurm nothing
depends on them, so a failed RaTE task is reported and the chain goes on (the run then exits non-zero). Ctrl-C,
SIGTERM (``kill``, ``launch.cancel``) or SIGHUP ask the running task to checkpoint, wait for it, and exit 130 / 143 /
129 (``Supervisor``); a worker whose launcher dies stops too. Resume with ``--resume``.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TextIO

from launch.jobs import EXIT_INTERRUPTED, LAUNCHER_PID_ENV
from launch.plan import MERGE, RATE, Plan
from launch.runs import rate_dir, resume_command
from mrlora.runstore import RunDir

LOCAL_LOG_DIR = "local"


@dataclass(frozen=True)
class LocalTask:
    key: str
    cycle: int
    kind: str
    reward: str | None
    argv: tuple[str, ...]

    @property
    def label(self) -> str:
        if self.kind == MERGE:
            return f"cycle {self.cycle} merge"
        return f"cycle {self.cycle} {'RaTE ' if self.kind == RATE else ''}{self.reward}"


def local_tasks(plan: Plan, run_root: str) -> list[LocalTask]:
    tasks = []
    for job in plan.topological():
        if job.kind == MERGE:
            tasks.append(LocalTask(job.key, job.cycle, MERGE, None, ("merge", run_root, str(job.cycle))))
        else:
            verb = "rate" if job.kind == RATE else "expert"
            for r in job.rewards:
                key = job.key if not job.array else f"{job.key}-{r}"
                tasks.append(LocalTask(key, job.cycle, job.kind, r, (verb, run_root, str(job.cycle), r)))
    return tasks


def log_path(run: RunDir, task_key: str) -> Path:
    return run.logs_dir / LOCAL_LOG_DIR / f"{task_key}.log"


def metrics_tail(run: RunDir, cycle: int, reward: str, kind: str = "expert") -> tuple[int, dict]:
    """(steps logged, the newest metrics line) of an expert or (``kind`` "rate") a RaTE distillation."""
    path = rate_dir(run, cycle, reward) / "metrics.jsonl" if kind == RATE else run.metrics_path(cycle, reward)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return 0, {}
    last = {}
    for line in reversed(lines):
        try:
            last = json.loads(line)
            break
        except ValueError:
            continue
    return sum(1 for line in lines if line.strip()), last


def reward_trend(run: RunDir, cycle: int, reward: str) -> tuple[float, float] | None:
    """(first, last) ``reward_mean`` of an expert's metrics, or None before its first step."""
    values = []
    try:
        lines = run.metrics_path(cycle, reward).read_text(encoding="utf-8").splitlines()
    except OSError:
        return None
    for line in lines:
        try:
            value = json.loads(line).get("reward_mean")
        except ValueError:
            continue
        if isinstance(value, (int, float)):
            values.append(float(value))
    return (values[0], values[-1]) if values else None


def _expert_grid(plan: Plan) -> tuple[list[str], list[int]]:
    """(rewards in plan order, cycles) of the plan's expert tasks: the rows and columns of the summary tables."""
    rewards = list(dict.fromkeys(r for job in plan.jobs if job.kind == "expert" for r in job.rewards))
    return rewards, sorted({job.cycle for job in plan.jobs if job.kind == "expert"})


def trend_table(run: RunDir, plan: Plan) -> str:
    """Cycles x rewards: each expert's reward mean at its first and last step, for the end-of-run summary."""
    rewards, cycles = _expert_grid(plan)
    if not rewards:
        return ""
    width = max(22, *(len(r) + 2 for r in rewards))
    lines = [
        "reward mean of each expert, first step -> last step:",
        "cycle " + "".join(f"{r:>{width}}" for r in rewards),
    ]
    for c in cycles:
        cells = []
        for r in rewards:
            trend = reward_trend(run, c, r)
            cells.append(f"{trend[0]:.4g} -> {trend[1]:.4g}" if trend else "-")
        lines.append(f"{c:>5} " + "".join(f"{cell:>{width}}" for cell in cells))
    return "\n".join(lines) + "\n"


def _merge_is_exact(run: RunDir, cycle: int) -> bool:
    try:
        return json.loads((run.merged_dir(cycle) / "update.json").read_text(encoding="utf-8")).get("exact") is True
    except (OSError, ValueError, AttributeError):
        return False


def merge_table(run: RunDir, plan: Plan) -> str:
    """Rewards x the model each cycle started from: the base, then the merge of the cycle before.

    Why: an expert's first step samples from the model its cycle starts from (its LoRA starts at zero), so its
    first ``reward_mean`` scores that model on the expert's reward, at no extra cost. Read down a column to see
    what each merge did to one reward: the trade-off the Reduce step makes. Only exact merges are listed; in
    reference mode an expert continues from its own adapter, so its first step does not score the merge. The
    last merge is not sampled by any expert (``eval.run`` scores it).
    """
    rewards, cycles = _expert_grid(plan)
    rows = []
    for c in cycles:
        if c > 1 and not _merge_is_exact(run, c - 1):
            continue
        trends = [reward_trend(run, c, r) for r in rewards]
        if any(trends):
            rows.append(
                ("base" if c == 1 else f"merge of cycle {c - 1}", [f"{t[0]:.4g}" if t else "-" for t in trends])
            )
    if len(rows) < 2:
        return ""
    width = max(22, *(len(r) + 2 for r in rewards))
    label = max(len(name) for name, _ in rows)
    lines = [
        "reward mean of the model each cycle starts from (its experts' first step), what each merge traded:",
        f"{'model':<{label}}" + "".join(f"{r:>{width}}" for r in rewards),
    ]
    lines += [f"{name:<{label}}" + "".join(f"{cell:>{width}}" for cell in cells) for name, cells in rows]
    return "\n".join(lines) + "\n"


def reward_keys(metrics: dict) -> list[str]:
    """The numeric keys of one metrics line named like reward*, the *mean* ones first."""
    keys = [k for k in metrics if "reward" in k.lower() and isinstance(metrics[k], (int, float))]
    return sorted(keys, key=lambda k: (0 if "mean" in k else 1, k))


def reward_summary(metrics: dict) -> str:
    """The reward means of one metrics line, as "reward_mean=0.512 ..." (at most two keys)."""
    return " ".join(f"{k}={metrics[k]:.4g}" for k in reward_keys(metrics)[:2])


def _child_env() -> dict:
    """This process's environment without Slurm's variables (a local task is a single process), plus our pid so
    the worker stops when this launcher dies (``mrlora.training.signals.stop_when_parent_dies``)."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    env[LAUNCHER_PID_ENV] = str(os.getpid())
    return env


# What stops a local run: Ctrl-C, kill / launch.cancel, a closed terminal. Exit 128 + the signal's number.
SUPERVISED_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Supervisor:
    """Turns SIGINT/SIGTERM/SIGHUP to the launcher into "checkpoint and stop" for the running worker.

    Why: each worker runs in its own process group (a terminal's Ctrl-C or SIGHUP would otherwise hit it
    directly, mid-step), so the launcher is the one place stops arrive. The first signal sends SIGTERM to the
    worker's whole group (the training job's stop signal: finish the round, checkpoint, exit) and the launcher
    keeps waiting for it, so no worker outlives a stopped launcher and a following ``--resume`` is the only
    writer. A second signal kills the group at once (the round in progress is lost, the last checkpoint is not).
    The handlers only record and forward; the loop prints.
    """

    def __init__(self):
        self.signum: int | None = None
        self.forced = False
        self.worker: subprocess.Popen | None = None
        self._previous: dict[int, Any] = {}  # what signal.signal returned: a handler, SIG_DFL or SIG_IGN

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum
            self._signal_worker(signal.SIGTERM)
        else:
            self.forced = True
            self._signal_worker(signal.SIGKILL)

    def _signal_worker(self, sig: int) -> None:
        import os

        if self.worker is not None and self.worker.poll() is None:
            try:
                os.killpg(self.worker.pid, sig)  # its own group (start_new_session): the worker and its children
            except ProcessLookupError:
                pass

    def __enter__(self) -> "Supervisor":
        for sig in SUPERVISED_SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._signal_worker(signal.SIGKILL)  # never leave a worker behind, whatever ended the loop

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or 0)

    def start(self, python_args: list[str], log: IO) -> subprocess.Popen:
        """Start ``python -u <python_args>`` as the supervised worker (its own session, output to ``log``)."""
        self.worker = proc = subprocess.Popen(
            [sys.executable, "-u", *python_args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=_child_env(),
            start_new_session=True,
        )
        if self.signum is not None:  # a signal between the caller's last check and Popen
            self._signal_worker(signal.SIGTERM)
        return proc


def run_supervised(steps: list[tuple[str, list[str], Path]], out: TextIO, continue_hint: str) -> int:
    """Run ``(label, python_args, log)`` steps one after another here, each a supervised worker (see
    ``Supervisor``): the local executor of work that is not a run's plan (an eval's shards, then its
    aggregation). Returns 0, the first failing exit code (after naming its log), or 128 + the stop signal."""
    with Supervisor() as supervisor:
        for n, (label, python_args, log) in enumerate(steps, 1):
            if supervisor.signum is not None:
                break
            prefix = f"[{n}/{len(steps)}] {label}"
            out.write(f"{prefix}: running (log {log})\n")
            out.flush()
            t0 = time.monotonic()
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as fh:
                fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(python_args)}\n")
                fh.flush()
                proc = supervisor.start(python_args, fh)
                rc = proc.wait()
                supervisor.worker = None
            if supervisor.signum is not None:
                break
            if rc != 0:
                out.write(f"{prefix}: FAILED (exit {rc}); read the log: {log}\n")
                return rc
            out.write(f"{prefix}: done in {time.monotonic() - t0:.1f} s\n")
        else:
            return 0
    out.write(f"stopped by {signal.Signals(supervisor.signum or 0).name}. Continue with: {continue_hint}\n")
    out.flush()
    return supervisor.exit_code


def run_plan_locally(
    run: RunDir,
    plan: Plan,
    steps_of: dict[str, int],
    out: TextIO = sys.stdout,
    poll_s: float = 0.5,
    rate_steps_of: dict[str, int] | None = None,
) -> int:
    """Run every task of ``plan`` in order; return 0 when all finished, else the failing exit code.

    ``steps_of`` / ``rate_steps_of`` map reward -> optimizer steps of its expert / RaTE distillation (for the
    progress display). A failed RaTE task does not stop the chain; it makes the return code non-zero. A stop
    signal (see ``Supervisor``) returns 128 + its number (130 Ctrl-C, 143 SIGTERM, 129 SIGHUP) once the running
    worker has checkpointed and exited.
    """
    with Supervisor() as supervisor:
        return _run_tasks(run, plan, steps_of, out, poll_s, rate_steps_of or {}, supervisor)


def _stopped(run: RunDir, supervisor: Supervisor, out: TextIO, prefix: str = "") -> int:
    name = signal.Signals(supervisor.signum or 0).name
    out.write(
        f"\n{prefix + ': ' if prefix else ''}stopped by {name}"
        f"{' (killed: the round in progress is lost, the last checkpoint is kept)' if supervisor.forced else ''}"
        f". Continue with: {resume_command(run)}\n"
    )
    out.flush()
    return supervisor.exit_code


def _run_tasks(
    run: RunDir,
    plan: Plan,
    steps_of: dict[str, int],
    out: TextIO,
    poll_s: float,
    rate_steps_of: dict[str, int],
    supervisor: Supervisor,
) -> int:
    rate_failures: list[tuple[LocalTask, Path, int]] = []
    tasks = local_tasks(plan, str(run.root))
    (run.logs_dir / LOCAL_LOG_DIR).mkdir(parents=True, exist_ok=True)
    tty = out.isatty()
    t_run = time.monotonic()
    for n, task in enumerate(tasks, 1):
        if supervisor.signum is not None:
            return _stopped(run, supervisor, out)
        log = log_path(run, task.key)
        prefix = f"[{n}/{len(tasks)}] {task.label}"
        out.write(f"{prefix}: running (log {log})\n" if not tty else f"{prefix}: starting")
        out.flush()
        t0 = time.monotonic()
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(task.argv)}\n")
            fh.flush()
            proc = supervisor.start(["-m", "launch.jobs", *task.argv], fh)
            last_shown, announced = None, False
            while proc.poll() is None:
                time.sleep(poll_s)
                if supervisor.signum is not None:
                    if not announced:
                        announced = True
                        out.write(
                            f"\n{prefix}: {signal.Signals(supervisor.signum).name}: asking it to checkpoint "
                            f"and stop (signal again to kill it at once)...\n"
                        )
                        out.flush()
                    continue
                if task.kind != MERGE and task.reward is not None:
                    done, metrics = metrics_tail(run, task.cycle, task.reward, task.kind)
                    total = (rate_steps_of if task.kind == RATE else steps_of).get(task.reward, "?")
                    shown = (done, reward_summary(metrics) if task.kind != RATE else "")
                    if shown != last_shown:
                        last_shown = shown
                        line = f"{prefix}: step {done}/{total} {shown[1]}".rstrip()
                        out.write(f"\r\033[K{line}" if tty else f"{line}\n")
                        out.flush()
            supervisor.worker = None
        if supervisor.signum is not None:
            return _stopped(run, supervisor, out, prefix)
        rc = proc.returncode
        elapsed = time.monotonic() - t0
        status = (
            "done" if rc == 0 else ("interrupted (checkpointed)" if rc == EXIT_INTERRUPTED else f"FAILED (exit {rc})")
        )
        extra = ""
        if task.kind == "expert" and rc == 0 and task.reward is not None:
            done, _ = metrics_tail(run, task.cycle, task.reward)
            trend = reward_trend(run, task.cycle, task.reward)
            extra = f", {done} steps" + (f", reward_mean {trend[0]:.4g} -> {trend[1]:.4g}" if trend else "")
        elif task.kind == RATE and rc == 0 and task.reward is not None:
            extra = f", token {rate_dir(run, task.cycle, task.reward) / 'token.safetensors'}"
        out.write(f"{chr(13) + chr(27) + '[K' if tty else ''}{prefix}: {status} in {elapsed:.1f} s{extra}\n")
        out.flush()
        if rc != 0 and task.kind == RATE and rc != EXIT_INTERRUPTED:
            out.write(f"read the log: {log} (the chain goes on: nothing depends on a RaTE token)\n")
            rate_failures.append((task, log, rc))
            continue
        if rc != 0:
            out.write(f"read the log: {log}\n")
            return rc
    if rate_failures:
        out.write(
            f"{len(tasks) - len(rate_failures)} of {len(tasks)} tasks finished in "
            f"{time.monotonic() - t_run:.1f} s; failed RaTE task(s): "
            f"{', '.join(t.label for t, _, _ in rate_failures)}. Fix the cause in their logs, then run "
            f"{resume_command(run)}\n"
        )
        out.write(trend_table(run, plan) + merge_table(run, plan))
        return rate_failures[0][2]
    out.write(f"all {len(tasks)} tasks finished in {time.monotonic() - t_run:.1f} s\n")
    out.write(trend_table(run, plan) + merge_table(run, plan))
    return 0
