"""A report a person reads: means with 95% intervals, changes vs base, curves, Pareto view, same-noise grid.

Per-tag accuracy, reward-vs-cycle curves, the Pareto view, and the same prompt under the same noise across
every checkpoint.

Why both Markdown and HTML: report.md (with the plots as PNG files and the thumbnails as JPEG files next to it)
renders on GitHub and in editors; report.html embeds every image, so it is one self-contained file to copy off
a cluster or attach to an issue. Its size is held under ``--max-mb`` (default 5 MB, enough for 80 checkpoints):
the grid's thumbnails get whatever the rest leaves (``eval.report_images``) and link to the full images.

``python -m eval.report --inputs EVAL_DIR [EVAL_DIR ...] --out REPORT_DIR [--grid-top 4] [--grid-random 4]
[--max-mb 5] [--allow-mixed]``

Each input is an eval directory aggregated by ``eval.run`` / ``eval.aggregate``. Checkpoints are listed base
first, then merged cycles, experts, exports and RaTE token mixes (``<checkpoint> + <spec>``, their own kind
"rate"). Several merged cycles of one run give reward-vs-cycle curves; all inputs together give the Pareto view.
Evals made with other prompts, seed, sampler steps, guidance or resolution are refused (``eval.report_compare``)
unless ``--allow-mixed``, which draws them together under a warning section. Intervals and paired changes:
``eval.report_stats``; the grid's choice of prompts: ``eval.report_grid``.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import itertools
import os
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval import rate as rate_mix
from eval import report_compare as compare
from eval import report_grid as grid
from eval.errors import EvalError
from eval.pareto import hypervolume, pareto_front
from eval.plan import EvalDir
from eval.report_images import data_uri, fit_thumbnails
from eval.report_metrics import Metric, change, metrics_for, tag_value, value
from eval.report_stats import CI_METHOD, MeanCI, arrow, format_ci, format_delta
from eval.results import Results, read_results
from mrlora.cli import add_version_flag, run_cli
from mrlora.runstore import atomic_file, atomic_write_text, read_json

KIND_STYLE = {
    "base": ("tab:gray", "s"),
    "merged": ("tab:blue", "o"),
    "expert": ("tab:orange", "^"),
    "exported": ("tab:green", "D"),
    rate_mix.KIND: ("tab:purple", "*"),
}
OTHER_STYLE = ("tab:brown", "x")
KIND_ORDER = ("base", "merged", "expert", "exported", rate_mix.KIND)
MAX_PARETO_PANELS = 6
MAX_BAR_CHECKPOINTS = 12  # more bars per tag than this is unreadable; the table has the numbers
MAX_POINT_LABELS = 15  # above this, only each panel's front points are labelled
DEFAULT_MAX_MB = 5.0


@dataclass
class EvalInput:
    """One aggregated eval: its summary and per-sample rows."""

    eval_dir: EvalDir
    summary: dict
    results: Results
    name: str | None = field(default=None, compare=False)  # the label, made unique among the report's inputs

    @property
    def checkpoint(self) -> dict:
        return self.summary.get("checkpoint", {})

    @property
    def settings(self) -> dict:
        return self.summary.get("settings", {})

    @property
    def rate(self) -> dict | None:
        """The RaTE token mix the images were generated with (settings.rate), None for a plain eval."""
        return self.settings.get("rate")

    @property
    def label(self) -> str:
        if self.name is not None:
            return self.name
        label = self.checkpoint.get("label") or self.eval_dir.root.name
        return rate_mix.label(label, self.rate) if self.rate is not None else label

    @property
    def kind(self) -> str:
        if self.rate is not None:
            return rate_mix.KIND
        return "base" if rate_mix.steers_a_base(self.checkpoint) else self.checkpoint.get("kind", "?")

    def mean(self, reward: str) -> float | None:
        block = self.summary["rewards"].get(reward)
        return None if block is None else block["mean"]


def load_input(path: str | Path) -> EvalInput:
    out = EvalDir(path)
    if not out.root.is_dir():
        raise EvalError(f"report input {out.root} does not exist")
    if out.done() is None:
        raise EvalError(
            f"report input {out.root} is not a finished eval (no DONE.json); run `python -m eval.aggregate --out "
            f"{out.root}` once all its shards are done"
        )
    return EvalInput(out, read_json(out.summary), read_results(out.results))


def ordered(inputs: list[EvalInput]) -> list[EvalInput]:
    """Base first, then merged cycles in cycle order, experts by (cycle, reward), exports, token mixes; ties keep
    the given order (a shell glob puts c10 before c2, which no reader wants)."""

    def key(pair):
        n, i = pair
        rank = KIND_ORDER.index(i.kind) if i.kind in KIND_ORDER else len(KIND_ORDER)
        cycle = i.checkpoint.get("cycle")
        return rank, cycle if isinstance(cycle, int) else -1, str(i.checkpoint.get("reward") or ""), n

    out = [i for _, i in sorted(enumerate(inputs), key=key)]
    seen: dict[str, int] = {}
    for i in out:
        seen[i.label] = seen.get(i.label, 0) + 1
    for i in out:
        if seen[i.label] > 1:
            i.name = f"{i.label} [{i.eval_dir.root.name}]"
    return out


def base_input(inputs: list[EvalInput]) -> EvalInput | None:
    """The eval changes are measured against: the first base model (``base`` or ``RUN:0``) without a token mix."""
    return next((i for i in inputs if i.kind == "base"), None)


# ------------------------------------------------------------------------------------------------ tables


@dataclass(frozen=True)
class Cell:
    """A table cell's text and, in HTML, a class (``better`` / ``worse`` / ``same`` colour a change)."""

    text: str
    css: str | None = None

    def __str__(self) -> str:
        return self.text


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


@dataclass
class Table:
    header: list[str]
    rows: list[list]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "---|" * len(self.header)]
        lines += ["| " + " | ".join(_fmt(v).replace("|", "\\|") for v in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self, css: str = "") -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td{_cls(v)}>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in self.rows
        )
        cls = f' class="{css}"' if css else ""
        return f"<div class='scroll'><table{cls}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


def _cls(v) -> str:
    return f' class="{v.css}"' if isinstance(v, Cell) and v.css else ""


def all_rewards(inputs: list[EvalInput]) -> list[str]:
    return sorted({r for i in inputs for r in i.summary["rewards"]})


def direction_mark(higher_is_better: bool) -> str:
    return "↑" if higher_is_better else "↓"


def _n_header(cis: list[MeanCI]) -> tuple[str, bool]:
    """`` (n=6)`` for the header when every cell counts the same images; else the cells carry their own n."""
    ns = {c.n for c in cis if c.mean is not None}
    return (f" (n={ns.pop()})", False) if len(ns) == 1 else ("", True)


def summary_table(inputs: list[EvalInput]) -> Table:
    """Per checkpoint: mean ± 95% CI of each metric (header: ↑ / ↓ and n when every eval has the same)."""
    metrics = metrics_for(inputs, all_rewards(inputs))
    header = ["checkpoint", "kind", "images"]
    columns = []
    for m in metrics:
        cis = [value(i, m) for i in inputs]
        suffix, per_cell = _n_header(cis)
        header.append(f"{m.title} {direction_mark(m.higher_is_better)}{suffix}")
        columns.append([format_ci(c, with_n=per_cell) for c in cis])
    rows = [[i.label, i.kind, i.summary["images"]] + [col[k] for col in columns] for k, i in enumerate(inputs)]
    return Table(header, rows)


def change_table(inputs: list[EvalInput], base: EvalInput) -> Table:
    """Per checkpoint other than the base: change of each metric vs the base, arrow coloured better / worse."""
    metrics = metrics_for(inputs, all_rewards(inputs))
    header = ["checkpoint", "kind"] + [f"Δ {m.title} {direction_mark(m.higher_is_better)}" for m in metrics]
    rows = []
    for i in inputs:
        if i is base:
            continue
        row = [i.label, i.kind]
        for m in metrics:
            d = change(base, i, m)
            css = None
            if d is not None:
                _, css = arrow(d.value, m.higher_is_better)
                if d.half is not None and abs(d.value) <= d.half:
                    css = "same"  # the interval holds 0: no colour claims a change
            row.append(Cell(format_delta(d, m.higher_is_better), css))
        rows.append(row)
    return Table(header, rows)


def rate_notes(inputs: list[EvalInput]) -> list[str]:
    """One sentence per token-mix eval: its token files, and a warning when it was not applied to a base model."""
    notes = []
    for i in inputs:
        if i.rate is None:
            continue
        files = ", ".join(f"{t['token']} = {t['path']} (sha256 {t['sha256'][:12]})" for t in i.rate["tokens"])
        warning = rate_mix.checkpoint_note(i.checkpoint)
        notes.append(f"{i.label}: RaTE tokens {files}." + (f" Note: {warning}." if warning else ""))
    return notes


@dataclass
class TagTable:
    """A GenEval-style reward's per-tag accuracy: the table and the numbers the bar plot draws."""

    table: Table
    tags: list[str]
    labels: list[str]
    means: np.ndarray  # (checkpoints, tags), NaN where missing
    halves: np.ndarray


def geneval_tables(inputs: list[EvalInput]) -> dict[str, TagTable]:
    """Per GenEval-style reward: rows = checkpoints, columns = tags (accuracy ± CI), overall, strict overall."""
    tables = {}
    for r in all_rewards(inputs):
        blocks = [(i, i.summary["rewards"].get(r, {}).get("geneval")) for i in inputs]
        blocks = [(i, b) for i, b in blocks if b]
        if not blocks:
            continue
        tags = sorted({t for _, b in blocks for t in b["per_tag"]})
        cells = [[tag_value(i, r, t) for t in tags] for i, _ in blocks]
        overall = Metric(f"{r} overall", r, True, "correct", by_tag=True)
        strict = Metric(f"{r} strict overall", r, True, "strict_correct", by_tag=True)
        header, per_cell = ["checkpoint"], []
        for k, t in enumerate(tags):
            suffix, own = _n_header([row[k] for row in cells])
            header.append(t + suffix)
            per_cell.append(own)
        rows = [
            [i.label]
            + [format_ci(c, with_n=own) for c, own in zip(row, per_cell)]
            + [format_ci(value(i, overall)), format_ci(value(i, strict))]
            for (i, _), row in zip(blocks, cells)
        ]
        means = np.array([[np.nan if c.mean is None else c.mean for c in row] for row in cells], dtype=np.float64)
        halves = np.array([[np.nan if c.half is None else c.half for c in row] for row in cells], dtype=np.float64)
        tables[r] = TagTable(
            Table(header + ["overall ↑", "strict overall ↑"], rows), tags, [i.label for i, _ in blocks], means, halves
        )
    return tables


# ------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int = 100) -> Path:
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def plot_per_tag(tags: TagTable, reward: str, path: Path) -> Path:
    """Bars per tag and checkpoint with their 95% intervals."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tags.tags) + 2), 4))
    width = 0.8 / max(1, len(tags.labels))
    for k, label in enumerate(tags.labels):
        ax.bar(
            np.arange(len(tags.tags)) + k * width,
            tags.means[k],
            width,
            yerr=np.nan_to_num(tags.halves[k]),
            capsize=2,
            error_kw={"elinewidth": 0.8},
            label=label,
        )
    ax.set_xticks(np.arange(len(tags.tags)) + 0.4 - width / 2, tags.tags, rotation=20)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (± 95% CI)")
    ax.set_title(f"{reward}: per-tag accuracy")
    ax.legend(fontsize=8)
    return _save(fig, path)


def cycle_curves(inputs: list[EvalInput]) -> dict[str, list[EvalInput]]:
    """Runs with at least two merged cycles (cycle 0 = the run's base) among the inputs, by run root."""
    runs: dict[str, dict[int, EvalInput]] = {}
    for i in inputs:
        ckpt = i.checkpoint
        if ckpt.get("kind") == "merged" and ckpt.get("run_root") is not None and i.rate is None:
            runs.setdefault(ckpt["run_root"], {})[int(ckpt["cycle"])] = i
    return {root: [c[k] for k in sorted(c)] for root, c in runs.items() if len(c) >= 2}


def plot_curves(curves: dict[str, list[EvalInput]], rewards: list[str], path: Path) -> Path:
    """Mean reward per merged cycle, the 95% interval as a band."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(
        1, len(rewards), figsize=(4.5 * len(rewards), 3.6), squeeze=False, layout="constrained"
    )  # long reward names as y labels must not overlap the next plot
    for ax, reward in zip(axes[0], rewards):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # cycles are whole numbers
        for root, points in curves.items():
            metric = Metric(reward, reward, True)
            cis = [(int(p.checkpoint["cycle"]), value(p, metric)) for p in points]
            cis = [(x, c) for x, c in cis if c.mean is not None]
            xs = [x for x, _ in cis]
            ys = np.array([c.mean for _, c in cis])
            hs = np.array([np.nan if c.half is None else c.half for _, c in cis])
            (line,) = ax.plot(xs, ys, marker="o", label=Path(root).name)
            ax.fill_between(xs, ys - hs, ys + hs, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_xlabel("cycle (0 = base)")
        ax.set_ylabel(f"mean {reward} (± 95% CI)")
        ax.set_title(reward)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


@dataclass
class ParetoView:
    rewards: list[str]
    labels: list[str]
    kinds: list[str]
    values: np.ndarray  # (checkpoints, rewards), signs flipped for lower-is-better rewards
    front: list[int]  # non-dominated on all the view's rewards at once
    reference: np.ndarray
    hypervolumes: dict[str, float]
    flipped: list[str]
    halves: np.ndarray = None  # (checkpoints, rewards) 95% CI half-widths, NaN without one
    left_out: dict[str, list[str]] = field(default_factory=dict)  # reward -> labels of the evals that lack it

    def panels(self) -> list[tuple[int, int]]:
        return list(itertools.combinations(range(len(self.rewards)), 2))[:MAX_PARETO_PANELS]

    def panel_front(self, a: int, b: int) -> list[int]:
        """The points non-dominated in the 2-D projection onto rewards ``a`` and ``b`` (what a panel marks)."""
        return pareto_front(self.values[:, [a, b]].tolist())


def pareto_view(inputs: list[EvalInput]) -> ParetoView | None:
    """The Pareto view over rewards every input scored; None when fewer than 2 rewards or checkpoints."""
    rewards = all_rewards(inputs)
    common = [r for r in rewards if all(i.mean(r) is not None for i in inputs)]
    left_out = {r: [i.label for i in inputs if i.mean(r) is None] for r in rewards if r not in common}
    if len(common) < 2 or len(inputs) < 2:
        return None
    flipped = [r for r in common if not inputs[0].summary["rewards"][r]["higher_is_better"]]
    values = np.array([[(-1 if r in flipped else 1) * i.mean(r) for r in common] for i in inputs], dtype=np.float64)
    halves = np.array(
        [[np.nan if (c := value(i, Metric(r, r, True))).half is None else c.half for r in common] for i in inputs],
        dtype=np.float64,
    )
    front = pareto_front(values.tolist())
    lo, hi = values.min(axis=0), values.max(axis=0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(lo), 1e-6))
    reference = lo - 0.05 * span
    kinds = [i.kind for i in inputs]
    groups = {"all": list(range(len(inputs)))}
    for kind in dict.fromkeys(kinds):
        groups[kind] = [k for k, kk in enumerate(kinds) if kk == kind]
    hvs = {name: hypervolume(values[idx].tolist(), reference.tolist()) for name, idx in groups.items()}
    return ParetoView(
        common, [i.label for i in inputs], kinds, values, front, reference, hvs, flipped, halves, left_out
    )


def _short_labels(labels: list[str]) -> list[str]:
    """Point labels without a first word every label shares (one run's timestamp), so they fit the panel."""
    heads = {label.split(" ", 1)[0] for label in labels}
    if len(labels) > 1 and len(heads) == 1 and all(" " in label for label in labels):
        return [label.split(" ", 1)[1] for label in labels]
    return list(labels)


def plot_pareto(view: ParetoView, path: Path) -> Path:
    """One panel per pair of rewards; each marks the points non-dominated in *its* projection, joined by a step."""
    plt = _pyplot()
    pairs = view.panels()
    ncols = min(2, len(pairs))  # two panels a row stay legible when the page is half a screen wide
    nrows = -(-len(pairs) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4.6 * nrows), squeeze=False, layout="constrained")
    axes = axes.reshape(-1)
    for ax in axes[len(pairs) :]:
        fig.delaxes(ax)
    labels = _short_labels(view.labels)
    halves = view.halves if view.halves is not None else np.full(view.values.shape, np.nan)
    for ax, (a, b) in zip(axes, pairs):
        ax.errorbar(
            view.values[:, a],
            view.values[:, b],
            xerr=np.nan_to_num(halves[:, a]),
            yerr=np.nan_to_num(halves[:, b]),
            fmt="none",
            ecolor="0.75",
            elinewidth=0.8,
            zorder=2,
        )
        for kind in dict.fromkeys(view.kinds):
            idx = [k for k, kk in enumerate(view.kinds) if kk == kind]
            colour, marker = KIND_STYLE.get(kind, OTHER_STYLE)
            size = 110 if marker == "*" else 50
            ax.scatter(view.values[idx, a], view.values[idx, b], c=colour, marker=marker, s=size, label=kind, zorder=3)
        front = sorted(view.panel_front(a, b), key=lambda k: (view.values[k, a], -view.values[k, b]))
        ax.step(
            view.values[front, a],
            view.values[front, b],
            where="post",
            color="red",
            linewidth=0.8,
            linestyle="--",
            zorder=3,
        )
        ax.scatter(
            view.values[front, a],
            view.values[front, b],
            facecolors="none",
            edgecolors="red",
            s=180,
            linewidths=1.5,
            label="Pareto front",
            zorder=4,
        )
        ax.margins(x=0.2, y=0.12)  # room for the point labels inside the panel
        shown = range(len(labels)) if len(labels) <= MAX_POINT_LABELS else front
        ranges = (np.ptp(ax.get_xlim()), np.ptp(ax.get_ylim()))
        for (x, y), names, dy in _point_labels(view.values[:, [a, b]], labels, shown, ranges):
            ax.annotate(names, (x, y), fontsize=7, xytext=(4, dy), textcoords="offset points")
        name = lambda r: f"-{r}" if r in view.flipped else r  # noqa: E731
        ax.set_xlabel(f"mean {name(view.rewards[a])} →")
        ax.set_ylabel(f"mean {name(view.rewards[b])} →")
        ax.set_title(f"front of {name(view.rewards[a])} × {name(view.rewards[b])}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def _point_labels(
    xy: np.ndarray, labels: list[str], shown, ranges: tuple[float, float]
) -> list[tuple[tuple[float, float], str, float]]:
    """(point, text, vertical offset in points) per label: points at one spot share one label ("a = b"), and a
    label that would run over another one at about the same height goes one line lower."""
    spots: dict[tuple[float, float], list[str]] = {}
    for k in shown:
        spots.setdefault((float(xy[k, 0]), float(xy[k, 1])), []).append(labels[k])
    x_range, y_range = ranges  # the panel's axis limits: label sizes in data units
    char = x_range * 4.2 / 320  # a 7-point character (~4.2 pt wide) on a panel about 320 pt wide
    out, placed = [], []
    for (x, y), names in sorted(spots.items(), key=lambda item: (-item[0][1], item[0][0])):
        text = " = ".join(names)
        width = char * (len(text) + 2)
        taken = {
            level for px, py, pw, level in placed if abs(y - py) < 0.04 * y_range and px < x + width and x < px + pw
        }
        level = next(n for n in range(len(placed) + 1) if n not in taken)
        placed.append((x, y, width, level))
        out.append(((x, y), text, 4 - 9 * level))
    return out


# ------------------------------------------------------------------------------------------------ report


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


class _Doc:
    """Builds the Markdown and the HTML report side by side, so they always hold the same content."""

    def __init__(self, out: Path):
        self.out = out
        self.md: list[str] = []
        self.html: list[str] = []

    def heading(self, text: str, level: int = 2) -> None:
        self.md.append(f"{'#' * level} {text}\n")
        self.html.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def para(self, text: str, css: str = "") -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p class='{css}'>{html.escape(text)}</p>" if css else f"<p>{html.escape(text)}</p>")

    def warnings(self, items: list[str]) -> None:
        self.md.append("\n".join(f"> **Warning:** {w}" for w in items) + "\n")
        self.html.append(
            "<div class='warn'><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in items) + "</ul></div>"
        )

    def table(self, table: Table, css: str = "") -> None:
        self.md.append(table.markdown() + "\n")
        self.html.append(table.html(css))

    def image(self, path: Path, alt: str) -> None:
        self.md.append(f"![{alt}]({path.relative_to(self.out).as_posix()})\n")
        self.html.append(
            f'<figure><img alt="{html.escape(alt)}" src="{_data_uri(path)}"><figcaption>'
            f"{html.escape(alt)}</figcaption></figure>"
        )

    def raw(self, markdown: str, page: str) -> None:
        self.md.append(markdown)
        self.html.append(page)


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:right;white-space:nowrap}
td:first-child,th:first-child{text-align:left}th{background:#eee;white-space:normal}
td:first-child{white-space:normal;min-width:8em;max-width:16em}.scroll{overflow-x:auto;max-width:100%}
p.note{font-size:small;color:#444}
img{max-width:100%}figure{margin:1em 0}figcaption{font-size:small;color:#555}
.better{color:#1a7f37;font-weight:bold}.worse{color:#c62828;font-weight:bold}.same{color:#666}
.warn{background:#fff4e5;border-left:4px solid #e69500;padding:0.2em 1em;margin:1em 0}
table.grid td,table.grid th{text-align:center;vertical-align:top;white-space:normal;padding:2px}
table.grid th{font-weight:normal;font-size:11px;max-width:14em}table.grid td:first-child,
table.grid th:first-child{position:sticky;left:0;background:#fff;text-align:left;font-size:12px;max-width:12em}
table.grid img{display:block;margin:auto;max-width:none}table.grid .s{font-size:10px;color:#333}"""


def _page(body: str) -> str:
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><meta name='viewport' "
        f"content='width=device-width, initial-scale=1'><title>mrlora eval report</title>"
        f"<style>{_CSS}</style></head><body>{body}</body></html>"
    )


def _link(out: Path, target: Path) -> str:
    """A relative link from the report directory to a full image (works on the cluster's filesystem)."""
    return urllib.parse.quote(Path(os.path.relpath(target, out)).as_posix())


def _score_text(value: float, decimals: int = 3) -> str:
    return "-" if not np.isfinite(value) else f"{value:.{decimals}f}"


def grid_section(
    members: list[EvalInput], columns: list[grid.GridColumn], rewards: list[str], out: Path, budget: int
) -> tuple[str, str, str]:
    """(markdown, html, note) of the same-noise grid, its thumbnails fitted into ``budget`` characters of HTML;
    columns are dropped from the end (random ones first) when even the smallest thumbnails do not fit."""
    rows = [grid.cell_rows(i, columns) for i in members]
    paths = [[i.eval_dir.root / i.results.image[j] for j in r] for i, r in zip(members, rows)]
    missing = [p for row in paths for p in row if not p.is_file()]
    if missing:
        return (
            "",
            "",
            (
                f"The grid is left out: {len(missing)} image file(s) are missing, e.g. {missing[0]}; "
                "the eval directories must keep their images/ folders."
            ),
        )
    shown = len(columns)
    fitted = None
    while shown >= 1:
        flat = [p for row in paths for p in row[:shown]]
        overhead = 600 * len(flat) + 400 * shown  # markup per cell and per column header
        fitted = fit_thumbnails(flat, budget - overhead) if budget > overhead else None
        if fitted is not None:
            break
        shown -= 1
    if fitted is None:
        return (
            "",
            "",
            (
                "The grid is left out: even 32-pixel thumbnails of one prompt for every checkpoint exceed "
                "the size budget; raise --max-mb or report fewer checkpoints."
            ),
        )
    chosen, columns = len(columns), columns[:shown]
    thumbs = out / "thumbs"
    thumbs.mkdir(exist_ok=True)
    for old in thumbs.glob("*.jpg"):  # a previous report's thumbnails
        old.unlink()
    head = ["checkpoint"] + [f"#{c.prompt_index} s{c.sample_index}: {c.prompt} ({c.why})" for c in columns]
    html_head = "<th>checkpoint</th>" + "".join(
        f"<th title='{html.escape(c.prompt, quote=True)}'><b>{html.escape(c.prompt)}</b><br>prompt #{c.prompt_index}"
        f", sample {c.sample_index}<br><i>{html.escape(c.why)}</i></th>"
        for c in columns
    )
    md_rows, html_rows = [], []
    k = 0
    for inp, r, row_paths in zip(members, rows, paths):
        md_cells, html_cells = [inp.label], [f"<td>{html.escape(inp.label)}</td>"]
        for c, j, full in zip(columns, r[:shown], row_paths[:shown]):
            jpeg, width = fitted.jpegs[k], fitted.widths[k]
            k += 1
            name = f"thumbs/{k:05d}_p{c.prompt_index}_s{c.sample_index}.jpg"
            (out / name).write_bytes(jpeg)  # no fsync per thumbnail: report.html, written atomically last, is the unit
            scores = " / ".join(
                _score_text(float(inp.results.scores[rw][j])) if rw in inp.results.scores else "-" for rw in rewards
            )
            href = _link(out, full)
            md_cells.append(f"[![{c.prompt_index}/{c.sample_index}]({name})]({href}) {scores}")
            html_cells.append(
                f"<td><a href='{href}'><img width='{width}' alt='{html.escape(inp.label)}' "
                f"src='{data_uri(jpeg)}'></a><span class='s'>{html.escape(scores)}</span></td>"
            )
        md_rows.append(md_cells)
        html_rows.append("<tr>" + "".join(html_cells) + "</tr>")
    md = Table(head, md_rows).markdown() + "\n"
    page = (
        f"<div class='scroll'><table class='grid'><thead><tr>{html_head}</tr></thead><tbody>"
        + "".join(html_rows)
        + "</tbody></table></div>"
    )
    note = (
        f"Thumbnails: JPEG of at most {fitted.side} px (quality {fitted.quality}), chosen to keep the report under its "
        "size budget; click one for the full image."
    )
    if shown < chosen:
        note += f" Only {shown} of {chosen} chosen prompts fit the size budget (raise --max-mb for more)."
    return md, page, note


def build_report(
    inputs: list[EvalInput],
    out: Path,
    grid_top: int = 4,
    grid_random: int = 4,
    max_bytes: int = int(DEFAULT_MAX_MB * 1e6),
    allow_mixed: bool = False,
) -> Path:
    """Write plots, thumbnails, report.md and report.html (last) into ``out``; return the HTML path."""
    if not inputs:
        raise EvalError("no inputs; pass --inputs EVAL_DIR [EVAL_DIR ...]")
    inputs = ordered(inputs)
    labels = [i.label for i in inputs]
    differences = compare.setting_differences(labels, [i.settings for i in inputs])
    if differences and not allow_mixed:
        raise EvalError(compare.mixed_settings_error(differences))
    out.mkdir(parents=True, exist_ok=True)
    rewards = all_rewards(inputs)
    base = base_input(inputs)

    warnings = []
    if differences:
        warnings.append(
            "These evals were made with different settings (--allow-mixed), so they are not directly "
            "comparable; they are drawn together below as asked. " + " | ".join(d.sentence() for d in differences) + "."
        )
        if any(d.key == "prompts_sha256" for d in differences):
            warnings.append("Prompt files: " + compare.prompt_files(labels, [i.settings for i in inputs]) + ".")
    missing = compare.missing_rewards(labels, [set(i.summary["rewards"]) for i in inputs])
    for reward, lacking in missing.items():
        warnings.append(
            f"{reward} was not scored by {', '.join(lacking)}: those cells show '-', and {reward} is "
            "left out of the Pareto view."
        )
    for reward, groups in compare.direction_conflicts(
        labels, [{r: b["higher_is_better"] for r, b in i.summary["rewards"].items()} for i in inputs]
    ).items():
        warnings.append(
            f"{reward} is recorded as higher-is-better by {', '.join(groups.get(True, []))} and "
            f"lower-is-better by {', '.join(groups.get(False, []))}: the reward changed between evals."
        )
    grid_members, grid_others = grid.same_noise_members(inputs, base or inputs[0])
    if grid_others:
        warnings.append(
            "Left out of the same-noise grid (other prompt set, seed or resolution than "
            f"{(base or inputs[0]).label}): {', '.join(i.label for i in grid_others)}."
        )

    doc = _Doc(out)
    doc.heading("mrlora eval report", 1)
    doc.para(
        f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} from {len(inputs)} eval(s); the "
        "inputs and their settings are listed at the end."
    )
    if warnings:
        doc.heading("Warnings")
        doc.warnings(warnings)

    doc.heading("Summary")
    doc.para(
        "Mean ± 95% CI per checkpoint; ↑ = higher is better, ↓ = lower is better (as each reward declares itself)."
    )
    doc.table(summary_table(inputs))
    doc.para(CI_METHOD, "note")
    if base is not None and len(inputs) > 1:
        doc.heading("Change vs base")
        doc.para(
            f"Each checkpoint minus {base.label}, ± its 95% interval: ▲ up, ▼ down; green is better and red "
            "worse for that metric, grey when the interval holds 0."
        )
        doc.table(change_table(inputs, base))
    elif len(inputs) > 1:
        doc.para("No base model (base or RUN:0) among the inputs, so no change vs base is shown; add its eval.")
    for note in rate_notes(inputs):
        doc.para(note)

    for reward, tags in geneval_tables(inputs).items():
        doc.heading(f"{reward}: per-tag accuracy")
        doc.para(
            "Overall = mean over tags of the per-tag accuracy (official GenEval summary); strict overall uses "
            "exact counts. Cells: accuracy ± 95% CI (n in the header, or in the cell when evals differ)."
        )
        doc.table(tags.table)
        if len(tags.labels) <= MAX_BAR_CHECKPOINTS:
            doc.image(plot_per_tag(tags, reward, out / f"per_tag_{reward}.png"), f"{reward} per-tag accuracy")
        else:
            doc.para(
                f"No bar plot for {len(tags.labels)} checkpoints (more than {MAX_BAR_CHECKPOINTS} bars per tag "
                "are unreadable); the table has every number."
            )

    curves = cycle_curves(inputs)
    if curves:
        doc.heading("Reward vs cycle")
        doc.image(
            plot_curves(curves, rewards, out / "reward_vs_cycle.png"), "mean reward per merged cycle (band: 95% CI)"
        )

    view = pareto_view(inputs)
    doc.heading("Pareto view")
    if view is None:
        doc.para(
            "Needs at least two checkpoints scored on at least two common rewards"
            + (f" (not scored by every eval: {', '.join(missing)})." if missing else ".")
        )
    else:
        note = f" (rewards where lower is better are negated: {', '.join(view.flipped)})" if view.flipped else ""
        left = f" Left out because not every eval scored them: {', '.join(view.left_out)}." if view.left_out else ""
        doc.para(
            f"One point per checkpoint (mean reward per axis, bars: 95% CI){note}; each panel circles the "
            f"points no other point beats on both of its rewards.{left} Front on all "
            f"{len(view.rewards)} rewards at once: " + ", ".join(view.labels[k] for k in view.front) + "."
        )
        doc.para(
            "Hypervolume is the volume of reward space (one axis per reward: "
            + ", ".join(view.rewards)
            + ") that a group's checkpoints dominate above the reference point ("
            + ", ".join(f"{r}={v:.4g}" for r, v in zip(view.rewards, view.reference))
            + ", i.e. 5% of each reward's range below the worst checkpoint here), so a larger value means the "
            "group's front reaches further on all rewards at once; it compares groups within this report "
            "only, because the reference point depends on the inputs: "
            + ", ".join(f"{g} {v:.4g}" for g, v in view.hypervolumes.items())
            + "."
        )
        doc.table(
            Table(
                ["checkpoint", "kind", "on front (all rewards)"] + view.rewards,
                [
                    [view.labels[k], view.kinds[k], "yes" if k in view.front else "no"]
                    + [float(x) for x in view.values[k]]
                    for k in range(len(view.labels))
                ],
            )
        )
        doc.image(
            plot_pareto(view, out / "pareto.png"),
            "Pareto view (each panel circles its own non-dominated points in red)",
        )

    doc.heading("Same prompt, same noise, every checkpoint")
    grid_at = len(doc.html)
    grid_md_at = len(doc.md)

    doc.heading("Inputs")
    doc.table(
        Table(
            [
                "checkpoint",
                "kind",
                "eval directory",
                "prompts",
                "seed",
                "sampler steps",
                "CFG",
                "resolution",
                "samples",
            ],
            [
                [
                    i.label,
                    i.kind,
                    str(i.eval_dir.root),
                    i.settings.get("prompts"),
                    i.settings.get("seed"),
                    i.settings.get("steps"),
                    i.settings.get("guidance_scale"),
                    i.settings.get("resolution"),
                    i.settings.get("samples"),
                ]
                for i in inputs
            ],
        )
    )

    intro = (
        "Every image below of one column starts from the same noise (same prompt, sample and seed), so the "
        "differences are the checkpoints'. Columns: the prompts where the checkpoints differ most, then a fixed "
        "random sample. Under each image: " + " / ".join(rewards) + "."
    )
    columns = grid.choose_columns(grid_members, rewards, grid_top, grid_random)
    rest = len(_page("".join(doc.html)).encode("utf-8")) + 2048  # + the grid's own paragraphs
    budget = max_bytes - rest
    for _ in range(3):  # the grid's markup is estimated; measure the page and shrink the grid if it is over
        if columns and budget <= 0:
            md, page, note = (
                "",
                "",
                (
                    f"The grid is left out: the tables and plots alone take {rest / 1e6:.2f} MB "
                    f"of the {max_bytes / 1e6:.2f} MB size budget; raise --max-mb."
                ),
            )
        elif columns:
            md, page, note = grid_section(grid_members, columns, rewards, out, budget)
        else:
            md, page, note = "", "", "No (prompt, sample) is shared by every eval, so there is no grid."
        texts = [intro, note] if page else [note]
        grid_html = [f"<p>{html.escape(t)}</p>" for t in texts] + [page]
        html_page = _page("".join(doc.html[:grid_at] + grid_html + doc.html[grid_at:]))
        over = len(html_page.encode("utf-8")) - max_bytes
        if over <= 0 or not page:
            break
        budget -= over + 4096
    doc.md[grid_md_at:grid_md_at] = [t + "\n" for t in texts] + [md]

    atomic_write_text(out / "report.md", "\n".join(doc.md))
    atomic_write_text(out / "report.html", html_page)
    return out / "report.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="aggregated eval directories")
    parser.add_argument("--out", required=True, help="report directory (report.md, report.html, plots, thumbnails)")
    parser.add_argument(
        "--grid-top", type=int, default=4, help="grid columns: prompts where the checkpoints differ most (default 4)"
    )
    parser.add_argument("--top", dest="grid_top", type=int, help=argparse.SUPPRESS)  # the old best/worst count
    parser.add_argument(
        "--grid-random",
        type=int,
        default=4,
        help="grid columns: a fixed random sample of the other prompts (default 4)",
    )
    parser.add_argument(
        "--max-mb",
        type=float,
        default=DEFAULT_MAX_MB,
        help=f"size budget of report.html in MB; thumbnails shrink to fit (default {DEFAULT_MAX_MB:g})",
    )
    parser.add_argument(
        "--allow-mixed",
        action="store_true",
        help="report evals made with different prompts / seed / steps / CFG / resolution together, "
        "under a warning section (refused otherwise)",
    )
    add_version_flag(parser)
    args = parser.parse_args(argv)
    if args.grid_top < 0 or args.grid_random < 0:
        raise EvalError(f"--grid-top and --grid-random must be >= 0, got {args.grid_top} and {args.grid_random}")
    if args.max_mb <= 0:
        raise EvalError(f"--max-mb must be > 0, got {args.max_mb}")
    inputs = [load_input(p) for p in args.inputs]
    path = build_report(
        inputs, Path(args.out), args.grid_top, args.grid_random, int(args.max_mb * 1e6), args.allow_mixed
    )
    size = path.stat().st_size
    print(f"wrote {path} ({size / 1e6:.2f} MB) and {path.with_suffix('.md')}")
    if size > args.max_mb * 1e6:
        print(
            f"warning: {path} is over the {args.max_mb:g} MB budget even without its grid (see the report); "
            "raise --max-mb or report fewer checkpoints",
            file=sys.stderr,
        )
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
