"""The one way every job turns a model spec into files on disk and a diffusers pipeline.

A spec is a preset name (``sd35m``, ``flux``, ``tiny-sd3``, ``tiny-flux``), a local model directory, a hub id
(``org/name``) or ``tiny:sd3`` / ``tiny:flux``. Compute nodes usually have no internet: hub ids honour
``HF_HUB_OFFLINE`` and a missing model says exactly how to pre-download it on the login node, instead of a
stack trace from deep inside huggingface_hub. Tiny models are built on first use into the mrlora cache
(``$MRLORA_CACHE``, default ``~/.cache/mrlora``); many array tasks may ask at once, so one process builds under
an O_EXCL lock file while the others wait, and the build's atomic rename keeps the result correct even if a
lock goes stale.

Torch and diffusers are imported inside the functions that need them.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
from pathlib import Path
from typing import Any

from mrlora.models.errors import ModelNotFoundError, TinyBuildError, UnknownArchError
from mrlora.models.tiny import TINY_ARCHS, TINY_VERSION, build_tiny, process_group_rank, read_marker

MODEL_PRESETS: dict[str, str] = {
    "sd35m": "stabilityai/stable-diffusion-3.5-medium",
    "flux": "black-forest-labs/FLUX.1-dev",
    "tiny-sd3": "tiny:sd3",
    "tiny-flux": "tiny:flux",
}

PIPELINE_CLASSES: dict[str, str] = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}

DTYPES: dict[str, str] = {
    "fp32": "float32",
    "float32": "float32",
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
}

# Files a diffusers pipeline needs; skips single-file checkpoints at the repo root (FLUX.1-dev's 23 GB
# flux1-dev.safetensors) and SD3.5's ComfyUI text_encoders/ folder, which would double the download.
HUB_ALLOW_PATTERNS = ["model_index.json", "*/*.json", "*/*.safetensors", "*/*.txt", "*/*.model"]
HUB_IGNORE_PATTERNS = ["text_encoders/*"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TINY_LOCK_TIMEOUT_S = 600.0  # a tiny build takes ~10 s; a lock older than this belongs to a dead builder
_TINY_POLL_S = 0.5


def cache_root() -> Path:
    """Where mrlora keeps built tiny models: ``$MRLORA_CACHE`` or ``~/.cache/mrlora``."""
    env = os.environ.get("MRLORA_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "mrlora"


def tiny_cache_dir(arch: str) -> Path:
    return cache_root() / f"tiny-{arch}-v{TINY_VERSION}"


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (read at call time: jobs may set it after importing huggingface_hub)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().lower() in {"1", "true", "yes", "on"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except ImportError:
        return False


def _download_hint(repo_id: str) -> str:
    return (
        f"pre-download it on the login node with `huggingface-cli download {repo_id}` (or `hf download "
        f"{repo_id}`) into the shared HF cache (HF_HOME), or set the model to a local directory"
    )


def resolve_model(spec: str) -> str:
    """A local directory holding the diffusers model named by ``spec`` (building or fetching it if needed)."""
    spec = str(spec).strip()
    if not spec:
        raise ModelNotFoundError(
            f"empty model spec; use a preset ({', '.join(MODEL_PRESETS)}), a local directory, a hub id or tiny:<arch>"
        )
    local = Path(spec).expanduser()
    if local.is_dir():
        return str(local.absolute())
    if spec in MODEL_PRESETS:
        return resolve_model(MODEL_PRESETS[spec])
    if spec.startswith("tiny:"):
        arch = spec.split(":", 1)[1]
        if arch not in TINY_ARCHS:
            raise UnknownArchError(
                f"unknown tiny model {spec!r}; use one of {', '.join('tiny:' + a for a in TINY_ARCHS)}"
            )
        return str(ensure_tiny(arch))
    if _HUB_ID.match(spec) and not local.exists():
        return _resolve_hub(spec)
    raise ModelNotFoundError(
        f"model path {str(local.absolute())!r} does not exist (or is not a directory); set it to a diffusers model "
        f"directory, a hub id (org/name), a preset ({', '.join(MODEL_PRESETS)}) or tiny:sd3 / tiny:flux"
    )


def _resolve_hub(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    offline = hub_offline()
    try:
        return snapshot_download(
            repo_id,
            allow_patterns=HUB_ALLOW_PATTERNS,
            ignore_patterns=HUB_IGNORE_PATTERNS,
            local_files_only=offline,
        )
    except GatedRepoError as exc:
        raise ModelNotFoundError(
            f"hub model {repo_id!r} is gated: accept its licence on huggingface.co, run `huggingface-cli login` "
            f"on the login node, then {_download_hint(repo_id)}"
        ) from exc
    except RepositoryNotFoundError as exc:
        raise ModelNotFoundError(
            f"hub model {repo_id!r} does not exist (or needs a login); check the id, or {_download_hint(repo_id)}"
        ) from exc
    except LocalEntryNotFoundError as exc:
        why = (
            "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache"
            if offline
            else ("it is not in the local Hugging Face cache and the hub is unreachable")
        )
        raise ModelNotFoundError(f"hub model {repo_id!r} is not available: {why}; {_download_hint(repo_id)}") from exc


def ensure_tiny(arch: str, seed: int = 0) -> Path:
    """The cached tiny ``arch`` model, built once per cache even when many processes ask at the same moment."""
    out = tiny_cache_dir(arch)
    if read_marker(out) is not None:
        return build_tiny(arch, out, seed=seed)  # validates arch/seed/version, does no work
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = out.with_name(out.name + ".lock")
    deadline = time.monotonic() + _TINY_LOCK_TIMEOUT_S
    builder = process_group_rank() == 0  # in a process group only rank 0 can write a complete build
    while True:
        if builder and _try_lock(lock):
            try:
                return build_tiny(arch, out, seed=seed, replace_incomplete=True)
            finally:
                lock.unlink(missing_ok=True)
        if read_marker(out) is not None:
            return build_tiny(arch, out, seed=seed)
        if builder and _lock_is_stale(lock):
            _break_lock(lock)  # its holder died: take over (retry the O_EXCL create at once)
            continue
        if time.monotonic() > deadline and not builder:
            raise TinyBuildError(
                f"waited {_TINY_LOCK_TIMEOUT_S:.0f} s for rank 0 to build {out}; is rank 0 "
                f"loading the same tiny:{arch} model?"
            )
        if time.monotonic() > deadline:
            # The holder is alive but hung: building anyway is safe, the atomic rename decides the winner.
            return build_tiny(arch, out, seed=seed, replace_incomplete=True)
        time.sleep(_TINY_POLL_S)


def _try_lock(lock: Path) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"host": socket.gethostname(), "pid": os.getpid(), "time": time.time()}, f)
    return True


def _break_lock(lock: Path) -> None:
    """Remove a stale lock; renaming first means only one of several waiters deletes it."""
    grave = lock.with_name(f"{lock.name}.stale-{os.getpid()}")
    try:
        os.rename(lock, grave)
    except FileNotFoundError:
        return
    grave.unlink(missing_ok=True)


def _lock_is_stale(lock: Path) -> bool:
    """A lock is stale if its holder on this host is gone, or it is older than the build timeout."""
    try:
        info = json.loads(lock.read_text())
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False  # released meanwhile; the caller retries
    except ValueError:
        return _age(lock) > 5.0  # being written right now, or garbage left by a crash
    if info.get("host") == socket.gethostname():
        from mrlora.runstore import pid_alive

        try:
            if not pid_alive(int(info.get("pid", -1))):  # a zombie holder counts as gone
                return True
        except (ValueError, OverflowError):
            pass
    return age > _TINY_LOCK_TIMEOUT_S


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def detect_arch(path: str | os.PathLike[str]) -> str:
    """``sd3`` or ``flux`` from the ``_class_name`` in ``model_index.json``."""
    index = Path(path) / "model_index.json"
    try:
        class_name = json.loads(index.read_text()).get("_class_name", "")
    except FileNotFoundError:
        raise ModelNotFoundError(
            f"{Path(path)} is not a diffusers model directory (no model_index.json); point the model at the "
            f"directory that contains model_index.json"
        ) from None
    except ValueError as exc:
        raise ModelNotFoundError(f"{index} is not valid JSON ({exc}); re-download the model") from exc
    if class_name.startswith("StableDiffusion3"):
        return "sd3"
    if class_name.startswith("Flux"):
        return "flux"
    raise UnknownArchError(
        f"{Path(path)} holds a {class_name or 'unknown'} pipeline; mrlora supports StableDiffusion3Pipeline (sd3) "
        f"and FluxPipeline (flux)"
    )


def torch_dtype(dtype: Any) -> Any:
    """A ``torch.dtype`` from a config string (``fp32``, ``bf16``, ``fp16`` or the long names) or a dtype."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    name = DTYPES.get(str(dtype).lower())
    if name is None:
        raise ValueError(f"unknown dtype {dtype!r}; use one of fp32, bf16, fp16")
    return getattr(torch, name)


def load_pipeline(
    spec: str,
    arch: str | None = None,
    dtype: Any = "fp32",
    device: Any = "cpu",
    progress_bar: bool = False,
    transformer: Any = None,
) -> Any:
    """Resolve ``spec`` and load it with the public diffusers class for its architecture.

    ``arch`` (``sd3`` / ``flux``), when given, must match the model files: a FLUX directory under an sd3 config
    is a configuration mistake that would otherwise fail much later with a shape error. ``transformer``, when
    given, is used instead of the spec's own (a run's materialised base, ``mrlora.reduce.model_after``), so
    its weights are never read twice.
    """
    path = resolve_model(spec)
    found = detect_arch(path)
    if arch is not None and arch != found:
        if arch not in PIPELINE_CLASSES:
            raise UnknownArchError(f"unknown arch {arch!r}; use one of {', '.join(PIPELINE_CLASSES)}")
        raise UnknownArchError(
            f"model {spec!r} ({path}) is a {found} model but arch={arch!r} was requested; set model.arch={found!r} "
            f"or point the model at a {arch} checkpoint"
        )
    import diffusers

    cls = getattr(diffusers, PIPELINE_CLASSES[found])
    components = {"transformer": transformer} if transformer is not None else {}
    pipe = cls.from_pretrained(path, dtype=torch_dtype(dtype), **components)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe


def pipeline_components_summary(pipe: Any) -> str:
    """One line per component: class and parameter count (for job logs)."""
    lines = []
    for name, module in sorted(pipe.components.items()):
        if module is None:
            continue
        params = sum(p.numel() for p in module.parameters()) if hasattr(module, "parameters") else None
        extra = f" {params / 1e6:.2f}M params, {next(module.parameters()).dtype}" if params else ""
        lines.append(f"{name}: {type(module).__name__}{extra}")
    return "\n".join(lines)
