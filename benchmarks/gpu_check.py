"""GPU bring-up check: the sd35m and flux presets at real shapes on one GPU, with no download.

For a user bringing up a new cluster (or a developer with one GPU): builds random models with the real
transformer shapes (``python -m mrlora.models.real_shapes``; text encoders at real width, shallow), then per
architecture, at 512 px with the preset's sampling settings (SDE steps, CFG, noise level, text length) and
bf16 weights:

1. precision: one SDE sample in bf16 whose transition log-probs are fp32 and finite, then one GRPO loss step that
   changes the LoRA weights and nothing else (every frozen tensor's checksum unchanged);
2. Map: N optimizer steps through the real training code (``mrlora.train``; group of 4 images per step, one
   process, ``train.deepspeed`` off: one GPU has nothing to shard): seconds per step, images per second,
   peak CUDA memory;
3. merge + materialisation of the trained expert (``mrlora.merge``, then the streamed export): wall seconds,
   peak RSS;
4. one eval image from the exported model with 40 ODE steps: seconds, peak CUDA memory.

``--quick`` trains 1 step per architecture and builds FLUX.1-dev at 4 double + 8 single blocks (full width);
the default trains 3 steps at FLUX's full depth (19 + 38 blocks: ~24 GB written to --workdir, ~40 GB of GPU
memory for weights and optimizer). Targets on one H100-class GPU: --quick under 5 minutes, the default under 10
(targets, not yet measured on a GPU). It ends with one summary line and exits 1 if a check failed.

    python benchmarks/gpu_check.py --quick                 # both architectures
    python benchmarks/gpu_check.py --arch flux --steps 5 --workdir /scratch/$USER/mrlora-gpu-check
    python benchmarks/gpu_check.py --device cpu --tiny     # the same script on tiny models, no GPU (a smoke test)
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PRESETS = {"sd3": "sd35m", "flux": "flux"}
QUICK_FLUX_DEPTH = (4, 8)
EVAL_STEPS = 40
GROUP = 4


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


class Cuda:
    """Peak-memory bookkeeping that also works on CPU (then it reports nothing)."""

    def __init__(self, device: str):
        import torch

        self.torch, self.on = torch, device.startswith("cuda")

    def reset(self) -> None:
        if self.on:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gb(self) -> float | None:
        if not self.on:
            return None
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated() / 2**30


def model_dir(arch: str, args, work: Path) -> str:
    if args.tiny:
        from mrlora.models.loading import resolve_model

        return resolve_model(f"tiny:{arch}")
    from mrlora.models.real_shapes import build_real_shapes

    depth = {}
    if arch == "flux" and args.quick:
        depth = {"double_layers": QUICK_FLUX_DEPTH[0], "single_layers": QUICK_FLUX_DEPTH[1]}
    return str(build_real_shapes(arch, work / f"{arch}-model", **depth))


def config(arch: str, base: str, args):
    from mrlora.config import config_for_reward, load_config

    preset = f"tiny-{arch}" if args.tiny else PRESETS[arch]
    sets = [
        f"model.pretrained={base}",
        f"sample.group_size={GROUP}",
        "sample.prompts_per_step=1",
        f"sample.batch_size={GROUP}",
        "train.micro_batch=2",
        "train.updates_per_round=1",
        f"train.steps={args.steps}",
        f"train.checkpoint_every={args.steps}",
        "train.deepspeed=",
        "prompts.brightness=gen:simple:64",
    ]
    if args.resolution:
        sets.append(f"sample.resolution={args.resolution}")
    return preset, sets, config_for_reward(load_config(preset, sets), "brightness")


def check_precision(cfg, base: str, device: str) -> dict:
    """bf16 sampling gives fp32, finite log-probs; one loss step moves the LoRA and leaves every frozen tensor."""
    import torch

    from mrlora.grpo import grpo_loss
    from mrlora.models.loading import load_pipeline
    from mrlora.sampling import flow_model, sample, step_log_prob
    from mrlora.training.lora import add_lora

    pipe = load_pipeline(base, cfg.model.arch, cfg.model.dtype, device)
    torch.manual_seed(0)
    params = add_lora(pipe.transformer, cfg)
    frozen = {n: p for n, p in pipe.transformer.named_parameters() if not p.requires_grad}
    before = {n: (p.float().sum().item(), p.float().abs().sum().item()) for n, p in frozen.items()}
    lora_before = {k: p.detach().clone() for k, p in params.items()}
    res = sample(
        pipe,
        ["a photo of a cat", "a red apple"],
        seeds=[0, 1],
        num_steps=int(cfg.sample.num_steps),
        guidance_scale=float(cfg.sample.guidance_scale),
        resolution=int(cfg.sample.resolution),
        noise_level=float(cfg.sample.noise_level),
        max_sequence_length=int(cfg.sample.max_sequence_length),
        decode=False,
    )
    weight_dtype = next(iter(frozen.values())).dtype
    out = {
        "weights_dtype": str(weight_dtype).replace("torch.", ""),
        "log_prob_dtype": str(res.log_probs.dtype).replace("torch.", ""),
        "log_probs_finite": bool(torch.isfinite(res.log_probs).all()),
        "latents_finite": bool(torch.isfinite(res.latents).all()),
    }
    optimizer = torch.optim.AdamW(list(params.values()), lr=1e-3)
    model = flow_model(pipe)
    j = int(cfg.sample.num_steps) - 1
    step = step_log_prob(
        model,
        pipe.transformer,
        res.latents[:, j].to(device),
        res.latents[:, j + 1].to(device),
        j,
        res.timesteps,
        res.sigmas,
        res.embeds,
        float(cfg.sample.guidance_scale),
        float(cfg.sample.noise_level),
    )
    advantages = torch.tensor([1.0, -1.0], device=step.log_prob.device)
    terms = grpo_loss(
        step.log_prob, res.log_probs[:, j].to(step.log_prob.device), advantages, float(cfg.train.clip_range)
    )
    terms.loss.backward()
    optimizer.step()
    after = {n: (p.float().sum().item(), p.float().abs().sum().item()) for n, p in frozen.items()}
    out["loss_finite"] = bool(torch.isfinite(terms.loss).item())
    out["frozen_changed"] = sorted(n for n in frozen if after[n] != before[n])
    out["lora_changed"] = sum(not torch.equal(lora_before[k], p.detach()) for k, p in params.items())
    out["lora_tensors"] = len(params)
    out["ok"] = (
        (out["weights_dtype"] == "bfloat16" or cfg.model.dtype != "bf16")
        and out["log_prob_dtype"] == "float32"
        and out["log_probs_finite"]
        and out["latents_finite"]
        and out["loss_finite"]
        and not out["frozen_changed"]
        and out["lora_changed"] > 0
    )
    del pipe, params, optimizer
    return out


def check_arch(arch: str, args, work: Path, cuda: Cuda) -> dict:
    import torch

    from eval.model import generate
    from mrlora.models.loading import load_pipeline
    from mrlora.reduce import merge_experts
    from mrlora.reduce.export import export_with_updates
    from mrlora.train import train_expert_standalone

    r: dict = {"arch": arch}
    t0 = time.perf_counter()
    base = model_dir(arch, args, work)
    r["build_s"] = time.perf_counter() - t0
    preset, sets, cfg = config(arch, base, args)
    r["resolution"], r["sde_steps"], r["cfg"] = cfg.sample.resolution, cfg.sample.num_steps, cfg.sample.guidance_scale

    cuda.reset()
    r["precision"] = check_precision(cfg, base, args.device)
    _free(torch)

    cuda.reset()
    expert = work / f"{arch}-expert"
    t0 = time.perf_counter()
    train_expert_standalone(preset, "brightness", base, str(expert), steps=args.steps, overrides=sets, progress=False)
    r["map_wall_s"] = time.perf_counter() - t0
    rec = [json.loads(line) for line in (expert / "metrics.jsonl").read_text().splitlines()]
    timed = rec[1:] or rec  # the first step warms up kernels and the allocator
    r["s_per_step"] = statistics.median(x["step_time_s"] for x in timed)
    r["images_per_s"] = statistics.median(x["samples_per_s"] for x in timed)
    r["map_cuda_gb"] = cuda.peak_gb()
    r["map_finite"] = all(
        all(isinstance(v, (int, float)) and v == v for k, v in x.items() if k in ("loss", "kl", "reward_mean"))
        for x in rec
    )
    _free(torch)

    t0 = time.perf_counter()
    merged = work / f"{arch}-merged"
    merge_experts([expert / "adapter"], [1.0], merged, base=base, arch=arch)
    exported = work / f"{arch}-exported"
    export_with_updates(base, [merged], exported)
    r["merge_materialise_s"] = time.perf_counter() - t0
    r["update_mb"] = (merged / "update.safetensors").stat().st_size / 1e6

    cuda.reset()
    pipe = load_pipeline(str(exported), arch, cfg.model.dtype, args.device)
    steps = args.eval_steps or EVAL_STEPS
    t0 = time.perf_counter()
    image = generate(
        pipe,
        ["a photo of a red apple on a table"],
        [0],
        steps,
        float(cfg.sample.guidance_scale),
        int(cfg.sample.resolution),
        int(cfg.sample.max_sequence_length),
    )[0]
    r["eval_s"], r["eval_steps"] = time.perf_counter() - t0, steps
    r["eval_cuda_gb"] = cuda.peak_gb()
    r["eval_size"] = list(image.size)
    del pipe
    _free(torch)
    r["peak_rss_gb"] = _peak_rss_gb()
    r["ok"] = r["precision"]["ok"] and r["map_finite"] and r["eval_size"] == [cfg.sample.resolution] * 2
    return r


def _free(torch) -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _gb(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f} GB"


def print_result(r: dict) -> None:
    p = r["precision"]
    print(
        f"\n== {r['arch']}: {r['resolution']} px, {r['sde_steps']} SDE steps, CFG {r['cfg']} (model built in "
        f"{r['build_s']:.0f} s)"
    )
    print(
        f"precision: weights {p['weights_dtype']}, log-probs {p['log_prob_dtype']} finite {p['log_probs_finite']}, "
        f"loss finite {p['loss_finite']}; LoRA tensors changed {p['lora_changed']}/{p['lora_tensors']}, frozen "
        f"tensors changed {len(p['frozen_changed'])}{' ' + str(p['frozen_changed'][:3]) if p['frozen_changed'] else ''}"
    )
    print(
        f"map: {r['s_per_step']:.2f} s/step, {r['images_per_s']:.2f} images/s ({GROUP} per step), peak CUDA "
        f"{_gb(r['map_cuda_gb'])}, wall {r['map_wall_s']:.0f} s"
    )
    print(f"merge + materialise: {r['merge_materialise_s']:.1f} s (update {r['update_mb']:.1f} MB)")
    print(
        f"eval: {r['eval_steps']} ODE steps in {r['eval_s']:.1f} s, peak CUDA {_gb(r['eval_cuda_gb'])}; "
        f"peak RSS {r['peak_rss_gb']:.1f} GB"
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python benchmarks/gpu_check.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--arch", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    p.add_argument("--quick", action="store_true", help="1 Map step; FLUX at 4 double + 8 single blocks")
    p.add_argument("--steps", type=int, help="Map steps per architecture (default 3; --quick: 1)")
    p.add_argument("--eval-steps", type=int, help=f"ODE steps of the eval image (default {EVAL_STEPS})")
    p.add_argument("--resolution", type=int, help="image size (default: the preset's, 512 px; --tiny: 64 px)")
    p.add_argument("--device", default="cuda", help="torch device (default cuda)")
    p.add_argument("--tiny", action="store_true", help="tiny random models instead of real shapes (CPU smoke test)")
    p.add_argument("--workdir", help="where models and outputs go (default: a temporary dir, deleted at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.steps = args.steps or (1 if args.quick else 3)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: no CUDA device visible; run on a GPU node (or --device cpu --tiny for a smoke test)",
            file=sys.stderr,
        )
        return 2
    cuda = Cuda(args.device)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="mrlora-gpu-check-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.device.startswith("cuda"):
        print(
            f"device: {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GB)"
        )
    results = []
    t0 = time.perf_counter()
    try:
        for arch in args.arch:
            results.append(check_arch(arch, args, work, cuda))
            print_result(results[-1])
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    total = time.perf_counter() - t0
    parts = ", ".join(
        f"{r['arch']} {'ok' if r['ok'] else 'FAILED'} {r['s_per_step']:.2f} s/step {_gb(r['map_cuda_gb'])}"
        for r in results
    )
    print(f"\ngpu check: {parts}; {total:.0f} s in all")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
