"""Who am I in a multi-process job: rank, world size and rendezvous from torchrun or Slurm.

Why: one expert trains on several nodes (one process per GPU). Locally ``torchrun`` sets RANK / WORLD_SIZE /
MASTER_ADDR; under ``srun`` (what submitit runs) only Slurm's variables exist, so we derive the same from
SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID, the first host of SLURM_JOB_NODELIST (``scontrol show
hostnames``) and a port derived from SLURM_JOB_ID (so two jobs sharing a node do not collide). We export them as
torchrun would, and accelerate / torch.distributed initialise from the environment as usual.

torch is imported lazily: the detection itself is pure and testable without processes.
"""

from __future__ import annotations

import os
import socket
import subprocess
from dataclasses import dataclass
from typing import Mapping

from mrlora.cli import UserError

PORT_BASE = 20000
PORT_SPAN = 20000


class DistributedError(UserError, RuntimeError):
    """The environment describes an inconsistent or unreachable process group."""


@dataclass(frozen=True)
class DistEnv:
    """The process's place in the job. ``source`` is "torchrun", "slurm" or "single"."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def port_for_job(job_id: str) -> int:
    """A rendezvous port in [20000, 40000) derived from the Slurm job id (digits only: array ids use 123_4)."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return PORT_BASE + int(digits) % PORT_SPAN


def first_host(nodelist: str) -> str:
    """The first hostname of a Slurm nodelist (``node[1-3]`` -> ``node1``) via ``scontrol show hostnames``."""
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, timeout=30, check=True
        ).stdout.split()
    except (OSError, subprocess.SubprocessError) as exc:
        raise DistributedError(
            f"cannot expand SLURM_JOB_NODELIST={nodelist!r} with `scontrol show hostnames` ({exc}); "
            "run inside a Slurm allocation, or set MASTER_ADDR/MASTER_PORT/RANK/WORLD_SIZE yourself"
        ) from None
    if not out:
        raise DistributedError(f"`scontrol show hostnames {nodelist}` returned no host")
    return out[0]


def reachable_address(host: str) -> str:
    """``host`` if it resolves, else its NodeAddr from ``scontrol show node`` (node names need not be in DNS)."""
    try:
        socket.gethostbyname(host)
        return host
    except OSError:
        pass
    try:
        out = subprocess.run(
            ["scontrol", "show", "node", host, "-o"], capture_output=True, text=True, timeout=30, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        raise DistributedError(f"host {host!r} does not resolve and `scontrol show node` failed: {exc}") from None
    for field in out.split():
        if field.startswith("NodeAddr="):
            return field.split("=", 1)[1]
    raise DistributedError(f"host {host!r} does not resolve and Slurm reports no NodeAddr for it")


def detect(environ: Mapping[str, str] | None = None) -> DistEnv:
    """Read the process group from torchrun's variables, else Slurm's, else a single process."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return DistEnv(
            rank=int(env["RANK"]),
            world_size=int(env["WORLD_SIZE"]),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 29500)),
            source="torchrun",
        )
    ntasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1)
    if "SLURM_PROCID" in env and ntasks > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if not nodelist:
            raise DistributedError("SLURM_NTASKS > 1 but SLURM_JOB_NODELIST is not set; is this an srun step?")
        job_id = env.get("SLURM_JOB_ID") or env.get("SLURM_JOBID") or "0"
        return DistEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=ntasks,
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=env.get("MASTER_ADDR") or reachable_address(first_host(nodelist)),
            master_port=int(env.get("MASTER_PORT") or port_for_job(job_id)),
            source="slurm",
        )
    return DistEnv()


def export(dist: DistEnv) -> None:
    """Publish ``dist`` in torchrun's variables so accelerate and torch.distributed pick it up (env://)."""
    if not dist.is_distributed:
        return
    os.environ.update(
        {
            "RANK": str(dist.rank),
            "WORLD_SIZE": str(dist.world_size),
            "LOCAL_RANK": str(dist.local_rank),
            "LOCAL_WORLD_SIZE": os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", "1")),
            "MASTER_ADDR": dist.master_addr,
            "MASTER_PORT": str(dist.master_port),
        }
    )


# ------------------------------------------------------------------------------ collectives used by training


def all_gather_cat(tensor, accelerator):
    """Concatenate a tensor of the same shape from every rank, in rank order (a no-op with one process)."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.gather(tensor.contiguous())


def any_rank(flag: bool, accelerator) -> bool:
    """True on every rank if ``flag`` is true on any rank (used to agree on stopping after a signal)."""
    if accelerator.num_processes == 1:
        return bool(flag)
    import torch

    t = torch.tensor([1.0 if flag else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(t, reduction="sum").item() > 0)
