"""Which images an eval makes, with which seeds, in which batches and shards; and where the files go.

Why batches are planned globally: on CPU (and with cuBLAS) a sample's numbers can depend on which other samples
share its batch. The work list ``(prompt, sample)`` is cut into batches of ``batch_size`` once, and a shard takes
a contiguous run of whole batches, so a 2-shard array job computes exactly the batches a single process would,
and produces bit-identical images and scores. Each sample also has its own seed (from the eval seed, the prompt
index and the sample index), so no image depends on the batch size either, up to floating-point noise.

Torch-free: the login-node submitter uses the layout to find finished shards.

Output directory layout::

    OUT/images/<index:05d>/samples/<k:05d>.png   official GenEval layout (evaluate_images.py reads OUT/images)
    OUT/images/<index:05d>/metadata.jsonl        the prompt's metadata line (+ "prompt")
    OUT/shards/<i:05d>-of-<n:05d>/results.h5     one shard's rows; DONE.json (sizes + sha256) written last
    OUT/results.h5                               every row, sorted by (prompt_index, sample_index)
    OUT/summary.json                             aggregated numbers (eval.summary)
    OUT/DONE.json                                written last by eval.aggregate
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from eval.errors import EvalError
from mrlora.runstore import DONE_MARKER, read_marker

_SHARD = re.compile(r"^\s*(\d+)\s*/\s*(\d+)\s*$")


@dataclass(frozen=True)
class Shard:
    """Shard ``index`` of ``count`` (0-based, as Slurm's SLURM_ARRAY_TASK_ID)."""

    index: int = 0
    count: int = 1

    @classmethod
    def parse(cls, text: str) -> "Shard":
        m = _SHARD.match(text or "")
        if m is None:
            raise EvalError(f"--shard {text!r} must look like i/n with 0 <= i < n (e.g. 0/4)")
        index, count = int(m.group(1)), int(m.group(2))
        if count < 1 or not 0 <= index < count:
            raise EvalError(f"--shard {text!r}: need 0 <= i < n and n >= 1")
        return cls(index, count)

    @property
    def name(self) -> str:
        return f"{self.index:05d}-of-{self.count:05d}"

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


@dataclass(frozen=True)
class WorkItem:
    prompt_index: int
    sample_index: int
    seed: int


def sample_seed(seed: int, prompt_index: int, sample_index: int) -> int:
    """A 63-bit seed for one image, independent of batching, sharding and of the other prompts."""
    digest = hashlib.sha256(f"mrlora-eval:{seed}:{prompt_index}:{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def plan_batches(num_prompts: int, samples: int, batch_size: int, seed: int) -> list[list[WorkItem]]:
    """The global batches: the work list (prompt-major) cut into chunks of ``batch_size``."""
    if samples < 1 or batch_size < 1:
        raise EvalError(f"--samples ({samples}) and --batch-size ({batch_size}) must be >= 1")
    items = [WorkItem(i, k, sample_seed(seed, i, k)) for i in range(num_prompts) for k in range(samples)]
    return [items[j : j + batch_size] for j in range(0, len(items), batch_size)]


def shard_batches(batches: list[list[WorkItem]], shard: Shard) -> list[list[WorkItem]]:
    """The contiguous run of whole batches that ``shard`` computes (possibly none for tiny prompt sets)."""
    n = len(batches)
    return batches[shard.index * n // shard.count : (shard.index + 1) * n // shard.count]


@dataclass(frozen=True)
class EvalDir:
    """Paths of one eval output directory (see the module docstring)."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    @property
    def images(self) -> Path:
        return self.root / "images"

    def prompt_dir(self, prompt_index: int) -> Path:
        return self.images / f"{prompt_index:05d}"

    def image_path(self, prompt_index: int, sample_index: int) -> Path:
        return self.prompt_dir(prompt_index) / "samples" / f"{sample_index:05d}.png"

    def image_relpath(self, prompt_index: int, sample_index: int) -> str:
        return self.image_path(prompt_index, sample_index).relative_to(self.root).as_posix()

    @property
    def shards_dir(self) -> Path:
        return self.root / "shards"

    def shard_dir(self, shard: Shard) -> Path:
        return self.shards_dir / shard.name

    @property
    def results(self) -> Path:
        return self.root / "results.h5"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    def shard_done(self, shard: Shard) -> dict | None:
        return read_marker(self.shard_dir(shard), DONE_MARKER)

    def done(self) -> dict | None:
        return read_marker(self.root, DONE_MARKER, verify="none")

    def pending_shards(self, count: int) -> list[int]:
        return [i for i in range(count) if self.shard_done(Shard(i, count)) is None]
