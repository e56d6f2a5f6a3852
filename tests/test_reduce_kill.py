"""A merge or export killed mid-write (SIGKILL) leaves nothing that counts as complete, and a rerun finishes it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from configs.tiny_sd3 import get_config
from mrlora.config import config_to_dict
from mrlora.reduce import export_with_updates, load_update, merge_cycle_in_run, save_expert_adapter
from mrlora.reduce.export import EXPORT_MARKER
from mrlora.reduce.safetensors_io import DELAY_ENV
from mrlora.runstore import DONE_MARKER, MERGE_MARKER, RunDir, read_marker, write_marker

REPO = Path(__file__).resolve().parents[1]
MODULES = [f"transformer_blocks.{i}.attn.{p}" for i in range(10) for p in ("to_q", "to_k", "to_v")]
DIM = 16


def make_base(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    g = torch.Generator().manual_seed(0)
    save_file(
        {f"{m}.weight": torch.randn(DIM, DIM, generator=g).to(torch.bfloat16) for m in MODULES},
        str(path / "diffusion_pytorch_model.safetensors"),
    )
    return path


def make_run(tmp_path: Path, base: Path) -> RunDir:
    cfg = config_to_dict(get_config())
    cfg["model"]["pretrained"] = str(base)
    cfg["rewards"], cfg["weights"] = ["a", "b"], [1.0, 3.0]
    run = RunDir.create(tmp_path / "runs", "tiny-sd3", run_ts="20261123_130000")
    run.write_run_json({"run_ts": run.run_ts, "model": "tiny-sd3", "config": cfg})
    g = torch.Generator().manual_seed(1)
    for reward in ("a", "b"):
        state = {}
        for m in MODULES:
            state[f"{m}.lora_A.weight"] = torch.randn(2, DIM, generator=g)
            state[f"{m}.lora_B.weight"] = torch.randn(DIM, 2, generator=g)
        save_expert_adapter(
            state, run.adapter_dir(1, reward), arch="sd3", base=str(base), lora_config={"r": 2, "lora_alpha": 2}
        )
        write_marker(run.expert_dir(1, reward), DONE_MARKER)
    return run


def start_and_kill(code: str, wait_for, tmp_path: Path) -> None:
    """Run ``code`` in a subprocess that sleeps between tensors; SIGKILL it once ``wait_for()`` is true."""
    env = dict(os.environ, PYTHONPATH=str(REPO), **{DELAY_ENV: "0.5"})
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while not wait_for():
            assert proc.poll() is None, f"writer exited early: {proc.stderr.read().decode()}"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.05)
        time.sleep(0.6)  # at least one tensor written
        assert proc.poll() is None, "the writer finished before it could be killed; raise the delay"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


def test_killed_merge_is_redone(tmp_path):
    run = make_run(tmp_path, make_base(tmp_path / "base"))
    merged = run.merged_dir(1)
    start_and_kill(
        f"from mrlora.reduce import merge_cycle_in_run; merge_cycle_in_run({str(run.root)!r}, 1)",
        lambda: merged.is_dir() and any(p.name.startswith(".tmp-update.safetensors") for p in merged.iterdir()),
        tmp_path,
    )
    assert not (merged / MERGE_MARKER).exists() and run.merge_done(1) is None
    assert not (merged / "update.safetensors").exists()  # only the temporary file was being written

    marker = merge_cycle_in_run(str(run.root), 1)
    assert marker["complete"] and read_marker(merged, MERGE_MARKER, verify="sha256") is not None
    assert sorted(p.name for p in merged.iterdir()) == ["MERGE_DONE.json", "update.json", "update.safetensors"]
    A, B = load_update(merged)[MODULES[0]]
    assert A.shape == (4, DIM) and B.shape == (DIM, 4)


def test_killed_export_leaves_no_output_and_rerun_finishes(tmp_path):
    base = make_base(tmp_path / "base")
    run = make_run(tmp_path, base)
    merge_cycle_in_run(str(run.root), 1)
    out = tmp_path / "export"
    start_and_kill(
        "from mrlora.reduce import export_with_updates; "
        f"export_with_updates({str(base)!r}, [{str(run.merged_dir(1))!r}], {str(out)!r})",
        lambda: any(
            True for p in tmp_path.glob(".tmp-export-export.*") for _ in p.glob(".tmp-diffusion_pytorch_model*")
        ),
        tmp_path,
    )
    assert not out.exists()
    assert len(list(tmp_path.glob(".tmp-export-export.*"))) == 1  # the killed build, hidden

    export_with_updates(base, [run.merged_dir(1)], out)
    assert read_marker(out, EXPORT_MARKER) is not None
    assert not list(tmp_path.glob(".tmp-export-export.*"))  # the dead build was cleaned up
    from safetensors.torch import load_file

    exported = load_file(str(out / "diffusion_pytorch_model.safetensors"))
    original = load_file(str(base / "diffusion_pytorch_model.safetensors"))
    A, B = load_update(run.merged_dir(1))[MODULES[0]]
    expected = (original[f"{MODULES[0]}.weight"].float() + B @ A).to(torch.bfloat16)
    assert torch.equal(exported[f"{MODULES[0]}.weight"], expected)
