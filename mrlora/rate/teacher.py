"""The teacher of a distillation: the base transformer with one expert LoRA attached (and switchable off).

Reads the expert adapter format of docs/internals.md (``adapter_model.safetensors`` with
``<module>.lora_A.weight`` / ``lora_B.weight``, ``adapter_config.json``, ``mrlora.json``) through the Reduce
step's reader and attaches it with peft as adapter ``rate_teacher``. The same transformer then serves both roles: adapter enabled = teacher,
adapter disabled = the student's frozen base, so the base weights exist once in memory.

Everything is checked before the transformer is touched: the architecture and base id recorded in
``mrlora.json`` must match the base being distilled on, and every LoRA factor must fit its module; an expert
from another base fails here with a message, not later with a shape error deep inside a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mrlora.rate.errors import TeacherMismatchError

ADAPTER_NAME = "rate_teacher"


@dataclass(frozen=True)
class ExpertInfo:
    """What an expert directory says about itself (``mrlora.json``) and which modules it adapts."""

    path: Path
    arch: str
    base: str
    reward: str
    modules: tuple[str, ...]


def read_expert(path: str | Path) -> tuple[ExpertInfo, dict[str, torch.Tensor]]:
    """Parse an expert directory with the Reduce step's strict reader (the one definition of the format).

    Returns its description and ``{<module>.lora_A.weight: A, <module>.lora_B.weight: scale * B}``: the
    per-module scale (alpha / r, rsLoRA and patterns honoured by the reader) is folded into B, so the adapter
    is attached with scale 1 and computes exactly dW = scale * B @ A.
    """
    from mrlora.reduce import ReduceError, read_expert_adapter

    path = Path(path)
    if not path.is_dir():
        raise TeacherMismatchError(
            f"teacher {path} is not a directory; point it at an expert adapter directory (cycle_XXXX/<reward>/adapter)"
        )
    try:
        adapter = read_expert_adapter(path)
    except ReduceError as exc:
        raise TeacherMismatchError(f"teacher {path} is not a usable expert adapter: {exc}") from exc
    state: dict[str, torch.Tensor] = {}
    for module, pair in adapter.modules.items():
        state[f"{module}.lora_A.weight"] = pair.A
        state[f"{module}.lora_B.weight"] = pair.B * pair.scale
    info = ExpertInfo(
        path=path,
        arch=adapter.arch or "",
        base=adapter.base or "",
        reward=adapter.reward or "",
        modules=tuple(sorted(adapter.modules)),
    )
    return info, state


def same_base(recorded: str, base_spec: str) -> bool:
    """Whether the base id recorded by the expert names the model loaded from ``base_spec``.

    Equal strings, the same resolved directory (presets, ``tiny:<arch>``, local paths), or a hub id whose
    cache snapshot ``base_spec`` points into (``.../models--org--name/snapshots/...``).
    """
    if not recorded or recorded == base_spec:
        return True
    from mrlora.models.loading import MODEL_PRESETS, resolve_model

    def local(spec: str) -> str | None:
        if spec in MODEL_PRESETS:
            spec = MODEL_PRESETS[spec]
        if spec.startswith("tiny:") or Path(spec).expanduser().is_dir():
            try:
                return str(Path(resolve_model(spec)).resolve())
            except Exception:
                return None
        return None

    a, b = local(recorded), local(base_spec)
    if a is not None and a == b:
        return True
    hub = MODEL_PRESETS.get(recorded, recorded)
    if "/" in hub and not Path(hub).exists():
        marker = "models--" + hub.replace("/", "--")
        return marker in Path(base_spec).expanduser().resolve().parts
    return False


def check_expert(
    info: ExpertInfo,
    state: dict[str, torch.Tensor],
    transformer: Any,
    arch: str,
    base_spec: str,
    base_id: str | None = None,
) -> None:
    """Raise ``TeacherMismatchError`` unless the expert was trained on this base and fits its modules."""
    if info.arch and info.arch != arch:
        raise TeacherMismatchError(
            f"expert {info.path} was trained on a {info.arch} model (mrlora.json arch) but the base is {arch}; "
            f"use an expert of this base or the matching base"
        )
    identity = base_id or base_spec
    if not same_base(info.base, identity):
        raise TeacherMismatchError(
            f"expert {info.path} was trained on base {info.base!r} (mrlora.json) but the base given is "
            f"{identity!r}; pass the same base, or --base-id {info.base!r} if this directory is a copy of it"
        )
    named = dict(transformer.named_modules())
    for module in info.modules:
        layer = named.get(module)
        if not isinstance(layer, torch.nn.Linear):
            raise TeacherMismatchError(
                f"expert {info.path}: module {module} does not exist as a linear layer in this base's transformer; "
                f"the expert belongs to another base"
            )
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        if (
            a.ndim != 2
            or b.ndim != 2
            or a.shape[1] != layer.in_features
            or b.shape[0] != layer.out_features
            or a.shape[0] != b.shape[1]
        ):
            raise TeacherMismatchError(
                f"expert {info.path}: {module} has lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)}, which do not fit "
                f"a {layer.in_features} -> {layer.out_features} layer; the expert was trained on another base"
            )


def attach_expert(
    transformer: Any, expert_dir: str | Path, arch: str, base_spec: str, base_id: str | None = None
) -> ExpertInfo:
    """Check the expert against ``transformer`` and attach it (enabled) as peft adapter ``rate_teacher``."""
    from peft import LoraConfig, set_peft_model_state_dict

    info, state = read_expert(expert_dir)
    check_expert(info, state, transformer, arch, base_spec, base_id)
    ranks = {m: int(state[f"{m}.lora_A.weight"].shape[0]) for m in info.modules}
    rank = max(set(ranks.values()), key=list(ranks.values()).count)
    # scale 1 everywhere (lora_alpha = r per module): the expert's scale is already folded into B
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        target_modules=list(info.modules),
        rank_pattern={m: r for m, r in ranks.items() if r != rank},
        alpha_pattern={m: r for m, r in ranks.items() if r != rank},
        init_lora_weights=True,
    )
    transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    dtype = next(transformer.parameters()).dtype
    result = set_peft_model_state_dict(
        transformer, {k: v.to(dtype) for k, v in state.items()}, adapter_name=ADAPTER_NAME
    )
    unexpected = [k for k in getattr(result, "unexpected_keys", []) if "lora" in k]
    if unexpected:
        raise TeacherMismatchError(
            f"expert {info.path}: peft did not place {unexpected[:3]}; the adapter format is off"
        )
    transformer.set_adapter(ADAPTER_NAME)
    for p in transformer.parameters():
        p.requires_grad_(False)
    return info


def set_teacher(transformer: Any, enabled: bool) -> None:
    """Switch the expert on (teacher) or off (the student's base)."""
    if enabled:
        transformer.enable_adapters()
    else:
        transformer.disable_adapters()
