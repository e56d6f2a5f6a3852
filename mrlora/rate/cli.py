"""``python -m mrlora.rate``: distil an expert into a token, and generate with a token mix.

    python -m mrlora.rate distill --base DIR --teacher EXPERT_DIR --token "<ocr>" --out DIR [--steps N --lr X]
    python -m mrlora.rate generate --base DIR --tokens ocr.safetensors picks.safetensors \\
        --spec "<ocr> 2 <picks>" --prompt "a sign that says \\"hello\\"" --out img.png

Errors the user can fix (token already in the vocabulary, an expert of another base, an unknown token in the
spec, a missing model) print one line and exit with status 2, before anything is written. SIGUSR2/SIGTERM during
a distillation writes a checkpoint and exits with status 3; the same command continues from it.
"""

from __future__ import annotations

import argparse
import sys

from mrlora.cli import EXIT_INTERRUPTED, add_version_flag, run_cli


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        required=True,
        help="base model: a diffusers directory, hub id, preset (sd35m, flux, tiny-sd3) or tiny:sd3/tiny:flux",
    )
    p.add_argument("--dtype", default="fp32", help="weights dtype: fp32 (default), bf16 or fp16")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--resolution", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: sd3 4.5, flux 3.5)")
    p.add_argument("--max-sequence-length", type=int, default=256, help="T5 tokens (default 256)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mrlora.rate", description="RaTE: reward-aware token embeddings distilled from LoRA experts."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    d = sub.add_parser("distill", help="distil one expert LoRA into one new token (one embedding per text encoder)")
    _add_model_args(d)
    d.add_argument("--teacher", required=True, help="expert adapter dir (adapter_model.safetensors, mrlora.json, ...)")
    d.add_argument("--token", required=True, help="the new token string, e.g. '<ocr>' (must not be in the vocabulary)")
    d.add_argument("--out", required=True, help="output dir: checkpoints, metrics.jsonl, token.safetensors, DONE.json")
    d.add_argument(
        "--prompts",
        default="gen:simple:64",
        help="prompt file (one per line, or GenEval .jsonl) or gen:<kind>:<n> (default gen:simple:64)",
    )
    d.add_argument(
        "--base-id",
        default=None,
        help="identity of --base to compare with the expert's mrlora.json 'base' (default: --base itself)",
    )
    d.add_argument("--steps", type=int, default=500, help="optimizer steps (default 500)")
    d.add_argument("--lr", type=float, default=5e-3, help="AdamW learning rate (default 5e-3)")
    d.add_argument(
        "--weight-decay", type=float, default=0.0, help="AdamW weight decay on the token vectors (default 0)"
    )
    d.add_argument("--max-grad-norm", type=float, default=0.0, help="gradient clipping, 0 = off (default)")
    d.add_argument("--batch-size", type=int, default=4, help="samples per process per step (default 4)")
    d.add_argument(
        "--teacher-sample-steps",
        dest="teacher_steps",
        type=int,
        default=None,
        help="teacher ODE sampling steps (default: sd3 40, flux 28)",
    )
    d.add_argument("--teacher-steps", dest="teacher_steps", type=int, help=argparse.SUPPRESS)  # the old spelling
    d.add_argument("--teacher-reuse", type=int, default=1, help="steps sharing one teacher batch (default 1)")
    d.add_argument("--logit-mean", type=float, default=0.0, help="mean of the logit-normal s (default 0)")
    d.add_argument("--logit-std", type=float, default=1.0, help="std of the logit-normal s (default 1)")
    d.add_argument("--checkpoint-every", type=int, default=50, help="checkpoint period in steps, 0 = end only")
    d.add_argument("--seed", type=int, default=0, help="seed of prompts, teacher noise and training noise")

    g = sub.add_parser("generate", help="generate an image with a mix of tokens")
    _add_model_args(g)
    g.add_argument("--tokens", nargs="*", default=[], help="token files (.safetensors) to load")
    g.add_argument("--spec", default="", help="token mix, e.g. '<picks> 3 <ocr>@1.5 2' (count, @embedding scale)")
    g.add_argument("--prompt", required=True, help="the prompt (tokens are appended to it)")
    g.add_argument("--out", required=True, help="output image path (.png, .jpg, .webp)")
    g.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    g.add_argument(
        "--sample-steps", dest="steps", type=int, default=None, help="ODE sampling steps (default: sd3 40, flux 28)"
    )
    g.add_argument("--steps", dest="steps", type=int, help=argparse.SUPPRESS)  # the old spelling
    return parser


def _device(name: str | None) -> str:
    import torch

    return name or ("cuda" if torch.cuda.is_available() else "cpu")


def _resolution(pipe, requested: int | None) -> int:
    if requested:
        return requested
    return int(pipe.default_sample_size * pipe.vae_scale_factor) if hasattr(pipe, "default_sample_size") else 512


def _load(args):
    from mrlora.models.loading import load_pipeline

    return load_pipeline(args.base, dtype=args.dtype, device=_device(args.device))


def run_distill(args) -> int:
    from mrlora.rate.distill import DistillSettings, distill_token, init_process_group
    from mrlora.rate.encoders import check_token_is_new, pipeline_arch, validate_token_string
    from mrlora.rate.generate import ARCH_DEFAULTS
    from mrlora.rate.teacher import attach_expert
    from rewards.prompts import load_prompt_source

    validate_token_string(args.token)
    prompts = [item.prompt for item in load_prompt_source(args.prompts, seed=args.seed)]
    pipe = _load(args)
    arch = pipeline_arch(pipe)
    check_token_is_new(pipe, args.token)
    expert = attach_expert(pipe.transformer, args.teacher, arch, args.base, args.base_id)
    settings = DistillSettings(
        token=args.token,
        steps=args.steps,
        lr=args.lr,
        weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm,
        batch_size=args.batch_size,
        teacher_steps=args.teacher_steps or ARCH_DEFAULTS[arch]["steps"],
        teacher_reuse=args.teacher_reuse,
        guidance_scale=args.guidance_scale
        if args.guidance_scale is not None
        else ARCH_DEFAULTS[arch]["guidance_scale"],
        resolution=_resolution(pipe, args.resolution),
        max_sequence_length=args.max_sequence_length,
        logit_mean=args.logit_mean,
        logit_std=args.logit_std,
        checkpoint_every=args.checkpoint_every,
        seed=args.seed,
    ).validate()
    group = init_process_group()
    try:
        result = distill_token(
            pipe,
            prompts,
            settings,
            args.out,
            expert=expert,
            base_id=args.base_id or args.base,
            group=group,
            log=lambda m: print(m, file=sys.stderr),
        )
    finally:
        group.close()
    if group.is_main:
        loss = f"{result.final_loss:.5f}" if result.final_loss is not None else "n/a"
        print(f"{result.token_path}  (token {args.token}, {result.steps} steps, final loss {loss})")
    return 0


def run_generate(args) -> int:
    from mrlora.rate.encoders import pipeline_arch
    from mrlora.rate.generate import ARCH_DEFAULTS, generate_with_tokens, save_image
    from mrlora.rate.token_file import load_token

    tokens = [load_token(p) for p in args.tokens]  # fail on a bad file before loading the model
    if args.spec:
        from mrlora.rate.errors import UnknownTokenError
        from mrlora.rate.spec import parse_token_spec

        names = {t.token for t in tokens}
        unknown = [i.token for i in parse_token_spec(args.spec) if i.token not in names]
        if unknown:
            raise UnknownTokenError(
                f"--spec names {', '.join(map(repr, unknown))}, but the --tokens files define "
                f"{', '.join(sorted(names)) or 'no tokens'}; add its token file to --tokens"
            )
    pipe = _load(args)
    arch = pipeline_arch(pipe)
    images = generate_with_tokens(
        pipe,
        tokens,
        args.spec,
        [args.prompt],
        seeds=[args.seed],
        steps=args.steps or ARCH_DEFAULTS[arch]["steps"],
        guidance_scale=args.guidance_scale
        if args.guidance_scale is not None
        else ARCH_DEFAULTS[arch]["guidance_scale"],
        resolution=_resolution(pipe, args.resolution),
        max_sequence_length=args.max_sequence_length,
    )
    print(save_image(images[0], args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    """The command line: exit 0 done, 2 user error (one line on stderr), 3 preempted after a checkpoint."""
    return run_cli(_main, argv, prog="mrlora.rate")


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    add_version_flag(parser)
    args = parser.parse_args(argv)
    from mrlora.training.errors import Preempted

    try:
        return run_distill(args) if args.command == "distill" else run_generate(args)
    except Preempted as exc:
        print(f"{exc}; run the same command again to continue", file=sys.stderr)
        return EXIT_INTERRUPTED
