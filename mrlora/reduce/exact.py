"""The Reduce math: the experts' weighted update, exactly, as one stacked LoRA.

Expert i changes module m by dW_i = s_i B_i A_i (s_i = alpha / r). The Reduce step wants
dW = sum_i w_i dW_i with w normalised. Averaging the A's and the B's separately (the public reference code,
peft's ``linear``/``ties``/``dare_*``) gives (sum w_i B_i)(sum w_i A_i) instead, whose cross terms
w_i w_j B_i A_j are pure error (~150 % relative on tiny models). Stacking is exact and cheap:

    A = [A_1; A_2; ...]            (R x in,  R = sum_i r_i)
    B = [w_1 s_1 B_1, w_2 s_2 B_2, ...]   (out x R)
    B @ A = sum_i w_i s_i B_i A_i = dW

so the update is stored losslessly at rank R (docs/design.md section 6). Experts may have different ranks and cover
different modules; a module an expert does not adapt contributes zero for it (and the log says so).

``reduce_reference`` reproduces the public code's inexact merge for ablations, labelled as such.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from mrlora.config import ConfigError, normalised_weights
from mrlora.reduce.adapters import ExpertAdapter, LoraPair
from mrlora.reduce.base import BaseTransformer
from mrlora.reduce.errors import ArchMismatchError, ReduceError, ShapeMismatchError, WeightsError

log = logging.getLogger("mrlora.reduce")

MODES = ("exact", "reference")


@dataclass
class ReducedUpdate:
    """Per module, factors with ``dW = B @ A`` (fp32); plus what produced them.

    ``shapes`` (module -> (rank, in, out), in module order) is known without computing anything; the factors
    of one module are computed when asked (``module_factors``), so the merge job streams a FLUX-size update
    to disk holding one module at a time. ``factors`` computes (once) and keeps all of them, for small
    callers and tests.
    """

    shapes: dict[str, tuple[int, int, int]]
    compute: Callable[[str], tuple[torch.Tensor, torch.Tensor]] = field(repr=False)
    weights: list[float]  # normalised
    mode: str
    missing: dict[str, list[str]] = field(default_factory=dict)  # expert path -> modules it does not adapt

    @property
    def exact(self) -> bool:
        return self.mode == "exact"

    @property
    def rank_total(self) -> int:
        return max((r for r, _, _ in self.shapes.values()), default=0)

    def module_factors(self, module: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.compute(module)

    @functools.cached_property
    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return {m: self.compute(m) for m in self.shapes}

    def delta(self, module: str) -> torch.Tensor:
        A, B = self.factors[module]
        return B @ A


def check_weights(weights: list[float], n_experts: int, allow_negative: bool = False) -> list[float]:
    """Normalised weights, or WeightsError when they do not fit the experts."""
    if len(weights) != n_experts:
        raise WeightsError(
            f"{len(weights)} weight(s) for {n_experts} expert(s); give exactly one weight per expert, in order"
        )
    try:
        return normalised_weights(weights, allow_negative=allow_negative)
    except ConfigError as exc:
        raise WeightsError(str(exc)) from None


def check_experts(
    experts: list[ExpertAdapter], base: BaseTransformer | None = None, arch: str | None = None
) -> str | None:
    """Raise unless the experts agree with each other (arch, module shapes) and with the base; return the arch."""
    archs = {e.arch for e in experts if e.arch}
    if arch:
        archs.add(arch)
    if base is not None:
        archs.add(base.arch)
    if len(archs) > 1:
        detail = ", ".join(f"{e.path}: {e.arch}" for e in experts)
        base_note = f"; base {base.transformer_dir}: {base.arch}" if base is not None else ""
        raise ArchMismatchError(
            f"experts and base disagree on the architecture ({detail}{base_note}); merge only experts trained "
            "from the same base model"
        )
    shapes: dict[str, tuple[tuple[int, int], ExpertAdapter]] = {}
    for e in experts:
        for module, pair in e.modules.items():
            shape = (pair.out_features, pair.in_features)
            if module in shapes and shapes[module][0] != shape:
                other = shapes[module][1]
                raise ShapeMismatchError(
                    f"module {module}: {e.path} adapts a {shape[0]}x{shape[1]} weight but {other.path} a "
                    f"{shapes[module][0][0]}x{shapes[module][0][1]} one; the experts come from different bases"
                )
            shapes.setdefault(module, (shape, e))
            if base is not None:
                info = base.weight(module)
                if info is None:
                    raise ArchMismatchError(
                        f"{e.path} adapts {module}, which the base {base.transformer_dir} does not have; the "
                        "adapter was trained on a different architecture"
                    )
                if tuple(info.shape) != shape:
                    raise ShapeMismatchError(
                        f"{e.path}: {module} expects a {shape[0]}x{shape[1]} weight, the base "
                        f"{base.transformer_dir} has {'x'.join(map(str, info.shape))}; the adapter belongs to a different base"
                    )
    return archs.pop() if archs else None


def _log_missing(experts: list[ExpertAdapter], modules: list[str]) -> dict[str, list[str]]:
    missing = {}
    for e in experts:
        absent = [m for m in modules if m not in e.modules]
        if absent:
            missing[str(e.path)] = absent
            log.warning(
                "expert %s does not adapt %d module(s) the others do (it contributes zero there): %s%s",
                e.path,
                len(absent),
                ", ".join(absent[:5]),
                " ..." if len(absent) > 5 else "",
            )
    return missing


def reduce_exact(experts: list[ExpertAdapter], weights: list[float]) -> ReducedUpdate:
    """dW = sum_i w_i s_i B_i A_i per module, as stacked factors (``weights`` already normalised).

    Nothing is computed here: the update's shapes come from the experts' headers, and each module's factors
    are stacked when asked (``ReducedUpdate.module_factors``), reading only that module of each expert."""
    if len(experts) != len(weights):
        raise WeightsError(f"{len(weights)} weights for {len(experts)} experts")
    modules = sorted(set().union(*(e.modules for e in experts)))
    missing = _log_missing(experts, modules)
    contributing: dict[str, list[tuple[LoraPair, float]]] = {}
    shapes: dict[str, tuple[int, int, int]] = {}
    for module in modules:
        present = [(e.modules[module], w) for e, w in zip(experts, weights) if module in e.modules and w != 0.0]
        if present:
            contributing[module] = present
            first = present[0][0]
            shapes[module] = (sum(p.rank for p, _ in present), first.in_features, first.out_features)

    def compute(module: str) -> tuple[torch.Tensor, torch.Tensor]:
        present = contributing[module]
        As, Bs = [], []
        for pair, w in present:
            As.append(pair.A)
            Bs.append(pair.B * (w * pair.scale))
        return torch.cat(As, dim=0).contiguous(), torch.cat(Bs, dim=1).contiguous()

    return ReducedUpdate(shapes=shapes, compute=compute, weights=list(weights), mode="exact", missing=missing)


def reduce_reference(experts: list[ExpertAdapter], weights: list[float]) -> tuple[ReducedUpdate, dict]:
    """The public code's merge (INEXACT): average A's and B's separately; for ablations only.

    Returns the update (dW = s * B_avg @ A_avg, scale folded into B) and the averaged LoRA itself as
    ``{module: (A_avg, B_avg)}`` so the next cycle can continue training it, as the reference code does.
    Computed in memory (the averaged LoRA is saved whole anyway): an ablation mode, not for FLUX-size runs.
    """
    log.warning(
        "reference merge mode: averaging LoRA A and B separately is NOT the weighted average of the experts' "
        "updates (cross terms B_i A_j); use it only to reproduce the public code"
    )
    modules = sorted(set().union(*(e.modules for e in experts)))
    missing = _log_missing(experts, modules)
    factors, averaged = {}, {}
    for module in modules:
        present = [(e, w) for e, w in zip(experts, weights) if module in e.modules]
        ranks = {e.modules[module].rank for e, _ in present}
        scales = {round(e.modules[module].scale, 9) for e, _ in present}
        if len(ranks) > 1 or len(scales) > 1:
            raise ReduceError(
                f"reference merge needs equal rank and alpha across experts, but {module} has ranks "
                f"{sorted(ranks)} and scales {sorted(scales)}; use merge_mode 'exact'"
            )
        A = sum(w * e.modules[module].A for e, w in present)
        B = sum(w * e.modules[module].B for e, w in present)
        scale = present[0][0].modules[module].scale
        averaged[module] = (A.contiguous(), B.contiguous())
        factors[module] = (A.contiguous(), (scale * B).contiguous())
    shapes = {m: (int(A.shape[0]), int(A.shape[1]), int(B.shape[0])) for m, (A, B) in factors.items()}
    update = ReducedUpdate(shapes=shapes, compute=factors.__getitem__, weights=list(weights), mode="reference")
    update.missing = missing
    return update, averaged


def reduce_experts(experts: list[ExpertAdapter], weights: list[float], mode: str = "exact"):
    if mode == "exact":
        return reduce_exact(experts, weights), None
    if mode == "reference":
        return reduce_reference(experts, weights)
    raise ReduceError(f"unknown merge mode {mode!r}; choose one of {MODES}")
