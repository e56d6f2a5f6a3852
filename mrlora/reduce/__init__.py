"""The Reduce step: merge a cycle's LoRA experts exactly and fold the result into the next base.

Public entry points (docs/internals.md): ``merge_cycle_in_run`` (the merge job, which also materialises the
model every ``mapreduce.materialise_every`` cycles), ``export_model`` (a full model of a cycle),
``model_after`` (re-exported from ``mrlora.runstore``: the one answer to "the model after cycle c", for Map,
eval, export, RaTE and status) and ``load_pipeline_after`` (its pipeline), ``map_start`` (the Map step's start:
``model_after`` plus the reference mode's continued LoRA), ``apply_updates``, ``save_expert_adapter`` / ``read_expert_adapter`` (the expert adapter format), and ``merge_experts`` (the
function behind ``python -m mrlora.merge``).
"""

from mrlora.reduce.adapters import ExpertAdapter, LoraPair, read_expert_adapter, save_expert_adapter
from mrlora.reduce.errors import (
    AdapterError,
    ArchMismatchError,
    CorruptSafetensorsError,
    OutputExistsError,
    ReduceError,
    ShapeMismatchError,
    WeightsError,
)
from mrlora.reduce.exact import ReducedUpdate, reduce_exact, reduce_reference
from mrlora.reduce.export import export_model, export_with_updates
from mrlora.reduce.job import merge_cycle_in_run, merge_experts
from mrlora.reduce.load_model import load_pipeline_after, load_transformer_after
from mrlora.reduce.store import apply_updates, load_update
from mrlora.runstore import MapStart, ModelAfter, map_start, model_after, updates_after

__all__ = [
    "AdapterError",
    "ArchMismatchError",
    "CorruptSafetensorsError",
    "ExpertAdapter",
    "LoraPair",
    "MapStart",
    "ModelAfter",
    "OutputExistsError",
    "ReduceError",
    "ReducedUpdate",
    "ShapeMismatchError",
    "WeightsError",
    "apply_updates",
    "export_model",
    "export_with_updates",
    "load_pipeline_after",
    "load_transformer_after",
    "load_update",
    "map_start",
    "merge_cycle_in_run",
    "merge_experts",
    "model_after",
    "read_expert_adapter",
    "reduce_exact",
    "reduce_reference",
    "save_expert_adapter",
    "updates_after",
]
