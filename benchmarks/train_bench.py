"""Expert-training throughput on the tiny models: samples/s and seconds per optimizer step, 1 vs 2 processes.

Runs the real entry point (``python -m mrlora.train``; ``torchrun`` for several processes, gloo on CPU) in a
temporary directory and reads the per-step timings from metrics.jsonl. The first step (warm-up: allocator,
lazy inits) is excluded from the medians. Numbers on a shared 2-core machine are noisy: compare runs made on
the same idle machine.

    python benchmarks/train_bench.py --arch sd3 flux --procs 1 2 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(arch: str, procs: int, steps: int, resolution: int, threads: int, workdir: Path) -> dict:
    out = workdir / f"{arch}-{procs}p"
    train = [
        "-m",
        "mrlora.train",
        "--config",
        f"tiny-{arch}",
        "--reward",
        "brightness",
        "--base",
        f"tiny:{arch}",
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--no-progress",
        "--set",
        f"sample.resolution={resolution}",
        "--set",
        f"train.checkpoint_every={steps}",
    ]
    if procs == 1:
        cmd = [sys.executable, *train]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_port",
            str(29700 + procs),
            *train,
        ]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
    }
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    rec = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = rec[1:] or rec
    return {
        "arch": arch,
        "procs": procs,
        "steps": steps,
        "wall_s": wall,
        "s_per_step": statistics.median(r["step_time_s"] for r in timed),
        "sample_s_per_step": statistics.median(r["sample_time_s"] for r in timed),
        "samples_per_s": statistics.median(r["samples_per_s"] for r in timed),
        "samples_per_step": int(round(timed[0]["samples_per_s"] * timed[0]["step_time_s"])),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", nargs="+", default=["sd3", "flux"], choices=["sd3", "flux"])
    p.add_argument("--procs", nargs="+", type=int, default=[1, 2], help="process counts to compare")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is warm-up)")
    p.add_argument("--resolution", type=int, default=64, help="image size in pixels (tiny preset: 64)")
    p.add_argument("--threads", type=int, default=1, help="OMP/torch threads per process")
    args = p.parse_args(argv)
    print(
        f"{'arch':5} {'procs':>5} {'samples/step':>12} {'s/step':>8} {'sampling s':>10} {'samples/s':>9} {'wall s':>7}"
    )
    with tempfile.TemporaryDirectory(prefix="mrlora-train-bench-") as tmp:
        for arch in args.arch:
            for procs in args.procs:
                r = run(arch, procs, args.steps, args.resolution, args.threads, Path(tmp))
                print(
                    f"{r['arch']:5} {r['procs']:>5} {r['samples_per_step']:>12} {r['s_per_step']:>8.2f} "
                    f"{r['sample_s_per_step']:>10.2f} {r['samples_per_s']:>9.2f} {r['wall_s']:>7.1f}",
                    flush=True,
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
