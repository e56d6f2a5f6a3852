"""Does a cycle cost more as the run gets longer? A long MapReduce run simulated without training.

A real run directory on a random transformer with the real tensor names and shapes
(``mrlora.models.real_shapes``: SD3.5-M at full depth, FLUX.1-dev at reduced depth by default), and per cycle:

* three synthetic expert adapters at the preset's rank on the preset's LoRA targets, written with the real
  writer (``save_expert_adapter``) and marked DONE, as the Map step leaves them;
* the real merge job ``merge_cycle_in_run`` (merge, materialisation when due, retention), called in-process:
  wall time and peak RSS (VmHWM, reset before each call through ``/proc/self/clear_refs``, so each call's
  own peak; it includes the ~0.5 GB of python + torch + diffusers every job has);
* the Map start of the next cycle: ``map_start`` + ``load_transformer_after`` (the transformer a Map step,
  eval or RaTE builds; the text encoders and VAE are the same every cycle and left out), in-process, every
  ``--map-every`` cycles and at cycles 2 and N: wall time, bytes read (``/proc/self/io`` rchar: every read
  syscall, page-cache hits included) and peak RSS.

The expert adapters of a merged cycle are deleted again (they are synthetic) to keep the disk use to the
run's own bounded part. The last line per architecture is

    cycle growth <arch>: map start cycle N / cycle 2 = X.XXx time, Y.YYx bytes read; merge peak RSS Z MB

(targets: X, Y <= 1.5 at N = 40; Z < 2000). With ``--copy-baseline`` it first times a plain read+write copy of
the base's shards and compares the first merge (which streams the first materialisation) with it, e.g. for a
FLUX.1-dev-width transformer: ``--arch flux --cycles 1 --double-layers 19 --single-layers 38 --copy-baseline``
(one merge, no Map start; needs ~70 GB of disk at full depth). Page cache: nothing is dropped (other people share the machine),
so reads come from a warm cache, as on a node that just wrote them.

    python benchmarks/cycle_growth.py                       # sd3 full depth + flux 4+8 blocks, 40 cycles
    python benchmarks/cycle_growth.py --quick               # 6 cycles, shallow, rank 8: a couple of minutes
    python benchmarks/cycle_growth.py --arch sd3 --cycles 80 --workdir /big/disk --keep
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PRESET = {"sd3": "sd35m", "flux": "flux"}
REWARDS = ("geneval", "pickscore", "ocr")


def _peak_rss_mb() -> float:
    """This process's own peak RSS (VmHWM: per address space, so an exec'd child does not inherit the peak of
    the process that started it, as ``ru_maxrss`` does on Linux)."""
    with open("/proc/self/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _rchar() -> int:
    with open("/proc/self/io", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("rchar:"):
                return int(line.split()[1])
    return 0


def _reset_peak_rss() -> bool:
    """Start a new peak-RSS window for this process (Linux: writing 5 to clear_refs resets VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def measured(fn, *args) -> dict:
    """Run ``fn(*args) -> dict`` in this process; add its wall time, bytes read and peak RSS (of this call
    alone where the kernel can reset the peak, else of the process so far)."""
    import gc

    gc.collect()
    _reset_peak_rss()
    t0, r0 = time.perf_counter(), _rchar()
    out = fn(*args)
    out.update(wall_s=time.perf_counter() - t0, read_bytes=_rchar() - r0, peak_rss_mb=_peak_rss_mb())
    gc.collect()
    return out


# ------------------------------------------------------------------------------------------------------ setup


def build_run(work: Path, arch: str, args) -> tuple:
    """The base model (transformer only, random, real shapes) and a run directory using it."""
    from mrlora.config import config_to_dict, load_config
    from mrlora.models.real_shapes import transformer_config, write_transformer
    from mrlora.reduce.base import open_base
    from mrlora.runstore import RunDir

    base = work / "base"
    config = (
        transformer_config(arch, layers=args.layers)
        if arch == "sd3"
        else transformer_config(arch, double_layers=args.double_layers, single_layers=args.single_layers)
    )
    summary = write_transformer(arch, config, base / "transformer", dtype="bf16")
    pipeline = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}[arch]
    cls = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}[arch]
    (base / "model_index.json").write_text(json.dumps({"_class_name": pipeline, "transformer": ["diffusers", cls]}))
    cfg = load_config(
        PRESET[arch],
        [
            f"model.pretrained={base}",
            f"lora.rank={args.rank}",
            f"lora.alpha={2 * args.rank}",
            f"mapreduce.materialise_every={args.every}",
            f"mapreduce.cycles={max(args.cycles, 1)}",
        ],
    )
    run = RunDir.create(work / "runs", PRESET[arch])
    run.write_run_json({"run_ts": run.run_ts, "model": PRESET[arch], "config": config_to_dict(cfg), "history": []})
    info = open_base(base)
    suffixes = tuple(cfg.lora.target_modules)
    shapes = {}
    for shard in info.shards:
        for name, t in shard.tensors.items():
            module = name[: -len(".weight")]
            if (
                name.endswith(".weight")
                and module.split(".")[0] in ("transformer_blocks", "single_transformer_blocks")
                and any(module.endswith("." + s) for s in suffixes)
                and len(t.shape) == 2
            ):
                shapes[module] = tuple(t.shape)
    return run, base, cfg, shapes, summary


def plain_copy(src_dir: Path, dst_dir: Path) -> dict:
    """A plain read + write copy (16 MB buffer, fsync) of the base transformer's shards: what the disk does
    for the bytes a materialisation must at least move once."""
    dst_dir.mkdir(parents=True)
    t0, moved = time.perf_counter(), 0
    for src in sorted(src_dir.glob("*.safetensors")):
        with open(src, "rb") as fin, open(dst_dir / src.name, "wb") as fout:
            while block := fin.read(16 << 20):
                fout.write(block)
                moved += len(block)
            fout.flush()
            os.fsync(fout.fileno())
    wall = time.perf_counter() - t0
    shutil.rmtree(dst_dir)
    return {"copy_s": wall, "bytes": moved}


def write_experts(run, cycle: int, cfg, shapes: dict, rank: int) -> None:
    import torch

    from mrlora.reduce import save_expert_adapter
    from mrlora.runstore import DONE_MARKER, write_marker

    lora = {"r": rank, "lora_alpha": 2 * rank, "target_modules": sorted(shapes), "peft_type": "LORA"}
    for k, reward in enumerate(REWARDS):
        g = torch.Generator().manual_seed(1000 * cycle + k)
        state = {}
        for m, (o, i) in sorted(shapes.items()):
            state[f"{m}.lora_A.weight"] = torch.randn(rank, i, generator=g) * 0.01
            state[f"{m}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.01
        save_expert_adapter(
            state,
            run.adapter_dir(cycle, reward),
            arch=cfg.model.arch,
            lora_config=lora,
            base=cfg.model.pretrained,
            reward=reward,
        )
        write_marker(run.expert_dir(cycle, reward), DONE_MARKER, extra={"status": "ok"})


def _merge(run_root: str, cycle: int) -> dict:
    from mrlora.reduce import merge_cycle_in_run

    merge_cycle_in_run(run_root, cycle)
    return {}


def _map_start(run_root: str, cycle: int, spec: str, arch: str, dtype: str) -> dict:
    from mrlora.reduce import load_transformer_after, map_start

    start = map_start(run_root, cycle).base
    transformer = load_transformer_after(start, spec, arch, dtype)
    n = sum(p.numel() for p in transformer.parameters())
    return {"base_cycle": start.base_cycle, "updates": len(start.update_dirs), "params": n}


# ------------------------------------------------------------------------------------------------------ run


def simulate(arch: str, args, work: Path) -> dict:
    import diffusers
    import torch

    torch.set_num_threads(1)  # what the merge job does; the Map start's read + hash is single-threaded anyway
    _ = (diffusers.SD3Transformer2DModel, diffusers.FluxTransformer2DModel)  # lazy imports are not what is measured
    t0 = time.perf_counter()
    run, base, cfg, shapes, summary = build_run(work, arch, args)
    print(
        f"[{arch}] base: {summary['params'] / 1e9:.2f}B params, {summary['bytes'] / 1e9:.2f} GB bf16, "
        f"{len(shapes)} adapted modules, experts rank {args.rank} x {len(REWARDS)}; built in "
        f"{time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    copy = plain_copy(base / "transformer", work / "copy") if args.copy_baseline else None
    if copy:
        print(
            f"[{arch}] plain read+write copy of the base shards: {copy['bytes'] / 1e9:.2f} GB in "
            f"{copy['copy_s']:.1f} s",
            flush=True,
        )
    rows = []
    print(f"[{arch}] cycle  merge_s  merge_rss_MB  map_start_s  read_GB  map_rss_MB  starts_from", flush=True)
    for cycle in range(1, args.cycles + 1):
        write_experts(run, cycle, cfg, shapes, args.rank)
        merge = measured(_merge, str(run.root), cycle)
        for reward in REWARDS:
            shutil.rmtree(run.expert_dir(cycle, reward))
        row = {"cycle": cycle + 1, "merge_s": merge["wall_s"], "merge_rss_mb": merge["peak_rss_mb"]}
        if args.cycles > 1 and (cycle + 1 == 2 or cycle == args.cycles or cycle % args.map_every == 0):
            start = measured(_map_start, str(run.root), cycle + 1, str(base), cfg.model.arch, cfg.model.dtype)
            row.update(
                map_s=start["wall_s"],
                read_bytes=start["read_bytes"],
                map_rss_mb=start["peak_rss_mb"],
                base_cycle=start["base_cycle"],
                updates=start["updates"],
            )
            tail = (
                f"{row['map_s']:11.1f}  {row['read_bytes'] / 1e9:7.2f}  {row['map_rss_mb']:10.0f}  cycle "
                f"{row['base_cycle']} base + {row['updates']} update(s)"
            )
        else:
            tail = "          -        -           -"
        rows.append(row)
        print(f"[{arch}] {cycle + 1:5d}  {row['merge_s']:7.1f}  {row['merge_rss_mb']:12.0f}  {tail}", flush=True)
    from mrlora.runstore import disk_usage

    usage = disk_usage(run.root)
    print(
        f"[{arch}] run directory after {args.cycles} cycles: "
        + ", ".join(f"{k} {v / 1e9:.2f} GB" for k, v in usage.items() if v),
        flush=True,
    )
    result = {
        "arch": arch,
        "merge_rss_mb": max(r["merge_rss_mb"] for r in rows),
        "rows": rows,
        "copy_s": copy["copy_s"] if copy else None,
        "first_merge_s": rows[0]["merge_s"],
    }
    if args.cycles > 1:
        first = next(r for r in rows if r["cycle"] == 2 and "map_s" in r)
        last = rows[-1]
        result.update(
            n=last["cycle"],
            time_x=last["map_s"] / first["map_s"],
            bytes_x=last["read_bytes"] / max(first["read_bytes"], 1),
        )
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", choices=("sd3", "flux", "both"), default="both")
    p.add_argument("--cycles", type=int, help="merged cycles to simulate (default 40; --quick 6)")
    p.add_argument("--rank", type=int, help="rank of each of the 3 experts (default: the preset's, sd3 32, flux 64)")
    p.add_argument("--layers", type=int, help="SD3 blocks (default 24, the real depth; --quick 4)")
    p.add_argument("--double-layers", type=int, help="FLUX double blocks (default 4 of 19; --quick 1)")
    p.add_argument("--single-layers", type=int, help="FLUX single blocks (default 8 of 38; --quick 2)")
    p.add_argument("--every", type=int, default=1, help="mapreduce.materialise_every (default 1)")
    p.add_argument(
        "--map-every",
        type=int,
        default=1,
        help="measure the Map start every N cycles (always at cycles 2 and N; default every cycle)",
    )
    p.add_argument("--quick", action="store_true", help="6 cycles, shallow models, rank 8")
    p.add_argument(
        "--copy-baseline",
        action="store_true",
        help="also time a plain read+write copy of the base shards, to compare with the first merge "
        "(which materialises: reads base_0, writes the fp32 master and the transformer)",
    )
    p.add_argument("--workdir", help="where to build (default: a temporary directory, removed afterwards)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    quick = args.quick
    args.cycles = args.cycles or (6 if quick else 40)
    args.layers = args.layers or (4 if quick else None)
    args.double_layers = args.double_layers or (1 if quick else 4)
    args.single_layers = args.single_layers or (2 if quick else 8)
    if args.cycles < 2 and not args.copy_baseline:
        p.error("--cycles must be at least 2 (the ratios compare with cycle 2), or 1 with --copy-baseline")
    root = Path(args.workdir or tempfile.mkdtemp(prefix="cycle_growth_"))
    os.environ.setdefault("MRLORA_CACHE", str(root / "cache"))
    results = []
    try:
        for arch in ("sd3", "flux") if args.arch == "both" else (args.arch,):
            rank = args.rank or (8 if quick else {"sd3": 32, "flux": 64}[arch])
            sub = argparse.Namespace(**{**vars(args), "rank": rank})
            work = root / arch
            work.mkdir(parents=True, exist_ok=True)
            results.append(simulate(arch, sub, work))
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(root, ignore_errors=True)
    for r in results:
        if r["copy_s"]:
            print(
                f"materialise {r['arch']}: first merge (merge + streamed materialisation) {r['first_merge_s']:.1f} s "
                f"= {r['first_merge_s'] / r['copy_s']:.2f}x a plain read+write copy of the base ({r['copy_s']:.1f} s); "
                f"peak RSS {r['rows'][0]['merge_rss_mb']:.0f} MB"
            )
        if "n" not in r:
            continue
        print(
            f"cycle growth {r['arch']}: map start cycle {r['n']} / cycle 2 = {r['time_x']:.2f}x time, "
            f"{r['bytes_x']:.2f}x bytes read; merge peak RSS {r['merge_rss_mb']:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
