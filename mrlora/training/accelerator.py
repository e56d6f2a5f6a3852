"""The expert job's ``accelerate.Accelerator``: DDP, or DeepSpeed ZeRO-2 (``train.deepspeed="zero2"``), on GPUs or CPU.

Why a module of its own: the settings that make ZeRO-2 work are not accelerate's defaults, each was found by a
failure, and the loop should not carry them:

- ``prepare()`` gets no dataloader (the loop samples its own batches), so DeepSpeed must be told its micro batch
  (``train_micro_batch_size_per_gpu``), or ``prepare`` raises before the first step.
- On CPU, ``Accelerator(cpu=True)`` silently drops the DeepSpeed plugin (plain DDP), and without it accelerate
  sees no backend and runs one process. Naming the ``gloo`` backend keeps both: DeepSpeed's CPU accelerator
  over gloo, the same ZeRO-2 optimizer and checkpoint code as on GPUs, so the FLUX preset's training path is
  testable here. Its first use compiles a small op (``deepspeed_shm_comm``, minutes on 2 cores); the build is
  cached under ``TORCH_EXTENSIONS_DIR``, which defaults to mrlora's cache (``$MRLORA_CACHE/torch_extensions``).
- DeepSpeed only initialises a process group under a launcher; a single process gets a one-process world.
- Checkpoints leave the frozen base out (``exclude_frozen_parameters``; ZeRO-2 would otherwise write the whole
  FLUX transformer twice per checkpoint) and so load non-strictly: the base comes from the model, the LoRA and the
  partitioned optimizer state (with its fp32 master copy) from the checkpoint.
"""

from __future__ import annotations

import os
import socket

ZERO2 = "zero2"
DEEPSPEED_STATE_DIR = "deepspeed"  # inside checkpoint-<step>/: every rank's optimizer partition


def uses_zero2(cfg) -> bool:
    return cfg.train.deepspeed == ZERO2


def build_accelerator(cfg, n_backward: int, use_cpu: bool):
    """An Accelerator accumulating ``n_backward`` backward passes per optimizer step (fp32 math, no autocast)."""
    from accelerate import Accelerator

    if not uses_zero2(cfg):
        # cpu=True is required for torchrun on CPU: a plain Accelerator() silently does not distribute
        return Accelerator(cpu=use_cpu, gradient_accumulation_steps=n_backward, mixed_precision="no")
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    plugin = DeepSpeedPlugin(
        zero_stage=2, gradient_accumulation_steps=n_backward, gradient_clipping=cfg.train.max_grad_norm
    )
    plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = int(cfg.train.micro_batch)
    _one_process_world()
    handlers = []
    if use_cpu:
        cache_extensions()
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    return Accelerator(
        cpu=False,
        gradient_accumulation_steps=n_backward,
        mixed_precision="no",
        deepspeed_plugin=plugin,
        kwargs_handlers=handlers,
    )


def cache_extensions() -> str:
    """Point ``TORCH_EXTENSIONS_DIR`` at mrlora's cache unless the user set it; return the directory."""
    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        from mrlora.models.loading import cache_root

        os.environ["TORCH_EXTENSIONS_DIR"] = str(cache_root() / "torch_extensions")
    return os.environ["TORCH_EXTENSIONS_DIR"]


def _one_process_world() -> None:
    """torchrun's variables for a world of one, when no launcher set them (DeepSpeed needs a process group)."""
    if "LOCAL_RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(
        {
            "RANK": "0",
            "WORLD_SIZE": "1",
            "LOCAL_RANK": "0",
            "LOCAL_WORLD_SIZE": "1",
            "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
            "MASTER_PORT": os.environ.get("MASTER_PORT", str(port)),
        }
    )


def save_sharded_state(accelerator, directory) -> None:
    """Every rank writes its ZeRO-2 partition (and rank 0 the LoRA module state) into ``directory``."""
    accelerator.save_state(str(directory), exclude_frozen_parameters=True)


def load_sharded_state(accelerator, directory) -> None:
    """Load what :func:`save_sharded_state` wrote; the frozen base is not in it, so the load is not strict."""
    accelerator.load_state(str(directory), load_module_strict=False)
