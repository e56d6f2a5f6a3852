"""Real-shape smoke on CPU: one Map step, checkpoint, resume, merge, materialisation and an eval image at real widths.

SD3.5 Medium at full depth (24 blocks, 2.47B parameters) and FLUX.1-dev at reduced depth (real 3072 width;
2 double + 2 single blocks by default), random weights from ``python -m mrlora.models.real_shapes``, in bf16 with
the presets' LoRA targets (FLUX with its preset's ZeRO-2, here on one process), through the user-facing entry
points, each phase its own process (as on a cluster):

1. ``map``: ``python -m mrlora.train`` (SDE sampling with log-probs, the cheap ``brightness`` reward, the GRPO
   update with the KL term, a checkpoint), killed as soon as its step-1 checkpoint is complete;
2. ``resume``: the same command again: continues from that checkpoint, trains step 2, writes adapter/ + DONE;
3. ``merge``: ``python -m mrlora.merge`` (the exact stacked update); 4. ``materialise``: ``python -m mrlora.merge
   export`` (the streamed full model); 5. ``eval``: load the exported model, generate one image with the ODE
   sampler, then measure the bytes the memory plan predicts.

Printed per phase: wall time and peak RSS (``wait4`` of that process); then the LoRA parameter and module counts,
the update size, and the login node's memory estimate (``mrlora.memory_plan``) against the measured bytes
(weights per component, LoRA, Adam state, EMA, ZeRO-2's fp32 master; must agree within 5%). Resolution (64 px),
group size (2), SDE steps (2) and text length (32 tokens) are small (the CPU cost), shapes are not. On the shared
2-core, 24 GB development machine: FLUX 2+2 ~3 minutes at 3.5 GB peak RSS; SD3.5-M ~13 minutes (a Map step
3-5 minutes) at 6.9 GB, plus ~3 minutes to build it.

    python benchmarks/real_shapes.py                         # both (build included); --arch sd3 for one
    python benchmarks/real_shapes.py --arch flux --double-layers 2 --single-layers 2 --keep /tmp/shapes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = {"sd3": "sd35m", "flux": "flux"}
TOLERANCE = 0.05


def overrides(arch: str, resolution: int, eval_steps: int) -> list[str]:
    """The preset with small CPU-sized sampling; model, LoRA targets and dtype stay the preset's."""
    sets = [
        f"sample.resolution={resolution}",
        "sample.group_size=2",
        "sample.prompts_per_step=1",
        "sample.batch_size=2",
        "sample.num_steps=2",
        f"sample.eval_num_steps={eval_steps}",
        "sample.max_sequence_length=32",
        "train.micro_batch=2",
        "train.updates_per_round=1",
        "train.checkpoint_every=1",
        "train.steps=2",
        "prompts.brightness=gen:simple:16",
    ]
    return sets  # FLUX keeps the preset's ZeRO-2 (one process here: nothing to shard, the same code path)


def _env(threads: int) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}"
    env["OMP_NUM_THREADS"] = str(threads)
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def run_phase(name: str, cmd: list[str], threads: int, kill_when: Path | None = None) -> dict:
    """Run one phase in its own process; return wall seconds and its peak RSS (from ``wait4``)."""
    log = tempfile.NamedTemporaryFile("w+", prefix=f"mrlora-{name}-", suffix=".log", delete=False)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=_env(threads), stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    killed = False
    while True:
        if kill_when is not None and not killed and kill_when.exists():
            proc.send_signal(signal.SIGKILL)  # a crash right after the checkpoint: the next phase must resume
            killed = True
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        time.sleep(0.05)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    log.seek(0)
    text = log.read()
    log.close()
    if proc.returncode != 0 and not killed:
        raise SystemExit(f"phase {name} failed ({proc.returncode}): {' '.join(cmd)}\n{text[-4000:]}\nlog: {log.name}")
    os.unlink(log.name)
    result = {"phase": name, "wall_s": wall, "peak_rss_gb": usage.ru_maxrss / 2**20, "killed": killed}
    for line in text.splitlines():
        if line.startswith("RESULT "):
            result.update(json.loads(line[len("RESULT ") :]))
    return result


# ------------------------------------------------------------------------------------------- in-process phases


def phase_eval(model_dir: str, expert_dir: str, arch: str, sets: list[str]) -> dict:
    """One eval image from the exported model, then the measured bytes next to the memory plan's estimate."""
    import torch
    from safetensors import safe_open

    from eval.model import generate
    from mrlora.config import config_for_reward, load_config
    from mrlora.memory_plan import estimate
    from mrlora.models.loading import load_pipeline
    from mrlora.training.lora import add_lora

    cfg = config_for_reward(load_config(PRESETS[arch], sets + [f"model.pretrained={model_dir}"]), "brightness")
    pipe = load_pipeline(model_dir, arch, cfg.model.dtype, "cpu")
    t0 = time.perf_counter()
    image = generate(
        pipe,
        ["a photo of a red apple"],
        [0],
        cfg.sample.eval_num_steps,
        cfg.sample.guidance_scale,
        cfg.sample.resolution,
        cfg.sample.max_sequence_length,
    )[0]
    gen_s = time.perf_counter() - t0
    pixels = torch.tensor(list(image.getdata()), dtype=torch.float32)
    # buffers too: SD3's position table (0.45 GB in bf16) is a buffer, and it is held like the weights
    measured = {
        name: sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))
        for name, module in pipe.components.items()
        if hasattr(module, "parameters")
    }
    dtypes = sorted(
        {
            str(p.dtype).replace("torch.", "")
            for m in pipe.components.values()
            if hasattr(m, "parameters")
            for p in m.parameters()
        }
    )
    torch.manual_seed(0)
    params = add_lora(pipe.transformer, cfg)
    lora_bytes = sum(p.numel() * p.element_size() for p in params.values())
    ckpt = sorted(Path(expert_dir).glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    state = torch.load(ckpt / "training_state.pt", map_location="cpu", weights_only=False)
    master = 0
    if state["optimizer"] is not None:
        adam = _adam_bytes(state["optimizer"])
    else:  # ZeRO-2: DeepSpeed's partitions, one file per rank, each with its fp32 master copy
        adam = 0
        for part in (ckpt / "deepspeed").rglob("*optim_states.pt"):
            zero = torch.load(part, map_location="cpu", weights_only=False)["optimizer_state_dict"]
            adam += _adam_bytes(zero["base_optimizer_state"])
            master += sum(t.numel() * t.element_size() for t in zero["single_partition_of_fp32_groups"])
    with safe_open(str(ckpt / "ema.safetensors"), "pt") as f:
        ema = 4 * sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())  # fp32
    plan = estimate(cfg)
    rows = {f"weights {k}": (plan.frozen_bytes.get(k, 0), v) for k, v in measured.items()}
    rows.update(
        {
            "LoRA fp32": (plan.lora_bytes, lora_bytes),
            "Adam state": (plan.adam_bytes, adam),
            "EMA": (plan.ema_bytes, ema),
        }
    )
    if plan.zero2:
        rows["ZeRO-2 fp32 master"] = (plan.master_bytes, master)
    return {
        "eval_generate_s": gen_s,
        "image_std": float(pixels.std()),
        "image_finite": bool(torch.isfinite(pixels).all()),
        "param_dtypes": dtypes,
        "memory_rows": rows,
        "lora_modules_plan": plan.lora_modules,
    }


def _adam_bytes(optimizer_state: dict) -> int:
    return sum(
        t.numel() * t.element_size()
        for s in optimizer_state["state"].values()
        for k, t in s.items()
        if k in ("exp_avg", "exp_avg_sq")
    )


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# ------------------------------------------------------------------------------------------------------ driver


def bench_arch(arch: str, args, work: Path) -> list[dict]:
    py = sys.executable
    model = Path(args.model_dir[arch]) if args.model_dir.get(arch) else work / f"{arch}-model"
    phases = []
    if not (model / "REAL_SHAPES_COMPLETE.json").exists():
        depth = (
            ["--layers", str(args.layers)]
            if arch == "sd3" and args.layers
            else ["--double-layers", str(args.double_layers), "--single-layers", str(args.single_layers)]
            if arch == "flux"
            else []
        )
        phases.append(
            run_phase(
                "build",
                [py, "-m", "mrlora.models.real_shapes", "--arch", arch, "--out", str(model), *depth],
                args.threads,
            )
        )
    sets = overrides(arch, args.resolution, args.eval_steps)
    expert = work / f"{arch}-expert"
    train = [
        py,
        "-m",
        "mrlora.train",
        "--config",
        PRESETS[arch],
        "--reward",
        "brightness",
        "--base",
        str(model),
        "--out",
        str(expert),
        "--no-progress",
        *[a for s in sets for a in ("--set", s)],
    ]
    phases.append(run_phase("map", train, args.threads, kill_when=expert / "checkpoint-1" / "COMPLETE.json"))
    if not phases[-1]["killed"]:
        raise SystemExit("the first Map run finished before it could be killed after its checkpoint")
    phases.append(run_phase("resume", train, args.threads))
    done = json.loads((expert / "DONE.json").read_text())
    metrics = [json.loads(line) for line in (expert / "metrics.jsonl").read_text().splitlines()]
    merged = work / f"{arch}-merged"
    phases.append(
        run_phase(
            "merge",
            [
                py,
                "-m",
                "mrlora.merge",
                "--experts",
                str(expert / "adapter"),
                "--out",
                str(merged),
                "--base",
                str(model),
                "--arch",
                arch,
                "-q",
            ],
            args.threads,
        )
    )
    exported = work / f"{arch}-exported"
    phases.append(
        run_phase(
            "materialise",
            [
                py,
                "-m",
                "mrlora.merge",
                "export",
                "--base",
                str(model),
                "--updates",
                str(merged),
                "--out",
                str(exported),
                "-q",
            ],
            args.threads,
        )
    )
    code = (
        f"import json, sys; sys.path.insert(0, {str(REPO)!r}); from benchmarks.real_shapes import phase_eval; "
        f"print('RESULT ' + json.dumps(phase_eval({str(exported)!r}, {str(expert)!r}, {arch!r}, {sets!r})))"
    )
    phases.append(run_phase("eval", [py, "-c", code], args.threads))
    from safetensors import safe_open

    with safe_open(str(expert / "adapter" / "adapter_model.safetensors"), "pt") as f:
        lora_params = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
        modules = len({k.rsplit(".lora_", 1)[0] for k in f.keys()})
    update_bytes = (merged / "update.safetensors").stat().st_size
    return report(arch, phases, done, metrics, lora_params, modules, update_bytes, model)


def report(arch, phases, done, metrics, lora_params, modules, update_bytes, model) -> list[dict]:
    marker = json.loads((model / "REAL_SHAPES_COMPLETE.json").read_text())
    tcfg = marker["transformer"]
    depth = (
        f"{tcfg['num_layers']} blocks"
        if arch == "sd3"
        else f"{tcfg['num_layers']} double + {tcfg['num_single_layers']} single blocks"
    )
    print(f"\n== {arch}: {marker['summary']['params'] / 1e9:.3f}B transformer params ({depth}), {marker['dtype']}")
    print(f"{'phase':12} {'wall s':>8} {'peak RSS GB':>12}")
    for p in phases:
        print(
            f"{p['phase']:12} {p['wall_s']:>8.1f} {p['peak_rss_gb']:>12.2f}"
            + ("  (killed after checkpoint-1)" if p["killed"] else "")
        )
    ev = phases[-1]
    steps = [m["step"] for m in metrics]
    print(
        f"map: steps {steps} (resumed at 1), reward_mean {[round(m['reward_mean'], 4) for m in metrics]}, "
        f"kl {['%.2e' % m['kl'] for m in metrics]}, grad_norm {[round(m['grad_norm'], 4) for m in metrics]}, "
        f"s/step {[round(m['step_time_s'], 1) for m in metrics]}"
    )
    print(
        f"LoRA: {modules} modules (memory plan: {ev['lora_modules_plan']}), {lora_params / 1e6:.2f}M params; "
        f"update.safetensors {update_bytes / 1e6:.1f} MB; DONE steps {done['steps']}"
    )
    print(
        f"eval: {ev['eval_generate_s']:.1f} s for one image, finite {ev['image_finite']}, pixel std "
        f"{ev['image_std']:.2f}; param dtypes {ev['param_dtypes']}"
    )
    print(f"{'memory (bytes)':22} {'estimate':>14} {'measured':>14} {'error':>8}")
    worst = 0.0
    for name, (est, got) in ev["memory_rows"].items():
        err = abs(est - got) / got if got else (0.0 if est == 0 else float("inf"))
        worst = max(worst, err)
        print(f"{name:22} {est:>14,} {got:>14,} {err:>7.2%}")
    ok = worst <= TOLERANCE and modules == ev["lora_modules_plan"] and ev["image_finite"] and steps == [1, 2]
    return [
        {
            "arch": arch,
            "ok": ok,
            "worst_error": worst,
            "wall_s": sum(p["wall_s"] for p in phases),
            "peak_rss_gb": max(p["peak_rss_gb"] for p in phases),
        }
    ]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    p.add_argument("--layers", type=int, help="sd3 depth (default: the real 24)")
    p.add_argument("--double-layers", type=int, default=2, help="flux double blocks (default 2; real 19)")
    p.add_argument("--single-layers", type=int, default=2, help="flux single blocks (default 2; real 38)")
    p.add_argument("--resolution", type=int, default=64, help="image size in pixels (default 64)")
    p.add_argument("--eval-steps", type=int, default=2, help="ODE steps of the eval image (default 2)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per phase (default 2)")
    p.add_argument("--sd3-model", help="reuse a real-shape sd3 build instead of building one")
    p.add_argument("--flux-model", help="reuse a real-shape flux build instead of building one")
    p.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary dir, deleted)")
    args = p.parse_args(argv)
    args.model_dir = {"sd3": args.sd3_model, "flux": args.flux_model}
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mrlora-real-shapes-"))
    work.mkdir(parents=True, exist_ok=True)
    results = []
    try:
        for arch in args.arch:
            results += bench_arch(arch, args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    summary = ", ".join(
        f"{r['arch']} {'ok' if r['ok'] else 'FAILED'} {r['wall_s']:.0f} s peak {r['peak_rss_gb']:.1f} GB "
        f"memory-plan error {r['worst_error']:.2%}"
        for r in results
    )
    print(f"\nreal shapes: {summary}")
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
