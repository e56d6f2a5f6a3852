"""Generate images for a prompt set with a checkpoint, score them, and write results (one shard or all).

Example (SD3.5-M, the official GenEval prompts, 4 images per prompt)::

    python -m eval.run --checkpoint /runs/sd35m/20261123_101500:12 --suite geneval \\
        --prompts geneval/prompts/evaluation_metadata.jsonl --out /evals/cycle12

Everything is checked before anything is written: the checkpoint (markers), the prompt file, the rewards (their
models must load offline) and the model. Without ``--shard`` the eval runs as one shard and is aggregated at the
end; with ``--shard i/n`` only that shard is computed (``python -m eval.aggregate`` merges them; ``python -m
launch.eval`` submits both as Slurm jobs). A finished shard is skipped when run again.

With ``--rate-tokens FILE [FILE ...] --rate-spec "<ocr> 2 <picks>@1.5"`` every prompt is generated with that RaTE
token mix appended (docs/rate.md), on whatever ``--checkpoint`` resolves to (normally ``base`` or ``RUN_DIR:0``:
tokens steer the base model); scoring and the recorded prompts use the original prompt text. The report shows
such an eval as its own kind, "rate".
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from eval.checkpoint import FORMS_HINT, resolve_checkpoint
from eval.errors import EvalError
from eval.plan import EvalDir, Shard
from eval.prompts import load_prompts
from eval.rate import RateMix, checkpoint_note, install_mix, resolve_mix
from eval.scoring import SUITES, build_rewards, suite_rewards
from eval.settings import EvalSettings, check_same, read_settings, record_settings
from mrlora.cli import add_version_flag, run_cli
from mrlora.config import config_from_dict
from mrlora.runstore import file_digest

log = logging.getLogger("eval.run")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m eval.run",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help=f"what to evaluate: {FORMS_HINT}")
    p.add_argument(
        "--suite",
        required=True,
        help=f"{' | '.join(SUITES)}, any registered reward name (e.g. brightness), or a comma list",
    )
    p.add_argument(
        "--prompts",
        required=True,
        help="prompt file: GenEval metadata .jsonl (one JSON object with 'prompt' per line) or text, "
        "one prompt per line",
    )
    p.add_argument("--out", required=True, help="output directory (images/, results.h5, summary.json)")
    p.add_argument("--shard", default="0/1", help="compute only shard i of n (0-based), e.g. 3/8 (default 0/1)")
    p.add_argument(
        "--seed",
        type=int,
        default=0,
        help="eval seed; image (p, k) always gets the same noise for a given seed, whatever the "
        "checkpoint, so checkpoints are compared on identical noise (default 0)",
    )
    p.add_argument(
        "--samples",
        type=int,
        default=None,
        help="images per prompt (default 4 when the suite includes geneval, as GenEval does, else 1)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="images per pipeline call (default sample.batch_size)")
    p.add_argument(
        "--sample-steps",
        dest="steps",
        type=int,
        default=None,
        help="ODE sampling steps (default sample.eval_num_steps, 40 for SD3.5-M)",
    )
    p.add_argument("--steps", dest="steps", type=int, help=argparse.SUPPRESS)  # the old spelling
    p.add_argument("--cfg", type=float, default=None, help="guidance scale (default sample.guidance_scale)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default sample.resolution)")
    p.add_argument("--config", dest="config", help=argparse.SUPPRESS)  # the old spelling of --model
    p.add_argument(
        "--model",
        dest="config",
        default=None,
        metavar="PRESET",
        help="preset (sd35m, flux, tiny-sd3, tiny-flux, or a .py) for `base` and exported models; "
        "checkpoints of a run use the run's run.json",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override, repeatable (e.g. reward_models.pickscore.model=/models/pickscore)",
    )
    p.add_argument("--device", default=None, help="torch device (default cuda if available, else cpu)")
    r = p.add_argument_group("RaTE token mix (both or neither)")
    r.add_argument(
        "--rate-tokens",
        nargs="+",
        default=None,
        metavar="FILE",
        help="RaTE token files to load (e.g. RUN/cycle_0003/rate/ocr/token.safetensors)",
    )
    r.add_argument(
        "--rate-spec",
        default=None,
        metavar="SPEC",
        help="token mix appended to every prompt: '<token>[@scale] [count] ...', e.g. '<ocr> 2 "
        "<picks>@1.5'; recorded prompts and scoring keep the original text",
    )
    return p


def prepare(args: argparse.Namespace):
    """Validate every input; return (settings, checkpoint, config, prompts, shard). Writes nothing, torch-free."""
    shard = Shard.parse(args.shard)
    mix = resolve_mix(args.rate_tokens, args.rate_spec)
    ckpt = resolve_checkpoint(args.checkpoint, args.config, args.set)
    cfg = config_from_dict(ckpt.config)
    prompts = load_prompts(args.prompts)
    rewards = suite_rewards(args.suite)
    samples = args.samples if args.samples is not None else (4 if "geneval" in rewards else 1)
    settings = EvalSettings(
        checkpoint=ckpt.to_dict(),
        rewards=tuple(rewards),
        prompts=str(Path(args.prompts).resolve()),
        prompts_sha256=file_digest(args.prompts),
        num_prompts=len(prompts),
        samples=samples,
        batch_size=args.batch_size if args.batch_size is not None else int(cfg.sample.batch_size),
        seed=args.seed,
        steps=args.steps if args.steps is not None else int(cfg.sample.eval_num_steps),
        guidance_scale=float(args.cfg if args.cfg is not None else cfg.sample.guidance_scale),
        resolution=args.resolution if args.resolution is not None else int(cfg.sample.resolution),
        max_sequence_length=int(cfg.sample.max_sequence_length),
        dtype=str(cfg.model.dtype),
        shards=shard.count,
        rate=mix.to_dict() if mix is not None else None,
    )
    for name, value in (
        ("--samples", settings.samples),
        ("--batch-size", settings.batch_size),
        ("--sample-steps", settings.steps),
    ):
        if value < 1:
            raise EvalError(f"{name} must be >= 1, got {value}")
    if settings.resolution < 16 or settings.resolution % 16:
        raise EvalError(f"--resolution must be a positive multiple of 16, got {settings.resolution}")
    return settings, ckpt, cfg, prompts, shard


def out_complete(out: EvalDir, settings: EvalSettings) -> bool:
    """Refuse an ``--out`` that holds an eval with other settings; True when the eval there is already complete."""
    existing = read_settings(out.root)
    if existing is not None:
        check_same(out.root, existing, settings)
    return out.done() is not None


def _track(run_root: str, cycle: int, headline: dict) -> None:
    """Put an eval of a run's cycle on the run's tracker curves (best-effort: the eval's files are the result)."""
    from mrlora.tracking import log_eval

    try:
        log_eval(run_root, cycle, {k: v for k, v in headline.items() if v is not None})
    except Exception as exc:  # noqa: BLE001
        log.warning("could not log the eval to the run's trackers: %s", exc)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    add_version_flag(parser)
    args = parser.parse_args(argv)
    settings, ckpt, cfg, prompts, shard = prepare(args)
    mix = RateMix.from_dict(settings.rate) if settings.rate is not None else None
    if mix is not None:
        if (note := checkpoint_note(settings.checkpoint)) is not None:
            log.warning("%s", note)
    out = EvalDir(args.out)
    if out_complete(out, settings):
        print(f"{out.root} is already complete (DONE.json); nothing to do")
        return 0
    if out.shard_done(shard) is not None:
        log.info("shard %s of %s is already complete; skipping it", shard, out.root)
    else:
        log.info(
            "evaluating %s on %d prompts x %d samples, rewards %s",
            ckpt.label,
            settings.num_prompts,
            settings.samples,
            ", ".join(settings.rewards),
        )
        rewards = build_rewards(list(settings.rewards), ckpt.config)
        from eval.model import build_pipeline
        from eval.shard import run_shard

        pipe = build_pipeline(ckpt, cfg, args.device)
        if mix is not None:
            install_mix(pipe, mix)  # RaTE checks arch and embedding widths before anything is written
            log.info("generating with the RaTE mix %r (%s)", mix.spec, ", ".join(t.path for t in mix.tokens))
        record_settings(out.root, settings)
        run_shard(out, shard, settings, prompts, pipe, rewards)
    if shard.count == 1:
        from eval.aggregate import aggregate

        summary = aggregate(out)
        print(
            f"{out.root}: {summary['images']} images; "
            + ", ".join(f"{k}={v:.4g}" for k, v in summary["headline"].items() if v is not None)
        )
        if ckpt.kind == "merged" and ckpt.run_root is not None and ckpt.cycle is not None and mix is None:
            _track(ckpt.run_root, ckpt.cycle, summary["headline"])
    else:
        print(
            f"shard {shard} of {out.root} complete; when all {shard.count} are, run "
            f"`python -m eval.aggregate --out {out.root}`"
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
