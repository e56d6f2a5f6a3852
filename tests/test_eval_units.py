"""Eval pieces that need no model: Pareto maths, summary definitions, shard planning, templates, the submitter."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.errors import EvalError
from eval.pareto import hypervolume, pareto_front
from eval.plan import Shard, plan_batches, shard_batches
from eval.results import Results
from eval.summary import summarize
from launch.eval import TemplateError, array_spec, render_template

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------- pareto maths


def test_pareto_front_keeps_only_non_dominated_points():
    points = [(1, 1), (2, 0.5), (0.5, 2), (0.9, 0.9), (2, 0.5)]
    assert pareto_front(points) == [0, 1, 2, 4]


def test_hypervolume_matches_hand_computed_areas_and_volumes():
    # union of [0,2]x[0,1] and [0,1]x[0,3] = 2 + 3 - 1 = 4
    assert hypervolume([(2, 1), (1, 3)], (0, 0)) == pytest.approx(4.0)
    # a dominated point adds nothing
    assert hypervolume([(2, 1), (1, 3), (1, 1)], (0, 0)) == pytest.approx(4.0)
    # boxes [0,1]^2x[0,2] and [0,2]x[0,1]x[0,1]: 2 + 2 - 1 = 3
    assert hypervolume([(1, 1, 2), (2, 1, 1)], (0, 0, 0)) == pytest.approx(3.0)
    # points not beyond the reference contribute nothing
    assert hypervolume([(1, -1)], (0, 0)) == 0.0


# ---------------------------------------------------------------------------------------- summary numbers


def _results(tags, correct, scores, exact=None) -> Results:
    n = len(tags)
    details = {"geneval": {"correct": np.asarray(correct, float), "strict_correct": np.zeros(n)}}
    all_scores = {"geneval": np.asarray(scores, np.float32)}
    if exact is not None:
        details["ocr"] = {"exact": np.asarray(exact, float)}
        all_scores["ocr"] = np.asarray(scores, np.float32)
    return Results(
        np.arange(n),
        np.zeros(n, np.int64),
        np.arange(n),
        ["p"] * n,
        list(tags),
        ["{}"] * n,
        ["x.png"] * n,
        all_scores,
        details,
        {k: True for k in all_scores},
        {},
        {},
    )


def test_geneval_overall_is_the_mean_of_per_tag_accuracies_not_of_images():
    # 4 counting images (1 correct) and 1 colors image (correct): per-image mean 0.4, per-tag mean (0.25 + 1)/2
    res = _results(["counting"] * 4 + ["colors"], [1, 0, 0, 0, 1], [0.5] * 5)
    block = summarize(res)["rewards"]["geneval"]["geneval"]
    assert block["per_tag"]["counting"]["accuracy"] == pytest.approx(0.25)
    assert block["per_tag"]["colors"]["accuracy"] == pytest.approx(1.0)
    assert block["overall"] == pytest.approx(0.625)
    assert block["strict_overall"] == pytest.approx(0.0)


def test_ocr_exact_match_rate_and_means_are_reported():
    res = _results(["", "", "", ""], [0, 0, 0, 0], [1.0, 0.5, 1.0, 0.0], exact=[1, 0, 1, 0])
    summary = summarize(res)
    assert summary["rewards"]["ocr"]["exact_match_rate"] == pytest.approx(0.5)
    assert summary["headline"]["ocr"] == pytest.approx(0.625)
    assert summary["headline"]["ocr_exact_match"] == pytest.approx(0.5)


# ---------------------------------------------------------------------------------------- shard planning


def test_shards_partition_the_global_batches_exactly():
    batches = plan_batches(num_prompts=7, samples=3, batch_size=4, seed=0)
    single = [tuple(b) for b in shard_batches(batches, Shard(0, 1))]
    for n in (2, 3, 9):
        parts = [tuple(b) for i in range(n) for b in shard_batches(batches, Shard(i, n))]
        assert parts == single  # same batches, same order: a sharded eval computes exactly what one process does
    seeds = {(w.prompt_index, w.sample_index): w.seed for b in batches for w in b}
    assert len(set(seeds.values())) == 21
    again = plan_batches(7, 3, 2, seed=0)  # another batch size: same per-sample seeds
    assert {(w.prompt_index, w.sample_index): w.seed for b in again for w in b} == seeds
    other = plan_batches(7, 3, 4, seed=1)
    assert all(w.seed != seeds[(w.prompt_index, w.sample_index)] for b in other for w in b)


@pytest.mark.parametrize("text", ["2/2", "-1/2", "1", "a/b", "0/0"])
def test_bad_shard_spec_is_rejected(text):
    with pytest.raises(EvalError, match="--shard"):
        Shard.parse(text)


# --------------------------------------------------------------------------------------- sbatch templates


def test_render_template_requires_every_variable_and_uses_every_value():
    text = "# doc mentions {{x}} and is kept\n#SBATCH --job-name={{name}}\necho {{y}}\n"
    assert (
        render_template(text, {"name": "j", "y": "1"})
        == "# doc mentions {{x}} and is kept\n#SBATCH --job-name=j\necho 1\n"
    )
    with pytest.raises(TemplateError, match="y"):
        render_template(text, {"name": "j"})
    with pytest.raises(TemplateError, match="unused|not use"):
        render_template(text, {"name": "j", "y": "1", "z": "2"})


def test_array_spec_compacts_ranges_and_caps_parallel_tasks():
    assert array_spec([0, 1, 2, 3], 0) == "0-3"
    assert array_spec([1, 3, 4, 5, 7], 2) == "1,3-5,7%2"


def test_shipped_templates_render_without_leftover_placeholders(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "ev"
    # one shard already complete: --print must list only the others
    from eval.plan import EvalDir
    from mrlora.runstore import DONE_MARKER, write_marker

    done = EvalDir(out).shard_dir(Shard(1, 3))
    done.mkdir(parents=True)
    (done / "results.h5").write_bytes(b"x")
    write_marker(done, DONE_MARKER)
    code = (
        "import sys\nfrom launch.eval import cli\n"
        f"rc = cli(['--checkpoint', 'base', '--config', 'tiny-sd3', '--set', \"rewards=['brightness']\", "
        f"'--set', 'weights=[1.0]', '--suite', 'brightness', '--prompts', {str(prompts)!r}, '--out', {str(out)!r}, "
        "'--shards', '3', '--cluster', 'local', '--dry-run'])\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\nsys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout  # the login-node submitter never imports torch
    script = proc.stdout
    assert "#SBATCH --array=0,2\n" in script
    assert '--shard "${SLURM_ARRAY_TASK_ID}/3"' in script
    assert "-m eval.aggregate --out" in script
    body = "\n".join(line for line in script.splitlines() if not line.startswith("# "))
    assert "{{" not in body
    assert not (out / "slurm").exists()  # --print writes nothing


# ---------------------------------------------------------------------------- bad input: clear, no output


def _run_cli(args: list[str], env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "eval.run", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=120
    )


BASE_ARGS = [
    "--checkpoint",
    "base",
    "--config",
    "tiny-sd3",
    "--set",
    "rewards=['brightness']",
    "--set",
    "weights=[1.0]",
]


def test_prompt_file_with_a_bad_line_names_the_line_and_writes_nothing(tmp_path):
    prompts = tmp_path / "meta.jsonl"
    prompts.write_text(
        json.dumps({"prompt": "a cat", "tag": "single_object", "include": [{"class": "cat", "count": 1}]})
        + "\n{not json\n"
    )
    out = tmp_path / "ev"
    proc = _run_cli([*BASE_ARGS, "--suite", "brightness", "--prompts", str(prompts), "--out", str(out)])
    assert proc.returncode == 2
    assert f"{prompts}:2" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_missing_checkpoint_and_unknown_suite_fail_cleanly(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "ev"
    proc = _run_cli(
        ["--checkpoint", str(tmp_path / "nope"), "--suite", "brightness", "--prompts", str(prompts), "--out", str(out)]
    )
    assert proc.returncode == 2 and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run_cli([*BASE_ARGS, "--suite", "brightnes", "--prompts", str(prompts), "--out", str(out)])
    assert proc.returncode == 2 and "brightness" in proc.stderr  # the close match is suggested
    assert not out.exists()


def test_reward_model_missing_offline_fails_before_anything_is_written(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    out = tmp_path / "ev"
    proc = _run_cli(
        [
            *BASE_ARGS,
            "--set",
            f"reward_models.pickscore.model={tmp_path / 'no_model'}",
            "--set",
            f"reward_models.pickscore.processor={tmp_path / 'no_processor'}",
            "--suite",
            "pickscore",
            "--prompts",
            str(prompts),
            "--out",
            str(out),
        ],
        {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2, proc.stderr
    assert "pickscore" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists()


def test_pareto_point_labels_drop_a_shared_run_timestamp_only():
    from eval.report import _short_labels

    one_run = ["20261123_203842 base", "20261123_203842 cycle 1", "20261123_203842 cycle 2"]
    assert _short_labels(one_run) == ["base", "cycle 1", "cycle 2"]
    two_runs = ["20261123_203842 cycle 1", "20261124_090000 cycle 1"]
    assert _short_labels(two_runs) == two_runs  # which run a point is from is the information here
    assert _short_labels(["base"]) == ["base"]
