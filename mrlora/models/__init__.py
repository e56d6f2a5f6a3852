"""Models: tiny random SD3/FLUX builds, the one loading function every job uses, and LoRA target lists.

Importing this package stays torch-free (the login-node launcher reads ``MODEL_PRESETS`` and catches
``ModelNotFoundError``); the heavy functions are imported on first attribute access.
"""

from __future__ import annotations

import importlib
from typing import Any

from mrlora.models.errors import ModelError, ModelNotFoundError, TinyBuildError, UnknownArchError

_LAZY = {
    "MODEL_PRESETS": "mrlora.models.loading",
    "resolve_model": "mrlora.models.loading",
    "load_pipeline": "mrlora.models.loading",
    "detect_arch": "mrlora.models.loading",
    "torch_dtype": "mrlora.models.loading",
    "pipeline_components_summary": "mrlora.models.loading",
    "build_tiny": "mrlora.models.tiny",
    "TINY_ARCHS": "mrlora.models.tiny",
    "LORA_TARGETS": "mrlora.models.lora_targets",
    "lora_targets": "mrlora.models.lora_targets",
    "lora_target_modules": "mrlora.models.lora_targets",
}

__all__ = ["ModelError", "ModelNotFoundError", "TinyBuildError", "UnknownArchError", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mrlora.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
