"""Which rewards an eval suite means, and building them before any image is generated.

Why build first: a reward model missing on an offline compute node must fail the job in seconds, before
minutes of generation, and before anything is written to the output directory.
"""

from __future__ import annotations

from typing import Any

from eval.errors import EvalError

SUITES: dict[str, tuple[str, ...]] = {
    "geneval": ("geneval",),
    "ocr": ("ocr",),
    "pickscore": ("pickscore",),
    "all": ("geneval", "ocr", "pickscore"),
}


def suite_rewards(suite: str) -> list[str]:
    """Reward names of ``suite``: a suite name, any registered reward, or a comma-separated list of those."""
    from rewards import available_rewards
    from rewards.base import UnknownRewardError, get_reward_spec

    names: list[str] = []
    for part in (p.strip() for p in suite.split(",")):
        if not part:
            continue
        if part in SUITES:
            names.extend(SUITES[part])
            continue
        try:
            get_reward_spec(part)
        except UnknownRewardError as exc:
            raise EvalError(
                f"--suite {suite!r}: {part!r} is neither a suite ({', '.join(SUITES)}) nor a reward. {exc}"
            ) from None
        names.append(part)
    if not names:
        raise EvalError(
            f"--suite {suite!r} names no reward; use {', '.join(SUITES)} or one of {', '.join(available_rewards())}"
        )
    return list(dict.fromkeys(names))


def reward_kwargs(config: dict, name: str) -> dict[str, Any]:
    """The factory kwargs for ``name``: the config's ``reward_models.<name>`` (empty if absent), less the
    training-only ones (e.g. GenEval's JPEG compression: official eval scores the images as generated)."""
    from rewards.base import eval_kwargs

    return eval_kwargs(name, dict((config.get("reward_models") or {}).get(name) or {}))


def build_rewards(names: list[str], config: dict) -> dict[str, Any]:
    """Build every reward of the suite, turning missing models and bad kwargs into an EvalError."""
    from rewards import build_reward
    from rewards.base import RewardError

    built = {}
    for name in names:
        try:
            built[name] = build_reward(name, **reward_kwargs(config, name))
        except RewardError as exc:
            raise EvalError(f"reward {name!r} cannot be built: {exc}") from None
        except (OSError, ImportError) as exc:
            raise EvalError(
                f"reward {name!r} cannot be built: {exc}. If its model is not downloaded, run "
                f"`python -m rewards.prefetch --rewards {name}` on a node with internet, or set reward_models.{name}.* to "
                "a local path with --set"
            ) from None
    return built
