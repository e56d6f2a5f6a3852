"""Download every model the named rewards need into a (shared) Hugging Face cache, on the login node.

Compute nodes are often offline: run this once where there is internet, point the jobs' ``HF_HOME`` (or
``HF_HUB_CACHE``) at the same cache and set ``HF_HUB_OFFLINE=1``; each reward loader then finds its weights
or fails fast naming the missing model and this command.

    python -m rewards.prefetch --rewards pickscore geneval ocr [--cache DIR] [--dry-run]

Model ids come from the rewards' defaults, overridable per reward with ``--set reward.key=value`` (the same
keys as ``reward_models.<reward>`` in a config), e.g. ``--set pickscore.model=/my/PickScore``.
"""

from __future__ import annotations

import argparse
import os
import sys

from mrlora.cli import add_version_flag, main_entry
from rewards.base import RewardError, get_reward_spec
from rewards.hub import ModelRef

# Files transformers never reads: other frameworks' weights and open_clip duplicates (several GB for CLIP-H).
IGNORE_PATTERNS = [
    "*.msgpack",
    "*.h5",
    "*.ot",
    "*.onnx",
    "onnx/*",
    "flax_model*",
    "tf_model*",
    "rust_model*",
    "open_clip_*",
]
CONFIG_PATTERNS = ["*.json", "*.txt", "*.model"]


def models_to_fetch(rewards: list[str], overrides: dict[str, dict] | None = None) -> list[tuple[str, ModelRef]]:
    """(reward, model) pairs the rewards would load, without duplicates and without local directories."""
    overrides = overrides or {}
    seen: set[str] = set()
    plan = []
    for reward in rewards:
        spec = get_reward_spec(reward)
        refs = spec.models(**overrides.get(reward, {})) if spec.models else []
        for ref in refs:
            if ref.repo_id in seen or os.path.isdir(os.path.expanduser(ref.repo_id)):
                continue
            seen.add(ref.repo_id)
            plan.append((reward, ref))
    return plan


def _parse_overrides(items: list[str]) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for item in items:
        key, sep, value = item.partition("=")
        reward, dot, field = key.partition(".")
        if not sep or not dot or not reward or not field:
            raise RewardError(f"--set {item!r}: expected reward.key=value, e.g. pickscore.model=org/name")
        out.setdefault(reward, {})[field] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rewards.prefetch", description=__doc__.splitlines()[0])
    parser.add_argument("--rewards", nargs="+", required=True, help="reward names, e.g. pickscore geneval ocr")
    parser.add_argument("--cache", default=None, help="HF cache dir to fill (default: HF_HUB_CACHE / HF_HOME)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="REWARD.KEY=VALUE",
        help="override a reward kwarg that names a model (repeatable)",
    )
    parser.add_argument("--dry-run", action="store_true", help="print the models that would be downloaded")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    plan = models_to_fetch(args.rewards, _parse_overrides(args.overrides))
    if not plan:
        print("nothing to download: the named rewards need no hub models")
        return 0
    for reward, ref in plan:
        print(f"{reward:12s} {ref.purpose:22s} {ref.repo_id}{'' if ref.weights else '  (configs only)'}")
    if args.dry_run:
        return 0
    from huggingface_hub import snapshot_download

    failed = []
    for _reward, ref in plan:
        try:
            if ref.weights:
                path = snapshot_download(ref.repo_id, cache_dir=args.cache, ignore_patterns=IGNORE_PATTERNS)
            else:
                path = snapshot_download(ref.repo_id, cache_dir=args.cache, allow_patterns=CONFIG_PATTERNS)
            print(f"ok  {ref.repo_id} -> {path}", flush=True)
        except Exception as exc:  # report every failure, then exit non-zero
            failed.append(ref.repo_id)
            print(f"FAILED {ref.repo_id}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
    if failed:
        print(
            f"error: {len(failed)} model(s) failed: {', '.join(failed)}. Check network access and, for gated "
            "models, HF_TOKEN; then re-run (finished downloads are kept).",
            file=sys.stderr,
        )
        return 1
    cache = f"HF_HUB_CACHE={args.cache}" if args.cache else "the same HF_HOME"
    print(f"done; on compute nodes set HF_HUB_OFFLINE=1 and {cache}")
    return 0


if __name__ == "__main__":
    main_entry(main, prog="rewards.prefetch")
