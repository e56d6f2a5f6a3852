"""Build the diffusers pipeline a resolved checkpoint describes: base model + merged updates + expert LoRA.

Why fold everything into the weights instead of keeping a live LoRA: eval only runs inference, and a folded
update is exactly the same function (W + scale * B @ A) at no extra cost per step. The model after a cycle is
built by ``mrlora.reduce.load_pipeline_after`` (the same code Map uses to build its start); the expert's own LoRA
(expert adapter format, docs/internals.md) is folded here, in fp32, then cast back to the model dtype.

Generation uses the standard diffusers pipeline call: its FlowMatchEulerDiscreteScheduler is the deterministic
ODE sampler the papers evaluate with.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from eval.checkpoint import ResolvedCheckpoint
from eval.errors import EvalError

log = logging.getLogger(__name__)


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def fold_adapter(transformer: Any, adapter_dir: str | Path) -> int:
    """Add ``scale * B @ A`` of every module of an expert adapter to ``transformer``'s weights.

    The adapter is read (and validated) by ``mrlora.reduce.adapters.read_expert_adapter``, the same reader the
    Reduce step uses. The sum is computed in fp32 and cast back, one module at a time. Returns the number of
    modules updated.
    """
    import torch

    from mrlora.reduce.adapters import read_expert_adapter
    from mrlora.reduce.errors import ReduceError
    from mrlora.runstore import DamagedFileError

    try:
        expert = read_expert_adapter(adapter_dir)
    except DamagedFileError as exc:  # left in place: a merge that used it already checked it intact
        raise EvalError(
            f"{exc}; this expert cannot be evaluated (retrain it in a new run, or restore the file from a backup)"
        ) from None
    except ReduceError as exc:
        raise EvalError(f"cannot read the expert adapter: {exc}") from None
    modules = dict(transformer.named_modules())
    for name, pair in expert.modules.items():
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise EvalError(
                f"{adapter_dir}: module {name!r} does not exist in the {type(transformer).__name__}; the adapter "
                "was trained on another architecture"
            )
        weight = module.weight
        delta = pair.delta()
        if delta.shape != weight.shape:
            raise EvalError(
                f"{adapter_dir}: module {name!r}: update {tuple(delta.shape)} does not fit weight {tuple(weight.shape)}"
            )
        with torch.no_grad():
            weight.copy_((weight.to(torch.float32) + delta.to(weight.device)).to(weight.dtype))
    return len(expert.modules)


def build_pipeline(ckpt: ResolvedCheckpoint, cfg: Any, device: str | None = None) -> Any:
    """Load the checkpoint's model (``mrlora.reduce.load_pipeline_after``: its materialised base or
    ``ckpt.pretrained``, plus its updates) and fold in the expert LoRA."""
    from mrlora.models.errors import ModelError
    from mrlora.reduce import load_pipeline_after
    from mrlora.runstore import ModelAfter, RunStoreError

    device = device or default_device()
    model = ModelAfter(
        ckpt.cycle or 0, Path(ckpt.base_dir) if ckpt.base_dir else None, tuple(Path(p) for p in ckpt.update_dirs)
    )
    try:
        pipe = load_pipeline_after(model, ckpt.pretrained, cfg.model.arch, cfg.model.dtype, device)
    except ModelError as exc:
        raise EvalError(f"cannot load the model of checkpoint {ckpt.spec!r}: {exc}") from None
    except RunStoreError as exc:  # a damaged file: named, moved aside, and what redoes it
        raise EvalError(f"checkpoint {ckpt.spec!r}: {exc}") from None
    if ckpt.adapter_dir:
        n = fold_adapter(pipe.transformer, ckpt.adapter_dir)
        log.info("folded the expert LoRA %s (%d modules)", ckpt.adapter_dir, n)
    pipe.transformer.eval()
    return pipe


def generate(
    pipe: Any,
    prompts: list[str],
    seeds: list[int],
    steps: int,
    guidance_scale: float,
    resolution: int,
    max_sequence_length: int,
) -> list:
    """One batch of images, each from its own CPU ``torch.Generator`` (portable across devices and batch sizes)."""
    import torch

    generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    with torch.inference_mode():
        out = pipe(
            prompt=list(prompts),
            num_inference_steps=int(steps),
            guidance_scale=float(guidance_scale),
            height=int(resolution),
            width=int(resolution),
            generator=generators,
            max_sequence_length=int(max_sequence_length),
            output_type="pil",
        )
    return list(out.images)
