"""Eval end to end on tiny random models: a hand-built run with a merged cycle, artefacts, numbers, report, Slurm.

The run directory is built with the real Map/Reduce formats (expert adapters via
``mrlora.reduce.save_expert_adapter``, DONE markers, the real ``merge_cycle_in_run``), so eval is tested
against exactly what a run leaves on disk.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from prerequisites import missing_prerequisite

from eval.checkpoint import resolve_checkpoint
from eval.errors import EvalError
from mrlora.config import config_to_dict, load_config
from mrlora.runstore import DONE_MARKER, RunDir, write_marker

REPO = Path(__file__).resolve().parents[1]
# the tiny preset with two model-free rewards (independent of later changes to the preset's reward list)
TINY_SETS = [
    "rewards=['brightness','jpeg_compressibility']",
    "weights=[1.0,1.0]",
    "prompts.jpeg_compressibility=gen:simple:8",
    "prompts.brightness=gen:simple:8",
]
LORA = {"r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v"], "peft_type": "LORA"}
MODULES = ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_v", "transformer_blocks.1.attn.to_k")
SUITE = "geneval,brightness,jpeg_compressibility"
GENEVAL_PROMPTS = [
    {"tag": "single_object", "include": [{"class": "cat", "count": 1}], "prompt": "a photo of a cat"},
    {
        "tag": "counting",
        "include": [{"class": "dog", "count": 2}],
        "exclude": [{"class": "dog", "count": 3}],
        "prompt": "a photo of two dogs",
    },
    {"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"},
]


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory):
    """MRLORA_CACHE for the tiny build, inherited by subprocesses and Slurm jobs."""
    previous = os.environ.get("MRLORA_CACHE")
    if previous is None:
        os.environ["MRLORA_CACHE"] = str(tmp_path_factory.mktemp("mrlora_cache"))
    from mrlora.models.loading import resolve_model

    resolve_model("tiny:sd3")
    yield os.environ["MRLORA_CACHE"]
    if previous is None:
        os.environ.pop("MRLORA_CACHE", None)


def _random_lora(shapes: dict[str, tuple[int, int]], seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    state = {}
    for module in MODULES:
        out_f, in_f = shapes[module]
        state[f"{module}.lora_A.weight"] = torch.randn(LORA["r"], in_f, generator=g) * 0.3
        state[f"{module}.lora_B.weight"] = torch.randn(out_f, LORA["r"], generator=g) * 0.3
    return state


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, cache_env) -> RunDir:
    """A tiny-sd3 run: cycle 1 experts DONE and merged, cycle 2 experts DONE but not merged."""
    from diffusers import SD3Transformer2DModel

    from mrlora.models.loading import resolve_model
    from mrlora.reduce import merge_cycle_in_run, save_expert_adapter

    cfg = load_config("tiny-sd3", TINY_SETS)
    run = RunDir.create(tmp_path_factory.mktemp("runs"), "tiny-sd3", run_ts="20261123_101500")
    run.write_run_json({"run_ts": run.run_ts, "model": "tiny-sd3", "config": config_to_dict(cfg), "history": []})
    transformer = SD3Transformer2DModel.from_pretrained(Path(resolve_model("tiny:sd3")) / "transformer")
    shapes = {name: tuple(m.weight.shape) for name, m in transformer.named_modules() if name in MODULES}
    for cycle in (1, 2):
        for k, reward in enumerate(cfg.rewards):
            save_expert_adapter(
                _random_lora(shapes, 10 * cycle + k),
                run.adapter_dir(cycle, reward),
                arch="sd3",
                lora_config=LORA,
                base=cfg.model.pretrained,
                reward=reward,
            )
            write_marker(run.expert_dir(cycle, reward), DONE_MARKER, extra={"status": "done"})
    merge_cycle_in_run(str(run.root), 1)
    return run


@pytest.fixture(scope="module")
def geneval_sets(tmp_path_factory) -> list[str]:
    """--set overrides pointing the geneval reward at a tiny random detector and CLIP (no download)."""
    from rewards.tiny_models import save_tiny_clip, save_tiny_mask2former

    root = tmp_path_factory.mktemp("geneval_models")
    det = save_tiny_mask2former(root / "m2f")
    clip = save_tiny_clip(root / "clip")
    return [
        "reward_models.geneval.backend=local",
        f"reward_models.geneval.detector={det}",
        f"reward_models.geneval.clip={clip}",
        "reward_models.geneval.device=cpu",
    ]


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "geneval.jsonl"
    path.write_text("".join(json.dumps(m) + "\n" for m in GENEVAL_PROMPTS))
    return path


def _eval(
    checkpoint: str, out: Path, prompts: Path, sets: list[str], suite: str = SUITE, extra: list[str] = ()
) -> Path:
    from eval.run import main

    argv = [
        "--checkpoint",
        checkpoint,
        "--suite",
        suite,
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--samples",
        "2",
        "--batch-size",
        "4",
        "--sample-steps",
        "2",
        *extra,
    ]
    for item in sets:
        argv += ["--set", item]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def evals(tmp_path_factory, tiny_run, geneval_sets, prompt_file) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("evals")
    return {
        "base": _eval("base", root / "base", prompt_file, TINY_SETS + geneval_sets, extra=["--model", "tiny-sd3"]),
        "run0": _eval(f"{tiny_run.root}:0", root / "run0", prompt_file, geneval_sets),
        "run1": _eval(f"{tiny_run.root}:1", root / "run1", prompt_file, geneval_sets),
        "expert": _eval(str(tiny_run.expert_dir(2, "brightness")), root / "expert", prompt_file, geneval_sets),
    }


# ------------------------------------------------------------------------------------------------- tests


def test_eval_writes_every_artefact_in_the_official_layout(evals):
    for name, out in evals.items():
        assert (out / "DONE.json").is_file() and (out / "summary.json").is_file() and (out / "results.h5").is_file()
        dirs = sorted(p.name for p in (out / "images").iterdir())
        assert dirs == ["00000", "00001", "00002"], name  # only prompt folders: GenEval's evaluate_images.py works
        for i, meta in enumerate(GENEVAL_PROMPTS):
            folder = out / "images" / f"{i:05d}"
            lines = (folder / "metadata.jsonl").read_text().splitlines()
            assert [json.loads(line) for line in lines] == [meta]
            assert sorted(p.name for p in (folder / "samples").iterdir()) == ["00000.png", "00001.png"]
        from PIL import Image

        with Image.open(out / "images" / "00001" / "samples" / "00001.png") as im:
            assert im.size == (64, 64)


def test_summary_equals_the_hdf5_rows_aggregated_independently(evals):
    import h5py

    summary = json.loads((evals["run1"] / "summary.json").read_text())
    with h5py.File(evals["run1"] / "results.h5", "r") as fh:
        assert fh["prompt_index"][()].tolist() == [0, 0, 1, 1, 2, 2]
        assert fh["sample_index"][()].tolist() == [0, 1, 0, 1, 0, 1]
        for reward in ("geneval", "brightness", "jpeg_compressibility"):
            assert summary["rewards"][reward]["mean"] == pytest.approx(float(np.mean(fh["scores"][reward][()])))
        tags = [t.decode() if isinstance(t, bytes) else t for t in fh["tag"][()]]
        correct = fh["details/geneval/correct"][()]
        per_tag = {t: float(np.mean([c for c, tt in zip(correct, tags) if tt == t])) for t in set(tags)}
        assert {"correct", "strict_correct"} <= set(fh["details/geneval"])
    block = summary["rewards"]["geneval"]["geneval"]
    assert {t: v["accuracy"] for t, v in block["per_tag"].items()} == pytest.approx(per_tag)
    assert block["overall"] == pytest.approx(np.mean(list(per_tag.values())))
    assert summary["images"] == 6 and summary["prompts"] == 3


def test_same_weights_give_identical_images_and_merged_updates_change_them(evals):
    png = lambda name: (evals[name] / "images" / "00002" / "samples" / "00001.png").read_bytes()  # noqa: E731
    assert png("run0") == png("base")  # the run's base_0 and the preset's base, same seeds: bit-identical
    assert png("run1") != png("base")  # the merged update of cycle 1 is folded in
    assert png("expert") != png("run1")


def test_expert_checkpoint_is_base_plus_earlier_merges_plus_its_lora(tiny_run):
    import torch
    from safetensors.torch import load_file

    from eval.model import build_pipeline
    from mrlora.config import config_from_dict
    from mrlora.models.loading import load_pipeline

    ckpt = resolve_checkpoint(str(tiny_run.adapter_dir(2, "brightness")))
    assert ckpt.kind == "expert" and ckpt.cycle == 2 and ckpt.reward == "brightness"
    # the model after cycle 1: its materialised base (the merge job wrote it), no update left to fold
    assert ckpt.base_dir == str(tiny_run.base_dir(1)) and ckpt.update_dirs == ()
    pipe = build_pipeline(ckpt, config_from_dict(ckpt.config), "cpu")
    base = load_pipeline("tiny:sd3")
    update = load_file(str(tiny_run.merged_dir(1) / "update.safetensors"))
    lora = load_file(str(tiny_run.adapter_dir(2, "brightness") / "adapter_model.safetensors"))
    scale = LORA["lora_alpha"] / LORA["r"]
    got, want = dict(pipe.transformer.named_modules()), dict(base.transformer.named_modules())
    for module in MODULES:
        expected = (
            want[module].weight
            + update[f"{module}.lora_B"] @ update[f"{module}.lora_A"]
            + scale * lora[f"{module}.lora_B.weight"] @ lora[f"{module}.lora_A.weight"]
        )
        torch.testing.assert_close(got[module].weight, expected, rtol=1e-5, atol=1e-5)
    untouched = "transformer_blocks.0.attn.to_k"
    torch.testing.assert_close(got[untouched].weight, want[untouched].weight, rtol=0, atol=0)


def test_incomplete_or_unknown_checkpoints_are_refused(tiny_run, tmp_path):
    with pytest.raises(EvalError, match="MERGE_DONE"):
        resolve_checkpoint(f"{tiny_run.root}:2")  # experts done, merge not
    with pytest.raises(EvalError, match="name a cycle"):
        resolve_checkpoint(str(tiny_run.root))
    with pytest.raises(EvalError, match="--model"):
        resolve_checkpoint(f"{tiny_run.root}:1", preset="tiny-sd3")
    half = RunDir(tiny_run.root).expert_dir(3, "brightness")
    shutil.copytree(tiny_run.adapter_dir(2, "brightness"), half / "adapter")
    try:
        with pytest.raises(EvalError, match="incomplete.*DONE.json"):
            resolve_checkpoint(str(half))
    finally:
        shutil.rmtree(half.parent)


def test_rerun_skips_finished_work_and_refuses_other_settings(evals, tiny_run, geneval_sets, prompt_file):
    out = evals["run1"]
    before = (out / "DONE.json").stat().st_mtime_ns
    _eval(f"{tiny_run.root}:1", out, prompt_file, geneval_sets)
    assert (out / "DONE.json").stat().st_mtime_ns == before
    with pytest.raises(EvalError, match="other settings.*seed"):
        _eval(f"{tiny_run.root}:1", out, prompt_file, geneval_sets, extra=["--seed", "7"])


def _distinct_colours(png: Path) -> tuple[int, float]:
    from PIL import Image

    with Image.open(png) as im:
        arr = np.asarray(im.convert("RGB"))
    return len(np.unique(arr.reshape(-1, 3), axis=0)), float(arr.std())


class _Tables(HTMLParser):
    """The report's HTML tables as the reader sees them: section heading -> rows of cell texts (header first)."""

    def __init__(self):
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self.heading = ""
        self._in_heading = False
        self._cell: list[str] | None = None
        self._row: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "h2":
            self._in_heading, self.heading = True, ""
        elif tag == "table":
            self.tables[self.heading] = []
        elif tag == "tr":
            self._row = []
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")

    def handle_endtag(self, tag):
        if tag == "h2":
            self._in_heading = False
        elif tag in ("td", "th") and self._cell is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.tables[self.heading].append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._in_heading:
            self.heading += data
        if self._cell is not None:
            self._cell.append(data)


def _tables(page: str) -> dict[str, list[dict[str, str]]]:
    parser = _Tables()
    parser.feed(page)
    return {h: [dict(zip(rows[0], row)) for row in rows[1:]] for h, rows in parser.tables.items()}


def _ci(text: str) -> tuple[float, float, int]:
    """``0.512 ± 0.021`` -> (0.512, 0.021, decimals shown)."""
    mean, half = text.split(" ± ")
    return float(mean.replace("▲", "").replace("▼", "")), float(half.split()[0]), len(half.split()[0].split(".")[1])


def _t_interval(values_by_prompt: list[np.ndarray]) -> tuple[float, float]:
    """Mean over all images and the t half-width over the per-prompt means (equal samples per prompt)."""
    from scipy import stats

    means = np.array([v.mean() for v in values_by_prompt])
    lo, hi = stats.t.interval(0.95, len(means) - 1, loc=means.mean(), scale=stats.sem(means))
    return float(np.concatenate(values_by_prompt).mean()), float((hi - lo) / 2)


def _columns(path: Path) -> dict:
    import h5py

    with h5py.File(path / "results.h5", "r") as fh:
        return {
            "p": fh["prompt_index"][()],
            "k": fh["sample_index"][()],
            "prompt": [t.decode() if isinstance(t, bytes) else t for t in fh["prompt"][()]],
            **{r: fh["scores"][r][()].astype(np.float64) for r in fh["scores"]},
        }


def _layout_probe(page: Path, out: Path) -> Path:
    """A copy of the page that, once loaded, writes what a reader would notice into <pre id=probe>: the page
    scrolling sideways, blocks overlapping, grid images not decoded, the first CI cell off screen."""
    script = """<script>window.addEventListener('load', () => {
      const r = {pageOverflow: document.documentElement.scrollWidth - window.innerWidth, overlaps: [],
                 gridImages: 0, brokenImages: 0, ciRight: null};
      const blocks = [...document.body.children].filter(e => e.tagName !== 'SCRIPT');
      for (let i = 1; i < blocks.length; i++) {
        const a = blocks[i - 1].getBoundingClientRect(), b = blocks[i].getBoundingClientRect();
        if (b.top < a.bottom - 1) r.overlaps.push(blocks[i - 1].tagName + '/' + blocks[i].tagName);
      }
      for (const cell of document.querySelectorAll('td, th'))  // text running out of its cell into the next
        if (cell.scrollWidth > cell.clientWidth + 1) r.overlaps.push('cell: ' + cell.textContent.slice(0, 40));
      for (const td of document.querySelectorAll('table.grid td')) {  // a score caption over its image
        const img = td.querySelector('img'), caption = td.querySelector('.s');
        if (img && caption && caption.getBoundingClientRect().top < img.getBoundingClientRect().bottom - 1)
          r.overlaps.push('grid caption');
      }
      for (const img of document.querySelectorAll('table.grid img')) {
        r.gridImages++;
        if (!img.complete || img.naturalWidth === 0 || img.getBoundingClientRect().width === 0) r.brokenImages++;
      }
      const ci = [...document.querySelectorAll('td')].find(td => td.textContent.includes(' ± '));
      if (ci) r.ciRight = ci.getBoundingClientRect().right - window.innerWidth;
      const pre = document.createElement('pre'); pre.id = 'probe'; pre.textContent = JSON.stringify(r);
      document.body.appendChild(pre);
    });</script>"""
    probe = out / f"probe_{page.stem}.html"
    probe.write_text(page.read_text().replace("</body>", script + "</body>"))
    return probe


def test_report_is_self_contained_and_renders_its_images_in_chromium(evals, tmp_path):
    from eval.report import main

    out = tmp_path / "report"
    # given out of order: the report lists base first, then merged cycles, then experts
    assert (
        main(
            [
                "--inputs",
                str(evals["expert"]),
                str(evals["run1"]),
                str(evals["base"]),
                str(evals["run0"]),
                "--out",
                str(out),
                "--grid-top",
                "1",
                "--grid-random",
                "1",
            ]
        )
        == 0
    )
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for section in (
        "Summary",
        "Change vs base",
        "geneval: per-tag accuracy",
        "Reward vs cycle",
        "Pareto view",
        "Hypervolume",
        "Same prompt, same noise, every checkpoint",
        "Inputs",
    ):
        assert section in md and section in page
    for png in ("reward_vs_cycle.png", "pareto.png", "per_tag_geneval.png"):
        assert (out / png).is_file() and f"]({png})" in md
    assert "Warnings" not in page  # same settings, every reward scored by every eval
    tables = _tables(page)
    labels = ["base", "20261123_101500 base", "20261123_101500 cycle 1", "20261123_101500 cycle 2 brightness expert"]
    assert [row["checkpoint"] for row in tables["Summary"]] == labels

    # mean ± 95% CI and n against an independent computation from the HDF5 rows (prompts as the units)
    summary = {row["checkpoint"]: row for row in tables["Summary"]}
    for name, label in (("run1", labels[2]), ("expert", labels[3])):
        cols = _columns(evals[name])
        for reward in ("brightness", "jpeg_compressibility"):
            mean, half = _t_interval([cols[reward][cols["p"] == p] for p in range(3)])
            shown_mean, shown_half, decimals = _ci(summary[label][f"{reward} ↑ (n=6)"])
            assert shown_mean == pytest.approx(mean, abs=0.6 * 10**-decimals), (label, reward)
            assert shown_half == pytest.approx(half, abs=0.6 * 10**-decimals), (label, reward)
            assert mean == pytest.approx(
                json.loads((evals[name] / "summary.json").read_text())["rewards"][reward]["mean"]
            )
    assert "Student's t quantile" in html.unescape(page) and "cluster-robust over prompts" in page  # which CI

    # change vs base: paired per image (same noise), with the arrow of its sign; RUN:0 is the base itself
    change = {row["checkpoint"]: row for row in tables["Change vs base"]}
    assert "base" not in change
    assert change[labels[1]]["Δ brightness ↑"] == "= 0 (identical)"
    base_cols, run1_cols = _columns(evals["base"]), _columns(evals["run1"])
    for reward in ("brightness", "jpeg_compressibility"):
        diff = run1_cols[reward] - base_cols[reward]
        mean, half = _t_interval([diff[base_cols["p"] == p] for p in range(3)])
        cell = change[labels[2]][f"Δ {reward} ↑"]
        assert cell.startswith("▲" if mean > 0 else "▼"), cell
        shown_mean, shown_half, decimals = _ci(cell)
        assert shown_mean == pytest.approx(mean, abs=0.6 * 10**-decimals)
        assert shown_half == pytest.approx(half, abs=0.6 * 10**-decimals)

    # per-tag accuracy with n per tag; one prompt per tag here, so no interval is claimed
    tag_rows = tables["geneval: per-tag accuracy"]
    assert {"colors (n=2)", "counting (n=2)", "single_object (n=2)"} <= set(tag_rows[0])
    assert all(v.endswith("(no CI)") for row in tag_rows for k, v in row.items() if "(n=2)" in k)

    # the grid: the same (prompt, sample) for every checkpoint; first the one where checkpoints differ most
    all_cols = [_columns(evals[n]) for n in ("base", "run0", "run1", "expert")]
    spread = np.zeros(6)
    for reward in ("brightness", "jpeg_compressibility"):  # geneval scores 0 everywhere: no spread to rank by
        matrix = np.stack([c[reward] for c in all_cols])
        spread = np.maximum(spread, (matrix.max(axis=0) - matrix.min(axis=0)) / matrix.std())
    top = int(np.argmax(spread))
    grid_header = list(tables["Same prompt, same noise, every checkpoint"][0])
    first, second = grid_header[1], grid_header[2]
    p, k = int(all_cols[0]["p"][top]), int(all_cols[0]["k"][top])
    assert first.startswith(all_cols[0]["prompt"][top] + "\n") and f"prompt #{p}, sample {k}" in first
    assert "differs most in" in first and "random" in second and all_cols[0]["prompt"][top] not in second
    grid_rows = tables["Same prompt, same noise, every checkpoint"]
    assert [row["checkpoint"] for row in grid_rows] == labels
    start = page.index("<table class='grid'>")
    grid = page[start : page.index("</table>", start)]
    links = re.findall(r"<a href='([^']+)'><img width='\d+'[^>]*src='data:image/jpeg;base64,", grid)
    assert len(links) == 8
    assert (out / links[0]).resolve() == (evals["base"] / "images" / f"{p:05d}" / "samples" / f"{k:05d}.png")
    srcs = re.findall(r'<img[^>]*src=["\']([^"\']+)["\']', page)
    assert len(srcs) == 3 + 8 and sum(s.startswith("data:image/png;base64,") for s in srcs) == 3

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        missing_prerequisite("chromium is not installed (apt-get install -y chromium); the HTML render check needs it")

    def chrome(page: Path, width: int, *args: str, height: int = 6000) -> subprocess.CompletedProcess:
        proc = subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={tmp_path / 'chrome'}",
                f"--window-size={width},{height}",
                *args,
                page.as_uri(),
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        return proc

    def screenshot(page: Path, width: int = 1200) -> Path:
        shot = page.with_name(f"{page.stem}_{width}.png")
        proc = chrome(page, width, f"--screenshot={shot}")
        assert shot.is_file(), proc.stderr
        return shot

    # a laptop window and half of one: tables scroll inside their own box, nothing overlaps, the grid's images
    # decode and the first mean ± CI cell is on screen
    for width in (1400, 760):
        screenshot(out / "report.html", width)
        dom = chrome(
            _layout_probe(out / "report.html", out), width, "--dump-dom", "--virtual-time-budget=5000", height=1000
        )  # a short window: the first CI cell must not need scrolling sideways
        found = re.search(r'<pre id="probe">(.*?)</pre>', dom.stdout)
        assert found, dom.stderr[-2000:]
        probe = json.loads(html.unescape(found.group(1)))
        assert probe["pageOverflow"] <= 0 and probe["overlaps"] == [], (width, probe)
        assert probe["gridImages"] == 8 and probe["brokenImages"] == 0, (width, probe)
        assert probe["ciRight"] is not None and probe["ciRight"] <= 0, (width, probe)

    # the same page with its <img> tags removed: what tables and text alone look like
    stripped = tmp_path / "stripped.html"
    stripped.write_text(re.sub(r"<img[^>]*>", "", page))
    colours, spread = _distinct_colours(screenshot(out / "report.html"))
    text_colours, _ = _distinct_colours(screenshot(stripped))
    # text renders as a few hundred anti-aliasing shades; decoded plots and generated images add far more
    assert colours > 4 * text_colours and spread > 20, (colours, text_colours, spread)


def _shard_eval_args(tmp_path: Path) -> list[str]:
    """eval arguments for the sharded-vs-single comparisons: the tiny base, two model-free rewards, 5 prompts."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a red apple\na blue car on a street\nthe sign says "open"\na small house\na dog\n')
    common = [
        "--checkpoint",
        "base",
        "--config",
        "tiny-sd3",
        "--suite",
        "brightness,jpeg_compressibility",
        "--prompts",
        str(prompts),
        "--samples",
        "2",
        "--batch-size",
        "3",
    ]
    for item in TINY_SETS:
        common += ["--set", item]
    return common


def _single_shard_reference(common: list[str], out: Path) -> None:
    """The same eval in one process, single-threaded like the jobs (the local profile sets OMP_NUM_THREADS=1)."""
    ref = subprocess.run(
        [sys.executable, "-m", "eval.run", *common, "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert ref.returncode == 0, ref.stderr


def _same_results(sharded: Path, single: Path) -> None:
    assert sorted(p.name for p in (sharded / "shards").iterdir()) == ["00000-of-00002", "00001-of-00002"]
    a = json.loads((sharded / "summary.json").read_text())
    b = json.loads((single / "summary.json").read_text())
    assert a["rewards"] == b["rewards"] and a["images"] == b["images"] == 10
    for png in sorted((single / "images").rglob("*.png")):
        assert png.read_bytes() == (sharded / png.relative_to(single)).read_bytes(), png


@pytest.mark.slurm
def test_two_shard_array_job_gives_the_same_summary_as_one_shard(slurm_cluster, cache_env, tmp_path):
    common = _shard_eval_args(tmp_path)
    sharded = tmp_path / "sharded"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.eval",
            *common,
            "--out",
            str(sharded),
            "--shards",
            "2",
            "--profile",
            "local",
            "--executor",
            "slurm",
            "--time",
            "10",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    array_id = re.search(r"submitted eval array (\d+)", proc.stdout).group(1)
    aggregate_id = re.search(r"submitted aggregation job (\d+)", proc.stdout).group(1)
    single = tmp_path / "single"
    _single_shard_reference(common, single)  # meanwhile
    records = slurm_cluster.wait_for_job(aggregate_id, timeout=300)
    logs = "\n".join(p.read_text() for p in sorted((sharded / "logs").glob("*.out")))
    assert all(r.state == "COMPLETED" for r in records.values()), logs
    tasks = slurm_cluster.wait_for_job(array_id, timeout=60, array_size=2)
    assert sorted(tasks) == [f"{array_id}_0", f"{array_id}_1"]
    assert all(r.state == "COMPLETED" for r in tasks.values()), logs

    _same_results(sharded, single)

    # submitting again finds the eval complete and submits nothing
    again = subprocess.run(
        [sys.executable, "-m", "launch.eval", *common, "--out", str(sharded), "--shards", "2", "--profile", "local"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert again.returncode == 0 and "nothing to submit" in again.stdout


def test_local_executor_runs_the_unfinished_shards_then_the_aggregation(cache_env, tmp_path):
    """``launch.eval --executor local``: the same shard and aggregation commands as the Slurm scripts, run here
    one after another; run again after a shard was lost, it redoes exactly that shard."""

    def launch_eval(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "launch.eval", *common, "--out", str(sharded), "--shards", "2", *extra],
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
            # no Slurm to fall back on; the thread count of the reference (bitwise equal images need it)
            env={**{k: v for k, v in os.environ.items() if k != "SLURM_CONF"}, "OMP_NUM_THREADS": "1"},
        )

    common = _shard_eval_args(tmp_path)
    sharded = tmp_path / "sharded"
    shown = launch_eval("--executor", "local", "--dry-run")
    assert shown.returncode == 0 and not sharded.exists(), shown.stderr
    assert shown.stdout.count("-m eval.run") == 2 and "--shard 1/2" in shown.stdout, shown.stdout

    proc = launch_eval("--executor", "local")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 shard(s) of 2" in proc.stdout and "aggregation: done" in proc.stdout, proc.stdout
    single = tmp_path / "single"
    _single_shard_reference(common, single)
    _same_results(sharded, single)

    # a lost shard and the aggregate it fed: the same command redoes that shard only
    lost = sharded / "shards" / "00001-of-00002"
    shutil.rmtree(lost)
    (sharded / DONE_MARKER).unlink()
    again = launch_eval("--executor", "local")
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 shard(s) of 2" in again.stdout and "eval shard 1/2: done" in again.stdout, again.stdout
    _same_results(sharded, single)


def test_exported_model_dir_gives_the_images_of_its_merged_cycle(evals, tiny_run, geneval_sets, prompt_file, tmp_path):
    from mrlora.reduce import export_model

    exported = export_model(str(tiny_run.root), 1, str(tmp_path / "exported"))
    out = _eval(exported, tmp_path / "ev", prompt_file, TINY_SETS + geneval_sets, extra=["--config", "tiny-sd3"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["checkpoint"]["kind"] == "exported"
    for png in sorted((evals["run1"] / "images").rglob("*.png")):
        assert png.read_bytes() == (out / png.relative_to(evals["run1"])).read_bytes(), png
