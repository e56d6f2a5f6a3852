"""Evaluating a RaTE token mix: eval.run --rate-tokens/--rate-spec, its artefacts, the report's "rate" kind.

The token is made by hand (no distillation) with a large vector, so it visibly changes the tiny SD3's images.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import torch

from mrlora.cli import run_cli
from mrlora.rate.token_file import RateToken, save_token

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "--config",
    "tiny-sd3",
    "--set",
    "rewards=['brightness','jpeg_compressibility']",
    "--set",
    "weights=[1.0,1.0]",
    "--suite",
    "brightness,jpeg_compressibility",
    "--samples",
    "2",
    "--batch-size",
    "2",
    "--steps",
    "2",
]
PROMPTS = ['a shop sign that says "OPEN"', "a photo of a cat"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def hand_token(name: str, value: float) -> RateToken:
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return RateToken(
        token=name,
        arch="sd3",
        vectors={e: value * torch.randn(1, 32, generator=g) for e in ("clip_l", "clip_g", "t5")},
        base="tiny:sd3",
        reward=name.strip("<>"),
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rate_inputs")
    prompts = root / "prompts.txt"
    prompts.write_text("".join(p + "\n" for p in PROMPTS))
    return {
        "prompts": prompts,
        "ocr": save_token(hand_token("<ocr>", 40.0), root / "ocr" / "token.safetensors"),
        "picks": save_token(hand_token("<picks>", 40.0), root / "picks" / "token.safetensors"),
    }


def _argv(inputs, out: Path, *extra: str) -> list[str]:
    return ["--checkpoint", "base", *TINY, "--prompts", str(inputs["prompts"]), "--out", str(out), *extra]


@pytest.fixture(scope="module")
def evals(tmp_path_factory, inputs, mrlora_cache) -> dict:
    """A base eval and the same eval with the token mix '<ocr> 2', recording what the rewards were given."""
    import eval.run as run_mod

    root = tmp_path_factory.mktemp("rate_evals")
    seen: dict[str, list[str]] = {}
    original = run_mod.build_rewards

    def spying_build_rewards(names, config):
        built = original(names, config)

        class Spy:
            higher_is_better = built["brightness"].higher_is_better

            def __call__(self, images, prompts, metadata):
                seen.setdefault(current, []).extend(prompts)
                return built["brightness"](images, prompts, metadata)

        return {**built, "brightness": Spy()}

    from mrlora.reduce.job import single_threaded

    run_mod.build_rewards = spying_build_rewards
    # Module-scoped, so the tests' one_torch_thread does not cover it: the sharded test compares PNG bytes with
    # these images, and a matmul on 2 threads rounds differently from one on 1 thread.
    try:
        with single_threaded():
            current = "base"
            assert run_mod.main(_argv(inputs, root / "base")) == 0
            current = "rate"
            assert (
                run_mod.main(
                    _argv(
                        inputs,
                        root / "rate",
                        "--rate-tokens",
                        str(inputs["ocr"]),
                        str(inputs["picks"]),
                        "--rate-spec",
                        "<ocr> 2",
                    )
                )
                == 0
            )
    finally:
        run_mod.build_rewards = original
    return {"base": root / "base", "rate": root / "rate", "seen": seen, "root": root}


def test_token_mix_changes_images_but_records_and_scores_the_original_prompts(evals, inputs):
    base, rate = evals["base"], evals["rate"]
    assert (rate / "DONE.json").is_file() and (rate / "summary.json").is_file() and (rate / "results.h5").is_file()
    for i, prompt in enumerate(PROMPTS):
        meta = [json.loads(line) for line in (rate / "images" / f"{i:05d}" / "metadata.jsonl").read_text().splitlines()]
        assert meta == [{"prompt": prompt}]
        for k in range(2):
            rel = Path("images") / f"{i:05d}" / "samples" / f"{k:05d}.png"
            assert (rate / rel).read_bytes() != (base / rel).read_bytes(), rel  # same seeds, the token steers
    with h5py.File(rate / "results.h5", "r") as fh:
        rows = [p.decode() if isinstance(p, bytes) else p for p in fh["prompt"][()]]
        assert rows == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2
        assert json.loads(fh.attrs["settings"])["rate"]["spec"] == "<ocr> 2"
    # the rewards read the original text (OCR's quoted target, GenEval's metadata): no token in it
    assert evals["seen"]["rate"] == evals["seen"]["base"] == [PROMPTS[0]] * 2 + [PROMPTS[1]] * 2


def test_eval_json_and_summary_record_the_mix(evals, inputs):
    import hashlib

    settings = json.loads((evals["rate"] / "eval.json").read_text())
    assert settings["rate"]["spec"] == "<ocr> 2"
    recorded = {t["token"]: t for t in settings["rate"]["tokens"]}
    assert recorded["<ocr>"]["path"] == str(inputs["ocr"].resolve())
    assert recorded["<ocr>"]["sha256"] == hashlib.sha256(inputs["ocr"].read_bytes()).hexdigest()
    assert recorded["<picks>"]["reward"] == "picks"
    assert json.loads((evals["base"] / "eval.json").read_text())["rate"] is None
    summary = json.loads((evals["rate"] / "summary.json").read_text())
    assert summary["rate"]["label"] == "base + <ocr> 2" and summary["rate"]["note"] is None
    assert summary["rate"]["tokens"] == settings["rate"]["tokens"]


def test_rerun_with_another_spec_is_refused(evals, inputs, capsys):
    from eval.run import main

    before = (evals["rate"] / "eval.json").read_text()
    rc = run_cli(
        main,
        _argv(
            inputs, evals["rate"], "--rate-tokens", str(inputs["ocr"]), str(inputs["picks"]), "--rate-spec", "<ocr> 3"
        ),
    )
    assert rc == 2 and "already holds an eval with other settings" in capsys.readouterr().err
    assert (evals["rate"] / "eval.json").read_text() == before
    # the base eval's directory refuses a token mix too
    rc = run_cli(main, _argv(inputs, evals["base"], "--rate-tokens", str(inputs["ocr"]), "--rate-spec", "<ocr>"))
    assert rc == 2 and "rate" in capsys.readouterr().err


def test_token_mix_shards_are_bit_identical_to_one_process(evals, inputs):
    from eval.run import main

    out = evals["root"] / "rate_sharded"
    flags = ["--rate-tokens", str(inputs["ocr"]), str(inputs["picks"]), "--rate-spec", "<ocr> 2"]
    for shard in ("1/2", "0/2"):
        assert main(_argv(inputs, out, *flags, "--shard", shard)) == 0
    from eval.aggregate import aggregate
    from eval.plan import EvalDir

    aggregate(EvalDir(out))
    for i in range(len(PROMPTS)):
        for k in range(2):
            rel = Path("images") / f"{i:05d}" / "samples" / f"{k:05d}.png"
            assert (out / rel).read_bytes() == (evals["rate"] / rel).read_bytes(), rel


def test_report_shows_the_mix_as_its_own_kind_on_the_pareto_view(evals, tmp_path):
    from eval.report import load_input, pareto_view, summary_table
    from eval.report import main as report_main

    inputs = [load_input(evals["base"]), load_input(evals["rate"])]
    assert [i.kind for i in inputs] == ["base", "rate"]
    table = summary_table(inputs)
    assert [row[:2] for row in table.rows] == [["base", "base"], ["base + <ocr> 2", "rate"]]
    view = pareto_view(inputs)
    assert view is not None and view.kinds == ["base", "rate"] and "rate" in view.hypervolumes
    assert report_main(["--inputs", str(evals["base"]), str(evals["rate"]), "--out", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "pareto.png").stat().st_size > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "| base + <ocr> 2 | rate |" in md and "RaTE tokens <ocr> =" in md


def test_pareto_legend_gives_the_mix_its_own_marker_and_colour(evals, tmp_path, monkeypatch):
    import eval.report as report

    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path, dpi=100: figures.append(fig) or path)
    view = report.pareto_view([report.load_input(evals["base"]), report.load_input(evals["rate"])])
    report.plot_pareto(view, tmp_path / "pareto.png")
    legend = figures[0].axes[0].get_legend()
    entries = dict(zip([t.get_text() for t in legend.get_texts()], legend.legend_handles))
    assert {"base", "rate", "Pareto front"} <= set(entries)
    colour = lambda h: tuple(h.get_facecolor()[0])  # noqa: E731
    assert colour(entries["rate"]) != colour(entries["base"])
    assert report.KIND_STYLE["rate"][1] not in {m for k, (_, m) in report.KIND_STYLE.items() if k != "rate"}
    report._pyplot().close(figures[0])


def test_mix_on_a_non_base_checkpoint_is_noted():
    from eval.rate import checkpoint_note, label

    assert checkpoint_note({"kind": "merged", "cycle": 0, "label": "r base"}) is None
    note = checkpoint_note({"kind": "merged", "cycle": 3, "label": "r cycle 3"})
    assert note is not None and "'r cycle 3'" in note and "not trained for" in note
    assert label("base", {"spec": " <ocr>   2 "}) == "base + <ocr> 2"


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--rate-tokens", "{ocr}"], "--rate-tokens needs --rate-spec"),
        (["--rate-spec", "<ocr> 2"], "--rate-spec needs --rate-tokens"),
        (["--rate-tokens", "{ocr}", "--rate-spec", "<ocr> 0"], "must be >= 1"),
        (["--rate-tokens", "{prompts}", "--rate-spec", "<ocr>"], "not a readable safetensors"),
    ],
)
def test_bad_flag_combinations_exit_2_and_write_nothing(inputs, tmp_path, capsys, flags, message):
    from eval.run import main

    flags = [f.format(**{k: str(v) for k, v in inputs.items()}) for f in flags]
    out = tmp_path / "never"
    assert run_cli(main, _argv(inputs, out, *flags)) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unknown_token_is_refused_with_the_rate_message_by_the_cli(inputs, tmp_path):
    out = tmp_path / "never"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "eval.run",
            *_argv(inputs, out, "--rate-tokens", str(inputs["ocr"]), "--rate-spec", "<ocr> <geneval> 2"),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=dict(os.environ),
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "names '<geneval>', which is not loaded (loaded: <ocr>); pass its token file" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_launch_eval_passes_the_mix_to_every_shard_without_torch(inputs, tmp_path):
    out = tmp_path / "ev"
    argv = [
        "--checkpoint",
        "base",
        *TINY,
        "--prompts",
        str(inputs["prompts"]),
        "--out",
        str(out),
        "--shards",
        "2",
        "--profile",
        "local",
        "--print",
        "--rate-tokens",
        str(inputs["ocr"]),
        "--rate-spec",
        "<ocr> 2",
    ]
    code = (
        "import sys\nfrom launch.eval import cli\n"
        f"rc = cli({argv!r})\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "print('HEAVY', heavy)\nsys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout
    assert f"--rate-tokens {inputs['ocr'].resolve()} --rate-spec '<ocr> 2'" in proc.stdout
    bad = [a if a != "<ocr> 2" else "<picks> 2" for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "launch.eval", *bad], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2 and "names '<picks>', which is not loaded" in proc.stderr
    assert not out.exists()
    # a malformed count is caught on the login node too, not inside every shard job
    malformed = [a if a != "<ocr> 2" else "<ocr> 0" for a in argv]
    proc = subprocess.run(
        [sys.executable, "-m", "launch.eval", *malformed], capture_output=True, text=True, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2 and "must be >= 1" in proc.stderr, proc.stderr
    assert not out.exists()
