"""Submitting a plan's window to Slurm with submitit, and rendering the sbatch text it would submit.

One function (``sbatch_parameters``) turns a planned job into submitit parameters; ``render_sbatch`` feeds them
to submitit's own sbatch writer, so ``--dry-run`` and the golden files show byte for byte what a real
submission writes. Every job carries ``--kill-on-invalid-dep=yes`` (a failed parent cancels its dependents
instead of leaving them pending forever), ``--requeue`` and ``--open-mode=append`` (a requeued task appends to
its log), the pre-timeout signal, and its name and comment (``mrlora-<run_ts>-c0003-<role>``,
``mrlora:<run_ts>``) so status and cancel find exactly this run's jobs.

``extend_chain`` is what the last merge of a window runs on its compute node: it re-plans from the run
directory and submits the next window, so nothing needs to stay alive on the login node.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path

from launch import journal
from launch.plan import MERGE, RATE, Job, Plan, build_plan, job_key, job_prefix, run_comment, submission_dependencies
from launch.profiles import ClusterProfile, Resources

SUBMITIT_DIR = "slurm"


def submitit_folder(run_root: Path | str) -> Path:
    return Path(run_root) / "logs" / SUBMITIT_DIR


def _mem(gb: float) -> str:
    """--mem per node, as submitit writes it ("4GB", or MB for fractions)."""
    return f"{int(gb)}GB" if gb == int(gb) else f"{int(gb * 1024)}MB"


def sbatch_parameters(job: Job, run_ts: str, profile: ClusterProfile, dependencies: list[str]) -> dict:
    """submitit ``SlurmExecutor.update_parameters`` keywords for ``job`` (sbatch's names)."""
    params: dict = {
        "job_name": job.name(run_ts),
        # submitit's keywords are sbatch's flags with "_" for "-": the one rendering of the job's size
        **{flag.replace("-", "_"): value for flag, value in resource_flags(job.resources).items()},
        "signal_delay_s": profile.signal_delay_s,
        "comment": run_comment(run_ts),
        "wckey": "mrlora",
    }
    if profile.setup_lines:
        params["setup"] = profile.setup_lines
    if dependencies:
        params["dependency"] = "afterok:" + ":".join(dependencies)
    extra = {"kill-on-invalid-dep": "yes", "requeue": True}
    params["additional_parameters"] = extra
    return params


def resource_flags(res: Resources) -> dict[str, object]:
    """The ``#SBATCH`` flags (sbatch's spellings, in this order) that size and place a job: the one rendering
    of a ``Resources`` for every hand-readable script, the run's jobs (``--write-sbatch``) and eval's alike."""
    flags: dict[str, object] = {
        "nodes": res.nodes,
        "ntasks-per-node": res.procs_per_node,
        "cpus-per-task": res.cpus_per_task,
        "time": res.time_min,
    }
    if res.gpus_per_node:
        if res.gres_gpu:
            flags["gres"] = f"gpu:{res.gpus_per_node}"
        else:
            flags["gpus-per-node"] = res.gpus_per_node
    if res.mem_gb:
        flags["mem"] = _mem(res.mem_gb)
    for key in ("partition", "account", "qos"):
        if getattr(res, key):
            flags[key] = getattr(res, key)
    return flags


def submit_command(folder: Path | str, python: str | None = None) -> str:
    """The command submitit puts after srun (what every task runs)."""
    python = python or shlex.quote(sys.executable)
    return " ".join([python, "-u -m submitit.core._submit", shlex.quote(str(folder))])


def render_sbatch(
    job: Job,
    run_ts: str,
    profile: ClusterProfile,
    dependencies: list[str],
    folder: Path | str,
    python: str | None = None,
) -> str:
    """The sbatch file submitit writes for ``job``, rendered by submitit itself without submitting."""
    from submitit.slurm import slurm as submitit_slurm

    params = sbatch_parameters(job, run_ts, profile, dependencies)
    if job.array:
        params["map_count"] = len(job.rewards)
    return submitit_slurm._make_sbatch_string(command=submit_command(folder, python), folder=folder, **params)


def job_script(job: Job, run_ts: str, run_root: Path | str, profile: ClusterProfile, after: list[str]) -> str:
    """A plain sbatch script for ``job`` that a user can read and submit by hand (``--write-sbatch``).

    It asks Slurm for what the submitit path asks (``sbatch_parameters``: same resources, name, comment,
    kill-on-invalid-dep, requeue, pre-timeout signal), runs the profile's setup lines, then the job's real
    command: ``python -m launch.jobs expert|merge|rate RUN_ROOT CYCLE [REWARD]`` under ``srun`` (an array task
    picks its reward from ``SLURM_ARRAY_TASK_ID``). No pickles. ``after`` names the jobs it waits for; their ids
    exist only once those are submitted, so they are given on the command line (``submit.sh`` does it).
    """
    params = sbatch_parameters(job, run_ts, profile, [])
    logs = Path(run_root) / "logs" / "sbatch"
    pattern = "%x_%A_%a" if job.array else "%x_%j"
    lines = [
        "#!/bin/bash",
        f"# mrlora run {run_ts}: cycle {job.cycle} {job.role} "
        f"({'array: task i runs REWARDS[i]' if job.array else 'one job'})",
    ]
    if after:
        lines.append(
            f"# waits for: afterok:{':'.join(f'<job of {k}>' for k in after)}  (submit with "
            f"sbatch --dependency=afterok:<ids> {job.key}.sbatch; submit.sh does this)"
        )
    flags: dict[str, object] = {
        "job-name": params["job_name"],
        "comment": params["comment"],
        "wckey": params["wckey"],
        **resource_flags(job.resources),
    }
    if job.array:
        flags["array"] = f"0-{len(job.rewards) - 1}"
    flags.update(
        {
            "kill-on-invalid-dep": "yes",
            "signal": f"USR2@{profile.signal_delay_s}",
            "output": f"{logs}/{pattern}.out",
            "error": f"{logs}/{pattern}.err",
            "open-mode": "append",
        }
    )
    lines += [f"#SBATCH --{k}={v}" for k, v in flags.items()]
    lines += [
        "#SBATCH --requeue",
        "",
        "set -eo pipefail",
        *profile.setup_lines,
        'PYTHON="${MRLORA_PYTHON:-python}"  # the environment the setup lines activated',
    ]
    root = shlex.quote(str(run_root))
    if job.kind == MERGE:
        command = f'"$PYTHON" -u -m launch.jobs merge {root} {job.cycle}'
    else:
        verb = "rate" if job.kind == RATE else "expert"
        rewards = " ".join(shlex.quote(r) for r in job.rewards)
        lines.append(f"REWARDS=({rewards})")
        index = "${SLURM_ARRAY_TASK_ID:-0}" if job.array else "0"
        command = f'"$PYTHON" -u -m launch.jobs {verb} {root} {job.cycle} "${{REWARDS[{index}]}}"'
    lines.append(f"srun --unbuffered {command}")
    return "\n".join(lines) + "\n"


def write_sbatch_scripts(plan: Plan, profile: ClusterProfile, run_root: Path | str, out_dir: Path | str) -> list[Path]:
    """Write one sbatch script per job of ``plan`` plus ``submit.sh``, which submits them all in dependency
    order (each with ``--dependency=afterok:`` the ids sbatch returned for its parents). Returns the paths."""
    from mrlora.runstore import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if Path(run_root).is_dir():  # Slurm opens the log files before the job starts: the folder must exist
        (Path(run_root) / "logs" / "sbatch").mkdir(parents=True, exist_ok=True)
    written = []
    submit = [
        "#!/bin/bash",
        f"# Submit every job of run {plan.run_ts} ({len(plan.jobs)} jobs, cycles "
        f"{plan.first_cycle}..{plan.cycles}) in dependency order; prints each job id.",
        "set -euo pipefail",
        'cd "$(dirname "${BASH_SOURCE[0]}")"',
        "declare -A ID",
        'submit() { local key=$1; shift; ID[$key]=$(sbatch --parsable "$@" "$key.sbatch" | cut -d";" -f1); '
        'echo "$key ${ID[$key]}"; }',
    ]
    for job in plan.jobs:
        after = list(job.after)
        path = out / f"{job.key}.sbatch"
        atomic_write_text(path, job_script(job, plan.run_ts, run_root, profile, after))
        written.append(path)
        deps = [f"${{ID[{k}]}}" for k in after] + list(job.after_ids)
        dep = f" --dependency=afterok:{':'.join(deps)}" if deps else ""
        submit.append(f"submit {job.key}{dep}")
    atomic_write_text(out / "submit.sh", "\n".join(submit) + "\n")
    (out / "submit.sh").chmod(0o755)
    written.append(out / "submit.sh")
    return written


def job_callables(job: Job, run_root: str, owner_id: str, profile: ClusterProfile) -> list:
    """What each submission runs: one ExpertTask / RateTask per array task, or one MergeTask."""
    from launch.jobs import ExpertTask, MergeTask, RateTask

    if job.kind == MERGE:
        return [MergeTask(run_root, job.cycle, owner_id=owner_id)]
    if job.kind == RATE:
        return [RateTask(run_root, job.cycle, r, max_requeues=profile.max_requeues) for r in job.rewards]
    return [ExpertTask(run_root, job.cycle, r, max_requeues=profile.max_requeues) for r in job.rewards]


def make_executor(folder: Path, params: dict, max_requeues: int):
    import submitit

    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=max_requeues)
    executor.update_parameters(**params)
    return executor


@contextlib.contextmanager
def _environment(env: dict[str, str] | None):
    """Run sbatch with ``env`` as the process environment (submitit calls sbatch with os.environ)."""
    if env is None:
        yield
        return
    saved = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def submit_window(
    run_root: Path | str,
    plan: Plan,
    profile: ClusterProfile,
    owner_id: str,
    index: int = 0,
    env: dict[str, str] | None = None,
) -> dict[str, str]:
    """Submit window ``index`` of ``plan``; return {job key: Slurm job id}. All or nothing.

    If sbatch fails midway, the jobs already submitted for this window are cancelled before the error is
    raised, so a failed launch never leaves a partial chain behind.
    """
    from launch import slurm
    from mrlora.runstore import RunDir

    run = RunDir(run_root)
    folder = submitit_folder(run.root)
    folder.mkdir(parents=True, exist_ok=True)
    ids: dict[str, str] = {}
    try:
        with _environment(env):
            for job in plan.window(index):
                deps = submission_dependencies(job, ids)
                params = sbatch_parameters(job, plan.run_ts, profile, deps)
                executor = make_executor(folder, params, profile.max_requeues)
                calls = job_callables(job, str(run.root), owner_id, profile)
                if job.array:
                    with executor.batch():
                        submitted = [executor.submit(call) for call in calls]
                    job_id = submitted[0].job_id.split("_", 1)[0]
                else:
                    job_id = executor.submit(calls[0]).job_id
                ids[job.key] = job_id
                journal.write_record(
                    run,
                    journal.new_record(
                        job_id=job_id,
                        key=job.key,
                        name=job.name(plan.run_ts),
                        cycle=job.cycle,
                        kind=job.kind,
                        rewards=job.rewards,
                        array=job.array,
                        window=job.window,
                        after=deps,
                        log_dir=str(folder),
                    ),
                )
    except BaseException:
        if ids:
            with contextlib.suppress(Exception):
                slurm.scancel(list(ids.values()))
        raise
    return ids


def extend_chain(run_root: str, owner_id: str) -> dict[str, str]:
    """Submit the next window of a run from inside its chain (every merge job but the run's last calls this).

    Submits nothing when the chain that owns the run has already submitted the next cycle (the merge is not
    its window's last, a launcher adopted the run and submitted it, or the user cancelled those jobs on
    purpose), when jobs for the next cycle are queued (a requeued merge), or when another launcher owns the run.
    "Submitted by the owning chain" is a job record of that cycle whose id the lease lists: the lease holds the
    ids of the owner's newest submission, so records left by an earlier, failed attempt do not count.
    """
    from launch import runs, slurm
    from mrlora.config import config_from_dict
    from mrlora.runstore import RunDir

    run = RunDir(run_root)
    lease = run.read_lease()
    if lease is None or lease.owner_id != owner_id:
        print(
            f"[mrlora] not extending the chain of {run.root}: the run is now owned by "
            f"{lease.owner_id if lease else 'nobody'}",
            flush=True,
        )
        return {}
    meta = run.read_run_json()
    cfg = config_from_dict(meta["config"])
    profile = runs.profile_of(meta)
    progress = runs.progress_of(run, list(cfg.rewards))
    # RaTE jobs of cycles already merged were submitted with their own window (and may still be queued):
    # the chain only adds those of the cycles it is about to submit
    rate_cycles = [c for c in runs.rate_cycles_of(cfg) if c > progress.last_merged]
    plan = build_plan(
        run_ts=run.run_ts,
        rewards=list(cfg.rewards),
        cycles=cfg.mapreduce.cycles,
        profile=profile,
        mode=cfg.mapreduce.mode,
        progress=progress,
        rate_after_cycles=rate_cycles,
    )
    if plan.complete:
        return {}
    owned = set(lease.job_ids)
    submitted = [
        r.job_id
        for r in journal.read_records(run)
        if r.cycle == plan.first_cycle and r.kind != RATE and r.job_id in owned
    ]
    if submitted:
        return {}
    prefix = job_prefix(run.run_ts) + job_key(plan.first_cycle, "")
    already = [j.job_id for j in slurm.run_jobs_in_queue(run.run_ts) if j.name.startswith(prefix)]
    if already:
        print(f"[mrlora] cycle {plan.first_cycle} is already queued ({', '.join(already)}); not extending", flush=True)
        return {}
    ids = submit_window(run.root, plan, profile, owner_id, env=slurm.clean_submission_env())
    lease.job_ids = list(ids.values())
    run.update_lease(lease)
    print(
        f"[mrlora] submitted cycles {plan.first_cycle}..{max(j.cycle for j in plan.window(0))}: "
        f"{', '.join(f'{k}={v}' for k, v in ids.items())}",
        flush=True,
    )
    return ids
