"""Command line of the Reduce step: merge expert adapters exactly, or export a full model of a run's cycle.

    python -m mrlora.merge --experts A B C --weights 1 1 1 --out DIR [--base MODEL_DIR]
    python -m mrlora.merge export --run RUN_DIR --cycle C --out DIR
    python -m mrlora.merge export --base MODEL_DIR --updates U1 U2 --out DIR
    python -m mrlora.merge export --run RUN_DIR --cycle C --out DIR --model-card --push-to-hub OWNER/NAME [--private]

Invalid input (weights, adapters, architecture, shapes, corrupt files, an occupied --out) is reported on
stderr with what to do next, the exit status is 2, and no output directory is created.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from mrlora.cli import EXIT_USER_ERROR, add_version_flag, error_line, run_cli, setup_logging


def _merge_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mrlora.merge",
        description="Merge LoRA experts exactly: dW = sum_i w_i * (alpha_i/r_i) * B_i A_i per module, stored as "
        "one stacked LoRA of rank sum(r_i). `python -m mrlora.merge export --help` for full models.",
    )
    p.add_argument(
        "--experts",
        nargs="+",
        required=True,
        metavar="DIR",
        help="expert adapter directories (adapter_model.safetensors + adapter_config.json + mrlora.json)",
    )
    p.add_argument(
        "--weights",
        nargs="+",
        type=float,
        metavar="W",
        help="one weight per expert, normalised to sum 1 (default: equal weights)",
    )
    p.add_argument(
        "--out", required=True, help="output directory for update.safetensors/update.json (must be new or empty)"
    )
    p.add_argument("--base", help="base model directory: check the experts' architecture and shapes against it")
    p.add_argument("--arch", choices=("sd3", "flux"), help="expected architecture of the experts")
    p.add_argument(
        "--mode",
        choices=("exact", "reference"),
        default="exact",
        help="exact (default) or reference: the public code's inexact average of A and B, for ablations",
    )
    p.add_argument(
        "--allow-negative-weights",
        action="store_true",
        help="accept negative weights (task-arithmetic style); normalised by the sum of |w|",
    )
    p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    return p


def _export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mrlora.merge export",
        description="Write a full diffusers model directory (loadable by from_pretrained) with reduced updates "
        "folded into the transformer, streaming tensor by tensor.",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="run directory (OUT_ROOT/<model>/<RUN_TS>); use with --cycle")
    src.add_argument("--base", help="base model directory; use with --updates")
    p.add_argument("--cycle", type=int, help="export base_0 plus the updates of cycles 1..CYCLE (0: base_0)")
    p.add_argument(
        "--updates", nargs="+", default=[], metavar="DIR", help="merged update directories to fold in, in order"
    )
    p.add_argument("--out", required=True, help="output model directory (must not exist or be empty)")
    p.add_argument(
        "--model-card",
        action="store_true",
        help="write README.md: base model, licence of the base, the run's rewards, weights, cycles, steps and "
        "recipe, and its eval summary (with --run)",
    )
    p.add_argument(
        "--push-to-hub",
        metavar="REPO_ID",
        help="then upload the export to this Hugging Face model repository (created if missing); needs the "
        "network and a token (`hf auth login`), checked before anything is written",
    )
    p.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    p.add_argument("-q", "--quiet", action="store_true", help="only print errors")
    return p


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 0 done, 2 user error (one line on stderr, nothing written)."""
    return run_cli(_main, argv, prog="mrlora.merge")


def _export(args: argparse.Namespace) -> None:
    from mrlora.reduce import card as cards

    token = cards.check_can_push(args.push_to_hub) if args.push_to_hub else None  # refuse before writing
    from mrlora.reduce.export import export_model, export_with_updates

    if args.run:
        out = export_model(args.run, args.cycle, args.out, with_card=args.model_card)
    else:
        card = None
        if args.model_card:
            from mrlora.reduce.base import open_base

            card = cards.model_card(
                args.base, None, open_base(args.base).arch, update_dirs=[Path(d) for d in args.updates]
            )
        out = str(export_with_updates(args.base, args.updates, args.out, card=card))
    print(out)
    if args.push_to_hub:
        print(cards.push_to_hub(out, args.push_to_hub, private=args.private, token=token))


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    exporting = bool(argv) and argv[0] == "export"
    parser = _export_parser() if exporting else _merge_parser()
    add_version_flag(parser)
    args = parser.parse_args(argv[1:] if exporting else argv)
    setup_logging(logging.WARNING if args.quiet else logging.INFO)
    if exporting and args.run and args.cycle is None:
        parser.error("--run needs --cycle")
    if exporting and args.base and args.cycle is not None:
        parser.error("--cycle goes with --run; with --base pass --updates")
    if exporting and args.private and not args.push_to_hub:
        parser.error("--private goes with --push-to-hub REPO_ID")

    try:
        if exporting:
            _export(args)
        else:
            from mrlora.reduce.job import merge_experts

            weights = args.weights if args.weights is not None else [1.0] * len(args.experts)
            marker = merge_experts(
                args.experts,
                weights,
                args.out,
                base=args.base,
                mode=args.mode,
                allow_negative_weights=args.allow_negative_weights,
                arch=args.arch,
            )
            print(f"{args.out} ({marker['mode']}{'' if marker['exact'] else ', INEXACT'})")
    except ValueError as exc:  # not one of ours: a malformed value the standard library rejected
        print(error_line("mrlora.merge", exc), file=sys.stderr)
        return EXIT_USER_ERROR
    return 0
