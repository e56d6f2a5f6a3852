"""The eval report on synthetic evals: size budget at 80 checkpoints, mixed settings, missing axes, Pareto panels.

Synthetic evals are real eval directories (results.h5 via ``eval.results.write_results``, summary.json via
``eval.summary.summarize``, DONE.json) whose images are links into a small pool, so a report over 80
checkpoints costs seconds. The report over real generated evals is in test_eval_end_to_end.py.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import numpy as np
import pytest

from eval.results import Results, write_results
from eval.summary import summarize
from mrlora.cli import run_cli
from mrlora.runstore import DONE_MARKER, atomic_write_json, write_marker

SETTINGS = {
    "prompts": "/data/prompts.jsonl",
    "prompts_sha256": "ab" * 32,
    "num_prompts": 0,
    "samples": 2,
    "batch_size": 4,
    "seed": 0,
    "steps": 20,
    "guidance_scale": 4.5,
    "resolution": 256,
    "max_sequence_length": 256,
    "dtype": "bf16",
    "shards": 1,
    "rate": None,
}
TAGS = ("counting", "colors", "position", "single_object")


@pytest.fixture(scope="module")
def image_pool(tmp_path_factory) -> list[Path]:
    """16 256-pixel PNGs with structure and noise (JPEG cannot shrink pure noise, nor a flat colour, unfairly)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("pool")
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:256, 0:256] / 256.0
    pool = []
    for k in range(16):
        base = np.stack([np.sin(6 * xx + k), np.cos(5 * yy - k), np.sin(4 * (xx + yy) + 0.5 * k)], axis=-1)
        arr = np.clip(127 + 90 * base + rng.normal(0, 18, base.shape), 0, 255).astype(np.uint8)
        path = root / f"{k:02d}.png"
        Image.fromarray(arr).save(path)
        pool.append(path)
    return pool


def synthetic_eval(
    root: Path,
    checkpoint: dict,
    scores: dict[str, np.ndarray],
    pool: list[Path],
    settings: dict | None = None,
    prompts: list[str] | None = None,
    lower: tuple = (),
) -> Path:
    """An aggregated eval at ``root``: ``scores[reward]`` is (prompts, samples); GenEval-style ``correct`` details
    for a reward named geneval; rewards in ``lower`` recorded as lower-is-better."""
    from eval.plan import sample_seed

    num_prompts, samples = next(iter(scores.values())).shape
    settings = {**SETTINGS, "num_prompts": num_prompts, "samples": samples, **(settings or {})}
    prompts = prompts or [f"prompt number {p}" for p in range(num_prompts)]
    pi = np.repeat(np.arange(num_prompts), samples)
    si = np.tile(np.arange(samples), num_prompts)
    images = [f"images/{p:05d}/samples/{k:05d}.png" for p, k in zip(pi, si)]
    for n, rel in enumerate(images):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(pool[(n * 7 + len(str(root))) % len(pool)], root / rel)
    details = {r: {} for r in scores}
    if "geneval" in scores:
        details["geneval"] = {"correct": (scores["geneval"].reshape(-1) > 0.5).astype(np.float64)}
    res = Results(
        pi,
        si,
        np.array([sample_seed(settings["seed"], p, k) for p, k in zip(pi, si)]),
        [prompts[p] for p in pi],
        [TAGS[p % len(TAGS)] if "geneval" in scores else "" for p in pi],
        ["{}"] * len(pi),
        images,
        {r: v.reshape(-1).astype(np.float32) for r, v in scores.items()},
        details,
        {r: r not in lower for r in scores},
        settings,
        checkpoint,
    )
    write_results(root / "results.h5", res)
    atomic_write_json(root / "summary.json", summarize(res))
    write_marker(root, DONE_MARKER, extra={"summary": "summary.json"}, checksums=False)
    return root


def eighty_checkpoints(root: Path, pool: list[Path], prompts: int = 16, count: int = 80) -> list[Path]:
    """base, 40 merged cycles, 36 experts and 3 token mixes of one run (the first ``count`` of them), 3 rewards,
    rewards rising with the cycle."""
    rng = np.random.default_rng(0)
    run = "/runs/tiny-sd3/20261201_000000"
    specs = [{"kind": "base", "label": "base"}]
    specs += [
        {"kind": "merged", "cycle": c, "run_root": run, "label": f"20261201_000000 cycle {c}"} for c in range(1, 41)
    ]
    specs += [
        {"kind": "expert", "cycle": c, "reward": r, "run_root": run, "label": f"cycle {c} {r} expert"}
        for c in range(1, 13)
        for r in ("brightness", "geneval", "jpeg")
    ]
    out = []
    for n, ckpt in enumerate((specs + [{"kind": "base", "label": "base"}] * 3)[:count]):
        settings = {"rate": {"spec": f"<ocr> {n}", "tokens": []}} if n >= len(specs) else {}
        lift = 0.01 * (ckpt.get("cycle") or 0)
        scores = {r: rng.normal(0.3 + lift, 0.2, (prompts, 2)) for r in ("brightness", "geneval", "jpeg")}
        out.append(synthetic_eval(root / f"e{n:02d}", ckpt, scores, pool, settings))
    return out


def _grid(page: str) -> str:
    start = page.index("<table class='grid'>")
    return page[start : page.index("</table>", start)]


def test_report_of_80_checkpoints_stays_under_the_size_budget(tmp_path, image_pool):
    from eval.report import main

    inputs = eighty_checkpoints(tmp_path / "evals", image_pool)
    assert len(inputs) == 80
    out = tmp_path / "report"
    assert main(["--inputs", *map(str, inputs), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert (out / "report.html").stat().st_size <= 5_000_000
    grid = _grid(page)
    rows = grid.count("<tr>") - 1  # minus the header row
    columns = len(re.findall(r"<th[ >]", grid[: grid.index("</thead>")])) - 1
    assert rows == 80 and columns == 8
    thumbs = re.findall(r"<img width='(\d+)'[^>]*src='data:image/jpeg;base64,", grid)
    assert len(thumbs) == 640
    side = int(thumbs[0])
    assert 32 <= side < 256  # the budget shrank the 256-pixel images, but not to nothing
    assert f"JPEG of at most {side} px" in page
    # every thumbnail links to its full image, relative to the report directory
    links = re.findall(r"<a href='([^']+)'><img", grid)
    assert len(links) == 640 and all((out / link).resolve().is_file() for link in links[::37])
    md = (out / "report.md").read_text()
    assert md.count("](thumbs/") == 640 and len(list((out / "thumbs").glob("*.jpg"))) == 640

    # 80 rows in every table, the rate mixes as their own kind, the 40 cycles as one curve
    def section_rows(heading: str) -> list[str]:
        start = page.index(f"<h2>{heading}</h2>")
        return page[start : page.index("</table>", start)].split("<tr>")[2:]

    assert len(section_rows("Summary")) == 80 and len(section_rows("Change vs base")) == 79
    assert sum("<td>rate</td>" in row for row in section_rows("Summary")) == 3
    assert section_rows("Summary")[-1].startswith("<td>base + &lt;ocr&gt; 79</td>")  # base first, mixes last
    assert section_rows("Summary")[40].startswith("<td>20261201_000000 cycle 40</td>")  # cycles in cycle order
    assert (out / "reward_vs_cycle.png").is_file() and "No bar plot for 80 checkpoints" in page


def test_a_tight_budget_drops_grid_columns_and_says_so(tmp_path, image_pool):
    from eval.report import main

    inputs = eighty_checkpoints(tmp_path / "evals", image_pool, prompts=8, count=6)
    out = tmp_path / "report"
    assert main(["--inputs", *map(str, inputs), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    assert "Only" not in page and "px (quality 82)" in page  # 5 MB hold 48 full-size thumbnails
    rest = len(page.encode()) - len(_grid(page))
    budget = rest + 40_000  # room for a few columns of the smallest thumbnails, not for all 8
    assert main(["--inputs", *map(str, inputs), "--out", str(out), "--max-mb", str(budget / 1e6)]) == 0
    page = (out / "report.html").read_text()
    assert (out / "report.html").stat().st_size <= budget
    grid = _grid(page)
    columns = len(re.findall(r"<th[ >]", grid[: grid.index("</thead>")])) - 1
    assert 1 <= columns < 8 and f"Only {columns} of 8 chosen prompts fit the size budget" in page
    # a budget the tables and plots alone exceed: no grid, and the report says why
    assert main(["--inputs", *map(str, inputs), "--out", str(out), "--max-mb", str(rest / 2e6)]) == 0
    page = (out / "report.html").read_text()
    assert "<table class='grid'>" not in page and "The grid is left out: the tables and plots alone take" in page


def _small(
    root: Path,
    pool,
    label: str,
    settings: dict | None = None,
    rewards=("a", "b"),
    shift: float = 0.0,
    kind: str = "merged",
    cycle: int = 1,
) -> Path:
    rng = np.random.default_rng(len(label))
    scores = {r: rng.normal(0.5 + shift, 0.1, (3, 2)) for r in rewards}
    ckpt = {"kind": kind, "label": label, **({"cycle": cycle} if kind != "base" else {})}
    return synthetic_eval(root / label.replace(" ", "_"), ckpt, scores, pool, settings)


def test_evals_with_other_settings_are_refused_then_drawn_under_a_warning(tmp_path, image_pool, capsys):
    from eval.report import main

    base = _small(tmp_path, image_pool, "base", kind="base")
    same = _small(tmp_path, image_pool, "cycle 1", shift=0.1)
    other = _small(tmp_path, image_pool, "cycle 2", {"seed": 7, "steps": 40}, shift=0.2, cycle=2)
    argv = ["--inputs", str(base), str(same), str(other), "--out", str(tmp_path / "rep")]
    assert run_cli(main, argv) == 2
    err = capsys.readouterr().err
    assert "not comparable" in err and "seed: 0 (base, cycle 1); 7 (cycle 2)" in err
    assert "sampler steps: 20 (base, cycle 1); 40 (cycle 2)" in err and "--allow-mixed" in err
    assert not (tmp_path / "rep" / "report.html").exists()

    assert main([*argv, "--allow-mixed"]) == 0
    page = (tmp_path / "rep" / "report.html").read_text()
    warnings = page[page.index("<h2>Warnings</h2>") : page.index("<h2>Summary</h2>")]
    assert "seed: 0 (base, cycle 1); 7 (cycle 2)" in warnings and "sampler steps: 20" in warnings
    assert "Left out of the same-noise grid (other prompt set, seed or resolution than base): cycle 2" in warnings
    grid = _grid(page)
    assert "<td>cycle 1</td>" in grid and "<td>cycle 2</td>" not in grid
    change = page[page.index("<h2>Change vs base</h2>") :]
    row = change[change.index("<td>cycle 2</td>") :]
    assert "unpaired" in row[: row.index("</tr>")]  # other noise: no per-image pairing
    row = change[change.index("<td>cycle 1</td>") :]
    assert "unpaired" not in row[: row.index("</tr>")]


def test_a_reward_one_eval_lacks_is_named_not_dropped(tmp_path, image_pool):
    from eval.report import main

    full = _small(tmp_path, image_pool, "base", kind="base", rewards=("a", "b", "c"))
    part = _small(tmp_path, image_pool, "cycle 1", rewards=("a", "b"))
    out = tmp_path / "rep"
    assert main(["--inputs", str(full), str(part), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "c was not scored by cycle 1: those cells show '-', and c is left out of the Pareto view." in md
    assert "Left out because not every eval scored them: c." in md
    summary = md[md.index("## Summary") : md.index("## Change vs base")]
    header = next(line for line in summary.splitlines() if line.startswith("| checkpoint"))
    row = next(line for line in summary.splitlines() if line.startswith("| cycle 1 |"))
    split = lambda line: [c.strip() for c in line.strip().strip("|").split("|")]  # noqa: E731
    cells = dict(zip(split(header), split(row)))
    assert cells["c ↑ (n=6)"] == "-" and "±" in cells["a ↑ (n=6)"]


def test_each_pareto_panel_circles_the_points_that_projection_does_not_dominate(tmp_path, monkeypatch):
    import eval.report as report
    from eval.pareto import pareto_front

    values = np.array([[1.0, 1.0, 0.0], [0.5, 0.5, 1.0], [0.0, 2.0, 0.0]])  # all three on the 3-D front
    view = report.ParetoView(
        ["a", "b", "c"],
        ["A", "B", "C"],
        ["merged"] * 3,
        values,
        pareto_front(values.tolist()),
        values.min(axis=0) - 0.1,
        {},
        [],
        np.full(values.shape, 0.05),
    )
    assert view.front == [0, 1, 2]
    figures = []
    monkeypatch.setattr(report, "_save", lambda fig, path, dpi=100: figures.append(fig) or path)
    report.plot_pareto(view, tmp_path / "pareto.png")
    circled = {}
    for ax in figures[0].axes:
        rings = [c for c in ax.collections if c.get_label() == "Pareto front"]
        points = {tuple(np.round(p, 6)) for p in rings[0].get_offsets().tolist()}
        circled[(ax.get_xlabel(), ax.get_ylabel())] = points
    # B is beaten by A on (a, b), C by A on (a, c), A by C on (b, c): each panel circles only its own front
    assert circled[("mean a →", "mean b →")] == {(1.0, 1.0), (0.0, 2.0)}
    assert circled[("mean a →", "mean c →")] == {(1.0, 0.0), (0.5, 1.0)}
    assert circled[("mean b →", "mean c →")] == {(0.5, 1.0), (2.0, 0.0)}
    report._pyplot().close(figures[0])


def test_interval_is_the_t_interval_over_prompt_means():
    from scipy import stats

    from eval.report_stats import mean_ci

    rng = np.random.default_rng(3)
    values = rng.normal(size=(7, 4)) + rng.normal(size=(7, 1))  # a prompt effect: samples of a prompt correlate
    ci = mean_ci(values.reshape(-1), np.repeat(np.arange(7), 4))
    prompt_means = values.mean(axis=1)
    lo, hi = stats.t.interval(0.95, 6, loc=prompt_means.mean(), scale=stats.sem(prompt_means))
    assert ci.mean == pytest.approx(values.mean()) and ci.n == 28 and ci.prompts == 7
    assert ci.half == pytest.approx((hi - lo) / 2)
    # one sample per prompt: the ordinary t-interval over the images
    flat = values[:, 0]
    one = mean_ci(flat, np.arange(7))
    assert one.half == pytest.approx(stats.t.ppf(0.975, 6) * stats.sem(flat))
    assert mean_ci([1.0, float("nan")], [0, 1]).half is None  # one prompt left: no interval, not a zero one
    assert math.isclose(mean_ci([2.0, 2.0, 2.0], [0, 1, 2]).half, 0.0)


def test_summary_json_means_equal_the_report_means(tmp_path, image_pool):
    from eval.report import load_input
    from eval.report_metrics import Metric, value

    path = _small(tmp_path, image_pool, "cycle 1")
    inp = load_input(path)
    summary = json.loads((path / "summary.json").read_text())
    for reward in ("a", "b"):
        assert value(inp, Metric(reward, reward, True)).mean == pytest.approx(summary["rewards"][reward]["mean"])


def test_a_lower_is_better_reward_going_down_is_shown_as_better(tmp_path, image_pool):
    from eval.report import main

    rng = np.random.default_rng(5)
    noise = rng.normal(0, 0.05, (3, 2))
    base = synthetic_eval(
        tmp_path / "base",
        {"kind": "base", "label": "base"},
        {"err": 1.0 + noise, "score": 0.5 + noise},
        image_pool,
        lower=("err",),
    )
    merged = synthetic_eval(
        tmp_path / "c1",
        {"kind": "merged", "cycle": 1, "label": "cycle 1"},
        {"err": 0.8 + noise, "score": 0.4 + noise},
        image_pool,
        lower=("err",),
    )
    out = tmp_path / "rep"
    assert main(["--inputs", str(base), str(merged), "--out", str(out)]) == 0
    page = (out / "report.html").read_text()
    change = page[page.index("<h2>Change vs base</h2>") :]
    row = change[change.index("<td>cycle 1</td>") :]
    row = row[: row.index("</tr>")]
    assert "<th>Δ err ↓</th>" in change and "<th>Δ score ↑</th>" in change
    # both fell by exactly 0.2 / 0.1 on every image: err's fall is an improvement, score's is not
    assert '<td class="better">▼ -0.2' in row and '<td class="worse">▼ -0.1' in row
    assert "<h2>Pareto view</h2>" in page and "negated: err" in page

    later = synthetic_eval(
        tmp_path / "c2",
        {"kind": "merged", "cycle": 2, "label": "cycle 2"},
        {"err": 0.7 + noise, "score": 0.3 + noise},
        image_pool,
        lower=("err",),
    )
    assert main(["--inputs", str(merged), str(later), "--out", str(tmp_path / "no_base")]) == 0
    page = (tmp_path / "no_base" / "report.html").read_text()
    assert "<h2>Change vs base</h2>" not in page
    assert "No base model (base or RUN:0) among the inputs, so no change vs base is shown; add its eval." in page
