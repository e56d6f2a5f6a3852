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

import hashlib
import json
import math
import os
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from mrlora.reduce.errors import CorruptSafetensorsError
from mrlora.runstore import DamagedFileError

DELAY_ENV = "MRLORA_REDUCE_TENSOR_DELAY_S"
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's own limit
_COPY_CHUNK = 64 << 20

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
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
    if metadata is not None and not (
        isinstance(metadata, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
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
            isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end
        ):
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


def _damaged(path: Path, unit: Path | None, what: str) -> DamagedFileError:
    return DamagedFileError(f"{path} is damaged ({what}); it changed after it was written", path, unit)


def iter_verified(
    path: Path | str, expect: dict | None = None, unit: Path | str | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield every tensor of ``path`` in file order, reading the file once, front to back.

    With ``expect`` (a marker's ``{"size", "sha256"}`` entry) every byte read is hashed on the way and the file
    is checked against it: a wrong size fails before anything is read, a wrong checksum raises
    :class:`DamagedFileError` after the last tensor (so a caller that consumes everything before using it never
    uses damaged data; one that streams into a model must discard the model on that error). Hashing the read
    that happens anyway costs CPU only (sha256: ~1.3 GB/s on one core here), no second pass over the file, and
    it overlaps the read.
    """
    path = Path(path)
    unit = Path(unit) if unit is not None else path.parent
    if expect is not None:
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise DamagedFileError(f"{path} is missing ({exc}); resume the run to redo it", path, unit) from None
        if size != expect.get("size"):
            raise _damaged(path, unit, f"{size} bytes, its marker recorded {expect.get('size')}")
    header = read_header(path)
    digest = hashlib.sha256() if expect is not None and expect.get("sha256") else None
    # sha256 of tensor i runs on a helper thread while tensor i + 1 is read (both release the GIL), so on a
    # node with a spare core the check adds almost nothing to the read; updates stay in file order
    hasher = ThreadPoolExecutor(max_workers=1) if digest is not None else None
    pending = None
    try:
        with open(path, "rb", buffering=0) as fh:
            head = fh.read(header.data_start)
            if digest is not None:
                digest.update(head)
            for info in header.in_file_order():
                buf = bytearray(info.nbytes)
                view, done = memoryview(buf), 0
                while done < info.nbytes:
                    got = fh.readinto(view[done:])
                    if not got:
                        raise CorruptSafetensorsError(
                            f"{path} ended while reading tensor {info.name!r}; it is truncated"
                        )
                    done += got
                if hasher is not None:
                    if pending is not None:
                        pending.result()
                    pending = hasher.submit(digest.update, buf)
                dtype = DTYPES[info.dtype]
                tensor = (
                    torch.frombuffer(buf, dtype=dtype).reshape(info.shape)
                    if info.nbytes
                    else torch.empty(info.shape, dtype=dtype)
                )
                yield info.name, tensor
        if pending is not None:
            pending.result()
    finally:
        if hasher is not None:
            hasher.shutdown(wait=True)
    if digest is not None and digest.hexdigest() != expect["sha256"]:
        raise _damaged(path, unit, "its sha256 differs from the one its marker recorded")


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

    def __init__(
        self,
        path: Path | str,
        entries: Iterable[OutEntry],
        metadata: dict[str, str] | None = None,
        hash_output: bool = False,
    ):
        self.path = Path(path)
        # tensors are written strictly in file order, so the output can be hashed as it is written (the marker
        # then needs no second read of a multi-GB file); copies go through user space when hashing
        self._hasher = hashlib.sha256() if hash_output else None
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
        if self._hasher is not None:
            self._hasher.update(struct.pack("<Q", len(raw)) + raw)
        self.bytes_written = self._data_start

    @property
    def sha256(self) -> str | None:
        """The hex sha256 of the whole file (with ``hash_output=True``, once every tensor is written)."""
        return self._hasher.hexdigest() if self._hasher is not None else None

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
            if self._hasher is not None:
                self._hasher.update(flat.numpy())
        self._done(end - begin)

    def copy_from(self, name: str, src_fd: int, src_offset: int) -> None:
        """Copy the tensor's bytes unchanged from ``src_fd`` at ``src_offset`` (kernel-side when possible)."""
        _, begin, end = self._expect(name)
        remaining, src, dst = end - begin, src_offset, self._data_start + begin
        while remaining and self._hasher is not None:
            chunk = os.pread(src_fd, min(remaining, _COPY_CHUNK), src)
            if not chunk:
                raise CorruptSafetensorsError(f"source ended while copying tensor {name!r} into {self.path}")
            self._pwrite_all(chunk, dst)
            self._hasher.update(chunk)
            remaining, src, dst = remaining - len(chunk), src + len(chunk), dst + len(chunk)
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
                missing = [e.name for e in self._entries[self._next :]][:3]
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


def read_tensors(
    path: Path | str, expect: dict | None = None, unit: Path | str | None = None
) -> dict[str, torch.Tensor]:
    """Read every tensor of a small file (an adapter or an update), validating the header first; with
    ``expect`` (its marker entry) also its size and sha256, hashed during the one read (``iter_verified``)."""
    if expect is not None:
        return dict(iter_verified(path, expect, unit))
    with TensorReader(path) as reader:
        return {k: reader.get(k) for k in reader.keys()}
