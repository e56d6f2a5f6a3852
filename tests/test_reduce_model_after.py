"""The model after cycle c: one answer for Map, eval and export, bounded reads, no rounding drift, bounded disk.

Runs are built by hand on the tiny SD3 model with the real formats (expert adapters, DONE markers, the real
merge job ``merge_cycle_in_run``), and every expectation is computed independently from the expert adapter
files in float64 (safetensors + torch matmuls, none of the code under test).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from eval.checkpoint import resolve_checkpoint
from eval.model import build_pipeline
from mrlora.config import config_from_dict, config_to_dict, load_config
from mrlora.models.loading import load_pipeline
from mrlora.reduce import load_pipeline_after, map_start, merge_cycle_in_run, model_after, save_expert_adapter
from mrlora.runstore import DONE_MARKER, RunDir, write_marker

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.to_k")
LORA = {"r": 2, "lora_alpha": 4, "target_modules": ["to_q", "to_k", "to_v"], "peft_type": "LORA"}
REWARDS = ("brightness", "jpeg_compressibility")
WEIGHTS = (1.0, 3.0)


def make_run(tmp_path: Path, base: str, *sets: str) -> RunDir:
    cfg = load_config(
        "tiny-sd3", [f"model.pretrained={base}", f"rewards={list(REWARDS)}", f"weights={list(WEIGHTS)}", *sets]
    )
    run = RunDir.create(tmp_path / "runs", "tiny-sd3")
    run.write_run_json({"run_ts": run.run_ts, "model": "tiny-sd3", "config": config_to_dict(cfg), "history": []})
    return run


def shapes_of(base: str) -> dict[str, tuple[int, int]]:
    t = load_pipeline(base, "sd3").transformer
    return {m: tuple(t.get_submodule(m).weight.shape) for m in MODULES}


def finish_cycle(run: RunDir, cycle: int, shapes, init: Path | None = None) -> None:
    """Write DONE experts for ``cycle`` (random LoRAs; in reference mode continuing ``init``) and merge it."""
    for k, reward in enumerate(REWARDS):
        g = torch.Generator().manual_seed(100 * cycle + k)
        state = {}
        for m, (o, i) in shapes.items():
            a0 = b0 = 0.0
            if init is not None:
                a0 = load_file(str(init / "adapter_model.safetensors"))[f"{m}.lora_A.weight"]
                b0 = load_file(str(init / "adapter_model.safetensors"))[f"{m}.lora_B.weight"]
            state[f"{m}.lora_A.weight"] = a0 + torch.randn(LORA["r"], i, generator=g) * 0.3
            state[f"{m}.lora_B.weight"] = b0 + torch.randn(o, LORA["r"], generator=g) * 0.3
        save_expert_adapter(
            state, run.adapter_dir(cycle, reward), arch="sd3", lora_config=LORA, base="tiny", reward=reward
        )
        write_marker(run.expert_dir(cycle, reward), DONE_MARKER, extra={"status": "ok"})
    merge_cycle_in_run(str(run.root), cycle)


def expert_delta(run: RunDir, cycle: int, module: str, average_factors: bool = False) -> torch.Tensor:
    """The cycle's update of ``module`` from the expert files, float64: exact sum_i w_i s_i B_i A_i, or (the
    public reference merge) s * (sum w_i B_i)(sum w_i A_i)."""
    w = torch.tensor(WEIGHTS, dtype=torch.float64) / sum(WEIGHTS)
    scale = LORA["lora_alpha"] / LORA["r"]
    files = [load_file(str(run.adapter_dir(cycle, r) / "adapter_model.safetensors")) for r in REWARDS]
    A = [f[f"{module}.lora_A.weight"].double() for f in files]
    B = [f[f"{module}.lora_B.weight"].double() for f in files]
    if average_factors:
        return scale * sum(wi * b for wi, b in zip(w, B)) @ sum(wi * a for wi, a in zip(w, A))
    return sum(wi * scale * b @ a for wi, a, b in zip(w, A, B))


def test_eval_of_reference_and_exact_runs_folds_each_update_once(tiny_sd3_dir, tmp_path):
    """Eval of RUN:2 is base_0 + what cycles 1 and 2 changed: in exact mode both updates, in reference mode only
    cycle 2's averaged LoRA (which continued cycle 1's, so it already contains it). Counting cycle 1 twice, as
    eval once did, is off by the whole cycle-1 update."""
    shapes = shapes_of(tiny_sd3_dir)
    base0 = load_pipeline(tiny_sd3_dir, "sd3").transformer
    for mode in ("exact", "reference"):
        run = make_run(tmp_path / mode, tiny_sd3_dir, f"mapreduce.merge_mode='{mode}'")
        finish_cycle(run, 1, shapes)
        init = map_start(run.root, 2).init_adapter
        assert (init is not None) == (mode == "reference")
        finish_cycle(run, 2, shapes, init=init)

        ckpt = resolve_checkpoint(f"{run.root}:2")
        cfg = config_from_dict(ckpt.config)
        weights = build_pipeline(ckpt, cfg, device="cpu").transformer
        for m in MODULES:
            if mode == "exact":
                expected = base0.get_submodule(m).weight.double() + expert_delta(run, 1, m) + expert_delta(run, 2, m)
            else:
                expected = base0.get_submodule(m).weight.double() + expert_delta(run, 2, m, average_factors=True)
            got = weights.get_submodule(m).weight.double()
            assert torch.allclose(got, expected, rtol=0, atol=1e-5), (mode, m, (got - expected).abs().max())

        # an expert of cycle 2 is evaluated on the base it trained from: in reference mode base_0 itself; in
        # exact mode the model after cycle 1 (whose materialised base retention removed once cycle 2 had one)
        expert = resolve_checkpoint(str(run.expert_dir(2, REWARDS[0])))
        assert expert.base_dir is None
        assert expert.update_dirs == (() if mode == "reference" else (str(run.merged_dir(1)),))


def bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 numbers at |x| (8 significant bits)."""
    x = x.double().abs().clamp_min(2.0**-126)
    return 2.0 ** (torch.floor(torch.log2(x)) - 7)


def test_cycle_n_is_base0_plus_every_update_summed_in_fp32_and_rounded_once(tiny_sd3_dir, tmp_path):
    """bf16 run, materialised every 3 cycles, 8 cycles: fewer than 3 updates are ever folded at a Map start, old
    bases are pruned, and the weights of every cycle are the float64 sum base_0 + all updates rounded once to
    bf16 (the fp32 master never drifts): within half a bf16 ulp (up to fp32 summation) where a base was just
    materialised; where j updates follow the base, the base's own rounding (half an ulp of the base value) is
    the only extra error, whatever the cycle number."""
    shapes = shapes_of(tiny_sd3_dir)
    run = make_run(tmp_path, tiny_sd3_dir, "model.dtype='bf16'", "mapreduce.materialise_every=3")
    base0 = load_pipeline(tiny_sd3_dir, "sd3", dtype="bf16").transformer
    total = {m: base0.get_submodule(m).weight.double() for m in MODULES}
    at_base = dict(total)
    for cycle in range(1, 9):
        finish_cycle(run, cycle, shapes)
        for m in MODULES:
            total[m] = total[m] + expert_delta(run, cycle, m)
        model = model_after(run.root, cycle)
        assert len(model.update_dirs) < 3 and model.base_cycle == 3 * (cycle // 3)
        assert len(model.chain) == cycle
        if not model.update_dirs:
            at_base = dict(total)
        weights = load_pipeline_after(model, tiny_sd3_dir, "sd3", "bf16").transformer
        for m in MODULES:
            w = weights.get_submodule(m).weight
            assert w.dtype == torch.bfloat16
            err = (w.double() - total[m]).abs()
            bound = 0.5 * bf16_ulp(total[m]) * (1 + 1e-4)
            if model.update_dirs:
                bound = bound + 0.5 * bf16_ulp(at_base[m])
                assert (err <= bound).all(), (cycle, m, (err / bound).max())
            else:  # the master rounded once: exact but for fp32 summation order at rounding ties
                assert (err > bound).float().mean() < 1e-3, (cycle, m)
                assert (err <= 2 * bound).all(), (cycle, m)
    # retention: only the newest materialised base is kept; older ones are rebuilt from the updates if needed
    assert [c for c in run.cycles_present() if run.base_dir(c).exists()] == [6]
    marker = json.loads((run.base_dir(6) / "BASE_DONE.json").read_text())
    assert marker["chain"] == [1, 2, 3, 4, 5, 6] and marker["from_base_cycle"] == 3


def test_deleting_the_newest_base_changes_no_weights(tiny_sd3_dir, tmp_path):
    """A materialised base is a cache: deleting it (or losing it) gives the same model from base_0 + updates,
    and the next merge materialises again."""
    import shutil

    shapes = shapes_of(tiny_sd3_dir)
    run = make_run(tmp_path, tiny_sd3_dir)
    for cycle in (1, 2):
        finish_cycle(run, cycle, shapes)
    with_base = load_pipeline_after(model_after(run.root, 2), tiny_sd3_dir, "sd3", "fp32").transformer.state_dict()
    shutil.rmtree(run.base_dir(2))
    model = model_after(run.root, 2)
    assert model.base_dir is None and len(model.update_dirs) == 2
    without = load_pipeline_after(model, tiny_sd3_dir, "sd3", "fp32").transformer.state_dict()
    assert all(torch.equal(with_base[k], v) for k, v in without.items())
    finish_cycle(run, 3, shapes)
    assert model_after(run.root, 3).base_dir == run.base_dir(3)
    # what launch.status prints: where the next Map start reads from, and where the disk goes
    from mrlora.runstore import storage_summary

    line = storage_summary(run.root, 3)
    assert line.startswith("model after cycle 3: cycle 3's materialised base + 0 update(s)   disk ")
    assert "bases " in line and "updates " in line and "experts " in line


def test_merge_prunes_finished_experts_step_checkpoints_and_they_stay_done(tiny_sd3_dir, tmp_path):
    """Step checkpoints of a merged cycle's experts are never resumed: the merge removes them (unless
    mapreduce.keep_step_checkpoints) and rewrites DONE.json without them, so the experts stay verifiably done."""
    from mrlora.runstore import CHECKPOINT_MARKER, read_marker

    shapes = shapes_of(tiny_sd3_dir)
    for keep in (False, True):
        run = make_run(tmp_path / str(keep), tiny_sd3_dir, f"mapreduce.keep_step_checkpoints={keep}")
        for reward in REWARDS:
            ckpt = run.checkpoint_dir(1, reward, 2)
            ckpt.mkdir(parents=True)
            (ckpt / "training_state.pt").write_bytes(b"state")
            write_marker(ckpt, CHECKPOINT_MARKER)
        finish_cycle(run, 1, shapes)  # DONE.json (listing the checkpoint files) then the merge
        for reward in REWARDS:
            assert run.checkpoint_dir(1, reward, 2).exists() == keep
            done = read_marker(run.expert_dir(1, reward), DONE_MARKER, verify="sha256")
            assert done is not None and ("pruned" in done) != keep
