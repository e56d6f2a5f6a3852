"""Publishing an export: the model card of a tiny run (config and eval summary, the base's licence), and a push
to the Hub that is refused before anything is written when it cannot work from here."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import yaml
from test_eval_report import image_pool, synthetic_eval  # noqa: F401  (image_pool is a fixture)
from test_reduce_tiny import finish_experts, make_run

from mrlora.reduce import merge_cycle_in_run
from mrlora.reduce.cli import main as cli_main
from mrlora.reduce.export import EXPORT_MARKER
from mrlora.runstore import read_marker


def _front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n", 2)[1])


@pytest.fixture
def merged_run(tiny_sd3_dir, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(tiny_sd3_dir, base)
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-licence\n---\n\n# the tiny base\n")
    run = make_run(tmp_path, base)
    finish_experts(run, 1, base, seed=1)
    merge_cycle_in_run(str(run.root), 1)
    return run


def test_model_card_names_base_licence_run_config_and_evals(merged_run, tmp_path, image_pool, capsys):  # noqa: F811
    run = merged_run
    rng = np.random.default_rng(0)
    synthetic_eval(
        run.evals_dir / "c0", {"kind": "base", "label": "base"}, {"a": rng.normal(0.2, 0.1, (3, 2))}, image_pool
    )
    ckpt = {"kind": "merged", "cycle": 1, "run_root": str(run.root), "label": f"{run.run_ts} cycle 1"}
    synthetic_eval(run.evals_dir / "c1", ckpt, {"a": rng.normal(0.6, 0.1, (3, 2))}, image_pool)

    out = tmp_path / "export"
    assert cli_main(["export", "--run", str(run.root), "--cycle", "1", "--out", str(out), "--model-card"]) == 0
    card = (out / "README.md").read_text()
    meta = _front_matter(card)
    assert meta["library_name"] == "diffusers" and meta["pipeline_tag"] == "text-to-image"
    assert meta["license"] == "other" and meta["license_name"] == "tiny-licence"  # the base's licence
    assert "base_model" not in meta  # a local directory is no Hub id
    assert {"mrlora", "stable-diffusion-3"} <= set(meta["tags"])
    assert "# the tiny base" not in card  # the base's own card is replaced
    # rewards with their normalised merge weights (1, 2, 0.5 -> 2/7, 4/7, 1/7), cycles and steps
    for reward, weight in (("a", 2 / 7), ("b", 4 / 7), ("c", 1 / 7)):
        assert f"| {reward} | {weight:.4g} |" in card
    assert "after **1** of the run's" in card and "`train.lr`" in card and "`mapreduce.merge_mode`" in card
    # the eval summary is the eval report's table of both evals, with the change against the base
    assert "## Evaluation" in card and f"{run.run_ts} cycle 1" in card and "Change against base" in card
    assert read_marker(out, EXPORT_MARKER) is not None  # the card is part of the complete export

    # the same export again without evals changes only the card, and the export stays complete
    shutil.rmtree(run.evals_dir)
    assert cli_main(["export", "--run", str(run.root), "--cycle", "1", "--out", str(out), "--model-card"]) == 0
    assert "The run has no finished evals yet." in (out / "README.md").read_text()
    assert read_marker(out, EXPORT_MARKER) is not None

    from diffusers import DiffusionPipeline

    assert DiffusionPipeline.from_pretrained(out).transformer is not None


def test_card_of_a_hub_base_names_it():
    from mrlora.reduce.card import hub_id

    assert hub_id("stabilityai/stable-diffusion-3.5-medium") == "stabilityai/stable-diffusion-3.5-medium"
    snapshot = "/cache/hub/models--black-forest-labs--FLUX.1-dev/snapshots/0123abc"
    assert hub_id("tiny:flux", snapshot) == "black-forest-labs/FLUX.1-dev"
    assert hub_id("tiny:sd3", "/models/tiny-sd3") is None


@pytest.mark.parametrize("case", ["offline", "no-token"])
def test_push_is_refused_before_anything_is_written(case, merged_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored token
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        monkeypatch.setenv("HF_TOKEN", "hf_not_a_real_token")
    else:
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", case == "offline")
    out = tmp_path / "export"
    argv = ["export", "--run", str(merged_run.root), "--cycle", "1", "--out", str(out), "--model-card"]
    code = cli_main([*argv, "--push-to-hub", "someone/tiny-mr", "--private"])
    err = capsys.readouterr().err
    assert code == 2
    if case == "offline":
        assert "HF_HUB_OFFLINE=1" in err and "without --push-to-hub" in err
    else:
        assert "no" in err and "hf auth login" in err and "HF_TOKEN" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-export-*"))


def test_private_needs_push(merged_run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["export", "--run", str(merged_run.root), "--cycle", "1", "--out", str(tmp_path / "e"), "--private"])
    assert exc.value.code == 2 and "--private goes with --push-to-hub" in capsys.readouterr().err
