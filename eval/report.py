"""A report a person reads: tables, per-tag accuracy, best/worst images, reward-vs-cycle curves, Pareto view.

Why both Markdown and HTML: report.md (with the plots as PNG files next to it) renders on GitHub and in
editors; report.html embeds every image as base64, so it is one self-contained file to copy off a cluster or
attach to an issue.

``python -m eval.report --inputs EVAL_DIR [EVAL_DIR ...] --out REPORT_DIR [--top 4]``

Each input is an eval directory aggregated by ``eval.run`` / ``eval.aggregate``. Several merged cycles of one
run give reward-vs-cycle curves; base, experts and merged cycles together give the Pareto view (one point per
checkpoint, mean reward per axis, the front highlighted, the hypervolume of each group printed). An eval made with a
RaTE token mix (``eval.run --rate-tokens ... --rate-spec ...``) is its own kind, "rate", labelled
``<checkpoint> + <spec>`` (e.g. ``base + <ocr> 2``), so token mixes sit on the same view as the merged models.
"""

from __future__ import annotations

import argparse
import base64
import datetime as _dt
import html
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mrlora.cli import add_version_flag, run_cli
from eval.errors import EvalError
from eval.pareto import hypervolume, pareto_front
from eval import rate as rate_mix
from eval.plan import EvalDir
from eval.results import Results, read_results
from mrlora.runstore import atomic_file, atomic_write_text, read_json

KIND_STYLE = {"base": ("tab:gray", "s"), "merged": ("tab:blue", "o"), "expert": ("tab:orange", "^"),
              "exported": ("tab:green", "D"), rate_mix.KIND: ("tab:purple", "*")}
OTHER_STYLE = ("tab:brown", "x")
MAX_PARETO_PANELS = 6


@dataclass
class EvalInput:
    """One aggregated eval: its summary and per-sample rows."""

    eval_dir: EvalDir
    summary: dict
    results: Results

    @property
    def checkpoint(self) -> dict:
        return self.summary.get("checkpoint", {})

    @property
    def rate(self) -> dict | None:
        """The RaTE token mix the images were generated with (settings.rate), None for a plain eval."""
        return self.summary.get("settings", {}).get("rate")

    @property
    def label(self) -> str:
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


# ------------------------------------------------------------------------------------------------ tables

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

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>" for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def all_rewards(inputs: list[EvalInput]) -> list[str]:
    return sorted({r for i in inputs for r in i.summary["rewards"]})


def summary_table(inputs: list[EvalInput]) -> Table:
    rewards = all_rewards(inputs)
    extra = []
    for r in rewards:
        if any("geneval" in i.summary["rewards"].get(r, {}) for i in inputs):
            extra.append((f"{r} overall", lambda i, r=r: i.summary["rewards"].get(r, {}).get("geneval", {}).get("overall")))
        if any("exact_match_rate" in i.summary["rewards"].get(r, {}) for i in inputs):
            extra.append((f"{r} exact match", lambda i, r=r: i.summary["rewards"].get(r, {}).get("exact_match_rate")))
    header = ["checkpoint", "kind", "images"] + [f"{r} mean" for r in rewards] + [name for name, _ in extra]
    rows = [[i.label, i.kind, i.summary["images"]] + [i.mean(r) for r in rewards] + [fn(i) for _, fn in extra]
            for i in inputs]
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


def geneval_tables(inputs: list[EvalInput]) -> dict[str, Table]:
    """Per GenEval-style reward: rows = checkpoints, columns = tags (accuracy), plus overall."""
    tables = {}
    for r in all_rewards(inputs):
        blocks = [(i, i.summary["rewards"].get(r, {}).get("geneval")) for i in inputs]
        blocks = [(i, b) for i, b in blocks if b]
        if not blocks:
            continue
        tags = sorted({t for _, b in blocks for t in b["per_tag"]})
        rows = [[i.label] + [b["per_tag"].get(t, {}).get("accuracy") for t in tags] + [b["overall"], b["strict_overall"]]
                for i, b in blocks]
        tables[r] = Table(["checkpoint"] + tags + ["overall", "strict overall"], rows)
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


def plot_per_tag(table: Table, reward: str, path: Path) -> Path:
    plt = _pyplot()
    tags = table.header[1:-2]
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(tags) + 2), 4))
    width = 0.8 / max(1, len(table.rows))
    for k, row in enumerate(table.rows):
        values = [np.nan if v is None else v for v in row[1:1 + len(tags)]]
        ax.bar(np.arange(len(tags)) + k * width, values, width, label=row[0])
    ax.set_xticks(np.arange(len(tags)) + 0.4 - width / 2, tags, rotation=20)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
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
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(rewards), figsize=(4.5 * len(rewards), 3.6), squeeze=False,
                             layout="constrained")  # long reward names as y labels must not overlap the next plot
    for ax, reward in zip(axes[0], rewards):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # cycles are whole numbers
        for root, points in curves.items():
            xs = [int(p.checkpoint["cycle"]) for p in points if p.mean(reward) is not None]
            ys = [p.mean(reward) for p in points if p.mean(reward) is not None]
            ax.plot(xs, ys, marker="o", label=Path(root).name)
        ax.set_xlabel("cycle (0 = base)")
        ax.set_ylabel(f"mean {reward}")
        ax.set_title(reward)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


@dataclass
class ParetoView:
    rewards: list[str]
    labels: list[str]
    kinds: list[str]
    values: np.ndarray          # (checkpoints, rewards), signs flipped for lower-is-better rewards
    front: list[int]
    reference: np.ndarray
    hypervolumes: dict[str, float]
    flipped: list[str]


def pareto_view(inputs: list[EvalInput]) -> ParetoView | None:
    """The Pareto view over rewards every input scored; None when fewer than 2 rewards or checkpoints."""
    common = [r for r in all_rewards(inputs) if all(i.mean(r) is not None for i in inputs)]
    if len(common) < 2 or len(inputs) < 2:
        return None
    flipped = [r for r in common if not inputs[0].summary["rewards"][r]["higher_is_better"]]
    values = np.array([[(-1 if r in flipped else 1) * i.mean(r) for r in common] for i in inputs], dtype=np.float64)
    front = pareto_front(values.tolist())
    lo, hi = values.min(axis=0), values.max(axis=0)
    span = np.where(hi > lo, hi - lo, np.maximum(np.abs(lo), 1e-6))
    reference = lo - 0.05 * span
    kinds = [i.kind for i in inputs]
    groups = {"all": list(range(len(inputs)))}
    for kind in dict.fromkeys(kinds):
        groups[kind] = [k for k, kk in enumerate(kinds) if kk == kind]
    hvs = {name: hypervolume(values[idx].tolist(), reference.tolist()) for name, idx in groups.items()}
    return ParetoView(common, [i.label for i in inputs], kinds, values, front, reference, hvs, flipped)


def _short_labels(labels: list[str]) -> list[str]:
    """Point labels without a first word every label shares (one run's timestamp), so they fit the panel."""
    heads = {label.split(" ", 1)[0] for label in labels}
    if len(labels) > 1 and len(heads) == 1 and all(" " in label for label in labels):
        return [label.split(" ", 1)[1] for label in labels]
    return list(labels)


def plot_pareto(view: ParetoView, path: Path) -> Path:
    plt = _pyplot()
    pairs = list(itertools.combinations(range(len(view.rewards)), 2))[:MAX_PARETO_PANELS]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.4), squeeze=False, layout="constrained")
    front = set(view.front)
    labels = _short_labels(view.labels)
    for ax, (a, b) in zip(axes[0], pairs):
        for kind in dict.fromkeys(view.kinds):
            idx = [k for k, kk in enumerate(view.kinds) if kk == kind]
            colour, marker = KIND_STYLE.get(kind, OTHER_STYLE)
            size = 110 if marker == "*" else 50
            ax.scatter(view.values[idx, a], view.values[idx, b], c=colour, marker=marker, s=size, label=kind,
                       zorder=3)
        idx = sorted(front, key=lambda k: view.values[k, a])
        ax.scatter(view.values[idx, a], view.values[idx, b], facecolors="none", edgecolors="red", s=180,
                   linewidths=1.5, label="Pareto front", zorder=4)
        for k, label in enumerate(labels):
            ax.annotate(label, (view.values[k, a], view.values[k, b]), fontsize=7, xytext=(4, 4),
                        textcoords="offset points")
        ax.margins(x=0.2, y=0.12)  # room for the point labels inside the panel
        name = lambda r: f"-{r}" if r in view.flipped else r  # noqa: E731
        ax.set_xlabel(f"mean {name(view.rewards[a])}")
        ax.set_ylabel(f"mean {name(view.rewards[b])}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    return _save(fig, path)


def plot_best_worst(inp: EvalInput, reward: str, top: int, path: Path) -> Path:
    """Two rows: the ``top`` best and the ``top`` worst images of ``reward`` with score and prompt."""
    from PIL import Image

    plt = _pyplot()
    res = inp.results
    scores = np.asarray(res.scores[reward], dtype=np.float64)
    valid = np.flatnonzero(np.isfinite(scores))
    order = valid[np.argsort(-scores[valid] if res.higher_is_better.get(reward, True) else scores[valid],
                             kind="stable")]
    k = min(top, len(order))
    rows = [("best", order[:k]), ("worst", order[::-1][:k])]
    fig, axes = plt.subplots(2, max(k, 1), figsize=(2.0 * max(k, 1), 5.0), squeeze=False)
    for r, (name, idx) in enumerate(rows):
        for c in range(max(k, 1)):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(idx):
                continue
            j = int(idx[c])
            with Image.open(inp.eval_dir.root / res.image[j]) as im:
                ax.imshow(np.asarray(im.convert("RGB")))
            prompt = res.prompt[j] if len(res.prompt[j]) <= 40 else res.prompt[j][:37] + "..."
            ax.set_title(f"{name} {c + 1}: {scores[j]:.4g}\n{prompt}", fontsize=7)
    fig.suptitle(f"{inp.label}: {reward}", fontsize=9)
    return _save(fig, path, dpi=80)


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

    def para(self, text: str) -> None:
        self.md.append(text + "\n")
        self.html.append(f"<p>{html.escape(text)}</p>")

    def table(self, table: Table) -> None:
        self.md.append(table.markdown() + "\n")
        self.html.append(table.html())

    def image(self, path: Path, alt: str) -> None:
        self.md.append(f"![{alt}]({path.relative_to(self.out).as_posix()})\n")
        self.html.append(f'<figure><img alt="{html.escape(alt)}" src="{_data_uri(path)}"><figcaption>'
                         f"{html.escape(alt)}</figcaption></figure>")


_CSS = """body{font-family:sans-serif;margin:2em;max-width:1400px}table{border-collapse:collapse;margin:1em 0}
td,th{border:1px solid #bbb;padding:4px 8px;text-align:right}td:first-child,th:first-child{text-align:left}
th{background:#eee}img{max-width:100%}figure{margin:1em 0}figcaption{font-size:small;color:#555}"""


def build_report(inputs: list[EvalInput], out: Path, top: int = 4) -> Path:
    """Write plots, report.md and report.html (last) into ``out``; return the HTML path."""
    if not inputs:
        raise EvalError("no inputs; pass --inputs EVAL_DIR [EVAL_DIR ...]")
    out.mkdir(parents=True, exist_ok=True)
    doc = _Doc(out)
    doc.heading("mrlora eval report", 1)
    doc.para(f"Generated {_dt.datetime.now().isoformat(timespec='seconds')} from {len(inputs)} eval(s): "
             + ", ".join(str(i.eval_dir.root) for i in inputs))
    doc.heading("Summary")
    doc.table(summary_table(inputs))
    for note in rate_notes(inputs):
        doc.para(note)

    for reward, table in geneval_tables(inputs).items():
        doc.heading(f"{reward}: per-tag accuracy")
        doc.para("Overall = mean over tags of the per-tag accuracy (official GenEval summary); strict overall uses "
                 "exact counts.")
        doc.table(table)
        doc.image(plot_per_tag(table, reward, out / f"per_tag_{reward}.png"), f"{reward} per-tag accuracy")

    rewards = all_rewards(inputs)
    curves = cycle_curves(inputs)
    if curves:
        doc.heading("Reward vs cycle")
        doc.image(plot_curves(curves, rewards, out / "reward_vs_cycle.png"), "mean reward per merged cycle")

    view = pareto_view(inputs)
    doc.heading("Pareto view")
    if view is None:
        doc.para("Needs at least two checkpoints scored on at least two common rewards.")
    else:
        note = f" (rewards where lower is better are negated: {', '.join(view.flipped)})" if view.flipped else ""
        doc.para(f"One point per checkpoint (mean reward per axis){note}. Front: "
                 + ", ".join(view.labels[k] for k in view.front) + ".")
        doc.para("Hypervolume above the reference point (" + ", ".join(
            f"{r}={v:.4g}" for r, v in zip(view.rewards, view.reference)) + "; 5% of each range below the worst "
            "checkpoint): " + ", ".join(f"{g} {v:.4g}" for g, v in view.hypervolumes.items()) + ".")
        doc.table(Table(["checkpoint", "kind", "on front"] + view.rewards,
                        [[view.labels[k], view.kinds[k], "yes" if k in view.front else "no"]
                         + [float(x) for x in view.values[k]] for k in range(len(view.labels))]))
        doc.image(plot_pareto(view, out / "pareto.png"), "Pareto view (front circled in red)")

    doc.heading("Best and worst samples")
    for n, inp in enumerate(inputs):
        for reward in sorted(inp.results.scores):
            path = plot_best_worst(inp, reward, top, out / f"samples_{n:02d}_{reward}.png")
            doc.image(path, f"{inp.label}: best and worst by {reward}")

    atomic_write_text(out / "report.md", "\n".join(doc.md))
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>mrlora eval report</title>"
            f"<style>{_CSS}</style></head><body>{''.join(doc.html)}</body></html>")
    atomic_write_text(out / "report.html", page)
    return out / "report.html"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", nargs="+", required=True, help="aggregated eval directories")
    parser.add_argument("--out", required=True, help="report directory (report.md, report.html, plots)")
    parser.add_argument("--top", type=int, default=4, help="best/worst images shown per reward and eval")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    if args.top < 1:
        raise EvalError(f"--top must be >= 1, got {args.top}")
    inputs = [load_input(p) for p in args.inputs]
    path = build_report(inputs, Path(args.out), args.top)
    print(f"wrote {path} and {path.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
