"""The saved form of a RaTE token: one small safetensors file per token.

Tensors: one ``(1, dim)`` fp32 tensor per text encoder, keyed by the encoder name (``clip_l``, ``clip_g``,
``t5`` for SD3; ``clip``, ``t5`` for FLUX). Metadata (safetensors string metadata, readable without torch by
any safetensors reader): ``format``, ``version``, ``token``, ``arch``, ``encoders`` (JSON list), ``dims``
(JSON object), ``base`` (the base model id the token was distilled on), ``reward`` and free-form ``info``
(JSON). A file is the whole token: it loads on top of any copy of the same base, and ``check_fits`` refuses a
pipeline whose architecture, encoder names or embedding widths differ, before anything is modified.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mrlora.rate.encoders import embedding_dims, pipeline_arch
from mrlora.rate.errors import TokenFileError
from mrlora.runstore import atomic_file

FORMAT = "mrlora-rate-token"
VERSION = 1


@dataclass
class RateToken:
    """A learned token: its string and one embedding vector per text encoder."""

    token: str
    arch: str
    vectors: dict[str, torch.Tensor]
    base: str = ""
    reward: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> dict[str, int]:
        return {name: int(v.shape[-1]) for name, v in self.vectors.items()}

    @property
    def encoders(self) -> list[str]:
        return list(self.vectors)


def save_token(token: RateToken, path: str | Path) -> Path:
    """Write ``token`` to ``path`` atomically (a reader never sees a partial file)."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {
        name: v.detach().to("cpu", torch.float32).reshape(1, -1).contiguous() for name, v in token.vectors.items()
    }
    metadata = {
        "format": FORMAT,
        "version": str(VERSION),
        "token": token.token,
        "arch": token.arch,
        "encoders": json.dumps(token.encoders),
        "dims": json.dumps(token.dims),
        "base": token.base,
        "reward": token.reward,
        "info": json.dumps(token.info, sort_keys=True),
    }
    with atomic_file(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def load_token(path: str | Path) -> RateToken:
    """Read a token file; ``TokenFileError`` says what is wrong with a file that is not one."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise TokenFileError(f"token file {path} does not exist; distill one with `python -m mrlora.rate distill`")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            tensors = {key: fh.get_tensor(key) for key in fh.keys()}
    except Exception as exc:  # safetensors raises several unrelated types for a corrupt header
        raise TokenFileError(f"{path} is not a readable safetensors file ({exc}); re-run the distillation") from exc
    if meta.get("format") != FORMAT:
        raise TokenFileError(f"{path} is not a RaTE token file (metadata format={meta.get('format')!r})")
    if int(meta.get("version", "0")) > VERSION:
        raise TokenFileError(f"{path} has token format version {meta['version']}; this mrlora reads up to {VERSION}")
    try:
        encoders = json.loads(meta["encoders"])
        dims = json.loads(meta["dims"])
        info = json.loads(meta.get("info", "{}"))
        token, arch = meta["token"], meta["arch"]
    except (KeyError, ValueError) as exc:
        raise TokenFileError(f"{path} has incomplete RaTE metadata ({exc}); re-run the distillation") from exc
    if sorted(encoders) != sorted(tensors):
        raise TokenFileError(f"{path}: metadata lists encoders {encoders} but the file holds {sorted(tensors)}")
    for name in encoders:
        if tensors[name].ndim != 2 or int(tensors[name].shape[-1]) != int(dims.get(name, -1)):
            raise TokenFileError(
                f"{path}: tensor {name} has shape {tuple(tensors[name].shape)}, metadata dim {dims.get(name)}"
            )
    return RateToken(
        token=token,
        arch=arch,
        vectors={name: tensors[name].to(torch.float32) for name in encoders},
        base=meta.get("base", ""),
        reward=meta.get("reward", ""),
        info=info,
    )


def check_fits(token: RateToken, pipe: Any, source: str = "") -> None:
    """Raise ``TokenFileError`` unless ``token`` was made for a pipeline like ``pipe`` (arch, encoders, dims)."""
    where = f" ({source})" if source else ""
    arch = pipeline_arch(pipe)
    if token.arch != arch:
        raise TokenFileError(
            f"token {token.token!r}{where} was distilled on a {token.arch} model but the pipeline is {arch}; load it "
            f"into a {token.arch} pipeline of base {token.base or '(unrecorded)'}"
        )
    dims = embedding_dims(pipe)
    if sorted(dims) != sorted(token.dims):
        raise TokenFileError(
            f"token {token.token!r}{where} has embeddings for encoders {sorted(token.dims)} but the pipeline has "
            f"{sorted(dims)}; load the pipeline with the same text encoders as base {token.base or '(unrecorded)'}"
        )
    for name, dim in token.dims.items():
        if dims[name] != dim:
            raise TokenFileError(
                f"token {token.token!r}{where}: encoder {name} is {dims[name]} wide here but the token's embedding "
                f"is {dim} wide; it was distilled on another base ({token.base or 'unrecorded'})"
            )
