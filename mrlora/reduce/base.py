"""The base model on disk, seen through its transformer's safetensors headers only.

Validation (does this adapter fit this model?) and export (rewrite the transformer shard by shard) need the
names, shapes and files of the transformer's weights, never the weights themselves: reading the headers of a
24 GB FLUX checkpoint takes milliseconds. A base is either a diffusers pipeline directory (``model_index.json``
+ ``transformer/``) or a transformer directory on its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from mrlora.reduce.errors import ArchMismatchError, ReduceError
from mrlora.reduce.safetensors_io import SafetensorsHeader, TensorInfo, read_header

ARCH_BY_CLASS = {"SD3Transformer2DModel": "sd3", "FluxTransformer2DModel": "flux"}
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = "diffusion_pytorch_model.safetensors.index.json"


@dataclass
class BaseTransformer:
    """Where a base model's transformer weights are and what they look like."""

    root: Path | None  # the pipeline directory, or None for a bare transformer directory
    transformer_dir: Path
    arch: str
    shards: list[SafetensorsHeader]

    def __post_init__(self):
        self._by_name: dict[str, tuple[SafetensorsHeader, TensorInfo]] = {}
        for shard in self.shards:
            for name, info in shard.tensors.items():
                self._by_name[name] = (shard, info)

    def locate(self, name: str) -> tuple[SafetensorsHeader, TensorInfo] | None:
        """The shard holding tensor ``name`` and where it lies in it."""
        return self._by_name.get(name)

    def weight(self, module: str) -> TensorInfo | None:
        found = self._by_name.get(f"{module}.weight")
        return found[1] if found else None


def _arch_of(config_path: Path) -> str:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ReduceError(f"cannot read {config_path} ({exc}); is this a diffusers model directory?") from None
    cls = config.get("_class_name", "")
    if cls not in ARCH_BY_CLASS:
        raise ArchMismatchError(
            f"{config_path}: transformer class {cls!r} is not supported; expected one of {sorted(ARCH_BY_CLASS)}"
        )
    return ARCH_BY_CLASS[cls]


def open_base(path: Path | str) -> BaseTransformer:
    """Inspect a base model directory (pipeline or bare transformer) without loading any weight."""
    path = Path(path)
    if (path / "transformer" / "config.json").is_file():
        root, tdir = path, path / "transformer"
    elif (path / "config.json").is_file():
        root, tdir = None, path
    else:
        raise ReduceError(
            f"{path} is not a diffusers model directory (no transformer/config.json or config.json); pass the "
            "directory that holds model_index.json"
        )
    arch = _arch_of(tdir / "config.json")
    index = tdir / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ReduceError(f"{index} is unreadable or has no weight_map ({exc})") from None
        files = sorted(set(weight_map.values()))
    elif (tdir / WEIGHTS_NAME).is_file():
        files = [WEIGHTS_NAME]
    else:
        raise ReduceError(
            f"{tdir} has no {WEIGHTS_NAME} (or sharded index); only safetensors checkpoints are supported: "
            "re-save the model with safe_serialization=True"
        )
    shards = [read_header(tdir / f) for f in files]
    return BaseTransformer(root=root, transformer_dir=tdir, arch=arch, shards=shards)


def resolve_base(spec: str) -> Path:
    """A local directory for the run's ``model.pretrained`` (a path, a hub id, or ``tiny:<arch>``)."""
    if Path(spec).is_dir():
        return Path(spec)
    from mrlora.models.loading import resolve_model

    return Path(resolve_model(spec))
