"""The Reduce step: merge a cycle's LoRA experts exactly and fold the result into the next base.

Public entry points (docs/internals.md): ``merge_cycle_in_run`` (the merge job), ``export_model`` (a full
model of a cycle), ``apply_updates`` and ``effective_base`` / ``map_start`` (how the Map step builds its
starting weights; ``map_start`` adds the reference mode's continued LoRA),
``save_expert_adapter`` / ``read_expert_adapter`` (the expert adapter format), and ``merge_experts`` (the
function behind ``python -m mrlora.merge``).
"""

from mrlora.reduce.adapters import ExpertAdapter, LoraPair, read_expert_adapter, save_expert_adapter
from mrlora.reduce.errors import (AdapterError, ArchMismatchError, CorruptSafetensorsError, OutputExistsError,
                                  ReduceError, ShapeMismatchError, WeightsError)
from mrlora.reduce.exact import ReducedUpdate, reduce_exact, reduce_reference
from mrlora.reduce.export import export_model, export_with_updates
from mrlora.reduce.job import merge_cycle_in_run, merge_experts
from mrlora.reduce.store import MapStart, apply_updates, effective_base, load_update, map_start, updates_after

__all__ = [
    "AdapterError", "ArchMismatchError", "CorruptSafetensorsError", "ExpertAdapter", "LoraPair", "MapStart",
    "OutputExistsError", "ReduceError", "ReducedUpdate", "ShapeMismatchError", "WeightsError", "apply_updates",
    "effective_base", "export_model", "export_with_updates", "load_update", "map_start", "merge_cycle_in_run", "merge_experts",
    "read_expert_adapter", "reduce_exact", "reduce_reference", "save_expert_adapter", "updates_after",
]
