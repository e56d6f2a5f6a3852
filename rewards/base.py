"""The reward interface and the registry that names rewards by string.

Why a registry: configs name rewards as strings (``rewards = ["geneval", "pickscore", "ocr"]``) and config
validation runs on login nodes that must not import torch, so this module is torch-free. A factory is only
called (and only then imports its heavy dependencies) when a job actually builds the reward.

Name resolution in :func:`build_reward`, in order:

1. a name registered with :func:`register_reward` (the built-ins, plus anything a user module registered);
2. ``"package.module:factory"`` -- an importable module path, so a config can name a user's reward without
   installing anything;
3. an installed distribution's entry point in the group ``mrlora.rewards``.

The factory receives the reward's config dict (``reward_models.<name>``) as keyword arguments and returns a
:class:`Reward`.
"""

from __future__ import annotations

import abc
import difflib
import importlib
import importlib.metadata
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from mrlora.cli import UserError

ENTRY_POINT_GROUP = "mrlora.rewards"


class RewardError(UserError, RuntimeError):
    """A reward could not be built or could not score its inputs; the message says what to do next."""


class UnknownRewardError(RewardError, KeyError):
    """No reward of that name is registered, importable or installed as an entry point."""

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return str(self.args[0]) if self.args else ""


class MissingModelError(RewardError):
    """A model a reward needs is not available locally (typically under HF_HUB_OFFLINE=1)."""


@dataclass(frozen=True)
class RewardOutput:
    """Scores for a batch of N images.

    ``scores`` is the value training maximises / eval reports, one float32 per image. ``details`` holds named
    per-image sub-scores of the same length (e.g. GenEval's ``correct`` and ``strict_correct``, OCR's
    ``distance``); NaN marks "not applicable" for an image.
    """

    scores: np.ndarray
    details: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        scores = np.asarray(self.scores, dtype=np.float32).reshape(-1)
        object.__setattr__(self, "scores", scores)
        details = {}
        for key, value in self.details.items():
            arr = np.asarray(value)
            if arr.shape[:1] != scores.shape:
                raise ValueError(
                    f"RewardOutput.details[{key!r}] has {arr.shape[:1]} entries, scores has {scores.shape[0]}"
                )
            details[key] = arr
        object.__setattr__(self, "details", details)

    def __len__(self) -> int:
        return int(self.scores.shape[0])


class Reward(abc.ABC):
    """One reward: ``reward(images, prompts, metadata) -> RewardOutput``.

    Subclasses set ``name`` and ``higher_is_better`` and implement :meth:`score`. ``__call__`` checks the
    batch is consistent (one prompt and one metadata dict per image; ``metadata=None`` means empty dicts) and
    that the output has one score per image, so every reward fails the same clear way.
    """

    name: str = "reward"
    higher_is_better: bool = True

    @abc.abstractmethod
    def score(self, images: list, prompts: list[str], metadata: list[dict]) -> RewardOutput:
        """Score ``len(images)`` images; the inputs are already validated."""

    def __call__(
        self, images: Sequence, prompts: Sequence[str], metadata: Sequence[dict] | None = None
    ) -> RewardOutput:
        images = list(images)
        prompts = list(prompts)
        metadata = [{} for _ in images] if metadata is None else [dict(m or {}) for m in metadata]
        if not (len(images) == len(prompts) == len(metadata)):
            raise RewardError(
                f"reward {self.name!r}: got {len(images)} images, {len(prompts)} prompts and "
                f"{len(metadata)} metadata dicts; pass one prompt and one metadata dict per image"
            )
        if not images:
            return RewardOutput(scores=np.zeros((0,), np.float32))
        out = self.score(images, prompts, metadata)
        if len(out) != len(images):
            raise RewardError(f"reward {self.name!r} returned {len(out)} scores for {len(images)} images")
        return out

    def __repr__(self) -> str:
        return f"<{type(self).__name__} name={self.name!r}>"


RewardFactory = Callable[..., Reward]
ModelsFn = Callable[..., list]


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its factory and (for prefetch) the models it would load for given kwargs.

    ``train_only`` names factory kwargs that shape the training signal only (e.g. GenEval's JPEG compression
    before scoring, as published training does); eval builds the reward without them (:func:`eval_kwargs`).
    """

    name: str
    factory: RewardFactory
    models: ModelsFn | None = None
    train_only: tuple[str, ...] = ()


_REGISTRY: dict[str, RewardSpec] = {}


def register_reward(
    name: str, *, models: ModelsFn | None = None, train_only: Sequence[str] = ()
) -> Callable[[RewardFactory], RewardFactory]:
    """Decorator registering ``factory(**kwargs) -> Reward`` under ``name``.

    ``models(**kwargs) -> list[ModelRef]`` (optional) lists the Hugging Face models the reward would load
    with those kwargs; ``python -m rewards.prefetch`` downloads them. ``train_only`` lists kwargs that eval
    drops (see :class:`RewardSpec`). Keep the factory's heavy imports inside its body so registering stays cheap.
    """
    if not name or not isinstance(name, str) or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def decorator(factory: RewardFactory) -> RewardFactory:
        existing = _REGISTRY.get(name)
        if existing is not None and existing.factory is not factory:
            raise ValueError(f"reward {name!r} is already registered by {existing.factory.__module__}")
        _REGISTRY[name] = RewardSpec(name=name, factory=factory, models=models, train_only=tuple(train_only))
        return factory

    return decorator


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    try:
        return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}
    except Exception:  # a broken distribution must not break config validation
        return {}


def available_rewards() -> list[str]:
    """Registered reward names plus installed ``mrlora.rewards`` entry points, sorted."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _load_object(spec: str) -> Any:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UnknownRewardError(f"reward {spec!r}: a module path must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UnknownRewardError(
            f"reward {spec!r}: cannot import module {module_name!r} ({exc}); is it on PYTHONPATH?"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UnknownRewardError(f"reward {spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def get_reward_spec(name: str) -> RewardSpec:
    """Resolve ``name`` (registered name, ``module:factory`` path, or entry point) to a :class:`RewardSpec`."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if ":" in name:
        factory = _load_object(name)
        if name in _REGISTRY:  # importing the module may have registered it under its path
            return _REGISTRY[name]
        return RewardSpec(name=name, factory=factory, models=getattr(factory, "reward_models", None))
    eps = _entry_points()
    if name in eps:
        try:
            factory = eps[name].load()
        except Exception as exc:
            raise UnknownRewardError(
                f"reward {name!r}: entry point {eps[name].value!r} in group {ENTRY_POINT_GROUP!r} failed to load: {exc}"
            ) from exc
        return RewardSpec(name=name, factory=factory, models=getattr(factory, "reward_models", None))
    known = available_rewards()
    close = difflib.get_close_matches(name, known, n=3)
    hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
    raise UnknownRewardError(
        f"unknown reward {name!r}.{hint} Known rewards: {', '.join(known)}. A custom reward can also be named "
        f"as 'package.module:factory' or installed as an entry point in group {ENTRY_POINT_GROUP!r}."
    )


def eval_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """``kwargs`` without the reward's training-only ones: what eval builds ``name`` with."""
    drop = set(get_reward_spec(name).train_only)
    return {k: v for k, v in kwargs.items() if k not in drop}


def build_reward(name: str, **kwargs: Any) -> Reward:
    """Build the reward called ``name`` with its config kwargs (``reward_models.<name>``)."""
    spec = get_reward_spec(name)
    try:
        inspect.signature(spec.factory).bind(**kwargs)
    except TypeError as exc:
        raise RewardError(
            f"reward {name!r}: bad config kwargs {sorted(kwargs)}: {exc}. Check reward_models.{name} in your config."
        ) from exc
    except ValueError:  # builtins without a signature: let the call itself complain
        pass
    reward = spec.factory(**kwargs)
    if not isinstance(reward, Reward):
        raise RewardError(
            f"reward {name!r}: factory {getattr(spec.factory, '__qualname__', spec.factory)!r} returned "
            f"{type(reward).__name__}, expected a subclass of rewards.Reward"
        )
    return reward
