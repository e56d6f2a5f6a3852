"""RaTE on tiny SD3 vs tiny FLUX: how stable is the distillation, and how much of an expert does a token carry?

The paper reports RaTE is much less stable on FLUX (text and image tokens share one joint sequence). This
script measures it on the tiny random models with hand-made experts, for several seeds:

- ``gap_closed``: fraction of the base->teacher distance (MSE of final ODE latents on held-out prompts) that
  the base + token removes: 1 = the token reproduces the expert, 0 = no effect, < 0 = the token moves away.
  Reported for the token once (``x1``) and repeated three times (``x3``).
- ``eval_drop``: relative drop of the flow-matching loss on a fixed batch (same noise and s) from the initial
  token to the trained one.
- ``swap``: MSE between the base's latents for the held-out prompts and for the same seeds with the prompts
  rotated: how much the base listens to its text at all (a token can only act through the text).
  ``moved/swap``: how far the trained token moves the base's latents, in units of ``swap``.
- ``loss_cv``: coefficient of variation of the last half of the training loss (noise of the curve);
  ``grad_max/med``: largest over median gradient norm (spikes).

Prints one row per run and the per-arch medians. Usage:
    python benchmarks/rate_stability.py [--seeds 3] [--steps 60] [--lr 0.2] [--experts norm_out,attention]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

PROMPTS = [
    "a red car",
    "a dog on a beach",
    "two cats",
    "a tree in snow",
    "a blue house",
    "a person with a kite",
    "a bowl of fruit",
    "a mountain at sunset",
]
EVAL = ["a green apple", "a cat on a bench", "a city at night", "a boat on a lake"]
EXPERTS = {
    "norm_out": ["norm_out.linear"],
    "attention": [
        "transformer_blocks.0.attn.to_q",
        "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v",
        "transformer_blocks.0.attn.to_out.0",
    ],
}


def make_expert(out: Path, arch: str, modules: list[str], seed: int, magnitude: float) -> Path:
    from safetensors.torch import save_file

    from mrlora.models.loading import load_pipeline

    named = dict(load_pipeline(f"tiny:{arch}").transformer.named_modules())
    g = torch.Generator().manual_seed(seed)
    tensors, rank = {}, 2
    for m in modules:
        layer = named[m]
        tensors[f"{m}.lora_A.weight"] = (
            torch.randn(rank, layer.in_features, generator=g) * magnitude / layer.in_features**0.5
        )
        tensors[f"{m}.lora_B.weight"] = torch.randn(layer.out_features, rank, generator=g) * magnitude / rank**0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "adapter_model.safetensors"))
    (out / "adapter_config.json").write_text(
        json.dumps({"r": rank, "lora_alpha": rank, "target_modules": modules, "peft_type": "LORA"})
    )
    (out / "mrlora.json").write_text(
        json.dumps({"arch": arch, "base": f"tiny:{arch}", "reward": "bench", "scale": 1.0})
    )
    return out


def final_latents(pipe, prompts, teacher: bool, guidance: float):
    from mrlora.rate.teacher import set_teacher
    from mrlora.sampling import sample

    set_teacher(pipe.transformer, teacher)
    try:
        return sample(
            pipe,
            prompts,
            seeds=list(range(len(prompts))),
            num_steps=6,
            guidance_scale=guidance,
            resolution=64,
            noise_level=0.0,
            max_sequence_length=32,
            decode=False,
        ).latents[:, -1]
    finally:
        set_teacher(pipe.transformer, True)


def one_run(arch: str, expert_kind: str, seed: int, steps: int, lr: float, magnitude: float, work: Path) -> dict:
    from mrlora.models.loading import load_pipeline, resolve_model
    from mrlora.rate.compose import apply_token_spec
    from mrlora.rate.distill import DistillSettings, _generator, distill_token, flow_matching_loss
    from mrlora.rate.encoders import add_token, read_rows
    from mrlora.rate.teacher import attach_expert, set_teacher

    guidance = 4.5 if arch == "sd3" else 3.5
    expert = make_expert(work / f"expert-{arch}-{expert_kind}-{seed}", arch, EXPERTS[expert_kind], seed, magnitude)

    def teacher_pipe():
        pipe = load_pipeline(f"tiny:{arch}")
        return pipe, attach_expert(pipe.transformer, expert, arch, resolve_model(f"tiny:{arch}"))

    pipe, info = teacher_pipe()
    teacher = final_latents(pipe, EVAL, True, guidance)
    base = final_latents(pipe, EVAL, False, guidance)
    swapped = final_latents(pipe, EVAL[1:] + EVAL[:1], False, guidance)
    text_sensitivity = (swapped - base).pow(2).mean().item()  # how much the base listens to its prompt at all
    x0 = final_latents(pipe, PROMPTS[:4], True, guidance)
    g = _generator(seed, 99)
    noise, s = torch.randn(x0.shape, generator=g), torch.sigmoid(torch.randn((4,), generator=g))
    add_token(pipe, "<r>")
    set_teacher(pipe.transformer, False)
    with torch.no_grad():
        before = flow_matching_loss(pipe, "<r>", read_rows(pipe, "<r>"), x0, PROMPTS[:4], noise, s, guidance, 32).item()

    pipe, info = teacher_pipe()
    settings = DistillSettings(
        token="<r>",
        steps=steps,
        lr=lr,
        batch_size=4,
        teacher_steps=6,
        guidance_scale=guidance,
        resolution=64,
        max_sequence_length=32,
        checkpoint_every=0,
        seed=seed,
    )
    t0 = time.perf_counter()
    distill_token(
        pipe,
        PROMPTS,
        settings,
        work / f"out-{arch}-{expert_kind}-{seed}",
        expert=info,
        base_id=f"tiny:{arch}",
        log=lambda m: None,
    )
    seconds = time.perf_counter() - t0
    metrics = [
        json.loads(l) for l in (work / f"out-{arch}-{expert_kind}-{seed}" / "metrics.jsonl").read_text().splitlines()
    ]
    set_teacher(pipe.transformer, False)
    with torch.no_grad():
        after = flow_matching_loss(pipe, "<r>", None, x0, PROMPTS[:4], noise, s, guidance, 32).item()
    d_base = (base - teacher).pow(2).mean().item()
    gaps, moved = {}, 0.0
    for reps in (1, 3):
        student = final_latents(pipe, apply_token_spec(pipe, None, f"<r> {reps}", EVAL), False, guidance)
        gaps[reps] = 1 - (student - teacher).pow(2).mean().item() / d_base
        if reps == 1:
            moved = (student - base).pow(2).mean().item()
    losses = [m["loss"] for m in metrics]
    grads = [m["grad_norm"] for m in metrics]
    tail = losses[len(losses) // 2 :]
    return {
        "arch": arch,
        "expert": expert_kind,
        "seed": seed,
        "d_base": d_base,
        "gap_x1": gaps[1],
        "gap_x3": gaps[3],
        "moved_over_swap": moved / text_sensitivity,
        "text_sensitivity": text_sensitivity,
        "eval_drop": 1 - after / before,
        "loss_cv": statistics.pstdev(tail) / statistics.mean(tail),
        "grad_spike": max(grads) / statistics.median(grads),
        "seconds": seconds,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds per (arch, expert) (default 3)")
    p.add_argument("--steps", type=int, default=60, help="distillation steps (default 60)")
    p.add_argument("--lr", type=float, default=0.2, help="AdamW lr (default 0.2)")
    p.add_argument("--magnitude", type=float, default=5.0, help="size of the hand-made LoRA (default 5)")
    p.add_argument("--experts", default="norm_out,attention", help="expert kinds: norm_out, attention")
    p.add_argument("--archs", default="sd3,flux", help="architectures (default sd3,flux)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    header = (
        f"{'arch':5} {'expert':9} {'seed':>4} {'d_base':>8} {'gap_x1':>7} {'gap_x3':>7} {'eval_drop':>9} "
        f"{'loss_cv':>7} {'grad_max/med':>12} {'swap':>8} {'moved/swap':>10} {'s':>5}"
    )
    print(header, flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs.split(","):
            for kind in args.experts.split(","):
                for seed in range(args.seeds):
                    r = one_run(arch, kind, seed, args.steps, args.lr, args.magnitude, Path(tmp))
                    rows.append(r)
                    print(
                        f"{r['arch']:5} {r['expert']:9} {r['seed']:>4} {r['d_base']:8.3f} {r['gap_x1']:7.3f} "
                        f"{r['gap_x3']:7.3f} {r['eval_drop']:9.4f} {r['loss_cv']:7.3f} {r['grad_spike']:12.2f} "
                        f"{r['text_sensitivity']:8.5f} {r['moved_over_swap']:10.2f} {r['seconds']:5.1f}",
                        flush=True,
                    )
    print("\nmedians over seeds")
    for arch in args.archs.split(","):
        for kind in args.experts.split(","):
            sel = [r for r in rows if r["arch"] == arch and r["expert"] == kind]
            med = {
                k: statistics.median(r[k] for r in sel)
                for k in ("gap_x1", "gap_x3", "eval_drop", "loss_cv", "grad_spike", "moved_over_swap")
            }
            spread = max(r["gap_x1"] for r in sel) - min(r["gap_x1"] for r in sel)
            print(
                f"{arch:5} {kind:9} gap_x1 {med['gap_x1']:.3f} (range {spread:.3f})  gap_x3 {med['gap_x3']:.3f}  "
                f"eval_drop {med['eval_drop']:.4f}  loss_cv {med['loss_cv']:.3f}  grad_max/med {med['grad_spike']:.2f}  "
                f"moved/swap {med['moved_over_swap']:.2f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
