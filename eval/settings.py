"""The settings that define an eval, recorded in ``OUT/eval.json`` and in every shard's marker.

Why record them: shards run as independent array tasks, possibly days apart after a rerun. Aggregation only
combines shards whose settings are identical, and a second eval pointed at the same ``--out`` with another
checkpoint, prompt file or sampler setting is refused instead of mixing results.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from eval.errors import EvalError
from eval.rate import comparable as comparable_mix
from mrlora.runstore import atomic_write_json, read_json

EVAL_JSON = "eval.json"


@dataclass(frozen=True)
class EvalSettings:
    checkpoint: dict
    rewards: tuple[str, ...]
    prompts: str
    prompts_sha256: str
    num_prompts: int
    samples: int
    batch_size: int
    seed: int
    steps: int
    guidance_scale: float
    resolution: int
    max_sequence_length: int
    dtype: str
    shards: int
    rate: dict | None = None  # RaTE token mix (eval.rate.RateMix.to_dict()), None for a plain eval

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rewards"] = list(self.rewards)
        return out

    @classmethod
    def from_dict(cls, data: dict) -> "EvalSettings":
        return cls(**{**data, "rewards": tuple(data["rewards"])})


def _comparable(settings: EvalSettings) -> dict:
    """Settings as compared: the checkpoint by what it resolved to, not how it was spelled (relative paths), and
    token files by content."""
    out = settings.to_dict()
    out["checkpoint"] = {k: v for k, v in out["checkpoint"].items() if k != "spec"}
    out["rate"] = comparable_mix(out.get("rate"))
    return out


def _differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def record_settings(out: Path, settings: EvalSettings) -> None:
    """Write ``OUT/eval.json`` or check that the one there matches (concurrent shards write identical files)."""
    existing = read_settings(out)
    if existing is not None:
        check_same(out, existing, settings)
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / EVAL_JSON, settings.to_dict())


def read_settings(out: Path) -> EvalSettings | None:
    path = Path(out) / EVAL_JSON
    if not path.is_file():
        return None
    try:
        return EvalSettings.from_dict(read_json(path))
    except (ValueError, TypeError, KeyError) as exc:
        raise EvalError(f"{path} is corrupt or from another mrlora version ({exc}); use a fresh --out") from None


def check_same(out: Path, existing: EvalSettings, settings: EvalSettings) -> None:
    diffs = _differences(_comparable(existing), _comparable(settings))
    if diffs:
        raise EvalError(
            f"{out} already holds an eval with other settings ({'; '.join(diffs)}). Use another --out, or delete "
            f"{out} to start over"
        )
