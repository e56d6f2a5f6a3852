"""Adding the LoRA adapter to a transformer and reading/writing it in the expert adapter format.

The adapter is injected with peft (through diffusers' ``add_adapter``) on ``lora.target_modules``. Trainable
LoRA matrices are kept in fp32 whatever the base dtype (bf16 updates of small matrices lose most of the signal;
peft casts activations to the adapter dtype and the result back). Keys on disk follow docs/internals.md:
``<module>.lora_A.weight`` / ``<module>.lora_B.weight`` with ``<module>`` the dotted path in the transformer,
plus ``adapter_config.json`` (peft LoraConfig) and ``mrlora.json`` (arch, base, reward, scale).
"""

from __future__ import annotations

from pathlib import Path

import torch

from mrlora.training.errors import TrainError

ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def lora_config(rank: int, alpha: float, target_modules: list[str], init: str = "gaussian"):
    from peft import LoraConfig

    init_weights = True if init in ("default", "kaiming", "true", "True") else init
    return LoraConfig(
        r=int(rank),
        lora_alpha=alpha,
        target_modules=list(target_modules),
        init_lora_weights=init_weights,
        lora_dropout=0.0,
        bias="none",
    )


def add_lora(transformer: torch.nn.Module, cfg) -> dict[str, torch.nn.Parameter]:
    """Freeze ``transformer``, inject the adapter of ``cfg.lora``, return its parameters by expert-format key.

    Initialisation draws from torch's global RNG: seed it identically on every rank before calling.
    """
    from mrlora.models.errors import UnknownArchError
    from mrlora.models.lora_targets import block_linear_names

    transformer.requires_grad_(False)
    try:
        # explicit names inside the blocks: a suffix like FLUX's proj_out must not reach the output layer
        targets = block_linear_names(transformer, cfg.lora.target_modules)
    except UnknownArchError as exc:
        raise TrainError(f"lora.target_modules={list(cfg.lora.target_modules)}: {exc}") from None
    config = lora_config(cfg.lora.rank, cfg.lora.alpha, targets, cfg.lora.init)
    try:
        transformer.add_adapter(config, adapter_name=ADAPTER_NAME)
    except ValueError as exc:
        raise TrainError(
            f"cannot add LoRA on lora.target_modules={list(cfg.lora.target_modules)}: {exc}. Check the module "
            "names against the transformer (python -c 'print(pipe.transformer)')"
        ) from None
    params = lora_parameters(transformer)
    if not params:
        raise TrainError(f"lora.target_modules={list(cfg.lora.target_modules)} matched no module of the transformer")
    for p in params.values():
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


def expert_key(param_name: str) -> str:
    """``a.b.lora_A.default.weight`` -> ``a.b.lora_A.weight`` (the expert adapter format)."""
    return param_name.replace(f".lora_A.{ADAPTER_NAME}.", ".lora_A.").replace(f".lora_B.{ADAPTER_NAME}.", ".lora_B.")


def lora_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {expert_key(n): p for n, p in transformer.named_parameters() if ".lora_A." in n or ".lora_B." in n}


def lora_state(params: dict[str, torch.nn.Parameter]) -> dict[str, torch.Tensor]:
    return {k: p.detach().float().cpu().contiguous().clone() for k, p in params.items()}


@torch.no_grad()
def load_lora_state(params: dict[str, torch.nn.Parameter], state: dict[str, torch.Tensor]) -> None:
    if set(params) != set(state):
        diff = sorted(set(params) ^ set(state))
        raise TrainError(
            f"checkpoint adapter does not match this config's LoRA ({len(diff)} differing keys, e.g. {diff[:3]}); "
            "was lora.rank or lora.target_modules changed since the checkpoint was written?"
        )
    for k, p in params.items():
        if p.shape != state[k].shape:
            raise TrainError(f"checkpoint tensor {k} has shape {tuple(state[k].shape)}, the adapter {tuple(p.shape)}")
        p.copy_(state[k].to(p.dtype))


def write_expert_adapter(directory: Path, state: dict[str, torch.Tensor], cfg, base: str, reward: str) -> None:
    """Write the expert adapter files into ``directory`` (each atomically; the caller writes the marker).

    The format is owned by the Reduce step (``mrlora.reduce.save_expert_adapter``), which reads it back.
    """
    from mrlora.reduce import save_expert_adapter

    modules = sorted({key.rsplit(".lora_", 1)[0] for key in state})
    config = lora_config(cfg.lora.rank, cfg.lora.alpha, modules, cfg.lora.init)
    save_expert_adapter(state, Path(directory), cfg.model.arch, config, base, reward)


def read_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(directory) / ADAPTER_WEIGHTS
    if not path.is_file():
        raise TrainError(f"{path} is missing: {directory} is not an expert adapter directory")
    return load_file(str(path))
