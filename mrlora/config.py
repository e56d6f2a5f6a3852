"""Load, override, validate and freeze experiment configs.

Presets are ml_collections ``get_config()`` modules under ``configs/``. Users change them from the command line
with ``--set key.path=value``. The tree is locked, so an unknown key or a value of the wrong type is rejected
with the key named and the closest known keys suggested, before anything is planned or written. The frozen
form (a plain dict) goes into ``run.json`` so a resumed run uses exactly the config it started with.

This module is imported on login nodes: stdlib and ml_collections only.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib
import importlib.util
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable

import ml_collections

from mrlora.cli import UserError

log = logging.getLogger(__name__)

PRESETS = ("sd35m", "flux", "tiny-sd3", "tiny-flux")
# Maps keyed by reward name: a user adding a reward may create new keys here.
OPEN_MAPS = ("prompts", "reward_models", "per_reward")
DTYPES = ("fp32", "bf16", "fp16")
ARCHS = ("sd3", "flux")
MODES = ("parallel", "sequential")
MERGE_MODES = ("exact", "reference")
ADV_STD = ("group", "batch")
KL_FORMS = ("published", "transition")  # mrlora.grpo.kl_std: what the KL term divides by
EMA_SCHEDULES = ("published", "per_update")  # mrlora.ema.LoraEMA: when and how the EMA updates
RESERVED_REWARD_NAMES = ("merged", "rate", "logs")


class ConfigError(UserError, ValueError):
    """A config problem the user can fix; the message names the key and what to do."""


def _preset_module(preset: str):
    path = Path(preset)
    if path.suffix == ".py":
        if not path.is_file():
            raise ConfigError(f"config file {preset} does not exist")
        spec = importlib.util.spec_from_file_location(f"mrlora_user_config_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"config file {preset} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    name = preset.replace("-", "_")
    try:
        return importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"configs.{name}":
            raise
        hint = difflib.get_close_matches(preset, PRESETS, n=1)
        suggestion = f" Did you mean {hint[0]!r}?" if hint else ""
        raise ConfigError(
            f"unknown model preset {preset!r}.{suggestion} Known presets: {', '.join(PRESETS)}; "
            "or pass a path to a .py file with get_config()."
        ) from None


def _all_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_all_keys(value, path + "."))
    return keys


def _unknown_key(cfg: ml_collections.ConfigDict, key: str) -> ConfigError:
    close = difflib.get_close_matches(key, _all_keys(cfg), n=3, cutoff=0.6)
    hint = f" Closest known keys: {', '.join(close)}." if close else ""
    return ConfigError(f"unknown config key {key!r}.{hint} `--print-config` lists every key.")


# The spellings people type for a boolean on a command line.
BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _expected(current: Any) -> str:
    """What a value replacing ``current`` must look like, in the words of an error message."""
    if isinstance(current, bool):
        return "true or false (also yes/no, on/off, 1/0)"
    if isinstance(current, int):
        return "a whole number"
    if isinstance(current, float):
        return "a number (e.g. 3, 0.5, 1e-4)"
    if isinstance(current, str):
        return "text"
    if isinstance(current, (list, tuple)):
        return "a list, e.g. [a,b] or a,b"
    return type(current).__name__


def _unquote(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _split_items(text: str) -> list[str]:
    """The items of ``[a, b]`` or ``a,b`` (brackets optional; commas inside quotes do not split)."""
    text = text.strip()
    if text[:1] + text[-1:] in ("[]", "()"):
        text = text[1:-1]
    items, current, quote = [], "", ""
    for ch in text:
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ",":
            items.append(current)
            current = ""
            continue
        current += ch
    items.append(current)
    return [item.strip() for item in items if item.strip()] if len(items) > 1 or text.strip() else []


def _parse_scalar(key: str, text: str, like: Any) -> Any:
    """``text`` as a value of the type of ``like`` (the value it replaces); by its look when ``like`` is None."""
    text = text.strip()
    if isinstance(like, bool):
        word = _unquote(text).lower()
        if word in BOOL_WORDS:
            return BOOL_WORDS[word]
    elif isinstance(like, int):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = None
        if isinstance(value, float) and value.is_integer():
            value = int(value)  # 1e3
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(like, float):
        try:
            return float(_unquote(text))  # also nan / inf: validation refuses them where they make no sense
        except ValueError:
            pass
    elif isinstance(like, str):
        return _unquote(text)
    else:
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return _unquote(text)
    raise ConfigError(f"config key {key!r} expects {_expected(like)}, got {text!r}")


def _parse_value(raw: str, current: Any, key: str = "") -> Any:
    """Parse a command-line value into the type of the field it replaces.

    Lists accept Python syntax or the unquoted forms people type (``[to_q,to_k]``, ``to_q,to_k``, ``to_q``);
    each item takes the type of the list's current items, so ``weights=[1,1,nan]`` is a list of floats.
    """
    if isinstance(current, (list, tuple)):
        like = current[0] if current and all(type(v) is type(current[0]) for v in current) else None
        try:
            value = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            value = None
        if not isinstance(value, (list, tuple)):
            value = _split_items(raw)
        return [_parse_scalar(f"{key}[{i}]", v, like) if isinstance(v, str) else v for i, v in enumerate(value)]
    if current is None and raw.strip()[:1] + raw.strip()[-1:] == "[]":
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return [_parse_scalar(key, v, None) for v in _split_items(raw)]
    return _parse_scalar(key, raw, current)


def _coerce(key: str, value: Any, current: Any) -> Any:
    """Check ``value`` against the type of ``current``; return the value to store."""
    if current is None or isinstance(current, ml_collections.ConfigDict):
        return value
    if isinstance(value, str) and isinstance(current, (bool, int, float)):
        # typed on the command line into an open map (per_reward.<r>.train.ema=false): parse it as the field's type
        return _parse_scalar(key, value, current)
    if isinstance(current, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(current, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(current, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(current, str):
        if isinstance(value, str):
            return value
    elif isinstance(current, (list, tuple)):
        if isinstance(value, (str, int, float)):
            value = [value]
        if isinstance(value, (list, tuple)):
            if current and all(type(v) is type(current[0]) for v in current):
                return [_coerce(f"{key}[{i}]", v, current[0]) for i, v in enumerate(value)]
            return list(value)
    else:
        return value
    raise ConfigError(f"config key {key!r} expects {_expected(current)} (current value {current!r}), got {value!r}")


def set_value(cfg: ml_collections.ConfigDict, key: str, raw: Any, parse: bool = True) -> None:
    """Set ``key`` (dotted path) in ``cfg``; raise ConfigError for unknown keys or wrong types."""
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"malformed config key {key!r}")
    node = cfg
    open_map = parts[0] in OPEN_MAPS
    for depth, part in enumerate(parts[:-1]):
        if part not in node:
            if not (open_map and depth >= 1):
                raise _unknown_key(cfg, key)
            with node.unlocked():
                node[part] = ml_collections.ConfigDict()
        node = node[part]
        if not isinstance(node, ml_collections.ConfigDict):
            raise ConfigError(
                f"config key {'.'.join(parts[: depth + 1])!r} is a value, not a group: cannot set {key!r}"
            )
    leaf = parts[-1]
    if leaf not in node:
        if not (open_map and len(parts) >= 2):
            raise _unknown_key(cfg, key)
        value = _parse_value(raw, None, key) if parse and isinstance(raw, str) else raw
        with node.unlocked():
            node[leaf] = value
        return
    current = node[leaf]
    if isinstance(current, ml_collections.ConfigDict) and not open_map:
        raise ConfigError(
            f"config key {key!r} is a group; set one of its fields, e.g. {key}.{next(iter(current.keys()), 'x')}"
        )
    value = _parse_value(raw, current, key) if parse and isinstance(raw, str) else raw
    if isinstance(current, ml_collections.ConfigDict):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a mapping, got {value!r}")
        with node.unlocked():
            node[leaf] = ml_collections.ConfigDict(value)
        return
    node[leaf] = _coerce(key, value, current)


def parse_override(item: str) -> tuple[str, str]:
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.path=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    return key.strip(), raw.strip()


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Iterable[str]) -> ml_collections.ConfigDict:
    """Apply ``key=value`` overrides in order. Naming the rewards without naming weights means equal weights
    (one per reward), as ``--rewards`` does.

    Precedence, lowest first: the preset, the preset's ``per_reward`` values, the user's overrides in the order
    given. So a user's ``train.lr=1e-4`` applies to every expert: it also replaces a preset's per-reward
    ``train.lr`` (logged), and only the user's own ``per_reward.<reward>.train.lr`` is more specific.
    """
    keys = []
    for item in overrides:
        key, raw = parse_override(item)
        set_value(cfg, key, raw)
        keys.append(key)
        if key.split(".")[0] not in OPEN_MAPS:
            for reward, old in _drop_per_reward(cfg, key):
                log.warning(
                    "%s also replaces the per-reward value of %s (%r); to keep a value for one "
                    "reward, also set per_reward.%s.%s",
                    item,
                    reward,
                    old,
                    reward,
                    key,
                )
    if "rewards" in keys and "weights" not in keys:
        cfg.weights = [1.0] * len(cfg.rewards)
    return cfg


def _drop_per_reward(cfg: ml_collections.ConfigDict, key: str) -> list[tuple[str, Any]]:
    """Remove ``key`` (and anything under it) from every ``per_reward`` entry; return (reward, old value)."""
    dropped = []
    for reward in list(cfg.per_reward.keys()):
        node = cfg.per_reward[reward]
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.get(part) if isinstance(node, (dict, ml_collections.ConfigDict)) else None
            if node is None:
                break
        if node is None or not isinstance(node, (dict, ml_collections.ConfigDict)) or leaf not in node:
            continue
        old = node[leaf]
        if isinstance(node, ml_collections.ConfigDict):
            with node.unlocked():
                del node[leaf]
        else:
            del node[leaf]
        dropped.append((reward, old.to_dict() if isinstance(old, ml_collections.ConfigDict) else old))
    return dropped


def config_sources(overrides: Iterable[str]) -> dict[str, str]:
    """Which keys the user's overrides set, for ``--print-config``: ``{key: "command line"}``.

    A key under one of these is the command line's too; every other key is the preset's (:func:`format_config`).
    """
    named = [parse_override(item)[0] for item in overrides]
    sources: dict[str, str] = {}
    for key in named:
        sources[key] = "command line"
    if "rewards" in named and "weights" not in named:
        sources["weights"] = "command line (equal weights for --rewards)"
    return sources


def load_config(preset: str, overrides: Iterable[str] = ()) -> ml_collections.ConfigDict:
    """Build a preset, apply ``key=value`` overrides, validate, and return the locked config."""
    module = _preset_module(preset)
    cfg = module.get_config()
    cfg.lock()
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def config_to_dict(cfg: ml_collections.ConfigDict) -> dict:
    """The frozen, JSON-serialisable form stored in run.json."""
    return json.loads(cfg.to_json())


def config_from_dict(data: dict) -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict(copy.deepcopy(data))
    cfg.lock()
    return cfg


def _merge_into(cfg: ml_collections.ConfigDict, overrides: dict, prefix: str) -> None:
    for key, value in overrides.items():
        path = f"{prefix}{key}"
        if isinstance(value, (dict, ml_collections.ConfigDict)) and not (
            path.split(".")[0] in OPEN_MAPS and path.count(".") >= 1
        ):
            _merge_into(cfg, dict(value), path + ".")
        else:
            set_value(cfg, path, value, parse=False)


def config_for_reward(cfg: ml_collections.ConfigDict, reward: str) -> ml_collections.ConfigDict:
    """A copy of ``cfg`` with ``per_reward[reward]`` applied: what the expert for ``reward`` trains with."""
    out = config_from_dict(config_to_dict(cfg))
    overrides = cfg.per_reward.get(reward)
    if overrides:
        _merge_into(out, overrides.to_dict() if hasattr(overrides, "to_dict") else dict(overrides), "")
    return out


def run_reward_config(run_config: dict, reward: str) -> ml_collections.ConfigDict:
    """What the expert of ``reward`` (and its RaTE token) uses in a run: run.json's ``config`` with
    ``per_reward[reward]`` applied. A reward the run does not train is a ConfigError naming the run's rewards."""
    cfg = config_from_dict(run_config)
    if reward not in list(cfg.rewards):
        raise ConfigError(f"reward {reward!r} is not one of this run's rewards ({', '.join(cfg.rewards)})")
    return config_for_reward(cfg, reward)


def normalised_weights(weights: Iterable[float], allow_negative: bool = False) -> list[float]:
    """Reduce weights normalised to sum 1 (by absolute sum when negative weights are allowed)."""
    weights = [float(w) for w in weights]
    if not weights:
        raise ConfigError("no merge weights given")
    if any(not math.isfinite(w) for w in weights):
        raise ConfigError(f"merge weights must be finite numbers, got {weights}")
    if not allow_negative and any(w < 0 for w in weights):
        raise ConfigError(
            f"negative merge weight in {weights}. Weights must be >= 0; for task-arithmetic style negation "
            "set mapreduce.allow_negative_weights=True (python -m launch.mapreduce: --set "
            "mapreduce.allow_negative_weights=True; python -m mrlora.merge: --allow-negative-weights)."
        )
    total = sum(abs(w) for w in weights) if allow_negative else sum(weights)
    if total == 0:
        raise ConfigError(f"merge weights {weights} are all zero; give at least one positive weight")
    return [w / total for w in weights]


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Cross-field checks that types alone cannot express. Raises ConfigError naming the key."""

    def need(cond: bool, key: str, msg: str) -> None:
        if not cond:
            raise ConfigError(f"{key}: {msg}")

    need(cfg.model.arch in ARCHS, "model.arch", f"must be one of {ARCHS}, got {cfg.model.arch!r}")
    need(cfg.model.dtype in DTYPES, "model.dtype", f"must be one of {DTYPES}, got {cfg.model.dtype!r}")
    need(bool(cfg.model.pretrained), "model.pretrained", "is empty; give a local model dir or a hub id")
    need(cfg.lora.rank >= 1, "lora.rank", "must be >= 1")
    need(cfg.lora.alpha > 0, "lora.alpha", "must be > 0")
    need(len(cfg.lora.target_modules) > 0, "lora.target_modules", "needs at least one module name")
    need(cfg.sample.num_steps >= 1, "sample.num_steps", "must be >= 1")
    need(cfg.sample.eval_num_steps >= 1, "sample.eval_num_steps", "must be >= 1")
    need(cfg.sample.group_size >= 2, "sample.group_size", "must be >= 2 (advantages compare samples of a prompt)")
    need(cfg.sample.prompts_per_step >= 1, "sample.prompts_per_step", "must be >= 1")
    need(cfg.sample.batch_size >= 1, "sample.batch_size", "must be >= 1")
    need(
        cfg.sample.resolution % 16 == 0 and cfg.sample.resolution > 0,
        "sample.resolution",
        "must be a positive multiple of 16",
    )
    need(0 <= cfg.sample.noise_level <= 2, "sample.noise_level", "must be in [0, 2]")
    need(cfg.train.steps >= 1, "train.steps", "must be >= 1")
    need(cfg.train.lr > 0, "train.lr", "must be > 0")
    need(0 < cfg.train.timestep_fraction <= 1, "train.timestep_fraction", "must be in (0, 1]")
    need(cfg.train.clip_range > 0, "train.clip_range", "must be > 0")
    need(cfg.train.beta >= 0, "train.beta", "must be >= 0")
    need(cfg.train.micro_batch >= 1, "train.micro_batch", "must be >= 1")
    need(cfg.train.checkpoint_every >= 1, "train.checkpoint_every", "must be >= 1")
    _check_rounds(cfg, "")
    need(cfg.train.ema_every >= 1, "train.ema_every", "must be >= 1")
    need(0 <= cfg.train.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
    need(cfg.train.adv_std in ADV_STD, "train.adv_std", f"must be one of {ADV_STD}")
    need(
        cfg.train.ema_schedule in EMA_SCHEDULES,
        "train.ema_schedule",
        f"must be one of {EMA_SCHEDULES} ('published': Flow-GRPO's cadence, see docs/recipe.md), "
        f"got {cfg.train.ema_schedule!r}",
    )
    need(
        cfg.train.kl_form in KL_FORMS,
        "train.kl_form",
        f"must be one of {KL_FORMS} ('published': Flow-GRPO's form, see docs/recipe.md), got {cfg.train.kl_form!r}",
    )
    need(cfg.train.deepspeed in ("", "zero2"), "train.deepspeed", "must be '' or 'zero2'")
    need(cfg.mapreduce.cycles >= 1, "mapreduce.cycles", "must be >= 1")
    need(cfg.mapreduce.mode in MODES, "mapreduce.mode", f"must be one of {MODES}")
    need(cfg.mapreduce.merge_mode in MERGE_MODES, "mapreduce.merge_mode", f"must be one of {MERGE_MODES}")
    # .get: run.json of runs started before these keys existed lacks them (the merge job uses the same defaults)
    need(
        cfg.mapreduce.get("materialise_every", 1) >= 0,
        "mapreduce.materialise_every",
        "must be >= 0 (materialise when K updates would be folded; 0 never)",
    )
    need(cfg.mapreduce.get("keep_bases", 1) >= 1, "mapreduce.keep_bases", "must be >= 1 (the newest base is kept)")
    rate_cycles = list(cfg.mapreduce.get("rate_after_cycles", None) or [])
    need(
        all(isinstance(c, int) and not isinstance(c, bool) for c in rate_cycles),
        "mapreduce.rate_after_cycles",
        f"must be a list of cycle numbers, got {rate_cycles!r}",
    )
    outside = [c for c in rate_cycles if not 1 <= c <= cfg.mapreduce.cycles]
    need(
        not outside,
        "mapreduce.rate_after_cycles",
        f"cycle(s) {outside} are outside the run's cycles 1..{cfg.mapreduce.cycles}; choose cycles in that range "
        f"(or raise mapreduce.cycles)",
    )
    need(cfg.rate.steps >= 1, "rate.steps", "must be >= 1")
    need(cfg.rate.lr > 0, "rate.lr", "must be > 0")
    need(cfg.rate.logit_std > 0, "rate.logit_std", "must be > 0")

    rewards = list(cfg.rewards)
    need(len(rewards) >= 1, "rewards", "name at least one reward")
    need(len(set(rewards)) == len(rewards), "rewards", f"names a reward twice: {rewards}")
    for reward in rewards:
        # reward names become directory and job names: cycle_XXXX/<reward>/, mrlora-<ts>-c0001-<reward>
        need(
            reward not in RESERVED_REWARD_NAMES and not reward.startswith("rate-"),
            "rewards",
            f"{reward!r} is reserved for the run directory's own entries ({', '.join(RESERVED_REWARD_NAMES)}); "
            "register the reward under another name",
        )
        need(
            bool(reward) and "/" not in reward and not reward.startswith("."),
            "rewards",
            f"{reward!r} cannot be a directory name; use letters, digits, '_' or '-'",
        )
    need(
        len(cfg.weights) == len(rewards),
        "weights",
        f"has {len(cfg.weights)} values for {len(rewards)} rewards {rewards}; give one weight per reward",
    )
    try:
        normalised_weights(cfg.weights, cfg.mapreduce.allow_negative_weights)
    except ConfigError as exc:
        raise ConfigError(f"weights: {exc}") from None
    for reward in rewards:
        need(
            reward in cfg.prompts and bool(cfg.prompts[reward]),
            f"prompts.{reward}",
            f"no prompt source for reward {reward!r}; set prompts.{reward}=<file or gen:kind:n>",
        )
    known = _known_rewards()
    if known is not None:
        for reward in rewards:
            if ":" in reward:  # "package.module:factory" user rewards are resolved when the job builds them
                continue
            need(reward in known, "rewards", f"unknown reward {reward!r}; known rewards: {', '.join(sorted(known))}")
    for reward in cfg.per_reward:
        try:
            probe = config_for_reward(cfg, reward)
        except ConfigError as exc:
            raise ConfigError(f"per_reward.{reward}: {exc}") from None
        _check_rounds(probe, f"per_reward.{reward} gives ")


def _check_rounds(cfg: ml_collections.ConfigDict, context: str) -> None:
    """Checkpoints and preemption stops happen only at the end of a sampling round (so a resume never needs the
    round's samples): the step counts must be whole rounds."""
    per_round = cfg.train.updates_per_round
    if per_round < 1:
        raise ConfigError(f"{context}train.updates_per_round: must be >= 1, got {per_round}")
    for key in ("steps", "checkpoint_every"):
        value = cfg.train[key]
        if value % per_round:
            raise ConfigError(
                f"{context}train.{key}={value} is not a multiple of train.updates_per_round={per_round} "
                f"(optimizer steps per sampling round; checkpoints fall on round ends): set train.{key} to a "
                f"multiple of {per_round}, or train.updates_per_round=1"
            )


def _known_rewards() -> set[str] | None:
    """Names in the reward registry, or None when the rewards package is not importable here."""
    try:
        from rewards import available_rewards  # torch-free by contract
    except ImportError:
        return None
    return set(available_rewards())


def format_config(cfg: ml_collections.ConfigDict, sources: dict[str, str] | None = None) -> str:
    """Every key with its value, one per line, for ``--print-config``.

    With ``sources`` (:func:`config_sources`) each line also says where the value came from: the preset, the
    command line, or, under ``per_reward``, the preset's per-reward value that the expert of that reward gets
    instead of the top-level one.
    """
    lines = []

    def origin(path: str) -> str:
        if sources is None:
            return ""
        parts = path.split(".")
        for i in range(len(parts), 0, -1):
            if ".".join(parts[:i]) in sources:
                return f"  # {sources['.'.join(parts[:i])]}"
        if parts[0] == "per_reward" and len(parts) > 2:
            return f"  # preset, per-reward: the {parts[1]} expert uses this instead of {'.'.join(parts[2:])}"
        return "  # preset"

    def walk(node, prefix):
        for key, value in node.items():
            if isinstance(value, ml_collections.ConfigDict):
                walk(value, f"{prefix}{key}.")
            else:
                lines.append(f"{prefix}{key} = {value!r}{origin(prefix + key)}")

    walk(cfg, "")
    return "\n".join(lines)
