"""Experiment tracking across a whole run: one curve per expert lineage, with merges and evals on the same axis.

A run trains the expert of each reward anew every cycle, in a new job. Logged per job, a tracker shows 80
separate curves that all start at step 1. Here every job of a run logs into one tracker run per **lineage** -
the expert of one reward, over all cycles - at the **global step** ``(cycle - 1) * train.steps + step``, so
TensorBoard and Weights & Biases draw one continuous curve for the whole run. Merges are logged into the
``merge`` lineage (the normalised weights, the update's rank and Frobenius norm) and evals of a cycle into
the ``eval`` lineage, both at the global step where the cycle ends.

Files live under the run's ``tracking/`` directory (``RunDir.tracking_dir``): ``tensorboard/<lineage>/`` (one
event file per job; TensorBoard reads the folder as one run) and ``wandb/`` (W&B runs ``<run id>-<lineage>``,
grouped by the run id, resumed by each job). W&B runs offline unless ``WANDB_MODE`` says otherwise, which is
what compute nodes without internet need; ``wandb sync <run dir>/tracking/wandb/offline-run-*`` uploads later.

Trackers are best-effort: a missing package is named with the extra to install (``mrlora[tensorboard]``,
``mrlora[wandb]``) and training goes on; nothing here can stop a job. Heavy packages are imported only when a
tracker is enabled.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

log = logging.getLogger(__name__)

MERGE_LINEAGE = "merge"
EVAL_LINEAGE = "eval"


@dataclass(frozen=True)
class Lineage:
    """Where one curve goes: the tracker folder, the group (the run id), the lineage name, the step offset."""

    root: Path
    group: str
    name: str
    step_offset: int = 0

    def global_step(self, step: int) -> int:
        return self.step_offset + int(step)


def cycle_end_step(cfg, cycle: int) -> int:
    """The global step at which ``cycle`` ends: ``cycle`` x the longest expert's ``train.steps``."""
    from mrlora.config import config_for_reward

    steps = [int(config_for_reward(cfg, r).train.steps) for r in cfg.rewards] or [int(cfg.train.steps)]
    return int(cycle) * max(steps)


def expert_lineage(run_root: Path | str, cycle: int, reward: str, cfg) -> Lineage:
    """The lineage of ``reward``'s expert in a run; ``cfg`` is the run's config (before ``per_reward``)."""
    from mrlora.runstore import RunDir

    run = RunDir(Path(run_root))
    return Lineage(run.tracking_dir, run.run_ts, reward, cycle_end_step(cfg, cycle - 1))


def run_lineage(run_root: Path | str, name: str) -> Lineage:
    """A run-level lineage (``merge``, ``eval``) whose steps the caller gives as global steps."""
    from mrlora.runstore import RunDir

    run = RunDir(Path(run_root))
    return Lineage(run.tracking_dir, run.run_ts, name)


def standalone_lineage(out_dir: Path | str, reward: str) -> Lineage:
    """An expert trained outside a run logs next to itself (``<out>/tracking``)."""
    out = Path(out_dir)
    return Lineage(out / "tracking", out.name, reward)


class _Backend(Protocol):
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class Tracker:
    """The trackers a config enables, behind one small interface (``log`` / ``close``); may hold none."""

    def __init__(self, lineage: Lineage | None, backends: list[_Backend] | None = None):
        self.lineage = lineage
        self.backends = list(backends or [])

    @property
    def enabled(self) -> bool:
        return bool(self.backends)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        """Log the numeric entries of ``metrics`` at the lineage's global step for ``step``."""
        if not self.backends or self.lineage is None:
            return
        numeric = {
            k: float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        if not numeric:
            return
        at = self.lineage.global_step(step)
        for backend in list(self.backends):  # a copy: a failing backend is removed while iterating
            try:
                backend.log(numeric, at)
            except Exception as exc:  # noqa: BLE001 - a tracker must never stop a job
                log.warning("tracker %s failed (%s); dropping it for this job", type(backend).__name__, exc)
                self.backends.remove(backend)

    def close(self) -> None:
        for backend in self.backends:
            try:
                backend.close()
            except Exception as exc:  # noqa: BLE001
                log.warning("closing tracker %s failed: %s", type(backend).__name__, exc)
        self.backends = []


class _TensorBoard:
    def __init__(self, lineage: Lineage):
        from torch.utils.tensorboard import SummaryWriter

        folder = lineage.root / "tensorboard" / _safe(lineage.name)
        folder.mkdir(parents=True, exist_ok=True)
        self.writer = SummaryWriter(str(folder))

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, lineage: Lineage, project: str):
        import wandb

        lineage.root.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            project=project,
            group=lineage.group,
            name=f"{lineage.group}/{lineage.name}",
            id=wandb_run_id(lineage),
            resume="allow",
            dir=str(lineage.root),
            mode=os.environ.get("WANDB_MODE", "offline"),  # type: ignore[arg-type]  # wandb checks the value
            settings=wandb.Settings(silent=True, console="off"),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_run_id(lineage: Lineage) -> str:
    """The W&B run id of a lineage: every job of the lineage resumes the same W&B run."""
    return _safe(f"{lineage.group}-{lineage.name}")


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def open_tracker(logging_cfg, lineage: Lineage | None) -> Tracker:
    """The trackers ``logging_cfg`` (the config's ``logging`` group) enables, for ``lineage``."""
    backends: list[_Backend] = []
    if logging_cfg is None or lineage is None:
        return Tracker(lineage, backends)
    if logging_cfg.get("tensorboard", False):
        try:
            backends.append(_TensorBoard(lineage))
        except ImportError:
            log.warning(
                "logging.tensorboard is on but tensorboard is not installed; skipping it "
                "(pip install 'mrlora[tensorboard]')"
            )
    if logging_cfg.get("wandb", False):
        try:
            backends.append(_Wandb(lineage, str(logging_cfg.get("project", "mrlora"))))
        except ImportError:
            log.warning("logging.wandb is on but wandb is not installed; skipping it (pip install 'mrlora[wandb]')")
        except Exception as exc:  # noqa: BLE001 - a tracker must never stop a job
            log.warning("wandb unavailable (%s); continuing without it", exc)
    return Tracker(lineage, backends)


def _run_config(run_root: Path | str):
    from mrlora.config import config_from_dict
    from mrlora.runstore import RunDir

    return config_from_dict(RunDir(Path(run_root)).read_run_json()["config"])


def _tracks(cfg) -> bool:
    return bool(cfg.logging.get("tensorboard", False) or cfg.logging.get("wandb", False))


def log_run_event(run_root: Path | str, name: str, metrics: dict[str, Any], step: int) -> None:
    """Log ``metrics`` once into the run-level lineage ``name`` at global ``step``, if the run tracks at all."""
    cfg = _run_config(run_root)
    if not _tracks(cfg):
        return
    tracker = open_tracker(cfg.logging, run_lineage(run_root, name))
    try:
        tracker.log(metrics, step)
    finally:
        tracker.close()


def log_merge(run_root: Path | str, cycle: int) -> None:
    """Log the merge of ``cycle`` (weights, rank, update norm) where the cycle ends on the run's curves."""
    from mrlora.reduce.store import read_update_info
    from mrlora.runstore import RunDir

    cfg = _run_config(run_root)
    if not _tracks(cfg):
        return
    merged = RunDir(Path(run_root)).merged_dir(cycle)
    log_run_event(run_root, MERGE_LINEAGE, merge_metrics(merged, read_update_info(merged)), cycle_end_step(cfg, cycle))


def log_eval(run_root: Path | str, cycle: int, headline: dict[str, Any]) -> None:
    """Log an eval's headline numbers of the model after ``cycle`` (0 = the base) on the run's curves."""
    cfg = _run_config(run_root)
    if _tracks(cfg):
        log_run_event(run_root, EVAL_LINEAGE, headline, cycle_end_step(cfg, cycle))


def merge_metrics(update_dir: Path | str, info: dict) -> dict[str, float]:
    """What a merge is logged as: each expert's normalised weight, the update's rank and Frobenius norm.

    The norm of ``dW = B @ A`` is summed over modules as ``sqrt(sum trace((A A^T)(B^T B)))``, which costs
    ``R x R`` products instead of materialising any ``out x in`` matrix.
    """
    import torch
    from safetensors import safe_open

    out: dict[str, float] = {}
    for reward, weight in zip(info.get("rewards") or info.get("experts") or [], info.get("weights") or []):
        out[f"weight/{Path(str(reward)).name}"] = float(weight)
    path = Path(update_dir) / "update.safetensors"
    total, rank = 0.0, 0
    with safe_open(str(path), framework="pt") as fh:
        keys = set(fh.keys())
        for key in sorted(k for k in keys if k.endswith(".lora_A")):
            a = fh.get_tensor(key).double()
            b = fh.get_tensor(key[: -len(".lora_A")] + ".lora_B").double()
            total += float(torch.trace((a @ a.T) @ (b.T @ b)))
            rank = max(rank, int(a.shape[0]))
    out["update_norm"] = max(total, 0.0) ** 0.5
    out["update_rank"] = float(rank)
    return out
