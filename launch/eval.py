"""Submit an eval as Slurm jobs: an array over prompt shards, then an aggregation job with afterok.

Why a submitter and not just the template: it checks everything the job would check (checkpoint markers,
prompt file format, reward names, the settings of an existing ``--out``) on the login node, in a second,
before anything waits in the queue; and it submits only the shards that are not finished yet, so running the
same command again after a failure redoes exactly what is missing.

Example::

    python -m launch.eval --checkpoint /runs/sd35m/20261123_101500:12 --suite geneval \\
        --prompts evaluation_metadata.jsonl --out /evals/cycle12 --shards 8 --cluster mycluster

``--dry-run`` shows the two rendered sbatch scripts instead of submitting them (nothing is written). The
templates live in ``slurm_templates/`` (their variables are documented at their top) and the rendered scripts
are kept in ``OUT/slurm/``, so a user can resubmit them by hand.

A RaTE token mix (``--rate-tokens FILE ... --rate-spec SPEC``) is passed through to every shard; the submitter
checks the files and the token names of the spec (torch-free), the shard checks the rest before writing.

Login-node module: nothing heavy at module level; the eval modules it calls are torch-free.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shlex
import sys
from pathlib import Path

from launch.profiles import Resources
from launch.submit import resource_flags
from mrlora.cli import UserError, add_version_flag, run_cli

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = REPO_ROOT / "slurm_templates"
EVAL_TEMPLATE = TEMPLATES / "eval.sbatch"
AGGREGATE_TEMPLATE = TEMPLATES / "eval_aggregate.sbatch"
_PLACEHOLDER = re.compile(r"\{\{(\w+)\}\}")


class TemplateError(UserError, ValueError):
    """A template and the values given for it do not match (a missing, unknown or unused variable)."""


def render_template(text: str, values: dict[str, str]) -> str:
    """Replace ``{{name}}`` by ``values[name]``; doc comment lines (``# ...``) are left as they are.

    Every placeholder must have a value and every value must be used, so a template edited by a user and the
    submitter cannot drift apart silently.
    """
    used: set[str] = set()
    lines = []
    for line in text.splitlines(keepends=True):
        if line.startswith("# ") or line.rstrip("\n") == "#":
            lines.append(line)
            continue

        def substitute(match: re.Match) -> str:
            name = match.group(1)
            if name not in values:
                raise TemplateError(
                    f"template variable {{{{{name}}}}} has no value; known: {', '.join(sorted(values))}"
                )
            used.add(name)
            return values[name]

        lines.append(_PLACEHOLDER.sub(substitute, line))
    unused = sorted(set(values) - used)
    if unused:
        raise TemplateError(f"values given for variables the template does not use: {', '.join(unused)}")
    # an empty multi-line value leaves a blank line; drop those so the #SBATCH block stays contiguous
    return re.sub(r"\n{3,}", "\n\n", "".join(lines))


def sbatch_options(res: Resources, comment: str) -> str:
    """The ``{{sbatch_options}}`` of the templates: the job's size and placement, rendered as the run's own
    jobs render theirs (``launch.submit.resource_flags``), and the comment that finds it in squeue."""
    lines = [f"#SBATCH --{key}={value}" for key, value in resource_flags(res).items()]
    return "\n".join([*lines, f"#SBATCH --comment={comment}"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m launch.eval",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    e = p.add_argument_group("eval (passed to python -m eval.run; see its --help)")
    e.add_argument(
        "--checkpoint",
        required=True,
        help="base | RUN_DIR:<cycle> (0 = base) | expert dir RUN_DIR/cycle_XXXX/<reward> | exported dir",
    )
    e.add_argument("--suite", required=True, help="geneval | ocr | pickscore | all | a reward name | a comma list")
    e.add_argument("--prompts", required=True, help="GenEval metadata .jsonl or a text file, one prompt per line")
    e.add_argument("--out", required=True, help="eval output directory")
    e.add_argument("--seed", type=int, default=0, help="eval seed (default 0)")
    e.add_argument("--samples", type=int, default=None, help="images per prompt (default 4 for geneval, else 1)")
    e.add_argument("--batch-size", type=int, default=None, help="images per pipeline call")
    e.add_argument(
        "--sample-steps",
        dest="steps",
        type=int,
        default=None,
        help="ODE sampling steps (default sample.eval_num_steps)",
    )
    e.add_argument("--steps", dest="steps", type=int, help=argparse.SUPPRESS)  # the old spelling
    e.add_argument("--cfg", type=float, default=None, help="guidance scale (default sample.guidance_scale)")
    e.add_argument("--resolution", type=int, default=None, help="image side (default sample.resolution)")
    e.add_argument(
        "--model",
        dest="config",
        default=None,
        metavar="PRESET",
        help="preset for base / exported checkpoints (sd35m, flux, tiny-sd3, tiny-flux)",
    )
    e.add_argument("--config", dest="config", help=argparse.SUPPRESS)  # the old spelling
    e.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, repeatable")
    e.add_argument(
        "--rate-tokens",
        nargs="+",
        default=None,
        metavar="FILE",
        help="RaTE token files; with --rate-spec every prompt is generated with that token mix",
    )
    e.add_argument("--rate-spec", default=None, metavar="SPEC", help="RaTE token mix, e.g. '<ocr> 2 <picks>@1.5'")
    s = p.add_argument_group("slurm")
    s.add_argument("--shards", type=int, default=1, help="array tasks the prompt set is split into (default 1)")
    s.add_argument("--profile", dest="profile", help=argparse.SUPPRESS)  # the old spelling of --cluster
    s.add_argument(
        "--cluster",
        dest="profile",
        default=None,
        metavar="PROFILE",
        help="cluster profile (configs/clusters/<name>.toml or a path): partition, account, qos, "
        "setup lines, env; default: the built-in one-process profile",
    )
    s.add_argument("--partition", default=None, help="override the profile's partition for the eval tasks")
    s.add_argument("--time", type=int, default=60, help="time limit of one shard in minutes (default 60)")
    s.add_argument("--gpus", type=int, default=None, help="GPUs per shard (default 1 if the profile has GPUs, else 0)")
    s.add_argument("--cpus", type=int, default=None, help="CPUs per shard (default: the profile's cpus_per_gpu)")
    s.add_argument("--mem-gb", type=float, default=None, help="memory per shard in GB (default: the profile's)")
    s.add_argument("--max-parallel", type=int, default=0, help="run at most this many shards at once (0: no cap)")
    s.add_argument(
        "--executor",
        choices=("auto", "slurm", "local"),
        default=None,
        help="slurm: the shards as one array, the aggregation afterok; local: the unfinished shards one after "
        "another on this machine, then the aggregation (Ctrl-C stops the shard in progress; the same command "
        "continues); auto: slurm when it answers, else local (default: the profile's executor)",
    )
    s.add_argument(
        "--dry-run",
        dest="print",
        action="store_true",
        help="print the rendered sbatch scripts; submit and write nothing",
    )
    s.add_argument("--print", dest="print", action="store_true", help=argparse.SUPPRESS)  # the old spelling
    return p


def eval_run_args(args: argparse.Namespace) -> list[str]:
    """The eval.run arguments (absolute paths, so the job's working directory does not matter)."""

    def absolute(path: str) -> str:
        return str(Path(path).expanduser().resolve())

    checkpoint = args.checkpoint
    if checkpoint != "base":
        run, sep, cycle = checkpoint.rpartition(":")
        checkpoint = f"{absolute(run)}:{cycle}" if sep and cycle.isdigit() and run else absolute(checkpoint)
    argv = [
        "--checkpoint",
        checkpoint,
        "--suite",
        args.suite,
        "--prompts",
        absolute(args.prompts),
        "--out",
        absolute(args.out),
        "--seed",
        str(args.seed),
    ]
    for flag, value in (
        ("--samples", args.samples),
        ("--batch-size", args.batch_size),
        ("--sample-steps", args.steps),
        ("--cfg", args.cfg),
        ("--resolution", args.resolution),
        ("--model", args.config),
    ):
        if value is not None:
            argv += [flag, str(value)]
    for item in args.set:
        argv += ["--set", item]
    if args.rate_tokens:
        argv += ["--rate-tokens", *(absolute(t) for t in args.rate_tokens)]
    if args.rate_spec is not None:
        argv += ["--rate-spec", args.rate_spec]
    return argv


def _profile(name: str | None):
    from launch.profiles import default_profile, load_profile

    return load_profile(name) if name else default_profile()


def render_scripts(args: argparse.Namespace, profile, run_argv: list[str], array: str, out: Path) -> tuple[str, str]:
    gpus = args.gpus if args.gpus is not None else (1 if profile.gpus_per_node > 0 else 0)
    shard_size = Resources(
        nodes=1,
        tasks_per_node=1,
        gpus_per_node=gpus,
        gres_gpu=profile.gres_gpu,
        cpus_per_task=args.cpus if args.cpus is not None else profile.cpus_per_gpu,
        mem_gb=args.mem_gb if args.mem_gb is not None else profile.mem_per_gpu_gb * max(1, gpus),
        time_min=args.time,
        partition=args.partition if args.partition is not None else profile.partition,
        account=profile.account,
        qos=profile.qos,
    )
    # the aggregation is the merge job's kind of work: CPU only, small; at least 10 minutes for the report
    aggregate_size = dataclasses.replace(profile.merge, time_min=max(10, profile.merge_time_min))
    comment = f"mrlora-eval:{out.name}"
    common = {
        "log_dir": shlex.quote(str(out / "logs")),
        "setup": "\n".join(profile.setup_lines),
        "workdir": shlex.quote(str(REPO_ROOT)),
        "python": shlex.quote(sys.executable),
    }
    eval_script = render_template(
        EVAL_TEMPLATE.read_text(),
        {
            **common,
            "job_name": f"mrlora-eval-{out.name}",
            "array": array,
            "num_shards": str(args.shards),
            "sbatch_options": sbatch_options(shard_size, comment),
            "eval_args": shlex.join(run_argv),
        },
    )
    aggregate_script = render_template(
        AGGREGATE_TEMPLATE.read_text(),
        {
            **common,
            "job_name": f"mrlora-eval-{out.name}-aggregate",
            "sbatch_options": sbatch_options(aggregate_size, comment),
            "out": shlex.quote(str(out)),
        },
    )
    return eval_script, aggregate_script


def array_spec(indices: list[int], max_parallel: int) -> str:
    """Compact Slurm array spec: ``0-7``, or ``1,3,5-6``; ``%k`` caps concurrent tasks."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(str(start) if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts) + (f"%{max_parallel}" if max_parallel > 0 else "")


def sbatch(script: Path, extra: list[str]) -> str:
    """Submit ``script``; return the job id. Raises SlurmError with Slurm's own message."""
    from launch.slurm import clean_submission_env, run_slurm_command

    out = run_slurm_command(
        ["sbatch", "--parsable", *extra, str(script)],
        env=clean_submission_env(),
        not_found="run this on a Slurm login node, or use `python -m eval.run` to evaluate locally",
    )
    return out.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    add_version_flag(parser)
    args = parser.parse_args(argv)
    from eval.errors import EvalError
    from eval.plan import EvalDir
    from eval.run import build_parser as eval_parser
    from eval.run import out_complete, prepare

    if args.shards < 1:
        raise EvalError(f"--shards must be >= 1, got {args.shards}")
    run_argv = eval_run_args(args)
    # validate exactly as the job will (checkpoint markers, prompt file, rewards, settings of an existing --out)
    settings, ckpt, _cfg, _prompts, _shard = prepare(
        eval_parser().parse_args([*run_argv, "--shard", f"0/{args.shards}"])
    )
    out = EvalDir(Path(args.out).expanduser().resolve())
    if out_complete(out, settings):
        print(f"{out.root} is already complete (DONE.json); nothing to submit")
        return 0
    pending = out.pending_shards(args.shards)
    from launch.mapreduce import resolve_executor

    profile = _profile(args.profile)
    if resolve_executor(args.executor, profile, dry_run=args.print) == "local":
        given = sys.argv[1:] if argv is None else list(argv)
        return _run_here(
            args, run_argv, pending, out.root, ckpt.label, shlex.join(["python", "-m", "launch.eval", *given])
        )
    eval_script, aggregate_script = render_scripts(
        args, profile, run_argv, array_spec(pending, args.max_parallel) or "0", out.root
    )
    if args.print:
        if pending:
            print(f"# ---- {out.root / 'slurm' / 'eval.sbatch'} (shards {array_spec(pending, 0)} of {args.shards})")
            print(eval_script)
        print(f"# ---- {out.root / 'slurm' / 'eval_aggregate.sbatch'}")
        print(aggregate_script)
        return 0

    from mrlora.runstore import atomic_write_text

    slurm_dir = out.root / "slurm"
    (out.root / "logs").mkdir(parents=True, exist_ok=True)
    atomic_write_text(slurm_dir / "eval.sbatch", eval_script)
    atomic_write_text(slurm_dir / "eval_aggregate.sbatch", aggregate_script)
    dependency = []
    if pending:
        array_id = sbatch(slurm_dir / "eval.sbatch", [])
        dependency = [f"--dependency=afterok:{array_id}", "--kill-on-invalid-dep=yes"]
        print(f"submitted eval array {array_id}: {len(pending)} shard(s) of {args.shards} for {ckpt.label}")
    aggregate_id = sbatch(slurm_dir / "eval_aggregate.sbatch", dependency)
    print(f"submitted aggregation job {aggregate_id}; results in {out.root} (logs in {out.root / 'logs'})")
    return 0


def _run_here(
    args: argparse.Namespace, run_argv: list[str], pending: list[int], out: Path, label: str, again: str
) -> int:
    """The local executor: the same shard and aggregation commands the Slurm scripts run, here, in order."""
    steps = [
        (
            f"eval shard {i}/{args.shards}",
            ["-m", "eval.run", *run_argv, "--shard", f"{i}/{args.shards}"],
            out / "logs" / f"eval-local_{i}.out",
        )
        for i in pending
    ]
    steps.append(("aggregation", ["-m", "eval.aggregate", "--out", str(out)], out / "logs" / "aggregate-local.out"))
    if args.print:
        for name, python_args, log in steps:
            print(f"# {name} (log {log})\n{shlex.quote(sys.executable)} -u {shlex.join(python_args)}")
        return 0
    from launch.local import run_supervised

    print(f"evaluating {label} here: {len(pending)} shard(s) of {args.shards}, then the aggregation")
    rc = run_supervised(steps, sys.stdout, again)
    if rc == 0:
        print(f"results in {out} (summary.json; a report: python -m eval.report {shlex.quote(str(out))})")
    return rc


def cli(argv: list[str] | None = None) -> int:
    """``main`` with user errors printed as one line and exit status 2 (:func:`mrlora.cli.run_cli`)."""
    return run_cli(main, argv, prog="launch.eval")


if __name__ == "__main__":
    sys.exit(cli())
