"""Model errors, torch-free so the login-node launcher can catch and print them without heavy imports."""

from __future__ import annotations

from mrlora.cli import UserError


class ModelError(UserError):
    """Base class: something about the model spec, its files or its architecture is wrong."""


class ModelNotFoundError(ModelError):
    """A local model path does not exist, or a hub model is not in the local cache and cannot be fetched."""


class UnknownArchError(ModelError):
    """The architecture is not one mrlora supports (``sd3`` or ``flux``), or does not match the model files."""


class TinyBuildError(ModelError):
    """A tiny model cannot be built at the requested place (an unrelated directory is in the way)."""
