"""``python -m launch.mapreduce``: plan a MapReduce LoRA run, submit it, print how to watch it, and exit.

On a cluster the command never waits: it validates everything, creates the run directory, submits the first
window of cycles (the chain extends itself from the compute nodes), prints the job ids and returns. Where there
is no Slurm, the local executor runs the same plan in the foreground with a progress display.

Every input is checked before anything is created or submitted: an unknown model, reward or profile, a weights
count that does not match the rewards, an unwritable --out-root, a run owned by a live chain, or no Slurm with
``--executor slurm`` each end with one clear message and a non-zero exit, leaving no trace.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

from launch import runs, slurm
from launch.plan import MERGE, RATE, build_plan, format_plan, safe_name, submission_dependencies
from launch.preflight import absolute_paths, preflight
from launch.profiles import ClusterProfile, default_profile, load_profile
from launch.runs import LaunchError
from mrlora.cli import add_version_flag, run_cli
from mrlora.config import (
    apply_overrides,
    config_from_dict,
    config_sources,
    config_to_dict,
    format_config,
    load_config,
    validate,
)
from mrlora.memory_plan import format_plan_memory
from mrlora.runstore import RUN_NAME_RE, LeaseInfo, RunDir, is_run_ts, new_run_ts

DEFAULT_OUT_ROOT = "runs"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.mapreduce",
        description="Run MapReduce LoRA: per cycle, one expert per reward (a Slurm job array), then an exact merge. "
        "Submits and exits on Slurm; runs in the foreground with the local executor.",
        epilog="Example: python -m launch.mapreduce --model tiny-sd3 --cycles 2   (runs locally where there is no "
        "Slurm). Watch a cluster run with python -m launch.status RUN_TS --watch.",
    )
    p.add_argument(
        "--model",
        help="preset: sd35m, flux, tiny-sd3, tiny-flux, or a path to a config .py "
        "(required for a new run; picks the model directory on --resume)",
    )
    p.add_argument("--cycles", type=int, help="number of MapReduce cycles (default: the preset's)")
    p.add_argument("--rewards", nargs="+", metavar="REWARD", help="rewards to train one expert each for")
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="merge weights, one per reward, normalised to sum 1 (default: equal)",
    )
    p.add_argument("--merge-steps", type=int, metavar="N", help="optimizer steps per expert per cycle (train.steps)")
    p.add_argument(
        "--cluster",
        metavar="PROFILE",
        help="cluster profile: a name in configs/clusters/ or a .toml path (default: built-in 1-process)",
    )
    p.add_argument(
        "--mode",
        choices=("parallel", "sequential"),
        help="parallel: experts of a cycle run at once; sequential: one after the other (small allocations)",
    )
    p.add_argument(
        "--executor",
        choices=("slurm", "local", "auto"),
        help="slurm submits and exits; local runs here in the foreground; auto (default): slurm when "
        "squeue answers, else local",
    )
    p.add_argument(
        "--out-root",
        metavar="DIR",
        help=f"where runs live: DIR/<model>/<RUN_TS>/ (default: $MRLORA_OUT_ROOT or ./{DEFAULT_OUT_ROOT})",
    )
    p.add_argument(
        "--write-sbatch",
        metavar="DIR",
        help="write one plain sbatch script per job (the real job command, no pickles) and a submit.sh to "
        "DIR instead of submitting; with --dry-run only the scripts are written",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the plan and the sbatch text of each distinct job; submit and write nothing",
    )
    p.add_argument(
        "--print-config", action="store_true", help="print every config key with its value (after --set) and exit"
    )
    p.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="RUN_TS",
        help="continue a run (the newest one without RUN_TS) from its last completed cycle",
    )
    p.add_argument(
        "--adopt",
        action="store_true",
        help="with --resume: take over the run's jobs still in the queue instead of refusing",
    )
    p.add_argument(
        "--rate-after-cycle",
        dest="rate_after_cycles",
        nargs="+",
        type=int,
        metavar="C",
        help="after the experts of cycle C, distil each of them into a RaTE token (one job per reward, "
        "beside the chain: nothing waits for it); repeatable cycles, e.g. --rate-after-cycle 10 80. "
        "On --resume, adds to the run's cycles (mapreduce.rate_after_cycles)",
    )
    p.add_argument(
        "--name",
        metavar="NAME",
        help="part of a new run's id (RUN_TS becomes <start time>_NAME; letters, digits, '_', '.'); "
        "default: a short random suffix",
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.lr=1e-4 (repeatable); on --resume, the way to "
        "change the frozen config (recorded in run.json history)",
    )
    return p


def out_root_of(args) -> Path:
    return Path(args.out_root or os.environ.get("MRLORA_OUT_ROOT") or DEFAULT_OUT_ROOT).expanduser().resolve()


def resolve_executor(choice: str | None, profile: ClusterProfile, dry_run: bool = False) -> str:
    choice = choice or profile.executor
    if choice == "local":
        return "local"
    if choice == "auto":
        if slurm.have_slurm() and slurm.slurm_reachable() is None:
            return "slurm"
        return "local"
    if not slurm.have_slurm():
        if dry_run:
            return "slurm"
        raise LaunchError(
            "--executor slurm: sbatch/squeue not found on PATH. Run on a Slurm login node, or use "
            "--executor local to run here"
        )
    problem = None if dry_run else slurm.slurm_reachable()
    if problem:
        raise LaunchError(
            f"--executor slurm: Slurm does not answer ({problem}). Check SLURM_CONF / slurmctld, "
            "or use --executor local"
        )
    return "slurm"


def shortcut_overrides(args) -> list[str]:
    """The convenience flags as config overrides (--set values given later win)."""
    out = []
    if args.cycles is not None:
        out.append(f"mapreduce.cycles={args.cycles}")
    if args.rewards:
        out.append(f"rewards={list(args.rewards)!r}")  # equal weights unless given (config.apply_overrides)
    if args.weights:
        out.append(f"weights={[float(w) for w in args.weights]!r}")
    if args.merge_steps is not None:
        out.append(f"train.steps={args.merge_steps}")
    if args.mode:
        out.append(f"mapreduce.mode={args.mode}")
    if args.rate_after_cycles:
        out.append(f"mapreduce.rate_after_cycles={sorted(set(args.rate_after_cycles))!r}")
    return out


def add_rate_cycles(cfg, cycles: list[int] | None) -> None:
    """On resume: add ``--rate-after-cycle`` cycles to the run's (run.json files older than the field lack it)."""
    if not cycles:
        return
    with cfg.mapreduce.unlocked():
        cfg.mapreduce.rate_after_cycles = sorted(set(runs.rate_cycles_of(cfg)) | set(cycles))


def check_reward_names(names: list[str]) -> None:
    """Name an unknown --rewards entry before anything else complains about its missing prompts."""
    from rewards import available_rewards  # torch-free registry

    known = set(available_rewards())
    unknown = [n for n in names if n not in known and ":" not in n]
    if unknown:
        raise LaunchError(
            f"unknown reward(s) {', '.join(repr(n) for n in unknown)}; known rewards: "
            f"{', '.join(sorted(known))} (or package.module:factory for your own)"
        )


def _normalised_sbatch(text: str, run_ts: str) -> str:
    text = re.sub(rf"mrlora-{run_ts}-c\d+-", f"mrlora-{run_ts}-c*-", text)
    return re.sub(r"--dependency=\S+", "--dependency=...", text)


def print_dry_run(plan, profile: ClusterProfile, run_root: Path, executor: str, out=sys.stdout) -> None:
    from launch.submit import render_sbatch, submitit_folder

    out.write(format_plan(plan, profile) + "\n")
    if plan.complete:
        return
    out.write(f"\nexecutor: {executor}; run directory would be {run_root}\n")
    if executor == "local":
        out.write("the local executor runs these jobs here, one task at a time, in the order above\n")
        return
    seen: dict[str, list[str]] = {}
    texts: dict[str, str] = {}
    by_key = plan.by_key()
    for job in plan.jobs:
        # ids exist only for jobs submitted together (same window); earlier windows are finished by then
        placeholders = {key: f"<{key}>" for key in job.after if by_key[key].window == job.window}
        deps = submission_dependencies(job, placeholders)
        text = render_sbatch(job, plan.run_ts, profile, deps, submitit_folder(run_root))
        norm = _normalised_sbatch(text, plan.run_ts)
        seen.setdefault(norm, []).append(job.key)
        texts.setdefault(norm, text)
    out.write(
        f"\n{len(seen)} distinct sbatch file(s) (jobs differing only in cycle number and dependency ids share one):\n"
    )
    for norm, keys in seen.items():
        also = (
            f" (and {len(keys) - 1} more like it: {', '.join(keys[1:4])}{', ...' if len(keys) > 4 else ''})"
            if len(keys) > 1
            else ""
        )
        out.write(f"\n# ---- {keys[0]}{also}\n{texts[norm]}\n")


def _model_dir_name(cfg, model_arg: str) -> str:
    return safe_name(cfg.model.name or Path(model_arg).stem)


def _watch_hint(run: RunDir, out_root: Path) -> str:
    model = run.root.parent.name
    return (
        f"  status:  python -m launch.status {run.run_ts} --out-root {shlex.quote(str(out_root))} --model {model}"
        f" --watch\n"
        f"  queue:   squeue -u $USER -o '%.12i %.45j %.10T %r'\n"
        f"  cancel:  python -m launch.cancel {run.run_ts} --out-root {shlex.quote(str(out_root))} --model {model}\n"
        f"  resume:  python -m launch.mapreduce --resume {run.run_ts} --out-root {shlex.quote(str(out_root))} "
        f"--model {model}\n"
    )


def _execute(
    run: RunDir, plan, profile: ClusterProfile, executor: str, lease: LeaseInfo, cfg, out_root: Path, fresh: bool
) -> int:
    """Submit window 0 (Slurm) or run the whole plan here (local). The lease is ours on entry."""
    if plan.complete:
        run.release_lease(lease)
        print(f"run {run.run_ts}: all {plan.cycles} cycles are merged; nothing to do ({run.root})")
        return 0
    if executor == "slurm" and not plan.window(0):
        # --adopt of a run whose whole window is queued: at most one window is ever queued ahead, and the
        # window's last merge submits the next one (it reads the run's cycle count when it has finished)
        run.update_lease(lease)
        print(f"run directory: {run.root}")
        print(
            f"nothing new to submit: the queued jobs ({', '.join(lease.job_ids)}) cover the current window; "
            f"their last merge submits cycles up to {plan.cycles}"
        )
        print("watch it:")
        print(_watch_hint(run, out_root), end="")
        return 0
    if executor == "slurm":
        from launch.submit import submit_window

        try:
            ids = submit_window(run.root, plan, profile, lease.owner_id)
        except BaseException:
            run.release_lease(lease)
            if fresh:
                import shutil

                shutil.rmtree(run.root, ignore_errors=True)
            raise
        lease.job_ids = sorted(set(lease.job_ids) | set(ids.values()))
        run.update_lease(lease)
        window = plan.window(0)
        chain = [j for j in window if j.kind != RATE] or window
        rate_cycles = sorted({j.cycle for j in window if j.kind == RATE})
        print(f"run directory: {run.root}")
        print(
            f"submitted cycles {chain[0].cycle}..{chain[-1].cycle} of {plan.cycles} "
            f"({plan.mode}, {len(ids)} jobs"
            + (f"; RaTE after cycle(s) {', '.join(map(str, rate_cycles))}" if rate_cycles else "")
            + "):"
        )
        by_key = plan.by_key()
        for key, job_id in ids.items():
            print(f"  {job_id:>10}  {by_key[key].name(plan.run_ts)}")
        if plan.n_windows > 1:
            print(
                f"the last merge of each window submits the next {plan.window_cycles} cycle(s) itself "
                f"({plan.n_windows} windows in all)"
            )
        print("watch it:")
        print(_watch_hint(run, out_root), end="")
        return 0

    from launch.local import run_plan_locally
    from mrlora.config import config_for_reward

    steps = {r: config_for_reward(cfg, r).train.steps for r in cfg.rewards}
    rate_steps = {r: config_for_reward(cfg, r).rate.steps for r in cfg.rewards}
    print(f"run directory: {run.root}")
    n_tasks = sum(1 if job.kind == MERGE else len(job.rewards) for job in plan.jobs)
    print(
        f"running {max(0, plan.cycles - plan.first_cycle + 1)} cycle(s) locally ({n_tasks} tasks); "
        f"Ctrl-C checkpoints and stops"
    )
    try:
        rc = run_plan_locally(run, plan, steps, rate_steps_of=rate_steps)
    finally:
        run.release_lease(lease)
    if rc == 0:
        print(f"done: {run.root}")
        print(
            f"  status:  python -m launch.status {run.run_ts} --out-root {shlex.quote(str(out_root))} "
            f"--model {run.root.parent.name}"
        )
        suite = ",".join(cfg.rewards)
        evals = shlex.quote(str(run.evals_dir))
        print(
            f"  compare the base with the merged cycles on every reward (the trade-off the merge makes):\n"
            f"    python -m rewards.prompts --kind simple --n 8 --seed 1 --out {evals}/prompts.txt\n"
            f"    for c in $(seq 0 {plan.cycles}); do python -m eval.run --checkpoint "
            f"{shlex.quote(str(run.root))}:$c --suite {suite} --prompts {evals}/prompts.txt --out {evals}/c$c; "
            f"done\n"
            f"    python -m eval.report --inputs {evals}/c* --out {evals}/report"
        )
    if rc > 128:  # stopped by a signal (the worker checkpointed): 130 Ctrl-C, 143 SIGTERM, 129 SIGHUP
        return rc
    return 0 if rc == 0 else 1


def check_inputs(cfg, profile: ClusterProfile, executor: str, dry_run: bool) -> str:
    """``launch.preflight`` in the jobs' environment (on Slurm the profile's ``[env]``, e.g. ``HF_HUB_OFFLINE=1``;
    local tasks inherit ours). A problem stops a launch; a dry run shows the plan and returns the problem as a
    warning to print after it (the machine planning may not be the one that will launch)."""
    try:
        preflight(cfg, dict(profile.values["env"]) if executor == "slurm" else None)
    except LaunchError as exc:
        if not dry_run:
            raise
        return f"\nwarning: launching this for real would stop here: {exc}\n"
    return ""


def check_allocation(cfg, model_arg: str, cluster_given: bool, executor: str) -> None:
    """A model that needs GPUs, submitted to Slurm without ``--cluster``, would get the built-in profile's
    allocation (no GPU, one CPU): refuse instead of queueing a job that cannot train."""
    if executor == "slurm" and not cluster_given and not str(cfg.model.pretrained).startswith("tiny:"):
        raise LaunchError(
            f"--model {model_arg} trains on GPUs, but no --cluster was given: the built-in profile would ask Slurm "
            f"for 0 GPUs and 1 CPU per job. Pass --cluster example-gpu (or your own profile: a name in "
            f"configs/clusters/ or a .toml path), or --executor local to run here"
        )


def new_run(args, out_root: Path) -> int:
    if not args.model:
        raise LaunchError("--model is required for a new run (e.g. --model tiny-sd3); use --resume to continue one")
    if args.adopt:
        raise LaunchError("--adopt only makes sense with --resume")
    check_reward_names(args.rewards or [])
    if args.name is not None and not RUN_NAME_RE.fullmatch(args.name):
        raise LaunchError(
            f"--name {args.name!r}: use letters, digits, '_' and '.' (it becomes part of the run id "
            f"and of Slurm job names), e.g. --name lr3e4_seed1"
        )
    overrides = shortcut_overrides(args) + list(args.overrides)
    cfg = load_config(args.model, overrides)
    absolute_paths(cfg)  # run.json means the same files from any directory
    if args.print_config:
        print(format_config(cfg, config_sources(overrides)))
        return 0
    profile = load_profile(args.cluster) if args.cluster else default_profile()
    # --write-sbatch: Slurm scripts the user submits by hand, whether or not this machine reaches Slurm
    executor = "slurm" if args.write_sbatch else resolve_executor(args.executor, profile, dry_run=args.dry_run)
    check_allocation(cfg, args.model, bool(args.cluster), executor)
    problem = check_inputs(cfg, profile, executor, args.dry_run)
    runs.check_out_root(out_root)
    model_dir = _model_dir_name(cfg, args.model)
    run_ts = new_run_ts(name=args.name)
    plan = build_plan(
        run_ts=run_ts,
        rewards=list(cfg.rewards),
        cycles=cfg.mapreduce.cycles,
        profile=profile,
        mode=cfg.mapreduce.mode,
        rate_after_cycles=runs.rate_cycles_of(cfg),
    )
    if args.dry_run:
        print_dry_run(plan, profile, out_root / model_dir / run_ts, executor)
        print(format_plan_memory(cfg, plan.jobs))  # per-process weights + optimizer, from the config
        print(problem, end="")
        if args.write_sbatch:
            _write_sbatch(plan, profile, out_root / model_dir / run_ts, Path(args.write_sbatch), created=False)
        return 0
    run = RunDir.create(out_root, model_dir, run_ts if args.name is not None else None)  # a taken random id is redrawn
    try:
        if run.run_ts != run_ts:
            plan = build_plan(
                run_ts=run.run_ts,
                rewards=list(cfg.rewards),
                cycles=cfg.mapreduce.cycles,
                profile=profile,
                mode=cfg.mapreduce.mode,
                rate_after_cycles=runs.rate_cycles_of(cfg),
            )
        run.write_run_json(runs.new_run_json(run, model_dir, config_to_dict(cfg), profile, executor))
        lease = run.acquire_lease(LeaseInfo.new(executor, runs.command_line()), runs.lease_is_stale(run.run_ts))
    except BaseException:
        import shutil

        shutil.rmtree(run.root, ignore_errors=True)
        raise
    if args.write_sbatch:
        _write_sbatch(plan, profile, run.root, Path(args.write_sbatch), created=True)
        run.release_lease(lease)  # the user's own submissions own the run; --resume works as for any run
        return 0
    return _execute(run, plan, profile, executor, lease, cfg, out_root, fresh=True)


def _write_sbatch(plan, profile: ClusterProfile, run_root: Path, out: Path, created: bool) -> None:
    """``--write-sbatch DIR``: one readable sbatch script per job plus ``submit.sh``, instead of submitting."""
    from launch.submit import write_sbatch_scripts

    paths = write_sbatch_scripts(plan, profile, run_root, out)
    print(f"wrote {len(paths) - 1} sbatch script(s) and submit.sh to {out}")
    if created:
        print(
            f"run directory: {run_root}\nsubmit them all (in dependency order) with: bash {out / 'submit.sh'}\n"
            f"or one by one with sbatch; each script says which jobs it waits for"
        )
    else:
        print(
            f"(dry run: they refer to {run_root}, which was not created; drop --dry-run to create the run and "
            f"submit the scripts by hand)"
        )


def find_run(out_root: Path, model: str | None, run_ts: str | None) -> RunDir:
    """A run by timestamp (any model when --model is not given), or the newest run."""
    if model:
        return RunDir.find(out_root, model, run_ts)
    candidates = (
        sorted(
            (p for p in out_root.glob("*/*") if is_run_ts(p.name) and (p / "run.json").exists()),
            key=lambda p: p.name,
        )
        if out_root.is_dir()
        else []
    )
    if run_ts:
        candidates = [p for p in candidates if p.name == run_ts]
        if not candidates:
            raise LaunchError(f"no run {run_ts} under {out_root}; pass --out-root (and --model) where it lives")
        if len(candidates) > 1:
            raise LaunchError(
                f"run {run_ts} exists for several models ({', '.join(p.parent.name for p in candidates)}); pass --model"
            )
    if not candidates:
        raise LaunchError(f"no runs under {out_root}; start one with python -m launch.mapreduce --model ...")
    return RunDir(candidates[-1])


def resume_run(args, out_root: Path) -> int:
    given = [
        flag
        for flag, value in (
            ("--cycles", args.cycles),
            ("--rewards", args.rewards),
            ("--weights", args.weights),
            ("--merge-steps", args.merge_steps),
            ("--mode", args.mode),
        )
        if value
    ]
    if args.name is not None:
        given.append("--name")
    if given:
        raise LaunchError(
            f"{', '.join(given)} cannot be used with --resume: the run's frozen config is reused. Change a value "
            f"explicitly with --set (e.g. --set mapreduce.cycles=100); it is recorded in run.json history"
        )
    run = find_run(out_root, args.model, None if args.resume == "latest" else args.resume)
    meta = run.read_run_json()
    old = meta["config"]
    cfg = config_from_dict(old)
    apply_overrides(cfg, args.overrides)
    add_rate_cycles(cfg, args.rate_after_cycles)
    validate(cfg)
    absolute_paths(cfg, only=set(runs.config_changes(old, config_to_dict(cfg))))  # the values given now
    new = config_to_dict(cfg)
    changes = runs.config_changes(old, new)
    runs.check_resume_changes(changes, run, list(old["rewards"]))
    profile = runs.profile_of(meta)
    if args.cluster:
        chosen = load_profile(args.cluster)
        if chosen.to_dict() != meta["cluster"]:
            changes["cluster"] = [meta["cluster"].get("name"), chosen.name]
        profile = chosen
    executor = resolve_executor(args.executor, profile, dry_run=args.dry_run)

    holder = run.read_lease()
    queued = []
    if slurm.have_slurm() and slurm.slurm_reachable() is None:
        queued = slurm.run_jobs_in_queue(run.run_ts, set(holder.job_ids) if holder else set())
    if queued and not args.adopt:
        ids = ", ".join(sorted({j.job_id for j in queued}))
        raise LaunchError(
            f"run {run.run_ts} still has jobs in the queue: {ids}. Wait for them, cancel them with "
            f"`python -m launch.cancel {run.run_ts}`, or pass --adopt to take them over"
        )
    if queued and executor != "slurm":
        raise LaunchError("--adopt takes over Slurm jobs: use --executor slurm")
    live = runs.live_units(run, queued) if queued else {}
    rewards = list(cfg.rewards)
    plan = build_plan(
        run_ts=run.run_ts,
        rewards=rewards,
        cycles=cfg.mapreduce.cycles,
        profile=profile,
        mode=cfg.mapreduce.mode,
        progress=runs.progress_of(run, rewards, live),
        rate_after_cycles=runs.rate_cycles_of(cfg),
    )
    # what the remaining jobs read, e.g. a model path just fixed with --set model.pretrained=...
    problem = check_inputs(cfg, profile, executor, args.dry_run) if not plan.complete else ""
    if args.dry_run:
        if changes:
            print(f"changes to the frozen config: {changes}")
        print_dry_run(plan, profile, run.root, executor)
        print(format_plan_memory(cfg, plan.jobs))  # per-process weights + optimizer, from the config
        print(problem, end="")
        return 0

    info = LeaseInfo.new(executor, runs.command_line())
    if queued and holder is not None:
        # adopt: keep the chain's owner id, so its merge jobs still recognise the run as theirs
        info.owner_id = holder.owner_id
        info.job_ids = sorted({j.base_id for j in queued})
        run.update_lease(info)
    else:
        info.job_ids = sorted({j.base_id for j in queued})
        run.acquire_lease(info, runs.lease_is_stale(run.run_ts))
    meta["config"] = new
    meta["cluster"] = profile.to_dict()
    meta["executor"] = executor
    meta.setdefault("history", []).append(
        {
            "at": runs.now(),
            "command": runs.command_line(),
            "changes": changes,
            "action": "adopt" if queued else "resume",
            "from_cycle": plan.first_cycle,
        }
    )
    run.write_run_json(meta)
    print(
        f"resuming run {run.run_ts} from cycle {plan.first_cycle}"
        + (f" (adopting jobs {', '.join(info.job_ids)})" if queued else "")
        + (f"; config changes: {changes}" if changes else "")
    )
    return _execute(run, plan, profile, executor, info, cfg, out_root, fresh=False)


def main(argv: list[str] | None = None) -> int:
    """The command line: 0 on success, 2 with one error line for anything the user can fix (nothing is written),
    130 / 143 when interrupted (a local run's workers checkpoint first), 1 when a local job failed."""
    return run_cli(_main, argv, prog="launch.mapreduce")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    add_version_flag(parser)
    args = parser.parse_args(argv)
    out_root = out_root_of(args)
    if args.resume is not None:
        return resume_run(args, out_root)
    return new_run(args, out_root)


if __name__ == "__main__":
    sys.exit(main())
