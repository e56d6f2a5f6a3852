"""The Map step inside a run: cycle 2 trains on base_0 + cycle 1's merged update; the CLI reports user errors
in one line, exit code 2, and leaves nothing on disk."""

from __future__ import annotations

import pytest
import torch
from train_helpers import tiny_run

from mrlora.runstore import RunDir, RunStoreError
from mrlora.train import main, train_expert_in_run

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")


def _run(tmp_path, base: str) -> RunDir:
    return tiny_run(
        tmp_path,
        base,
        ["rewards=['brightness']", "weights=[1.0]", "sample.resolution=32", "train.steps=2", "train.lr=3e-2"],
    )


def test_second_cycle_trains_on_exactly_base_zero_plus_the_merged_update(tiny_sd3_dir, tmp_path):
    from mrlora.models.loading import load_pipeline
    from mrlora.reduce import apply_updates, merge_cycle_in_run, updates_after
    from mrlora.training import loop

    run = _run(tmp_path, tiny_sd3_dir)
    with pytest.raises(RunStoreError, match="cycle 1 .* no complete merge"):
        train_expert_in_run(str(run.root), 2, "brightness")
    first = train_expert_in_run(str(run.root), 1, "brightness")
    assert first["cycle"] == 1 and first["steps"] == 2
    merge_cycle_in_run(str(run.root), 1)

    seen = {}
    original = loop._load_start_pipeline

    def spy(job, device):  # the weights training starts from, before the LoRA is added
        pipe = original(job, device)
        seen["weights"] = {k: v.detach().clone() for k, v in pipe.transformer.state_dict().items()}
        seen["start_base"] = job.start_base
        return pipe

    loop._load_start_pipeline = spy
    try:
        second = train_expert_in_run(str(run.root), 2, "brightness")
    finally:
        loop._load_start_pipeline = original
    assert seen["start_base"] == run.base_dir(1)  # the materialised model after cycle 1, not base_0 + updates
    assert second["cycle"] == 2 and run.expert_done(2, "brightness") is not None
    assert train_expert_in_run(str(run.root), 2, "brightness") == second  # DONE: returns at once

    expected = load_pipeline(tiny_sd3_dir, "sd3", "fp32", "cpu").transformer
    apply_updates(expected, updates_after(run.root, 1), torch.float32)  # independent: base_0 + every update
    base0 = load_pipeline(tiny_sd3_dir, "sd3", "fp32", "cpu").transformer.state_dict()
    changed = 0
    for k, v in expected.state_dict().items():
        assert torch.equal(seen["weights"][k], v), k
        changed += int(not torch.equal(base0[k], v))
    assert changed > 0


def test_cli_user_errors_are_one_line_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "expert"
    code = main(
        [
            "--config",
            "tiny-sd3",
            "--reward",
            "brightness",
            "--base",
            "tiny:sd3",
            "--out",
            str(out),
            "--set",
            "train.lrr=1",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and "unknown config key 'train.lrr'" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["--run", str(tmp_path), "--reward", "brightness"]) == 2
    assert "--run needs --cycle" in capsys.readouterr().err
    assert main(["--reward", "brightness", "--config", "tiny-sd3"]) == 2
    assert "needs --base, --out" in capsys.readouterr().err
    assert main(["--run", str(tmp_path / "nope"), "--cycle", "1", "--reward", "brightness"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_help_describes_both_modes(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    text = capsys.readouterr().out
    assert info.value.code == 0
    for flag in ("--run", "--cycle", "--model", "--base", "--prior-updates", "--out", "--steps", "--set", "--reward"):
        assert flag in text
