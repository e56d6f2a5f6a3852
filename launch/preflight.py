"""What the login node checks before a run is created or submitted: can every job find what it will read?

Why: a missing model directory, an empty prompt file or a reward model missing from the offline cache is
otherwise found inside the job, on Slurm after queueing for the GPUs. Everything here is cheap and torch-free:
paths are looked at, prompt sources are read with the loader the jobs use (``rewards.prompts``), hub models
are looked up in the local Hugging Face cache only when the jobs cannot download (``HF_HUB_OFFLINE=1``), with
the helpers the jobs resolve them with (``rewards.hub``). "The jobs" means their environment: a cluster
profile's ``[env]`` (typically ``HF_HUB_OFFLINE=1`` and a shared ``HF_HOME``) applies to the checks as it will to
the jobs, so a login node with internet still finds what the offline compute nodes would miss. Each problem is
one ``LaunchError`` naming the thing and the fix; nothing has been written when it is raised.

``absolute_paths`` also rewrites relative prompt files and model directories as absolute paths, so run.json
means the same files whichever directory a resume or a job starts from.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Mapping

from launch.runs import LaunchError

# model.pretrained values that are built or named, not paths
_BUILT_PREFIX = "tiny:"
# the jobs' variables that decide where and whether Hugging Face models are found
HF_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE")


@contextlib.contextmanager
def job_environment(env: Mapping[str, str]) -> Iterator[None]:
    """This process's HF variables as the jobs will have them (``env``: a profile's ``[env]``), then restored."""
    saved = {k: os.environ.get(k) for k in HF_ENV}
    os.environ.update({k: str(v) for k, v in env.items() if k in HF_ENV})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hub_cache_dir() -> str:
    """The hub cache the environment names (huggingface_hub fixes its default when first imported)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def _is_generated(prompt_spec: str) -> bool:
    return str(prompt_spec).startswith("gen:")


def _local_path(spec: str) -> Path | None:
    """``spec`` as a local path when it names one (exists, or is spelled like a path rather than a hub id)."""
    path = Path(os.path.expanduser(spec))
    if path.exists() or spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec:
        return path
    return None


def absolute_paths(cfg, only: set[str] | None = None) -> None:
    """Rewrite relative prompt files and a relative local model directory in ``cfg`` as absolute paths (of the
    dotted keys in ``only`` when given: on resume, the values given now, not those of an older run.json)."""
    for reward in list(cfg.prompts.keys()):
        spec = cfg.prompts[reward]
        if spec and not _is_generated(spec) and (only is None or f"prompts.{reward}" in only):
            cfg.prompts[reward] = str(Path(os.path.expanduser(spec)).absolute())
    spec = str(cfg.model.pretrained)
    local = _local_path(spec) if spec and not spec.startswith(_BUILT_PREFIX) else None
    if local is not None and local.exists() and (only is None or "model.pretrained" in only):
        cfg.model.pretrained = str(local.absolute())


def check_model(spec: str) -> None:
    """``model.pretrained`` names a diffusers model directory, a preset, a tiny model, or a hub id the jobs can
    get (under ``HF_HUB_OFFLINE=1``: one already in the local cache)."""
    from mrlora.models.loading import MODEL_PRESETS, hub_offline  # torch-free

    spec = MODEL_PRESETS.get(spec, spec)
    if spec.startswith(_BUILT_PREFIX):
        return
    local = _local_path(spec)
    if local is not None:
        if not local.is_dir():
            raise LaunchError(
                f"model.pretrained: {local} does not exist{' (or is not a directory)' if local.exists() else ''}. "
                f"Fix the path with --set model.pretrained=/path/to/diffusers-model, or give a hub id "
                f"(org/name)"
            )
        if not (local / "model_index.json").is_file():
            raise LaunchError(
                f"model.pretrained: {local} is not a diffusers model directory (no model_index.json); "
                f"point it at the directory from `save_pretrained` or `hf download`"
            )
        return
    if not hub_offline():
        return  # the job downloads it
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    if not isinstance(try_to_load_from_cache(spec, "model_index.json", cache_dir=cache), str):
        raise LaunchError(
            f"model.pretrained: hub model {spec!r} is not in the Hugging Face cache {cache} and "
            f"HF_HUB_OFFLINE=1 forbids the jobs to download it. On a node with internet run "
            f"`HF_HUB_CACHE={cache} hf download {spec}`, or set model.pretrained to a local directory"
        )


def check_prompts(cfg) -> None:
    """Every reward's prompt source loads and holds at least one prompt (the loader the jobs use)."""
    from rewards.base import RewardError
    from rewards.prompts import load_prompt_source

    for reward in cfg.rewards:
        spec = cfg.prompts[reward]
        try:
            items = load_prompt_source(spec, int(cfg.seed))
        except (RewardError, OSError, ValueError) as exc:
            raise LaunchError(
                f"prompts.{reward}: {exc}. Fix it with --set prompts.{reward}=<file, one prompt per "
                f"line (or GenEval .jsonl)> or gen:<kind>:<n>"
            ) from None
        if not items:
            raise LaunchError(f"prompts.{reward}: {spec} holds no prompts; give a file with one prompt per line")


def check_reward_models(cfg) -> None:
    """Under ``HF_HUB_OFFLINE=1`` every model a reward loads is in the local cache (``rewards.hub``)."""
    from rewards.base import RewardError, get_reward_spec
    from rewards.hub import hub_offline, resolve_model

    if not hub_offline():
        return
    for reward in cfg.rewards:
        kwargs = cfg.reward_models.get(reward)
        kwargs = kwargs.to_dict() if hasattr(kwargs, "to_dict") else dict(kwargs or {})
        try:
            spec = get_reward_spec(reward)
            for ref in spec.models(**kwargs) if spec.models else []:
                resolve_model(
                    ref.repo_id,
                    reward=reward,
                    purpose=ref.purpose,
                    cache_dir=kwargs.get("cache_dir") or hub_cache_dir(),
                )
        except RewardError as exc:
            raise LaunchError(str(exc)) from None


def preflight(cfg, job_env: Mapping[str, str] | None = None) -> None:
    """All checks, in the order a user would fix them; ``job_env``: what the jobs' environment adds to ours (a
    Slurm profile's ``[env]``)."""
    with job_environment(job_env or {}):
        if cfg.model.pretrained:
            check_model(str(cfg.model.pretrained))
        check_prompts(cfg)
        check_reward_models(cfg)
