"""The ``mrlora`` command: one entry point with a subcommand per tool, e.g. ``mrlora launch --model flux``.

Each subcommand is exactly its ``python -m`` module (which keeps working): ``mrlora status`` is
``python -m launch.status``. Only the chosen module is imported, so ``mrlora status`` on a login node stays as
light as the module itself. Installed as a console script by ``pip install`` (``[project.scripts]``).
"""

from __future__ import annotations

import importlib
import sys

from mrlora.cli import code_version, run_cli

# subcommand -> (module whose main(argv) runs it, one line of help)
COMMANDS: dict[str, tuple[str, str]] = {
    "launch": ("launch.mapreduce", "plan and start (or --resume) a MapReduce LoRA run"),
    "status": ("launch.status", "where a run stands: cycles x (rewards + merge)"),
    "logs": ("launch.logs", "print or follow the log of one job of a run"),
    "cancel": ("launch.cancel", "cancel a run's queued and running jobs"),
    "eval": ("eval.run", "generate and score a checkpoint on a prompt set, here"),
    "eval-submit": ("launch.eval", "the same evaluation as an sbatch array of shards + aggregation"),
    "report": ("eval.report", "tables, curves and the Pareto view across evals"),
    "train": ("mrlora.train", "train one Flow-GRPO expert (standalone or one expert of a run)"),
    "merge": ("mrlora.reduce.cli", "merge experts exactly, or export a full model of a run's cycle"),
    "rate": ("mrlora.rate.cli", "RaTE: distil an expert into a token; generate with a token mix"),
    "prefetch": ("rewards.prefetch", "download the reward models once, on the login node"),
    "prompts": ("rewards.prompts", "write a generated prompt set to a file"),
    "tiny": ("mrlora.models.tiny", "build a tiny random SD3 / FLUX model directory"),
    "real-shapes": ("mrlora.models.real_shapes", "build a real-shape random SD3.5-M / FLUX.1-dev model directory"),
    "completion": ("mrlora.completion", "print a bash / zsh completion script: source <(mrlora completion bash)"),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())
    return (
        f"usage: mrlora COMMAND [ARGS...]   (mrlora COMMAND --help for its options)\n\ncommands:\n{rows}\n\n"
        f"Each command is also `python -m <module>`; e.g. mrlora status = python -m launch.status."
    )


def main(argv: list[str] | None = None) -> int:
    """``mrlora COMMAND ARGS``: exit status of the command (2 for an unknown one); quiet on a closed pipe."""
    return run_cli(_dispatch, argv, prog="mrlora")


def _dispatch(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] == "--version":
        print(f"mrlora {code_version()}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"mrlora: error: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    sys.argv = [f"mrlora {name}", *rest]
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
