"""Reduce-step errors, torch-free so the CLI and the launcher can catch and print them cheaply.

Every error is something the user can act on (wrong weights, a broken or foreign adapter, a model directory
that is not what it claims), so the messages name the file and the next step. The CLI prints them on stderr
and exits with status 2 before anything is written.
"""

from __future__ import annotations

from mrlora.cli import UserError


class ReduceError(UserError):
    """Base class of every Reduce-step problem."""


class WeightsError(ReduceError):
    """Merge weights that cannot be normalised or do not match the experts."""


class AdapterError(ReduceError):
    """An expert adapter directory is missing a file, is corrupt, or is not a plain LoRA."""


class CorruptSafetensorsError(AdapterError):
    """A safetensors file whose header or data section is damaged or truncated."""


class ArchMismatchError(ReduceError):
    """Experts or updates made for a different base architecture than the one given."""


class ShapeMismatchError(ReduceError):
    """A LoRA factor does not fit the module it adapts (or the other experts' factors)."""


class OutputExistsError(ReduceError):
    """The output location holds something we must not overwrite."""
