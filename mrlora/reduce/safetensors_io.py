"""Read and write safetensors files one tensor at a time.

Why not ``safetensors.torch.load_file`` / ``save_file``: both hold a whole file in memory, and ``safe_open``
memory-maps the file, so every page touched stays in the process's resident set until the handle closes. A
FLUX.1-dev transformer is 24 GB in bf16; the Reduce and export steps must stay near the size of the largest
tensor instead. So we parse the header ourselves (validating it strictly: a truncated or damaged file is an
error naming the file, never garbage weights), read a tensor with ``pread`` into its own buffer, and write an
output file by laying out its header first and then streaming each tensor's bytes at its offset. Tensors that
do not change are copied byte for byte inside the kernel (``os.copy_file_range``) without decoding them.

``MRLORA_REDUCE_TENSOR_DELAY_S`` (seconds, float) makes the writer sleep after every tensor. It exists for the
tests that kill a merge or export mid-write; it is read once per writer and is 0 by default.
"""

from __future__ import annotations

import json
import math
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from mrlora.reduce.errors import CorruptSafetensorsError

DELAY_ENV = "MRLORA_REDUCE_TENSOR_DELAY_S"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_COPY_CHUNK = 64 << 20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_name] = getattr(torch, _attr)
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}


def _itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file (offsets relative to the data section)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class SafetensorsHeader:
    """A validated safetensors header: the tensors in file order, and the metadata dict."""

    path: Path
    data_start: int
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str] | None

    def in_file_order(self) -> list[TensorInfo]:
        return sorted(self.tensors.values(), key=lambda t: t.begin)


def read_header(path: Path | str) -> SafetensorsHeader:
    """Parse and check the header of ``path``; raise CorruptSafetensorsError naming the problem."""
    path = Path(path)

    def bad(reason: str) -> CorruptSafetensorsError:
        return CorruptSafetensorsError(
            f"{path} is not a valid safetensors file ({reason}); it is probably truncated or damaged: "
            "rewrite it from its source (rerun the job that produced it)"
        )

    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise bad(f"only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise bad(f"header length {n} does not fit in {size} bytes")
            raw = fh.read(n)
    except OSError as exc:
        raise CorruptSafetensorsError(f"cannot read {path}: {exc}") from None
    try:
        obj = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise bad("header is not JSON") from None
    if not isinstance(obj, dict):
        raise bad("header is not a JSON object")
    metadata = obj.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise bad("__metadata__ must map strings to strings")
    tensors: dict[str, TensorInfo] = {}
    for name, entry in obj.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"malformed entry for tensor {name!r}") from None
        if dtype not in DTYPES:
            raise bad(f"tensor {name!r} has unsupported dtype {dtype!r}")
        if not all(isinstance(d, int) and d >= 0 for d in shape) or not (
                isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
            raise bad(f"tensor {name!r} has an invalid shape or offsets")
        if (end - begin) != math.prod(shape) * _itemsize(dtype):
            raise bad(f"tensor {name!r}: {end - begin} bytes for shape {list(shape)} {dtype}")
        tensors[name] = TensorInfo(name, dtype, shape, begin, end)
    position = 0
    for info in sorted(tensors.values(), key=lambda t: t.begin):
        if info.begin != position:
            raise bad(f"tensor {info.name!r} starts at {info.begin}, expected {position}")
        position = info.end
    if 8 + n + position != size:
        raise bad(f"data section should be {position} bytes, file has {size - 8 - n}")
    return SafetensorsHeader(path, 8 + n, tensors, metadata)


class TensorReader:
    """Read single tensors of one safetensors file into private buffers (no mmap, no whole-file load)."""

    def __init__(self, path: Path | str, header: SafetensorsHeader | None = None):
        self.header = header or read_header(path)
        self.path = Path(path)
        self._fd = os.open(self.path, os.O_RDONLY)

    def __enter__(self) -> "TensorReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    @property
    def fd(self) -> int:
        return self._fd

    def keys(self) -> list[str]:
        return list(self.header.tensors)

    def get(self, name: str) -> torch.Tensor:
        info = self.header.tensors[name]
        dtype = DTYPES[info.dtype]
        if info.nbytes == 0:
            return torch.empty(info.shape, dtype=dtype)
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        done = 0
        while done < info.nbytes:
            got = os.preadv(self._fd, [view[done:]], self.header.data_start + info.begin + done)
            if got <= 0:
                raise CorruptSafetensorsError(f"{self.path} ended while reading tensor {name!r}; the file is truncated")
            done += got
        return torch.frombuffer(buf, dtype=dtype).reshape(info.shape)


@dataclass(frozen=True)
class OutEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]


class StreamingWriter:
    """Write a safetensors file whose tensor list is known up front, one tensor at a time, in order.

    The header is written first; each ``write``/``copy_from`` puts one tensor's bytes at its offset. ``close``
    checks that every tensor was written. Write to a temporary path (``mrlora.runstore.atomic_file``): a file
    abandoned half way has a valid-looking header but a short data section, which ``read_header`` rejects.
    """

    def __init__(self, path: Path | str, entries: Iterable[OutEntry], metadata: dict[str, str] | None = None):
        self.path = Path(path)
        self._entries = list(entries)
        header: dict = {}
        if metadata:
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._spans: dict[str, tuple[int, int]] = {}
        for e in self._entries:
            size = math.prod(e.shape) * _itemsize(e.dtype)
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + size]}
            self._spans[e.name] = (offset, offset + size)
            offset += size
        raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
        raw += b" " * (-len(raw) % 8)
        self._data_start = 8 + len(raw)
        self._next = 0
        self._delay = float(os.environ.get(DELAY_ENV, "0") or 0)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self._pwrite_all(struct.pack("<Q", len(raw)) + raw, 0)
        self.bytes_written = self._data_start

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        elif self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _pwrite_all(self, data, offset: int) -> None:
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            done += os.pwrite(self._fd, view[done:], offset + done)

    def _expect(self, name: str) -> tuple[OutEntry, int, int]:
        if self._next >= len(self._entries) or self._entries[self._next].name != name:
            expected = self._entries[self._next].name if self._next < len(self._entries) else "nothing"
            raise RuntimeError(f"{self.path}: wrote {name!r} out of order, expected {expected!r}")
        entry = self._entries[self._next]
        begin, end = self._spans[name]
        return entry, begin, end

    def _done(self, nbytes: int) -> None:
        self._next += 1
        self.bytes_written += nbytes
        if self._delay:
            time.sleep(self._delay)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry, begin, end = self._expect(name)
        if DTYPE_NAMES.get(tensor.dtype) != entry.dtype or tuple(tensor.shape) != entry.shape:
            raise RuntimeError(
                f"{self.path}: tensor {name!r} is {tensor.dtype} {list(tensor.shape)}, header says "
                f"{entry.dtype} {list(entry.shape)}"
            )
        if end > begin:
            flat = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._pwrite_all(flat.numpy(), self._data_start + begin)
        self._done(end - begin)

    def copy_from(self, name: str, src_fd: int, src_offset: int) -> None:
        """Copy the tensor's bytes unchanged from ``src_fd`` at ``src_offset`` (kernel-side when possible)."""
        _, begin, end = self._expect(name)
        remaining, src, dst = end - begin, src_offset, self._data_start + begin
        while remaining:
            try:
                n = os.copy_file_range(src_fd, self._fd, min(remaining, 1 << 30), src, dst)
            except (AttributeError, OSError):
                chunk = os.pread(src_fd, min(remaining, _COPY_CHUNK), src)
                if chunk:
                    self._pwrite_all(chunk, dst)
                n = len(chunk)
            if n <= 0:
                raise CorruptSafetensorsError(f"source ended while copying tensor {name!r} into {self.path}")
            remaining, src, dst = remaining - n, src + n, dst + n
        self._done(end - begin)

    def close(self) -> None:
        if self._fd < 0:
            return
        try:
            if self._next != len(self._entries):
                missing = [e.name for e in self._entries[self._next:]][:3]
                raise RuntimeError(f"{self.path}: closed with tensors not written: {missing}...")
        finally:
            os.close(self._fd)
            self._fd = -1


def write_tensors(path: Path | str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write small in-memory tensors (adapters, updates) with the streaming writer, in the given order."""
    entries = [OutEntry(k, DTYPE_NAMES[t.dtype], tuple(t.shape)) for k, t in tensors.items()]
    with StreamingWriter(path, entries, metadata) as writer:
        for k, t in tensors.items():
            writer.write(k, t)


def read_tensors(path: Path | str) -> dict[str, torch.Tensor]:
    """Read every tensor of a small file (an adapter or an update), validating the header first."""
    with TensorReader(path) as reader:
        return {k: reader.get(k) for k in reader.keys()}
