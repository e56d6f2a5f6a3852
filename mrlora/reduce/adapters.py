"""Expert adapters: the directory format the Map step writes and the Reduce step reads (docs/internals.md).

A directory holds ``adapter_model.safetensors`` (``<module>.lora_A.weight`` r x in, ``<module>.lora_B.weight``
out x r), ``adapter_config.json`` (a peft ``LoraConfig``) and ``mrlora.json`` (``arch``, ``base``, ``reward``,
``scale``). Reading is strict because a merge silently built from a wrong adapter poisons every later cycle:
the per-module scale comes from the LoRA config (``alpha / r``, rsLoRA and rank/alpha patterns honoured) and
must agree with the factors' actual rank and with ``mrlora.json``; DoRA and other non-plain-LoRA weights are
refused instead of being dropped.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from mrlora.reduce.errors import AdapterError, ShapeMismatchError
from mrlora.reduce.safetensors_io import read_tensors, write_tensors
from mrlora.runstore import atomic_file, atomic_write_json

log = logging.getLogger("mrlora.reduce")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MRLORA_JSON = "mrlora.json"
KEY_PREFIXES = ("base_model.model.", "transformer.")
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass(frozen=True)
class LoraPair:
    """One adapted module of one expert: dW = scale * B @ A (fp32 factors)."""

    A: torch.Tensor  # r x in
    B: torch.Tensor  # out x r
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    @property
    def in_features(self) -> int:
        return int(self.A.shape[1])

    @property
    def out_features(self) -> int:
        return int(self.B.shape[0])

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B @ self.A)


@dataclass
class ExpertAdapter:
    """A validated expert: its modules' LoRA factors plus what ``mrlora.json`` says about it."""

    path: Path
    modules: dict[str, LoraPair]
    arch: str | None
    base: str | None
    reward: str | None
    config: dict[str, Any] = field(repr=False)

    @property
    def ranks(self) -> dict[str, int]:
        return {m: p.rank for m, p in self.modules.items()}

    def summary(self) -> dict[str, Any]:
        ranks = sorted(set(self.ranks.values()))
        scales = sorted({round(p.scale, 9) for p in self.modules.values()})
        return {
            "path": str(self.path),
            "reward": self.reward,
            "arch": self.arch,
            "base": self.base,
            "modules": len(self.modules),
            "ranks": ranks,
            "scales": scales,
        }


def module_key(key: str) -> tuple[str, str, str | None] | None:
    """``(module, "A"|"B", adapter_name)`` for a LoRA factor key (any accepted prefix), else None."""
    for prefix in KEY_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
            break
    m = _KEY_RE.match(key)
    if not m:
        return None
    return m.group("module"), m.group("factor"), m.group("adapter")


def _pattern_value(patterns: Mapping[str, Any] | None, module: str, default):
    """peft's rule: the first pattern matching the end of the module path (on a dot boundary) wins."""
    for pattern, value in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?(?:{pattern})", module):
            return value
    return default


def lora_scale(config: Mapping[str, Any], module: str) -> tuple[float, int]:
    """``(scale, configured rank)`` of ``module`` under a peft LoRA config (dict form)."""
    r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r")))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", r)))
    denom = math.sqrt(r) if config.get("use_rslora") else r
    return alpha / denom, r


def _load_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{path.parent} has no {path.name} ({what}); is this an expert adapter directory?") from None
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path} is unreadable or not JSON ({exc}); rewrite the adapter") from None
    if not isinstance(data, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    return data


def _check_config(path: Path, config: dict) -> None:
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type not in ("LORA", "PEFTTYPE.LORA"):
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not LORA; only plain LoRA can be merged")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{path}: adapter_config.json needs an integer r >= 1, got {config.get('r')!r}")
    for flag in ("use_dora", "fan_in_fan_out"):
        if config.get(flag):
            raise AdapterError(f"{path}: {flag}=true is not supported by the exact merge (plain LoRA only)")
    if config.get("lora_bias"):
        raise AdapterError(f"{path}: lora_bias=true is not supported by the exact merge (plain LoRA only)")


def adapter_marker_entry(path: Path) -> tuple[dict | None, Path | None]:
    """What the marker completing an adapter directory in a run recorded for its weights file, and the
    directory that marker completes: an expert's ``adapter/`` (``DONE.json``), a step checkpoint
    (``COMPLETE.json``), a reference merge's ``merged/adapter`` (``MERGE_DONE.json``). ``(None, None)`` for an
    adapter outside a run (nothing to check against)."""
    from mrlora.runstore import CHECKPOINT_MARKER, DONE_MARKER, MERGE_MARKER, marker_entry

    inside = f"{path.name}/{ADAPTER_WEIGHTS}"
    for unit, marker, rel in (
        (path, CHECKPOINT_MARKER, ADAPTER_WEIGHTS),
        (path.parent, DONE_MARKER, inside),
        (path.parent, MERGE_MARKER, inside),
    ):
        entry = marker_entry(unit, marker, rel)
        if entry is not None:
            return entry, unit
    return None, None


def read_expert_adapter(path: Path | str) -> ExpertAdapter:
    """Load and validate an expert adapter directory (see the module docstring for the checks).

    Inside a run its weights file is also checked against the marker that completes it
    (``adapter_marker_entry``: size and sha256, hashed during the one read); DamagedFileError names a damaged
    file, with the directory that marker completes as what must be redone.
    """
    path = Path(path)
    expect, unit = adapter_marker_entry(path)
    if not path.is_dir():
        raise AdapterError(f"expert adapter {path} does not exist or is not a directory")
    config = _load_json(path / ADAPTER_CONFIG, "the peft LoraConfig")
    _check_config(path / ADAPTER_CONFIG, config)
    meta = _load_json(path / MRLORA_JSON, "mrlora metadata") if (path / MRLORA_JSON).exists() else {}
    if not meta:
        log.warning("%s has no %s: its architecture cannot be checked except by shapes", path, MRLORA_JSON)
    weights = path / ADAPTER_WEIGHTS
    if not weights.exists():
        raise AdapterError(f"{path} has no {ADAPTER_WEIGHTS}; the expert did not finish writing its adapter")
    tensors = read_tensors(weights, expect=expect, unit=unit)

    factors: dict[str, dict[str, torch.Tensor]] = {}
    names = set()
    for key, tensor in tensors.items():
        parsed = module_key(key)
        if parsed is None:
            raise AdapterError(
                f"{weights}: unexpected tensor {key!r}; expert adapters hold only <module>.lora_A.weight / "
                "<module>.lora_B.weight (DoRA magnitudes, biases and embeddings cannot be merged exactly)"
            )
        module, factor, adapter_name = parsed
        names.add(adapter_name)
        if factor in factors.setdefault(module, {}):
            raise AdapterError(
                f"{weights}: module {module} has two lora_{factor} tensors (several adapters saved together?)"
            )
        if tensor.dim() != 2:
            raise ShapeMismatchError(f"{weights}: {key} has shape {list(tensor.shape)}; LoRA factors are matrices")
        factors[module][factor] = tensor.to(torch.float32)
    if len(names) > 1:
        raise AdapterError(
            f"{weights} holds several adapters {sorted(map(str, names))}; save one adapter per directory"
        )
    if not factors:
        raise AdapterError(f"{weights} holds no LoRA factors")

    modules: dict[str, LoraPair] = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{weights}: module {module} has no {missing}; the file is incomplete")
        A, B = ab["A"], ab["B"]
        if A.shape[0] != B.shape[1]:
            raise ShapeMismatchError(
                f"{weights}: {module} lora_A is {list(A.shape)} and lora_B is {list(B.shape)}; their ranks differ"
            )
        scale, configured = lora_scale(config, module)
        if A.shape[0] != configured:
            raise ShapeMismatchError(
                f"{weights}: {module} has rank {A.shape[0]} but adapter_config.json says r={configured}; "
                "the config does not belong to these weights"
            )
        if not torch.isfinite(A).all() or not torch.isfinite(B).all():
            raise AdapterError(f"{weights}: {module} has NaN or infinite values; the expert diverged")
        modules[module] = LoraPair(A, B, scale)

    if "scale" in meta and not (config.get("rank_pattern") or config.get("alpha_pattern")):
        expected = next(iter(modules.values())).scale
        if not math.isclose(float(meta["scale"]), expected, rel_tol=1e-6):
            raise AdapterError(
                f"{path / MRLORA_JSON}: scale {meta['scale']} disagrees with adapter_config.json "
                f"(lora_alpha / r = {expected}); one of the two files belongs to another adapter"
            )
    return ExpertAdapter(
        path=path,
        modules=modules,
        arch=meta.get("arch"),
        base=meta.get("base"),
        reward=meta.get("reward"),
        config=config,
    )


def _config_dict(lora_config: Any) -> dict:
    if hasattr(lora_config, "to_dict"):
        data = lora_config.to_dict()
    elif isinstance(lora_config, Mapping):
        data = dict(lora_config)
    else:
        raise TypeError(f"lora_config must be a peft LoraConfig or a dict, got {type(lora_config).__name__}")
    data.setdefault("peft_type", "LORA")

    def plain(v):
        if isinstance(v, (set, frozenset, tuple)):
            return sorted(v) if isinstance(v, (set, frozenset)) else list(v)
        if hasattr(v, "value") and isinstance(v.value, str):  # enums such as PeftType.LORA
            return v.value
        return v

    return {k: plain(v) for k, v in data.items()}


def save_expert_adapter(
    source: torch.nn.Module | Mapping[str, torch.Tensor],
    out_dir: Path | str,
    arch: str,
    lora_config: Any,
    base: str,
    reward: str | None = None,
    scale: float | None = None,
    adapter_name: str = "default",
    dtype: torch.dtype | None = None,
) -> Path:
    """Write an expert adapter directory (the Map step's output, the Reduce step's input).

    Parameters
    ----------
    source : a module carrying a peft LoRA adapter (e.g. a diffusers transformer after ``add_adapter``) whose
        ``adapter_name`` adapter is saved, or a state dict of ``<module>.lora_A.weight``/``lora_B.weight``
        (``base_model.model.`` / ``transformer.`` prefixes and adapter-name infixes are accepted).
    out_dir : created if needed; the three files are written atomically (no completion marker: the caller's
        checkpoint or DONE marker, written after this returns, is what makes the directory complete).
    arch : ``"sd3"`` or ``"flux"``.
    lora_config : a peft ``LoraConfig`` or its dict form (``r``, ``lora_alpha``, ``target_modules``, ...).
    base : identity of base_0 (the run's ``model.pretrained``).
    reward : the reward this expert was trained for.
    scale : optional ``alpha / r`` check; must agree with ``lora_config`` when given.
    dtype : cast the factors (default: keep their dtype).
    """
    out_dir = Path(out_dir)
    config = _config_dict(lora_config)
    _check_config(out_dir / ADAPTER_CONFIG, config)
    if isinstance(source, torch.nn.Module):
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(source, adapter_name=adapter_name)
    else:
        state = dict(source)
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        parsed = module_key(key)
        if parsed is None:
            raise AdapterError(f"cannot save {key!r} as an expert adapter tensor (plain LoRA factors only)")
        module, factor, name = parsed
        if name not in (None, adapter_name):
            continue
        t = tensor.detach().to("cpu")
        tensors[f"{module}.lora_{factor}.weight"] = (t.to(dtype) if dtype else t).contiguous()
    modules = sorted({k.rsplit(".lora_", 1)[0] for k in tensors})
    if not modules:
        raise AdapterError(f"no LoRA factors for adapter {adapter_name!r} in the source; nothing to save")
    for module in modules:
        if f"{module}.lora_A.weight" not in tensors or f"{module}.lora_B.weight" not in tensors:
            raise AdapterError(f"module {module} lacks lora_A or lora_B in the source state dict")
    derived = lora_scale(config, modules[0])[0]
    if scale is not None and not math.isclose(scale, derived, rel_tol=1e-6):
        raise AdapterError(f"scale {scale} disagrees with lora_config (lora_alpha / r = {derived})")
    ordered = {k: tensors[k] for k in sorted(tensors)}
    with atomic_file(out_dir / ADAPTER_WEIGHTS) as tmp:
        write_tensors(tmp, ordered, metadata={"format": "pt"})
    atomic_write_json(out_dir / ADAPTER_CONFIG, config)
    atomic_write_json(out_dir / MRLORA_JSON, {"arch": arch, "base": base, "reward": reward, "scale": derived})
    return out_dir
