"""What a submitted job runs: thin wrappers around the training and merge entry points.

The wrappers add what only the launcher knows about: requeueing a preempted expert (its own array task
``<array id>_<task>``, from rank 0 only, and only while the job is still RUNNING, so a user's ``scancel`` is
never undone), extending the chain with the next window after a merge, and releasing the run's lease after the
last merge. Heavy code (torch, diffusers) is imported inside the call, on the compute node.

The same wrappers run under the local executor, one subprocess per job:
``python -m launch.jobs expert RUN_ROOT CYCLE REWARD``, ``python -m launch.jobs merge RUN_ROOT CYCLE`` and
``python -m launch.jobs rate RUN_ROOT CYCLE REWARD`` (exit 0 done, 3 interrupted after a checkpoint, 1 failed).
A RaTE distillation is preempted and requeued exactly like an expert: it checkpoints on the signal and continues
from the checkpoint when the requeued task starts again.

``MRLORA_JOB_ENTRYPOINTS`` (internal, for tests of the launcher itself) names a module that provides
``train_expert_in_run``, ``merge_cycle_in_run``, ``distill_in_run`` and ``Preempted`` in place of mrlora.train /
mrlora.reduce / mrlora.rate.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from dataclasses import dataclass

from mrlora.cli import EXIT_INTERRUPTED, add_version_flag, setup_logging

ENTRYPOINTS_ENV = "MRLORA_JOB_ENTRYPOINTS"
# set by the local executor: the launcher's pid, so a worker stops (checkpoints) when its launcher dies
LAUNCHER_PID_ENV = "MRLORA_LAUNCHER_PID"


class JobFailed(RuntimeError):
    """A job that must fail (and take its dependents with it) instead of being requeued."""


def _entrypoint(module_name: str, function: str):
    """(``module_name.function``, the Preempted it raises), or the test module's (``MRLORA_JOB_ENTRYPOINTS``)."""
    override = os.environ.get(ENTRYPOINTS_ENV)
    module = importlib.import_module(override or module_name)
    if override:
        return getattr(module, function), module.Preempted
    from mrlora.training.errors import Preempted

    return getattr(module, function), Preempted


def _log(msg: str) -> None:
    print(f"[mrlora.launch] {msg}", flush=True)


def slurm_task_id() -> str | None:
    """This job's own Slurm id: ``<array id>_<task>`` inside an array, else the job id; None outside Slurm."""
    array_id, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_id and task:
        return f"{array_id}_{task}"
    return os.environ.get("SLURM_JOB_ID")


def handle_preemption(what: str, max_requeues: int) -> None:
    """After the expert checkpointed on a signal: requeue our own task on Slurm, or report an interruption."""
    job = slurm_task_id()
    if job is None:
        raise SystemExit(EXIT_INTERRUPTED)
    if int(os.environ.get("SLURM_PROCID", "0")) != 0:
        _log(f"{what}: checkpointed on signal; rank 0 decides about the requeue")
        raise SystemExit(0)
    from launch import slurm

    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)
    if restarts >= max_requeues:
        raise JobFailed(
            f"{what}: interrupted again after {restarts} requeues (limit {max_requeues}); "
            f"raise max_requeues in the cluster profile or a longer time_min, then --resume"
        )
    state = slurm.job_state(job)
    if state != "RUNNING":
        # scancel (CANCELLED) or the hard time limit: requeueing would undo the user's decision
        _log(f"{what}: checkpointed; job {job} is {state or 'gone'}, not requeueing")
        raise SystemExit(1)
    slurm.requeue(job)
    _log(f"{what}: checkpointed and requeued {job} (restart {restarts + 1}/{max_requeues})")
    raise SystemExit(0)


class _Rerunnable:
    def checkpoint(self, *args, **kwargs):
        """submitit's hook when USR2 arrives before the entry point installed its own handler: just run us again
        (entry points continue from the newest complete checkpoint, or find their marker and return)."""
        from submitit.helpers import DelayedSubmission

        return DelayedSubmission(self)


@dataclass
class _RequeueableTask(_Rerunnable):
    """One array task that checkpoints on a signal and is requeued (``handle_preemption``) to continue."""

    run_root: str
    cycle: int
    reward: str
    max_requeues: int = 20

    # set by subclasses (class attributes, not dataclass fields)
    label = ""
    module = ""
    function = ""

    def __call__(self) -> dict:
        setup_logging()
        run, preempted = _entrypoint(self.module, self.function)
        what = f"cycle {self.cycle} {self.label} {self.reward}"
        _log(f"{what}: starting in {self.run_root}")
        try:
            result = run(self.run_root, self.cycle, self.reward)
        except preempted:
            handle_preemption(what, self.max_requeues)
            raise
        _log(f"{what}: done")
        return result


@dataclass
class ExpertTask(_RequeueableTask):
    """Train the expert of ``reward`` in cycle ``cycle`` of the run at ``run_root`` (one array task)."""

    label = "expert"
    module = "mrlora.train"
    function = "train_expert_in_run"


@dataclass
class RateTask(_RequeueableTask):
    """Distil the expert of ``reward`` in cycle ``cycle`` into its RaTE token (one array task)."""

    label = "RaTE"
    module = "mrlora.rate"
    function = "distill_in_run"


@dataclass
class MergeTask(_Rerunnable):
    """Merge cycle ``cycle``; then, on Slurm, extend the chain or, after the run's last cycle, release the lease.

    Which of the two is decided when the merge has finished, from the run's config as it is *then* (the user
    may have raised ``mapreduce.cycles`` with ``--resume --adopt`` after this job was queued), never from flags
    frozen into the job at submission. Extending is idempotent: it submits nothing when the chain owning the
    run has already submitted the next cycle, so every merge but a window's last finds nothing to do
    (``launch.submit.extend_chain``).
    """

    run_root: str
    cycle: int
    owner_id: str = ""

    def __call__(self) -> dict:
        setup_logging()
        merge, _ = _entrypoint("mrlora.reduce", "merge_cycle_in_run")
        _log(f"cycle {self.cycle} merge: starting in {self.run_root}")
        marker = merge(self.run_root, self.cycle)
        _log(f"cycle {self.cycle} merge: done")
        try:
            from mrlora.tracking import log_merge

            log_merge(self.run_root, self.cycle)
        except Exception as exc:  # noqa: BLE001 - tracking is best-effort; the merge is done
            _log(f"cycle {self.cycle} merge: could not log it to the trackers ({type(exc).__name__}: {exc})")
        if int(os.environ.get("SLURM_PROCID", "0")) != 0 or slurm_task_id() is None:
            return marker
        from mrlora.config import config_from_dict
        from mrlora.runstore import RunDir

        run = RunDir(self.run_root)
        meta = run.read_run_json()
        cycles = int(config_from_dict(meta["config"]).mapreduce.cycles)
        if self.cycle < cycles:
            self._extend(run, meta)
            return marker
        lease = run.read_lease()
        if lease is not None and lease.owner_id == self.owner_id:
            run.release_lease(lease)
            _log("last cycle merged; released the run's lease")
        return marker

    def _extend(self, run, meta: dict) -> None:
        """Submit the next window unless the profile leaves that to the login node; never fail the merge.

        The next cycle's experts, when already queued, wait for this job with ``afterok``: a failure here after
        a complete merge (sbatch refused on compute nodes, Slurm briefly not answering) must not cancel them.
        """
        from launch.runs import profile_of, resume_command
        from launch.submit import extend_chain

        if profile_of(meta).chain_extension == "login-node":
            _log(
                f"cycle {self.cycle} merged; the profile extends the chain from the login node: "
                f"{resume_command(run)} --adopt"
            )
            return
        try:
            extend_chain(self.run_root, self.owner_id)
        except Exception as exc:  # noqa: BLE001 - see the docstring; the message says what to do
            _log(
                f"cycle {self.cycle} merged, but submitting the next cycles failed ({type(exc).__name__}: {exc}); "
                f"continue from the login node with: {resume_command(run)} --adopt"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m launch.jobs", description="Run one job of a MapReduce LoRA run (what the executors call)."
    )
    sub = parser.add_subparsers(dest="what", required=True)
    e = sub.add_parser("expert", help="train one expert of one cycle")
    e.add_argument("run_root")
    e.add_argument("cycle", type=int)
    e.add_argument("reward")
    m = sub.add_parser("merge", help="merge one cycle")
    m.add_argument("run_root")
    m.add_argument("cycle", type=int)
    r = sub.add_parser("rate", help="distil one expert of one cycle into its RaTE token")
    r.add_argument("run_root")
    r.add_argument("cycle", type=int)
    r.add_argument("reward")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    setup_logging()  # the job's log gets every library logger's lines (the merge logs what it merged)
    if os.environ.get(LAUNCHER_PID_ENV):
        from mrlora.training.signals import stop_when_parent_dies

        stop_when_parent_dies(int(os.environ[LAUNCHER_PID_ENV]))
    from mrlora.claim import ClaimHeldError

    try:
        if args.what == "expert":
            ExpertTask(args.run_root, args.cycle, args.reward)()
        elif args.what == "rate":
            RateTask(args.run_root, args.cycle, args.reward)()
        else:
            MergeTask(args.run_root, args.cycle)()
    except (JobFailed, ClaimHeldError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
