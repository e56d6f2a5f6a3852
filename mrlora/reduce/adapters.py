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
from mrlora.reduce.safetensors_io import (
    SafetensorsHeader,
    TensorReader,
    iter_verified,
    read_header,
    write_tensors,
)
from mrlora.runstore import atomic_file, atomic_write_json

log = logging.getLogger("mrlora.reduce")

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
MRLORA_JSON = "mrlora.json"
KEY_PREFIXES = ("base_model.model.", "transformer.")
_KEY_RE = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


class _FactorFile:
    """An adapter weights file whose factors are read one at a time, on demand (``read_expert_adapter(...,
    load=False)``): the header is parsed once, each read is a ``pread`` of one tensor, so a merge of FLUX-size
    experts holds one module's factors at a time instead of every expert whole."""

    def __init__(self, header: SafetensorsHeader):
        self.header = header
        # the identity of the file whose bytes were verified: a later read of a replaced or rewritten file
        # is refused instead of merging bytes nobody checked
        self._stat = self._identity()

    def _identity(self) -> tuple[int, int, int]:
        st = Path(self.header.path).stat()
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    def read(self, name: str) -> torch.Tensor:
        if self._identity() != self._stat:
            raise AdapterError(
                f"{self.header.path} changed after it was verified (another process rewrote it?); "
                "rerun the merge once nothing writes to the expert directory"
            )
        with TensorReader(self.header.path, self.header) as reader:
            return reader.get(name).to(torch.float32)


@dataclass(frozen=True)
class LoraPair:
    """One adapted module of one expert: dW = scale * B @ A (fp32 factors).

    The factors are either in memory or, for an adapter opened with ``load=False``, read from its (already
    verified) file each time ``A`` or ``B`` is asked for."""

    scale: float
    a_shape: tuple[int, int]
    b_shape: tuple[int, int]
    _tensors: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False, compare=False)
    _file: _FactorFile | None = field(default=None, repr=False, compare=False)
    _keys: tuple[str, str] = field(default=("", ""), repr=False, compare=False)

    @classmethod
    def loaded(cls, A: torch.Tensor, B: torch.Tensor, scale: float) -> "LoraPair":
        return cls(scale, (int(A.shape[0]), int(A.shape[1])), (int(B.shape[0]), int(B.shape[1])), (A, B))

    def _factor(self, index: int) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[index]
        assert self._file is not None
        return self._file.read(self._keys[index])

    @property
    def A(self) -> torch.Tensor:
        return self._factor(0)

    @property
    def B(self) -> torch.Tensor:
        return self._factor(1)

    @property
    def rank(self) -> int:
        return self.a_shape[0]

    @property
    def in_features(self) -> int:
        return self.a_shape[1]

    @property
    def out_features(self) -> int:
        return self.b_shape[0]

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


def read_expert_adapter(path: Path | str, load: bool = True) -> ExpertAdapter:
    """Validate an expert adapter directory (see the module docstring for the checks) and return it.

    The weights file is read once, front to back, one tensor at a time: every factor's shape and finiteness is
    checked, and inside a run the file is checked against the marker that completes it
    (``adapter_marker_entry``: size and sha256, hashed during that read); DamagedFileError names a damaged
    file, with the directory that marker completes as what must be redone. ``load=False`` keeps no factor in
    memory: each ``LoraPair.A``/``.B`` is read from the verified file when asked (the merge job, which
    must stay small at FLUX size); ``load=True`` keeps them (training and eval load the whole adapter anyway).
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
    header = read_header(weights)

    factors: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
    kept: dict[str, torch.Tensor] = {}
    names = set()
    not_finite: set[str] = set()
    # the one read first (hashed inside a run), so a damaged file is reported as damaged, not as malformed
    for key, tensor in iter_verified(weights, expect, unit):
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            not_finite.add(key)
        if load:
            kept[key] = tensor.to(torch.float32)
    for info in header.in_file_order():
        key = info.name
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
        if len(info.shape) != 2:
            raise ShapeMismatchError(f"{weights}: {key} has shape {list(info.shape)}; LoRA factors are matrices")
        factors[module][factor] = (key, tuple(info.shape))
    if len(names) > 1:
        raise AdapterError(
            f"{weights} holds several adapters {sorted(map(str, names))}; save one adapter per directory"
        )
    if not factors:
        raise AdapterError(f"{weights} holds no LoRA factors")

    source = None if load else _FactorFile(header)
    modules: dict[str, LoraPair] = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            missing = "lora_B" if "A" in ab else "lora_A"
            raise AdapterError(f"{weights}: module {module} has no {missing}; the file is incomplete")
        (key_a, a_shape), (key_b, b_shape) = ab["A"], ab["B"]
        if a_shape[0] != b_shape[1]:
            raise ShapeMismatchError(
                f"{weights}: {module} lora_A is {list(a_shape)} and lora_B is {list(b_shape)}; their ranks differ"
            )
        scale, configured = lora_scale(config, module)
        if a_shape[0] != configured:
            raise ShapeMismatchError(
                f"{weights}: {module} has rank {a_shape[0]} but adapter_config.json says r={configured}; "
                "the config does not belong to these weights"
            )
        if key_a in not_finite or key_b in not_finite:
            raise AdapterError(f"{weights}: {module} has NaN or infinite values; the expert diverged")
        if load:
            modules[module] = LoraPair.loaded(kept[key_a], kept[key_b], scale)
        else:
            modules[module] = LoraPair(
                scale, (a_shape[0], a_shape[1]), (b_shape[0], b_shape[1]), _file=source, _keys=(key_a, key_b)
            )

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
