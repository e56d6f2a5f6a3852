"""Per-sample results: one row per generated image, stored in HDF5 (h5py).

Why HDF5: a GenEval run is 553 prompts x 4 samples x several sub-scores; HDF5 keeps typed columns, reads one
column without parsing the rest, and is readable from any language. Layout of ``results.h5``::

    prompt_index  int64 (N,)      index of the prompt in the prompt file
    sample_index  int64 (N,)      k of the image within its prompt
    seed          int64 (N,)      the image's generator seed
    prompt, tag, metadata, image  utf-8 strings (N,): prompt text, GenEval tag ("" if none), metadata JSON,
                                  image path relative to the eval directory
    scores/<reward>               float32 (N,)
    details/<reward>/<key>        float64 (N,) for numeric sub-scores (NaN = not applicable), else strings
    attrs: settings, checkpoint (JSON), higher_is_better (JSON {reward: bool})
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from eval.errors import EvalError
from mrlora.runstore import atomic_file

_STR_COLUMNS = ("prompt", "tag", "metadata", "image")


@dataclass
class Results:
    """Columns of the per-sample table (see the module docstring)."""

    prompt_index: np.ndarray
    sample_index: np.ndarray
    seed: np.ndarray
    prompt: list[str]
    tag: list[str]
    metadata: list[str]
    image: list[str]
    scores: dict[str, np.ndarray]
    details: dict[str, dict[str, np.ndarray]]
    higher_is_better: dict[str, bool] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    checkpoint: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.prompt_index.shape[0])

    @classmethod
    def empty(cls, rewards: dict[str, bool], settings: dict, checkpoint: dict) -> "Results":
        return cls(
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            np.zeros(0, np.int64),
            [],
            [],
            [],
            [],
            {r: np.zeros(0, np.float32) for r in rewards},
            {r: {} for r in rewards},
            dict(rewards),
            settings,
            checkpoint,
        )

    @staticmethod
    def concat(parts: list["Results"]) -> "Results":
        """Rows of every part, sorted by (prompt_index, sample_index); all parts must score the same columns."""
        if not parts:
            raise EvalError("no results to combine")
        first = parts[0]
        if any(set(p.scores) != set(first.scores) for p in parts):
            raise EvalError("shards scored different rewards; rerun them with the same --suite")
        parts = [p for p in parts if len(p)] or [first]
        first = parts[0]
        if any(set(p.details[r]) != set(first.details[r]) for p in parts for r in first.scores):
            raise EvalError("shards recorded different sub-scores; rerun them with the same code version")
        cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)  # noqa: E731
        out = Results(
            cat([p.prompt_index for p in parts]).astype(np.int64),
            cat([p.sample_index for p in parts]).astype(np.int64),
            cat([p.seed for p in parts]).astype(np.int64),
            [s for p in parts for s in p.prompt],
            [s for p in parts for s in p.tag],
            [s for p in parts for s in p.metadata],
            [s for p in parts for s in p.image],
            {r: cat([p.scores[r] for p in parts]).astype(np.float32) for r in first.scores},
            {r: {k: cat([p.details[r][k] for p in parts]) for k in first.details[r]} for r in first.scores},
            dict(first.higher_is_better),
            first.settings,
            first.checkpoint,
        )
        return out.sorted()

    def sorted(self) -> "Results":
        order = np.lexsort((self.sample_index, self.prompt_index))
        take = lambda xs: [xs[i] for i in order]  # noqa: E731
        return Results(
            self.prompt_index[order],
            self.sample_index[order],
            self.seed[order],
            take(self.prompt),
            take(self.tag),
            take(self.metadata),
            take(self.image),
            {r: v[order] for r, v in self.scores.items()},
            {r: {k: v[order] for k, v in d.items()} for r, d in self.details.items()},
            self.higher_is_better,
            self.settings,
            self.checkpoint,
        )


def _details_array(values) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind in "biuf":
        return arr.astype(np.float64)
    return np.asarray([str(v) for v in arr.tolist()], dtype=object)


def details_columns(details: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """A reward's details as stored: numeric (bool, int, float) as float64, anything else as strings."""
    return {k: _details_array(v) for k, v in details.items()}


def write_results(path: Path | str, res: Results) -> None:
    """Write ``res`` atomically (temporary file in the same directory, then rename)."""
    import h5py

    text = h5py.string_dtype("utf-8")
    with atomic_file(path) as tmp:
        with h5py.File(tmp, "w") as fh:
            fh.create_dataset("prompt_index", data=res.prompt_index.astype(np.int64))
            fh.create_dataset("sample_index", data=res.sample_index.astype(np.int64))
            fh.create_dataset("seed", data=res.seed.astype(np.int64))
            for name in _STR_COLUMNS:
                fh.create_dataset(name, data=np.asarray(getattr(res, name), dtype=object), dtype=text)
            scores = fh.create_group("scores")
            details = fh.create_group("details")
            for reward, values in res.scores.items():
                scores.create_dataset(reward, data=np.asarray(values, np.float32))
                group = details.create_group(reward)
                for key, col in res.details.get(reward, {}).items():
                    if col.dtype == object:
                        group.create_dataset(key, data=col, dtype=text)
                    else:
                        group.create_dataset(key, data=col.astype(np.float64))
            fh.attrs["settings"] = json.dumps(res.settings, sort_keys=True)
            fh.attrs["checkpoint"] = json.dumps(res.checkpoint, sort_keys=True)
            fh.attrs["higher_is_better"] = json.dumps(res.higher_is_better, sort_keys=True)


def read_results(path: Path | str) -> Results:
    import h5py

    path = Path(path)
    if not path.is_file():
        raise EvalError(f"{path} does not exist; run `python -m eval.aggregate --out {path.parent}` first")

    def strings(ds) -> list[str]:
        return [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in ds[()]]

    with h5py.File(path, "r") as fh:
        details: dict[str, dict[str, np.ndarray]] = {}
        for reward in fh["details"]:
            details[reward] = {}
            for key, ds in fh["details"][reward].items():
                details[reward][key] = (
                    np.asarray(strings(ds), dtype=object) if h5py.check_string_dtype(ds.dtype) else ds[()]
                )
        return Results(
            fh["prompt_index"][()],
            fh["sample_index"][()],
            fh["seed"][()],
            *(strings(fh[name]) for name in _STR_COLUMNS),
            {reward: fh["scores"][reward][()] for reward in fh["scores"]},
            details,
            json.loads(fh.attrs["higher_is_better"]),
            json.loads(fh.attrs["settings"]),
            json.loads(fh.attrs["checkpoint"]),
        )
