"""Merge the finished shards of an eval into ``results.h5`` + ``summary.json``, then write ``DONE.json``.

Why a separate step: shards are array tasks; the aggregation job runs after all of them (``afterok``), refuses
to combine an incomplete or inconsistent set, and is idempotent, so rerunning it is always safe.

``python -m eval.aggregate --out DIR [--force]``
"""

from __future__ import annotations

import argparse
import logging
import sys

from eval.errors import EvalError
from eval.plan import EvalDir, Shard
from eval.results import Results, read_results, write_results
from eval.settings import read_settings
from eval.summary import summarize
from mrlora.cli import add_version_flag, run_cli
from mrlora.runstore import DONE_MARKER, atomic_write_json, read_json, write_marker

log = logging.getLogger(__name__)


def aggregate(out: EvalDir, force: bool = False) -> dict:
    """Combine every shard of ``out``; return the summary. Raises EvalError naming missing shards."""
    settings = read_settings(out.root)
    if settings is None:
        raise EvalError(f"{out.root} holds no eval (no eval.json); run `python -m eval.run ... --out {out.root}`")
    if out.done() is not None and not force:
        log.info("%s is already aggregated", out.root)
        return read_json(out.summary)
    if force:
        (out.root / DONE_MARKER).unlink(missing_ok=True)
    missing = out.pending_shards(settings.shards)
    if missing:
        raise EvalError(
            f"{len(missing)} of {settings.shards} shards of {out.root} are not complete (shards "
            f"{', '.join(map(str, missing))}); rerun them with `python -m eval.run ... --shard i/{settings.shards}` "
            "or resubmit with `python -m launch.eval` (finished shards are skipped)"
        )
    parts = []
    for i in range(settings.shards):
        shard_dir = out.shard_dir(Shard(i, settings.shards))
        part = read_results(shard_dir / "results.h5")
        if part.settings != settings.to_dict():
            raise EvalError(
                f"shard {shard_dir} was computed with other settings than {out.root / 'eval.json'}; "
                f"delete it and rerun that shard"
            )
        parts.append(part)
    res = Results.concat(parts)
    _check_coverage(res, settings.num_prompts, settings.samples, out)
    write_results(out.results, res)
    summary = summarize(res)
    atomic_write_json(out.summary, summary)
    write_marker(out.root, DONE_MARKER, extra={"summary": "summary.json", "images": len(res)}, checksums=False)
    log.info("aggregated %d shards (%d images) into %s", settings.shards, len(res), out.root)
    return summary


def _check_coverage(res: Results, num_prompts: int, samples: int, out: EvalDir) -> None:
    seen = set(zip(res.prompt_index.tolist(), res.sample_index.tolist()))
    if len(seen) != len(res) or len(res) != num_prompts * samples:
        raise EvalError(
            f"the shards of {out.root} hold {len(res)} rows ({len(seen)} distinct) for {num_prompts} prompts x "
            f"{samples} samples; delete {out.shards_dir} and rerun the eval"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.aggregate", description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, help="the eval's output directory (the --out of eval.run)")
    parser.add_argument("--force", action="store_true", help="aggregate again even if DONE.json exists")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    summary = aggregate(EvalDir(args.out), force=args.force)
    print(
        f"{args.out}: {summary['images']} images; "
        + ", ".join(f"{k}={v:.4g}" for k, v in summary["headline"].items() if v is not None)
    )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
