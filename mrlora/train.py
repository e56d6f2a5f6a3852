"""Train one Flow-GRPO LoRA expert: the Map step's job entry point (standalone or inside a MapReduce run).

Standalone, on any base model::

    python -m mrlora.train --model tiny-sd3 --reward brightness --base tiny:sd3 --out /tmp/expert --steps 6

Inside a run (what Slurm array tasks and the local executor run; also ``train_expert_in_run``)::

    python -m mrlora.train --run OUT_ROOT/tiny-sd3/20261123_101500 --cycle 1 --reward brightness

Distributed: start one process per GPU with ``srun`` (Slurm variables are read) or ``torchrun``; a plain
``python`` is a single process. Re-running the same command continues from the newest complete checkpoint and
stops at the same step count; an expert whose DONE.json exists returns at once. On SIGUSR2/SIGTERM the job
finishes the current sampling round (``train.updates_per_round`` optimizer steps), writes a checkpoint and raises
:class:`Preempted` (exit code 3 on the CLI).

Heavy imports (torch, diffusers) happen inside the functions, so ``--help`` answers instantly.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mrlora.cli import EXIT_INTERRUPTED, add_version_flag, run_cli
from mrlora.training.errors import Preempted, TrainError

__all__ = ["Preempted", "TrainError", "train_expert_in_run", "train_expert_standalone", "main"]


def train_expert_in_run(run_root: str, cycle: int, reward: str) -> dict:
    """Train expert ``reward`` of ``cycle`` in the run at ``run_root``; return its DONE.json content.

    The base is base_0 plus the merged updates of cycles < ``cycle`` and the LoRA starts fresh; in
    ``mapreduce.merge_mode="reference"`` the LoRA instead continues the previous merge's averaged adapter, on the
    base without that merge's update (``mrlora.reduce.map_start``). The config is run.json's with
    ``per_reward[reward]`` applied. Continues from the newest complete checkpoint; returns at once if DONE exists.
    """
    from mrlora.config import config_from_dict, run_reward_config
    from mrlora.reduce import map_start
    from mrlora.runstore import RunDir
    from mrlora.tracking import expert_lineage
    from mrlora.training.data import salt_for
    from mrlora.training.loop import ExpertJob, train_expert

    run = RunDir(run_root)
    cycle = int(cycle)
    done = run.expert_done(cycle, reward)
    if done is not None:
        return done
    run_config = run.read_run_json()["config"]
    cfg = run_reward_config(run_config, reward)
    start = map_start(run.root, cycle)
    extra = {"cycle": cycle, "run": run.run_ts}
    if start.init_adapter is not None:
        extra["init_adapter"] = str(Path(start.init_adapter).relative_to(run.root))
    job = ExpertJob(
        cfg=cfg,
        reward=reward,
        out_dir=run.expert_dir(cycle, reward),
        base_spec=cfg.model.pretrained,
        base_id=cfg.model.pretrained,
        prior_updates=list(start.update_dirs),
        start_base=start.base.base_dir,
        init_adapter=start.init_adapter,
        seed_salt=salt_for(reward, cycle),
        extra_done=extra,
        tracking=expert_lineage(run.root, cycle, reward, config_from_dict(run_config)),
    )
    return train_expert(job)


def train_expert_standalone(
    preset: str,
    reward: str,
    base: str,
    out: str,
    steps: int | None = None,
    prior_updates: list[str] | None = None,
    overrides: list[str] | None = None,
    progress: bool = True,
) -> dict:
    """Train one expert of ``preset`` on ``base`` (+ ``prior_updates``) into ``out``; return DONE.json's content."""
    from mrlora.config import config_for_reward, load_config
    from mrlora.training.data import salt_for
    from mrlora.training.loop import ExpertJob, train_expert

    sets = list(overrides or [])
    if steps is not None:
        sets.append(f"train.steps={int(steps)}")
    sets.append(f"model.pretrained={base}")
    cfg = config_for_reward(load_config(preset, sets), reward)
    missing = [p for p in (prior_updates or []) if not Path(p).is_dir()]
    if missing:
        raise TrainError(f"--prior-updates: {missing} are not directories; pass cycle_XXXX/merged directories")
    job = ExpertJob(
        cfg=cfg,
        reward=reward,
        out_dir=Path(out),
        base_spec=base,
        base_id=base,
        prior_updates=[Path(p) for p in prior_updates or []],
        seed_salt=salt_for(reward, 0),
        progress=progress,
    )
    return train_expert(job)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mrlora.train",
        description="Train one Flow-GRPO LoRA expert (the Map step), resumable and distributed "
        "(srun / torchrun: one process per GPU).",
        epilog="Exit codes: 0 done, 2 error (message printed), 3 preempted after a checkpoint (run again to continue).",
    )
    run = p.add_argument_group("inside a MapReduce run")
    run.add_argument("--run", metavar="RUN_DIR", help="run directory (OUT_ROOT/<model>/<RUN_TS>) holding run.json")
    run.add_argument("--cycle", type=int, help="cycle number (from 1) whose expert to train")
    alone = p.add_argument_group("standalone")
    alone.add_argument(
        "--model", dest="config", metavar="PRESET", help="preset (sd35m, flux, tiny-sd3, tiny-flux) or a .py file"
    )
    alone.add_argument("--config", dest="config", help=argparse.SUPPRESS)  # the old spelling
    alone.add_argument("--base", help="base model: local diffusers dir, hub id, or tiny:sd3 / tiny:flux")
    alone.add_argument(
        "--prior-updates",
        nargs="*",
        default=[],
        metavar="DIR",
        help="merged update dirs (cycle_XXXX/merged) folded into the base first, in order",
    )
    alone.add_argument("--out", help="expert directory to write (checkpoints, adapter/, metrics.jsonl, DONE.json)")
    alone.add_argument("--steps", type=int, help="optimizer steps (default: the preset's train.steps)")
    alone.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (e.g. --set train.lr=1e-4)",
    )
    alone.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--reward", required=True, help="reward the expert maximises (e.g. pickscore, brightness)")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 0 done, 2 user error (one line on stderr), 3 preempted after a checkpoint."""
    return run_cli(_main, argv, prog="mrlora.train")


def _main(argv: list[str] | None) -> int:
    parser = _parser()
    add_version_flag(parser)
    args = parser.parse_args(argv)
    try:
        if args.run:
            if args.cycle is None:
                raise TrainError("--run needs --cycle C")
            if args.config or args.base or args.out:
                raise TrainError("--run takes its config, base and output from the run; drop --model/--base/--out")
            done = train_expert_in_run(args.run, args.cycle, args.reward)
        else:
            missing = [
                flag
                for flag, value in (("--model", args.config), ("--base", args.base), ("--out", args.out))
                if not value
            ]
            if missing:
                raise TrainError(f"standalone training needs {', '.join(missing)} (or use --run RUN_DIR --cycle C)")
            done = train_expert_standalone(
                args.config,
                args.reward,
                args.base,
                args.out,
                args.steps,
                args.prior_updates,
                args.set,
                progress=not args.no_progress,
            )
    except Preempted as exc:
        print(f"mrlora.train: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    metrics = done.get("final_metrics") or {}
    print(
        f"expert {args.reward}: {done.get('steps')} steps, reward_mean {metrics.get('reward_mean', float('nan')):.4f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
