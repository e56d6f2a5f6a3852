"""Invalid merge inputs: a clear message on stderr, exit status 2, and no output directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mrlora.reduce import save_expert_adapter
from mrlora.reduce.cli import main

IN, OUT = 16, 12
MODULES = ["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"]


def make_base(path: Path, cls: str = "SD3Transformer2DModel", shape=(OUT, IN)) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"_class_name": cls}))
    save_file(
        {f"{m}.weight": torch.zeros(shape) for m in MODULES} | {"proj_out.weight": torch.zeros(4, IN)},
        str(path / "diffusion_pytorch_model.safetensors"),
    )
    return path


def make_expert(path: Path, seed: int = 0, rank: int = 4, arch: str = "sd3", in_features: int = IN) -> Path:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for m in MODULES:
        state[f"{m}.lora_A.weight"] = torch.randn(rank, in_features, generator=g)
        state[f"{m}.lora_B.weight"] = torch.randn(OUT, rank, generator=g)
    return save_expert_adapter(
        state, path, arch=arch, lora_config={"r": rank, "lora_alpha": 2 * rank}, base="synthetic"
    )


@pytest.fixture
def setup(tmp_path):
    experts = [make_expert(tmp_path / f"e{i}", seed=i) for i in range(3)]
    return tmp_path, experts, make_base(tmp_path / "base")


def run_cli(capsys, argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def expect_error(capsys, tmp_path, argv, *needles):
    out = tmp_path / "out"
    code, err = run_cli(capsys, argv + ["--out", out])
    assert code == 2, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    assert not out.exists()


def test_valid_merge_writes_marker(capsys, setup):
    tmp_path, experts, base = setup
    code, err = run_cli(
        capsys, ["--experts", *experts, "--weights", 1, 2, 3, "--base", base, "--out", tmp_path / "out"]
    )
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "MERGE_DONE.json",
        "update.json",
        "update.safetensors",
    ]


@pytest.mark.parametrize(
    "weights,needle",
    [
        ([1, -1, 1], "negative merge weight"),
        ([0, 0, 0], "all zero"),
        ([1, 1], "2 weight(s) for 3 expert(s)"),
    ],
)
def test_bad_weights(capsys, setup, weights, needle):
    tmp_path, experts, _ = setup
    expect_error(capsys, tmp_path, ["--experts", *experts, "--weights", *weights], needle)


def test_negative_weights_need_the_flag(capsys, setup):
    tmp_path, experts, _ = setup
    code, err = run_cli(
        capsys, ["--experts", *experts, "--weights", 1, -1, 1, "--allow-negative-weights", "--out", tmp_path / "out"]
    )
    assert code == 0, err


def test_arch_mismatch_with_base(capsys, setup):
    tmp_path, experts, _ = setup
    flux_base = make_base(tmp_path / "flux_base", cls="FluxTransformer2DModel")
    expect_error(
        capsys, tmp_path, ["--experts", *experts, "--base", flux_base], "disagree on the architecture", "sd3", "flux"
    )


def test_arch_mismatch_between_experts(capsys, setup):
    tmp_path, experts, _ = setup
    other = make_expert(tmp_path / "flux_expert", arch="flux")
    expect_error(capsys, tmp_path, ["--experts", experts[0], other], "disagree on the architecture")


def test_module_shape_mismatch_with_base(capsys, setup):
    tmp_path, experts, _ = setup
    base = make_base(tmp_path / "wide_base", shape=(OUT, 2 * IN))
    expect_error(capsys, tmp_path, ["--experts", *experts, "--base", base], "different base", "to_k", "12x32")


def test_module_missing_in_base(capsys, setup):
    tmp_path, experts, _ = setup
    base = tmp_path / "small_base"
    base.mkdir()
    (base / "config.json").write_text(json.dumps({"_class_name": "SD3Transformer2DModel"}))
    save_file({f"{MODULES[0]}.weight": torch.zeros(OUT, IN)}, str(base / "diffusion_pytorch_model.safetensors"))
    expect_error(capsys, tmp_path, ["--experts", *experts, "--base", base], MODULES[1], "different architecture")


def test_shape_mismatch_between_experts(capsys, setup):
    tmp_path, experts, _ = setup
    odd = make_expert(tmp_path / "odd", in_features=IN + 1)
    expect_error(capsys, tmp_path, ["--experts", experts[0], odd], "different bases")


def test_rank_disagrees_with_config(capsys, setup):
    tmp_path, experts, _ = setup
    cfg = json.loads((experts[1] / "adapter_config.json").read_text())
    cfg["r"] = 8
    (experts[1] / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(capsys, tmp_path, ["--experts", *experts], "r=8", "rank 4")


def test_truncated_safetensors(capsys, setup):
    tmp_path, experts, _ = setup
    f = experts[2] / "adapter_model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-100])
    expect_error(capsys, tmp_path, ["--experts", *experts], str(f), "truncated")


def test_corrupt_safetensors_header(capsys, setup):
    tmp_path, experts, _ = setup
    f = experts[0] / "adapter_model.safetensors"
    data = bytearray(f.read_bytes())
    data[10:20] = b"\xff" * 10
    f.write_bytes(bytes(data))
    expect_error(capsys, tmp_path, ["--experts", *experts], str(f), "not a valid safetensors file")


def test_missing_adapter_config(capsys, setup):
    tmp_path, experts, _ = setup
    (experts[1] / "adapter_config.json").unlink()
    expect_error(capsys, tmp_path, ["--experts", *experts], "adapter_config.json", str(experts[1]))


def test_missing_expert_dir(capsys, setup):
    tmp_path, experts, _ = setup
    expect_error(capsys, tmp_path, ["--experts", experts[0], tmp_path / "nope"], "does not exist")


def test_dora_adapter_refused(capsys, setup):
    tmp_path, experts, _ = setup
    cfg = json.loads((experts[0] / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (experts[0] / "adapter_config.json").write_text(json.dumps(cfg))
    expect_error(capsys, tmp_path, ["--experts", *experts], "use_dora")


def test_occupied_output_is_not_touched(capsys, setup):
    tmp_path, experts, _ = setup
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code, err = run_cli(capsys, ["--experts", *experts, "--out", out])
    assert code == 2 and "not a merge output" in err
    assert (out / "notes.txt").read_text() == "keep me"


def test_cli_subprocess_exit_code_and_stderr(setup):
    tmp_path, experts, _ = setup
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrlora.merge",
            "--experts",
            *map(str, experts),
            "--weights",
            "1",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "error: 2 weight(s) for 3 expert(s)" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == "" and not out.exists()


def test_missing_base_dir(capsys, setup):
    tmp_path, experts, _ = setup
    expect_error(capsys, tmp_path, ["--experts", *experts, "--base", tmp_path / "no_such_model"], "does not exist")


def test_expert_rewritten_after_verification_is_refused(setup):
    """The merge verifies each expert in one streamed read, then reads factors module by module; a file that
    another process replaces in between is refused rather than merged unchecked."""
    from mrlora.reduce.adapters import read_expert_adapter
    from mrlora.reduce.errors import AdapterError

    _, experts, _ = setup
    adapter = read_expert_adapter(experts[0], load=False)
    module, pair = next(iter(adapter.modules.items()))
    first = pair.A.clone()
    assert torch.equal(read_expert_adapter(experts[0]).modules[module].A, first)
    tmp = experts[0] / "adapter_model.safetensors.new"
    tmp.write_bytes((experts[1] / "adapter_model.safetensors").read_bytes())
    os.replace(tmp, experts[0] / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="changed after it was verified"):
        _ = pair.A
