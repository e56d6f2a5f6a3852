"""Reduce math on synthetic adapters: the stored update is exactly sum_i w_i dW_i, and folds compose by cycle."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from configs.tiny_sd3 import get_config
from mrlora.config import config_to_dict
from mrlora.reduce import (
    apply_updates,
    load_update,
    merge_experts,
    read_expert_adapter,
    save_expert_adapter,
    updates_after,
)
from mrlora.runstore import RunDir

IN, OUT = 24, 20
MODULES = ["blocks.0.attn.to_q", "blocks.0.attn.to_k", "blocks.1.ff.proj"]


def make_expert(path: Path, rank: int, alpha: float, seed: int, modules=MODULES, arch="sd3") -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in modules:
        state[f"{m}.lora_A.weight"] = torch.randn(rank, IN, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(OUT, rank, generator=g)
    cfg = {"r": rank, "lora_alpha": alpha, "target_modules": ["to_q", "to_k", "proj"]}
    return save_expert_adapter(state, path, arch=arch, lora_config=cfg, base="synthetic", reward=f"r{seed}")


def independent_delta(path: Path, module: str) -> torch.Tensor:
    """dW of one expert computed from the raw files, in float64 (no code under test involved)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path / "adapter_model.safetensors"))
    cfg = json.loads((path / "adapter_config.json").read_text())
    if f"{module}.lora_A.weight" not in tensors:
        return torch.zeros(OUT, IN, dtype=torch.float64)
    A = tensors[f"{module}.lora_A.weight"].double()
    B = tensors[f"{module}.lora_B.weight"].double()
    return cfg["lora_alpha"] / cfg["r"] * B @ A


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


class Toy(torch.nn.Module):
    """A module tree with the adapted paths, standing in for a transformer."""

    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.layers = torch.nn.ModuleDict()
        for m in MODULES:
            self.set(m, torch.nn.Linear(IN, OUT))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g))

    def set(self, dotted: str, module: torch.nn.Module) -> None:
        parent = self
        *path, leaf = dotted.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)


def test_mixed_ranks_nonuniform_weights_exact(tmp_path):
    experts = [
        make_expert(tmp_path / "e1", 4, 8, 1),
        make_expert(tmp_path / "e2", 8, 8, 2),
        make_expert(tmp_path / "e3", 2, 1, 3),
    ]
    weights = [3.0, 1.0, 0.5]
    merge_experts(experts, weights, tmp_path / "out")
    update = load_update(tmp_path / "out")
    info = json.loads((tmp_path / "out" / "update.json").read_text())
    norm = [w / sum(weights) for w in weights]
    assert info["exact"] is True and info["weights"] == pytest.approx(norm)
    for m in MODULES:
        A, B = update[m]
        assert A.dtype == torch.float32 and A.shape == (14, IN) and B.shape == (OUT, 14)  # rank 4 + 8 + 2
        expected = sum(w * independent_delta(e, m) for e, w in zip(experts, norm))
        assert rel_err(B @ A, expected) < 1e-5


def test_reference_mode_is_inexact_and_labelled(tmp_path, caplog):
    experts = [make_expert(tmp_path / f"e{i}", 4, 8, i) for i in range(3)]
    with caplog.at_level(logging.WARNING, logger="mrlora.reduce"):
        marker = merge_experts(experts, [1, 1, 1], tmp_path / "ref", mode="reference")
    assert marker["exact"] is False
    info = json.loads((tmp_path / "ref" / "update.json").read_text())
    assert info["exact"] is False and info["mode"] == "reference" and "inexact" in info["warning"]
    assert any("NOT the weighted average" in r.message for r in caplog.records)
    update = load_update(tmp_path / "ref")
    m = MODULES[0]
    A, B = update[m]
    truth = sum(independent_delta(e, m) for e in experts) / 3
    # the public code's merge: product of averages, not average of products (cross terms)
    assert rel_err(B @ A, truth) > 0.5
    # it continues as an adapter: the averaged LoRA is saved in expert format
    cont = read_expert_adapter(tmp_path / "ref" / "adapter")
    assert torch.allclose(cont.modules[m].delta(), B @ A, atol=1e-5)


def test_module_missing_from_one_expert_contributes_zero(tmp_path, caplog):
    e1 = make_expert(tmp_path / "e1", 4, 4, 1)
    e2 = make_expert(tmp_path / "e2", 4, 4, 2, modules=MODULES[:2])
    with caplog.at_level(logging.WARNING, logger="mrlora.reduce"):
        merge_experts([e1, e2], [1, 1], tmp_path / "out")
    assert any(MODULES[2] in r.message and "contributes zero" in r.message for r in caplog.records)
    update = load_update(tmp_path / "out")
    A, B = update[MODULES[2]]
    assert A.shape[0] == 4  # only e1's factors
    assert rel_err(B @ A, 0.5 * independent_delta(e1, MODULES[2])) < 1e-5
    info = json.loads((tmp_path / "out" / "update.json").read_text())
    assert info["missing_modules"] == {str(e2): [MODULES[2]]}


def test_negative_weights_when_allowed(tmp_path):
    e1, e2 = make_expert(tmp_path / "e1", 4, 4, 1), make_expert(tmp_path / "e2", 4, 4, 2)
    merge_experts([e1, e2], [1, -1], tmp_path / "out", allow_negative_weights=True)
    A, B = load_update(tmp_path / "out")[MODULES[0]]
    expected = 0.5 * independent_delta(e1, MODULES[0]) - 0.5 * independent_delta(e2, MODULES[0])
    assert rel_err(B @ A, expected) < 1e-5


def _make_run(tmp_path: Path) -> RunDir:
    cfg = config_to_dict(get_config())  # the preset's tree, unvalidated: reward names do not matter here
    run = RunDir.create(tmp_path / "runs", "tiny-sd3", run_ts="20261123_100000")
    run.write_run_json({"run_ts": run.run_ts, "model": "tiny-sd3", "config": cfg})
    return run


def test_updates_after_cycle3_equals_folding_cycles_by_hand(tmp_path):
    run = _make_run(tmp_path)
    for c in (1, 2, 3):
        experts = [make_expert(tmp_path / f"c{c}e{i}", 2 + i, 4, 10 * c + i) for i in range(3)]
        merge_experts(experts, [1, 2, 3], run.merged_dir(c))
    # the Map step of cycle 3 starts from cycles 1 and 2; cycle 4 from all three
    assert updates_after(run.root, 2) == [run.merged_dir(1), run.merged_dir(2)]
    dirs = updates_after(run.root, 3)
    assert dirs == [run.merged_dir(c) for c in (1, 2, 3)]

    model = Toy().to(torch.bfloat16)
    by_hand = {m: model.get_submodule(m).weight.detach().float().clone() for m in MODULES}
    for d in dirs:
        for m, (A, B) in load_update(d).items():
            by_hand[m] += B @ A
    folded = apply_updates(model, dirs, dtype=torch.bfloat16)
    assert folded == sorted(MODULES)
    for m in MODULES:
        w = model.get_submodule(m).weight
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, by_hand[m].to(torch.bfloat16))  # one fp32 fold, one rounding


def test_updates_after_refuses_incomplete_cycle(tmp_path):
    from mrlora.runstore import RunStoreError

    run = _make_run(tmp_path)
    merge_experts([make_expert(tmp_path / "e", 2, 2, 0)], [1], run.merged_dir(1))
    run.merged_dir(2).mkdir(parents=True)  # a killed merge: no marker
    with pytest.raises(RunStoreError, match="cycle 2"):
        updates_after(run.root, 2)


def test_apply_updates_rejects_foreign_module_without_changing_weights(tmp_path):
    e = make_expert(tmp_path / "e", 2, 2, 0, modules=MODULES + ["not.in.model"])
    merge_experts([e], [1], tmp_path / "u")
    model = Toy()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    from mrlora.reduce import ArchMismatchError

    with pytest.raises(ArchMismatchError, match="not.in.model"):
        apply_updates(model, [tmp_path / "u"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_reference_mode_run_continues_the_merged_lora(tmp_path):
    """Reference mode end to end: cycle 2's experts continue cycle 1's averaged LoRA, so cycle 2's update
    replaces cycle 1's in the chain, and the model after cycle 2 is base_0 + the averaged cycle-2 LoRA."""
    from safetensors.torch import save_file

    from mrlora.reduce import map_start, merge_cycle_in_run, model_after
    from mrlora.runstore import DONE_MARKER, write_marker

    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    save_file({f"{m}.weight": torch.randn(OUT, IN) for m in MODULES}, str(base / "diffusion_pytorch_model.safetensors"))
    cfg = config_to_dict(get_config())
    cfg["model"]["pretrained"], cfg["rewards"], cfg["weights"] = str(base), ["a", "b"], [1.0, 1.0]
    cfg["mapreduce"]["merge_mode"] = "reference"
    run = RunDir.create(tmp_path / "runs", "tiny-sd3", run_ts="20261123_110000")
    run.write_run_json({"run_ts": run.run_ts, "model": "tiny-sd3", "config": cfg})

    def train(cycle: int) -> None:
        start = map_start(run.root, cycle)
        for i, reward in enumerate(("a", "b")):
            if start.init_adapter is None:
                make_expert(run.adapter_dir(cycle, reward), 4, 8, 10 * cycle + i)
            else:  # continue the averaged LoRA: init + a step of "training"
                init = read_expert_adapter(start.init_adapter)
                g = torch.Generator().manual_seed(10 * cycle + i)
                state = {}
                for m, pair in init.modules.items():
                    state[f"{m}.lora_A.weight"] = pair.A + 0.1 * torch.randn(pair.A.shape, generator=g)
                    state[f"{m}.lora_B.weight"] = pair.B + 0.1 * torch.randn(pair.B.shape, generator=g)
                save_expert_adapter(
                    state, run.adapter_dir(cycle, reward), arch="sd3", base=str(base), lora_config=init.config
                )
            write_marker(run.expert_dir(cycle, reward), DONE_MARKER)
        merge_cycle_in_run(str(run.root), cycle)

    train(1)
    assert map_start(run.root, 1).init_adapter is None
    start2 = map_start(run.root, 2)
    assert start2.update_dirs == [] and start2.init_adapter == run.merged_dir(1) / "adapter"
    train(2)
    info = json.loads((run.merged_dir(2) / "update.json").read_text())
    assert info["supersedes_previous"] is True and info["exact"] is False
    assert updates_after(run.root, 2) == list(model_after(run.root, 2).update_dirs) == [run.merged_dir(2)]

    experts = [read_expert_adapter(run.adapter_dir(2, r)) for r in ("a", "b")]
    m = MODULES[0]
    A_avg = (experts[0].modules[m].A + experts[1].modules[m].A) / 2
    B_avg = (experts[0].modules[m].B + experts[1].modules[m].B) / 2
    A, B = load_update(run.merged_dir(2))[m]
    assert rel_err(B @ A, 2.0 * B_avg @ A_avg) < 1e-5  # scale alpha/r = 2
