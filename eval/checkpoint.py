"""Turn a ``--checkpoint`` argument into what must be loaded: a base model, merged updates, an expert LoRA.

Why torch-free: the login-node submitter (``launch.eval``) resolves the checkpoint before queueing an array
job, so a typo or an unfinished expert fails in a second instead of after the job waited for a GPU.

Accepted forms (docs/internals.md for the run layout):

* ``base``: the preset's (or ``--set model.pretrained=...``) base model;
* ``RUN_DIR:<cycle>``: the model after that cycle (``runstore.model_after``: the run's newest materialised base
  plus the updates after it, the same weights the next Map step starts from; ``RUN_DIR:0`` = base_0); every
  one of cycles 1..cycle must carry ``MERGE_DONE.json``;
* an expert dir ``RUN_DIR/cycle_XXXX/<reward>`` (or its ``adapter/``): the model the expert was trained from
  (``runstore.map_start``; in reference mode without the update its LoRA continues), plus the expert's LoRA;
  the expert must carry ``DONE.json``;
* a step checkpoint ``RUN_DIR/cycle_XXXX/<reward>/checkpoint-<step>`` (its live LoRA; needs ``COMPLETE.json``);
* an exported model dir (``model_index.json``, from ``mrlora.reduce.export_model``): loaded as is.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import ml_collections

from eval.errors import EvalError
from mrlora.config import ConfigError, apply_overrides, config_from_dict, config_to_dict, load_config, validate
from mrlora.runstore import (
    CHECKPOINT_MARKER,
    DONE_MARKER,
    RUN_JSON,
    ModelAfter,
    RunDir,
    RunStoreError,
    map_start,
    model_after,
    read_marker,
)

KINDS = ("base", "merged", "expert", "exported")
ADAPTER_FILE = "adapter_model.safetensors"
_CYCLE_DIR = re.compile(r"^cycle_(\d{4,})$")
_CHECKPOINT_DIR = re.compile(r"^checkpoint-(\d+)$")
_RUN_CYCLE = re.compile(r"^(?P<run>.+):(?P<cycle>\d+)$")

FORMS_HINT = (
    "give `base`, `RUN_DIR:<cycle>` (0 = the run's base model), an expert dir RUN_DIR/cycle_XXXX/<reward>, "
    "or an exported model dir (with model_index.json)"
)


@dataclass(frozen=True)
class ResolvedCheckpoint:
    """What ``--checkpoint`` names, resolved against the run directory.

    The model is ``pretrained`` (its transformer replaced by the materialised ``base_dir`` when set) with every
    dir of ``update_dirs`` folded in (in order), then the expert LoRA at ``adapter_dir`` (if any). ``cycle`` is
    the number of merged cycles in the weights for ``merged``, and the expert's own cycle for ``expert``.
    """

    spec: str
    kind: str
    pretrained: str
    update_dirs: tuple[str, ...] = ()
    adapter_dir: str | None = None
    base_dir: str | None = None
    run_root: str | None = None
    cycle: int | None = None
    reward: str | None = None
    step: int | None = None
    label: str = ""
    config: dict = field(default_factory=dict, compare=False, repr=False)

    def to_dict(self) -> dict:
        """JSON form recorded with every result (without the config, which is stored separately)."""
        out = asdict(self)
        out.pop("config")
        out["update_dirs"] = list(self.update_dirs)
        return out


def _run_config(run: RunDir, overrides: tuple[str, ...]) -> ml_collections.ConfigDict:
    try:
        cfg = config_from_dict(run.read_run_json()["config"])
    except RunStoreError as exc:
        raise EvalError(str(exc)) from None
    except KeyError:
        raise EvalError(f"{run.run_json} has no 'config' entry; it was not written by mrlora's launcher") from None
    try:
        apply_overrides(cfg, overrides)
        validate(cfg)
    except ConfigError as exc:
        raise EvalError(f"--set: {exc}") from None
    return cfg


def _preset_config(preset: str | None, overrides: tuple[str, ...], what: str) -> ml_collections.ConfigDict:
    if not preset:
        raise EvalError(
            f"{what} needs --model <preset> (sd35m, flux, tiny-sd3, tiny-flux or a .py file): it sets the model "
            "dtype, the sampling defaults and the reward model paths"
        )
    try:
        return load_config(preset, overrides)
    except ConfigError as exc:
        raise EvalError(str(exc)) from None


def _reject_preset_for_run(preset: str | None, spec: str) -> None:
    if preset:
        raise EvalError(
            f"--model {preset} cannot be combined with a checkpoint of a run ({spec}): the run's own config "
            "(run.json) is used; change eval-relevant keys with --set key=value"
        )


def _model(run: RunDir, cycle: int, expert: bool) -> ModelAfter:
    """The model after ``cycle``, or (``expert``) the model the experts of ``cycle`` were trained from."""
    try:
        return map_start(run.root, cycle).base if expert else model_after(run.root, cycle)
    except RunStoreError as exc:
        raise EvalError(f"checkpoint incomplete: {exc}") from None


def _model_fields(model: ModelAfter) -> dict:
    return {
        "update_dirs": tuple(str(p) for p in model.update_dirs),
        "base_dir": str(model.base_dir) if model.base_dir is not None else None,
    }


def resolve_checkpoint(
    spec: str, preset: str | None = None, overrides: tuple[str, ...] | list[str] = ()
) -> ResolvedCheckpoint:
    """Resolve ``spec`` (see the module docstring) and the config the eval uses with it.

    Raises :class:`EvalError` naming the problem: a path that does not exist, an expert without ``DONE.json``,
    a cycle without ``MERGE_DONE.json``, or a missing ``--model`` where no run provides one.
    """
    overrides = tuple(overrides)
    if spec == "base":
        cfg = _preset_config(preset, overrides, "--checkpoint base")
        return ResolvedCheckpoint(spec, "base", cfg.model.pretrained, label="base", config=config_to_dict(cfg))

    match = _RUN_CYCLE.match(spec)
    if match and (Path(match["run"]) / RUN_JSON).is_file():
        run = RunDir(Path(match["run"]).resolve())
        cycle = int(match["cycle"])
        _reject_preset_for_run(preset, spec)
        cfg = _run_config(run, overrides)
        model = _model(run, cycle, expert=False)
        label = f"{run.run_ts} base" if cycle == 0 else f"{run.run_ts} cycle {cycle}"
        return ResolvedCheckpoint(
            spec,
            "merged",
            cfg.model.pretrained,
            **_model_fields(model),
            run_root=str(run.root),
            cycle=cycle,
            label=label,
            config=config_to_dict(cfg),
        )
    if match and not Path(spec).exists():
        raise EvalError(f"checkpoint {spec!r}: {match['run']} is not a run directory (no {RUN_JSON}); {FORMS_HINT}")

    path = Path(spec)
    if not path.exists():
        raise EvalError(f"checkpoint {spec!r} does not exist; {FORMS_HINT}")
    path = path.resolve()
    if (path / RUN_JSON).is_file():
        raise EvalError(
            f"checkpoint {spec!r} is a run directory; name a cycle: {spec}:<cycle> (merged cycles 1..cycle, "
            f"0 = the run's base model), or an expert dir {spec}/cycle_XXXX/<reward>"
        )
    if (path / "model_index.json").is_file():
        cfg = _preset_config(preset, overrides, f"exported model {spec}")
        return ResolvedCheckpoint(spec, "exported", str(path), label=path.name, config=config_to_dict(cfg))
    return _resolve_expert(spec, path, preset, overrides)


def _resolve_expert(spec: str, path: Path, preset: str | None, overrides: tuple[str, ...]) -> ResolvedCheckpoint:
    step = None
    if path.name == "adapter":
        path = path.parent
    if (m := _CHECKPOINT_DIR.match(path.name)) is not None:
        step = int(m.group(1))
        expert_dir, adapter_dir, marker = path.parent, path, CHECKPOINT_MARKER
    else:
        expert_dir, adapter_dir, marker = path, path / "adapter", DONE_MARKER
    cycle_match = _CYCLE_DIR.match(expert_dir.parent.name)
    run_root = expert_dir.parent.parent
    if cycle_match is None or not (run_root / RUN_JSON).is_file():
        raise EvalError(f"checkpoint {spec!r} is not a checkpoint mrlora knows; {FORMS_HINT}")
    if read_marker(path, marker) is None:
        raise EvalError(
            f"checkpoint {spec!r} is incomplete: {path / marker} is missing or does not match the files. Wait for "
            "its training job to finish, or resume the run (`python -m launch.mapreduce --resume`)"
        )
    if not (adapter_dir / ADAPTER_FILE).is_file():
        raise EvalError(f"checkpoint {spec!r}: {adapter_dir / ADAPTER_FILE} is missing although {marker} exists")
    run = RunDir(run_root)
    cycle = int(cycle_match.group(1))
    reward = expert_dir.name
    _reject_preset_for_run(preset, spec)
    cfg = _run_config(run, overrides)
    model = _model(run, cycle, expert=True)
    label = f"{run.run_ts} cycle {cycle} {reward} expert" + (f" step {step}" if step is not None else "")
    return ResolvedCheckpoint(
        spec,
        "expert",
        cfg.model.pretrained,
        **_model_fields(model),
        adapter_dir=str(adapter_dir),
        run_root=str(run.root),
        cycle=cycle,
        reward=reward,
        step=step,
        label=label,
        config=config_to_dict(cfg),
    )
