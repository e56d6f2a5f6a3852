"""Reduce-step benchmark: our streamed exact merge + export versus peft's ``cat`` + ``merge_and_unload``.

Setup (no download): a synthetic bf16 transformer with SD3.5-M's real tensor names and shapes (24 joint blocks,
hidden 1536, 13 dual-attention blocks, ~2.47B parameters, written as sharded safetensors with an index), and
three rank-32 experts (alpha 64) on the published SD3 attention targets. Each path runs in its own subprocess
so its peak RSS (``ru_maxrss``) is its own:

* ours         ``merge_experts`` -> the stacked update (rank 96), then ``export_with_updates`` -> a full model
               directory, streamed tensor by tensor (one process, as a user making a release model runs it)
* peft         load the transformer (bf16), load the three adapters, ``add_weighted_adapter(combination_type=
               "cat")``, ``merge_and_unload``, ``save_pretrained`` (same shard size)
* disk         a plain read + write copy of the same shard files (userspace, 16 MB buffer, fsync): what the
               disk sustains for the bytes the export must move

The export reads the base once and writes it once; "within 2x of the disk" compares it with the plain copy.
Page cache: nothing is dropped (other people share this machine), so all paths read a warm cache. Ours and
the copy fsync what they write (a run-store rule); peft's save_pretrained does not, so its time stops while
its output is still in the page cache: the peft child fsyncs its files afterwards and reports that
separately, and the ratios are printed both ways.

    python benchmarks/merge_bench.py [--scale 0.25] [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SD35M = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
RANK, ALPHA, N_EXPERTS = 32, 64, 3
SHARD_BYTES = 2 * 10**9


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ------------------------------------------------------------------------------------------------------- setup


def sd35m_config(scale: float) -> dict:
    cfg = dict(SD35M)
    cfg["num_layers"] = max(2, round(SD35M["num_layers"] * scale))
    cfg["dual_attention_layers"] = tuple(i for i in SD35M["dual_attention_layers"] if i < cfg["num_layers"] - 1)
    return cfg


def build_base(root: Path, scale: float) -> dict:
    """Random bf16 weights with the real names/shapes, written shard by shard (never the whole model in RAM)."""
    import torch
    from diffusers import SD3Transformer2DModel

    from mrlora.reduce.safetensors_io import OutEntry, StreamingWriter

    cfg = sd35m_config(scale)
    with torch.device("meta"):
        model = SD3Transformer2DModel(**cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    tdir = root / "transformer"
    tdir.mkdir(parents=True)
    model.save_config(tdir)
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"]})
    )
    shards, current, size = [], [], 0
    for name, shape in shapes.items():
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    g = torch.Generator().manual_seed(0)
    for i, names in enumerate(shards, start=1):
        fname = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        entries = [OutEntry(n, "BF16", shapes[n]) for n in names]
        with StreamingWriter(tdir / fname, entries, {"format": "pt"}) as w:
            for n in names:
                t = torch.empty(shapes[n], dtype=torch.bfloat16)
                if t.numel():
                    t.normal_(0, 0.02, generator=g)
                w.write(n, t)
                total += t.numel() * 2
                weight_map[n] = fname
    (tdir / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    modules = sorted(
        n[: -len(".weight")]
        for n in shapes
        if n.endswith(".weight")
        and n.startswith("transformer_blocks.")
        and n[: -len(".weight")].endswith(tuple("." + t for t in TARGETS))
    )
    return {
        "params": sum(int(torch.Size(s).numel()) for s in shapes.values()),
        "bytes": total,
        "shards": len(shards),
        "layers": cfg["num_layers"],
        "modules": modules,
        "shapes": {m: shapes[m + ".weight"] for m in modules},
    }


def build_experts(root: Path, info: dict) -> list[Path]:
    import torch

    from mrlora.reduce import save_expert_adapter

    dirs = []
    for i in range(N_EXPERTS):
        g = torch.Generator().manual_seed(100 + i)
        state = {}
        for m in info["modules"]:
            out_f, in_f = info["shapes"][m]
            state[f"{m}.lora_A.weight"] = torch.randn(RANK, in_f, generator=g) * 0.01
            state[f"{m}.lora_B.weight"] = torch.randn(out_f, RANK, generator=g) * 0.01
        cfg = {"r": RANK, "lora_alpha": ALPHA, "target_modules": list(TARGETS)}
        dirs.append(
            save_expert_adapter(
                state, root / f"expert{i}", arch="sd3", lora_config=cfg, base="synthetic-sd35m", reward=f"r{i}"
            )
        )
    return dirs


# ---------------------------------------------------------------------------------------------------- children


def child_ours(args: dict) -> dict:
    """Merge then export in one process, as a user making a release model runs them."""
    from mrlora.reduce import export_with_updates, merge_experts

    t0 = time.perf_counter()
    merge_experts(args["experts"], [1.0] * len(args["experts"]), args["merged"], base=args["base"])
    t1 = time.perf_counter()
    export_with_updates(args["base"], [args["merged"]], args["out"])
    t2 = time.perf_counter()
    return {"work_s": t2 - t0, "merge_s": t1 - t0, "export_s": t2 - t1}


def child_peft(args: dict) -> dict:
    import torch
    from diffusers import SD3Transformer2DModel
    from peft import LoraConfig
    from peft.tuners.lora import LoraModel

    from mrlora.reduce.safetensors_io import read_tensors

    t0 = time.perf_counter()
    transformer = SD3Transformer2DModel.from_pretrained(Path(args["base"]) / "transformer", torch_dtype=torch.bfloat16)
    names = [f"e{i}" for i in range(len(args["experts"]))]
    lora_model = None
    for name, d in zip(names, args["experts"]):
        cfg_dict = json.loads((Path(d) / "adapter_config.json").read_text())
        cfg = LoraConfig(r=cfg_dict["r"], lora_alpha=cfg_dict["lora_alpha"], target_modules=cfg_dict["target_modules"])
        if lora_model is None:
            lora_model = LoraModel(transformer, cfg, name)
        else:
            lora_model.peft_config[name] = cfg
            lora_model.inject_adapter(lora_model.model, name)
        tensors = read_tensors(Path(d) / "adapter_model.safetensors")
        with torch.no_grad():
            for key, t in tensors.items():
                module, _, rest = key.rpartition(".lora_")
                layer = lora_model.model.get_submodule(module)
                getattr(layer, f"lora_{rest[0]}")[name].weight.copy_(t)
    weights = [1.0 / len(names)] * len(names)
    lora_model.add_weighted_adapter(names, weights, "merged", combination_type="cat")
    lora_model.set_adapter("merged")
    merged = lora_model.merge_and_unload()
    merged.save_pretrained(args["out"], max_shard_size=SHARD_BYTES)
    t1 = time.perf_counter()
    for f in sorted(Path(args["out"]).iterdir()):  # save_pretrained leaves its writes in the page cache
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    return {"work_s": t1 - t0, "fsync_s": time.perf_counter() - t1}


def child_disk(args: dict) -> dict:
    t0 = time.perf_counter()
    src = Path(args["base"]) / "transformer"
    dst = Path(args["out"])
    dst.mkdir(parents=True)
    moved = 0
    for f in sorted(src.glob("*.safetensors")):
        with open(f, "rb") as fin, open(dst / f.name, "wb") as fout:
            while block := fin.read(16 << 20):
                fout.write(block)
                moved += len(block)
            fout.flush()
            os.fsync(fout.fileno())
    return {"work_s": time.perf_counter() - t0, "bytes": moved}


def child_setup(args: dict) -> dict:
    t0 = time.perf_counter()
    info = build_base(Path(args["base"]), args["scale"])
    experts = build_experts(Path(args["work"]), info)
    return {
        "work_s": time.perf_counter() - t0,
        "experts": [str(d) for d in experts],
        **{k: info[k] for k in ("params", "bytes", "shards", "layers", "modules")},
    }


def child_compare(args: dict) -> dict:
    return {"work_s": 0.0, "max_rel": compare_outputs(Path(args["ours"]), Path(args["peft"]), args["modules"])}


CHILDREN = {"setup": child_setup, "compare": child_compare, "ours": child_ours, "peft": child_peft, "disk": child_disk}


def run_child(kind: str, args: dict, threads: int | None = None) -> dict:
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--child-args", json.dumps(args)],
        capture_output=True,
        text=True,
        env=env,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def compare_outputs(ours: Path, peft_dir: Path, modules: list[str]) -> float:
    """Max relative difference of a few adapted weights between the two outputs (bf16 rounding expected)."""
    from safetensors import safe_open

    def find(root: Path, key: str):
        for f in sorted(root.glob("*.safetensors")):
            with safe_open(str(f), "pt") as fh:
                if key in fh.keys():
                    return fh.get_tensor(key).float()
        raise KeyError(key)

    worst = 0.0
    for m in modules[:: max(1, len(modules) // 6)]:
        a, b = find(ours / "transformer", m + ".weight"), find(peft_dir, m + ".weight")
        worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=1.0, help="fraction of SD3.5-M's 24 blocks (0.25: quick run)")
    p.add_argument("--workdir", help="where to put the ~4 copies of the model (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument(
        "--threads",
        type=int,
        help="OMP_NUM_THREADS for both the ours and the peft child (default: "
        "torch's default); on a shared, oversubscribed node 1 avoids thread hand-off stalls for both",
    )
    p.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    p.add_argument("--child-args", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        result = CHILDREN[a.child](json.loads(a.child_args))
        result["maxrss_mb"] = _maxrss_mb()
        print(json.dumps(result))
        return

    work = Path(tempfile.mkdtemp(prefix="merge_bench_", dir=a.workdir))
    try:
        # every heavy step runs in a child: ru_maxrss survives fork+exec, so a big parent would inflate them all
        info = run_child("setup", {"base": str(work / "base"), "work": str(work), "scale": a.scale})
        print(
            f"synthetic SD3.5-M base: {info['layers']} blocks, {info['params'] / 1e9:.2f}B params, "
            f"{info['bytes'] / 1e9:.2f} GB bf16 in {info['shards']} shard(s); {N_EXPERTS} rank-{RANK} experts on "
            f"{len(info['modules'])} modules (setup {info['wall_s']:.0f} s)"
        )
        common = {"base": str(work / "base"), "experts": info["experts"]}
        ours = run_child("ours", {**common, "merged": str(work / "merged"), "out": str(work / "ours")}, a.threads)
        peft = run_child("peft", {**common, "out": str(work / "peft")}, a.threads)
        disk = run_child("disk", {**common, "out": str(work / "copy")})
        max_rel = run_child(
            "compare", {"ours": str(work / "ours"), "peft": str(work / "peft"), "modules": info["modules"]}
        )["max_rel"]

        moved = 2 * disk["bytes"]
        print(f"\n{'path':40s} {'wall s':>8s} {'work s':>8s} {'peak RSS MB':>12s}")
        for name, r in (
            ("ours: merge + export (one process)", ours),
            ("peft: cat + merge_and_unload + save", peft),
            ("disk: plain read+write copy", disk),
        ):
            print(f"{name:40s} {r['wall_s']:8.1f} {r['work_s']:8.1f} {r['maxrss_mb']:12.0f}")
        print(f"  of which ours: merge {ours['merge_s']:.1f} s, export {ours['export_s']:.1f} s (fsynced)")
        print(f"  peft's output is not fsynced by save_pretrained; fsyncing it afterwards took {peft['fsync_s']:.1f} s")
        peft_durable = peft["work_s"] + peft["fsync_s"]
        print(
            f"\nbytes moved by the export: {moved / 1e9:.2f} GB (read {disk['bytes'] / 1e9:.2f} + write "
            f"{disk['bytes'] / 1e9:.2f}); plain copy sustains {moved / 1e9 / disk['work_s']:.2f} GB/s, "
            f"export {moved / 1e9 / ours['export_s']:.2f} GB/s"
        )
        print(
            f"speed-up vs peft (wall, incl. interpreter start): {peft['wall_s'] / ours['wall_s']:.2f}x   (target >= 3x)"
        )
        print(f"speed-up vs peft (work only):                     {peft['work_s'] / ours['work_s']:.2f}x")
        print(f"speed-up vs peft (work, both outputs on disk):    {peft_durable / ours['work_s']:.2f}x")
        print(
            f"peak memory vs peft:                              {peft['maxrss_mb'] / ours['maxrss_mb']:.2f}x less "
            "(target >= 5x)"
        )
        print(
            f"export time / plain copy time:                    {ours['export_s'] / disk['work_s']:.2f}x   "
            "(target <= 2x)"
        )
        print(f"merge + export time / plain copy time:            {ours['work_s'] / disk['work_s']:.2f}x")
        print(f"max relative difference ours vs peft on adapted weights: {max_rel:.2e} (bf16 rounding)")
    finally:
        if a.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
