"""Distil one expert into one new token: the loop, its checkpoints and its resume.

Teacher: the base transformer with the expert LoRA enabled, sampling the final latent x_0 from the prompt
*without* the token with the deterministic ODE sampler (``mrlora.sampling.sample`` with ``noise_level=0``).
Student: the same transformer with the adapter disabled, conditioned on the prompt with the token appended.
Only the token's vector in each text encoder trains, by rectified-flow matching on the teacher's latent::

    s ~ sigmoid(N(logit_mean, logit_std)),  e ~ N(0, I),  x_s = (1 - s) x_0 + s e,  loss = |v(x_s, s) - (e - x_0)|^2

so the token learns to make the base's velocity field flow toward what the expert would have drawn.

Distribution follows the Map step: ranks from torchrun or Slurm (``mrlora.distributed``), gloo on CPU, NCCL
on GPU; each rank takes its slice of the step's batch, and the gradients of the token vectors are all-reduced
(averaged) before every AdamW step, so every rank holds identical vectors.

Every random draw is a function of (seed, step) for the *global* batch, of which rank r takes slice r: the
result does not depend on the number of processes (N processes with batch b train like one with batch N*b),
and resuming needs only the vectors, the optimizer state and the step: a resumed run (even with another
process count) sees exactly the prompts and noise of an uninterrupted one.
On SIGUSR2 / SIGTERM (Slurm's warning before a time limit, scancel) the current step finishes, a checkpoint
is written and ``mrlora.training.Preempted`` is raised, the same contract as the Map step, so the launcher
requeues RaTE jobs like expert jobs. Checkpoints and the result go through the run store (atomic files, marker last)::

    OUT/checkpoint-<step>/token.safetensors + training_state.pt + COMPLETE.json
    OUT/metrics.jsonl     one line per step (rank 0)
    OUT/token.safetensors the distilled token, then OUT/DONE.json last
"""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from mrlora.claim import acquire_on_main
from mrlora.claim import release as release_claim
from mrlora.rate.compose import load_tokens
from mrlora.rate.encoders import add_token, check_token_is_new, encoder_slots, pipeline_arch, substituted_rows
from mrlora.rate.errors import RateError
from mrlora.rate.teacher import ExpertInfo, set_teacher
from mrlora.rate.token_file import RateToken, load_token, save_token
from mrlora.runstore import (
    CHECKPOINT_MARKER,
    DONE_MARKER,
    atomic_file,
    complete_checkpoints,
    read_marker,
    reset_incomplete_dir,
    set_aside_damaged,
    write_marker,
)
from mrlora.training.checkpoint import KEEP as KEEP_CHECKPOINTS
from mrlora.training.errors import Preempted
from mrlora.training.metrics import MetricsLog
from mrlora.training.signals import StopFlag

TOKEN_FILE = "token.safetensors"
STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.jsonl"


@dataclass
class DistillSettings:
    """Hyper-parameters of one distillation (defaults suit SD3.5-M at 512 px; tiny tests override them)."""

    token: str
    steps: int = 500
    lr: float = 5e-3
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0: no clipping
    batch_size: int = 4  # samples per process per step
    teacher_steps: int = 20  # ODE steps of the teacher's sampling
    teacher_reuse: int = 1  # steps that share one teacher batch (fresh noise and s every step)
    guidance_scale: float = 4.5  # teacher CFG (FLUX: the guidance embedding, also given to the student)
    resolution: int = 512
    max_sequence_length: int = 256
    logit_mean: float = 0.0
    logit_std: float = 1.0
    checkpoint_every: int = 50
    seed: int = 0

    def validate(self) -> "DistillSettings":
        for name in ("steps", "batch_size", "teacher_steps", "teacher_reuse", "resolution", "max_sequence_length"):
            if int(getattr(self, name)) < 1:
                raise RateError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise RateError(f"lr must be a positive number, got {self.lr}")
        if self.logit_std <= 0:
            raise RateError(f"logit_std must be > 0, got {self.logit_std}")
        if self.checkpoint_every < 0:
            raise RateError(f"checkpoint_every must be >= 0 (0: only at the end), got {self.checkpoint_every}")
        return self


@dataclass
class DistillResult:
    token_path: Path
    steps: int
    final_loss: float | None
    losses: list[float] = field(default_factory=list)
    resumed_from: int | None = None
    done: dict | None = None


# ---------------------------------------------------------------------------------------- process group


@dataclass
class ProcessGroup:
    """Rank and world size of this distillation, and whether we created the torch.distributed group."""

    rank: int = 0
    world_size: int = 1
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def mean_(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
            tensor /= self.world_size
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is true on any rank (all ranks must stop at the same step)."""
        if self.world_size == 1:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0])
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item() > 0)

    def close(self) -> None:
        if self.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def init_process_group() -> ProcessGroup:
    """Join the job's process group (torchrun or Slurm variables), or run alone."""
    from mrlora.distributed import detect, export

    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return ProcessGroup(torch.distributed.get_rank(), torch.distributed.get_world_size(), owns_group=False)
    env = detect()
    if not env.is_distributed:
        return ProcessGroup()
    export(env)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    torch.distributed.init_process_group(backend=backend, init_method="env://")
    return ProcessGroup(env.rank, env.world_size, owns_group=True)


# --------------------------------------------------------------------------------------------- helpers


def _generator(*parts: int) -> torch.Generator:
    """A CPU generator seeded from a tuple of integers (seed, purpose, step, rank, ...)."""
    h = 1469598103934665603
    for p in parts:
        h = ((h ^ (int(p) & 0xFFFFFFFFFFFF)) * 1099511628211) % (2**61 - 1)
    return torch.Generator().manual_seed(h)


_PURPOSE_PROMPTS, _PURPOSE_TEACHER, _PURPOSE_NOISE = 1, 2, 3


def with_token(prompt: str, token: str) -> str:
    """The student's prompt: the token appended (the same place ``apply_token_spec`` puts it)."""
    return f"{prompt} {token}"


def latest_checkpoint(out_dir: Path) -> tuple[int, Path] | None:
    """The newest checkpoint whose marker is complete and whose files match its checksums (never a "latest"
    pointer); a damaged newer one is skipped here and moved aside when its step is written again."""
    for step, path in reversed(complete_checkpoints(out_dir)):
        if read_marker(path, CHECKPOINT_MARKER, verify="sha256") is not None:
            return step, path
        print(
            f"[rate] {path} fails its checksums (damaged after it was written); resuming from an older one", flush=True
        )
    return None


def flow_matching_loss(
    pipe: Any,
    token: str,
    vectors: dict[str, torch.Tensor] | None,
    x0: torch.Tensor,
    prompts: Sequence[str],
    noise: torch.Tensor,
    s: torch.Tensor,
    guidance_scale: float,
    max_sequence_length: int,
) -> torch.Tensor:
    """Rectified-flow matching of the base (adapter off) conditioned on ``prompt + token`` toward ``x0``.

    x_s = (1 - s) x0 + s e, target e - x0, mean squared error over everything. ``vectors`` (differentiable)
    replace the token's stored rows; ``None`` uses the rows as they are (evaluation of a loaded token).
    The caller chooses whether the expert adapter is enabled (training: disabled).
    """
    from mrlora.sampling import flow_model

    model = flow_model(pipe)
    transformer = pipe.transformer
    device = transformer.device
    x0d, e, sd = x0.to(device).float(), noise.to(device).float(), s.to(device).float()
    shape = (-1,) + (1,) * (x0d.ndim - 1)
    x_s = (1 - sd.view(shape)) * x0d + sd.view(shape) * e
    texts = [with_token(p, token) for p in prompts]
    ctx = substituted_rows(pipe, token, vectors) if vectors is not None else contextlib.nullcontext()
    with ctx:
        embeds = model.encode(texts, 1.0, max_sequence_length)
        v = model.velocity(transformer, x_s, sd * 1000.0, embeds, guidance_scale)
    return torch.nn.functional.mse_loss(v.float(), e - x0d)


# ------------------------------------------------------------------------------------------------ the loop


def distill_token(
    pipe: Any,
    prompts: Sequence[str],
    settings: DistillSettings,
    out_dir: str | Path,
    *,
    expert: ExpertInfo,
    base_id: str,
    group: ProcessGroup | None = None,
    info: dict | None = None,
    log: Callable[[str], None] = print,
) -> DistillResult:
    """Distil the expert attached to ``pipe.transformer`` (see ``teacher.attach_expert``) into ``settings.token``.

    Resumes from the newest complete checkpoint in ``out_dir``; returns at once if ``out_dir/DONE.json`` is
    complete. Leaves the learned vectors written into ``pipe``'s embedding rows.
    """
    from mrlora.sampling import sample

    settings.validate()
    group = group or ProcessGroup()
    out_dir = Path(out_dir)
    prompts = [str(p) for p in prompts]
    if not prompts:
        raise RateError("no prompts to distil on; pass --prompts FILE (one prompt per line) or a gen: source")
    token = settings.token

    done = read_marker(out_dir, DONE_MARKER)
    if done is not None:
        log(f"{out_dir} is already complete ({DONE_MARKER}); nothing to do")
        load_tokens(pipe, [out_dir / TOKEN_FILE])
        return DistillResult(
            out_dir / TOKEN_FILE, int(done.get("steps", settings.steps)), done.get("final_loss"), done=done
        )
    # one writer per token directory, even for a job started twice; released once DONE.json is written
    claim = acquire_on_main(out_dir, f"RaTE {token}", group.is_main, group.any)
    if group.any(read_marker(out_dir, DONE_MARKER) is not None):
        release_claim(claim)  # finished by the writer that held the claim until a moment ago
        return distill_token(
            pipe, prompts, settings, out_dir, expert=expert, base_id=base_id, group=group, info=info, log=log
        )

    arch = pipeline_arch(pipe)
    check_token_is_new(pipe, token)
    ids = add_token(pipe, token)
    slots = encoder_slots(pipe)
    transformer = pipe.transformer
    for module in (transformer, *(getattr(pipe, s.encoder_attr) for s in slots)):
        module.requires_grad_(False)
        module.eval()

    # Initial vectors: the rows add_token wrote (the mean embedding), identical on every rank.
    vectors = {
        s.name: torch.nn.Parameter(
            getattr(pipe, s.encoder_attr).get_input_embeddings().weight[ids[s.name]].detach().float().clone()
        )
        for s in slots
    }
    params = [vectors[s.name] for s in slots]
    optimizer = torch.optim.AdamW(
        params, lr=settings.lr, betas=(settings.adam_beta1, settings.adam_beta2), weight_decay=settings.weight_decay
    )

    start, resumed_from = 0, None
    latest = latest_checkpoint(out_dir)
    if latest is not None:
        step, path = latest
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
        saved = load_token(path / TOKEN_FILE)
        if saved.token != token or sorted(saved.vectors) != sorted(vectors):
            raise RateError(
                f"checkpoint {path} is for token {saved.token!r} with encoders {sorted(saved.vectors)}, not {token!r}; "
                f"use another --out directory"
            )
        with torch.no_grad():
            for name, p in vectors.items():
                p.copy_(saved.vectors[name].reshape(-1))
        optimizer.load_state_dict(state["optimizer"])
        start = resumed_from = int(state["step"])
        log(f"resuming {token} from {path} (step {start})")
    if group.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
    # rank 0 keeps the rows up to the checkpoint we resume from (dropping later steps and a torn line)
    metrics = MetricsLog(out_dir / METRICS_FILE, resume_step=start, enabled=group.is_main)
    losses = [float(r["loss"]) for r in metrics.records]
    group.barrier()

    def make_token(step: int) -> RateToken:
        return RateToken(
            token=token,
            arch=arch,
            vectors={n: p.detach().reshape(1, -1).clone() for n, p in vectors.items()},
            base=base_id,
            reward=expert.reward,
            info={"teacher": str(expert.path), "steps": step, "settings": asdict(settings), **(info or {})},
        )

    def checkpoint(step: int) -> Path:
        ckpt = out_dir / f"checkpoint-{step}"
        if group.is_main:
            if read_marker(ckpt, CHECKPOINT_MARKER, verify="sha256") is None:
                if read_marker(ckpt, CHECKPOINT_MARKER) is not None:
                    set_aside_damaged(ckpt)  # complete but damaged: keep it for inspection, write the step again
                reset_incomplete_dir(ckpt, CHECKPOINT_MARKER)
                save_token(make_token(step), ckpt / TOKEN_FILE)
                with atomic_file(ckpt / STATE_FILE) as tmp:
                    torch.save({"optimizer": optimizer.state_dict(), "step": step, "world_size": group.world_size}, tmp)
                write_marker(ckpt, CHECKPOINT_MARKER, extra={"step": step, "token": token})
                for _, old in complete_checkpoints(out_dir)[:-KEEP_CHECKPOINTS]:  # pruned like the Map step's
                    shutil.rmtree(old, ignore_errors=True)
        group.barrier()
        return ckpt

    teacher_cache: tuple[int, torch.Tensor, list[str]] | None = None
    try:
        with StopFlag() as stop:
            for step in range(start, settings.steps):
                t0 = time.perf_counter()
                # -- the global batch of this step is drawn from (seed, step) alone; rank r takes slice r, so the
                #    result does not depend on the number of processes (averaged gradients = full-batch gradient)
                batch_index = step // settings.teacher_reuse
                n_global = settings.batch_size * group.world_size
                mine = slice(group.rank * settings.batch_size, (group.rank + 1) * settings.batch_size)
                if teacher_cache is None or teacher_cache[0] != batch_index:
                    g = _generator(settings.seed, _PURPOSE_PROMPTS, batch_index)
                    chosen = torch.randint(0, len(prompts), (n_global,), generator=g).tolist()[mine]
                    seeds = torch.randint(0, 2**62, (n_global,), generator=g).tolist()[mine]
                    batch_prompts = [prompts[i] for i in chosen]
                    set_teacher(transformer, True)
                    result = sample(
                        pipe,
                        batch_prompts,
                        seeds=seeds,
                        num_steps=settings.teacher_steps,
                        guidance_scale=settings.guidance_scale,
                        resolution=settings.resolution,
                        noise_level=0.0,
                        max_sequence_length=settings.max_sequence_length,
                        decode=False,
                    )
                    teacher_cache = (batch_index, result.latents[:, -1].float(), batch_prompts)
                _, x0, batch_prompts = teacher_cache
                t_teacher = time.perf_counter() - t0

                # -- student: base (adapter off) + token, rectified-flow matching on the teacher's latent
                set_teacher(transformer, False)
                g = _generator(settings.seed, _PURPOSE_NOISE, step)
                noise = torch.randn((n_global, *x0.shape[1:]), generator=g)[mine]
                s = torch.sigmoid(torch.randn((n_global,), generator=g) * settings.logit_std + settings.logit_mean)[
                    mine
                ]
                loss = flow_matching_loss(
                    pipe,
                    token,
                    vectors,
                    x0,
                    batch_prompts,
                    noise,
                    s,
                    settings.guidance_scale,
                    settings.max_sequence_length,
                )
                optimizer.zero_grad(set_to_none=False)
                loss.backward()
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                    group.mean_(p.grad)
                grad_norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])).item()
                if settings.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                mean_loss = group.mean_(loss.detach().float().clone().reshape(1)).item()
                if not math.isfinite(mean_loss):
                    raise RateError(
                        f"distillation loss became {mean_loss} at step {step + 1}; lower --lr or raise --teacher-steps "
                        f"(the last complete checkpoint in {out_dir} is kept)"
                    )
                losses.append(mean_loss)
                done_steps = step + 1
                metrics.log(
                    {
                        "step": done_steps,
                        "loss": mean_loss,
                        "grad_norm": grad_norm,
                        "s_mean": float(s.mean()),
                        "teacher_s": round(t_teacher, 4),
                        "step_s": round(time.perf_counter() - t0, 4),
                        **{f"norm_{n}": float(p.detach().norm()) for n, p in vectors.items()},
                    }
                )
                if done_steps < settings.steps and group.any(stop.requested):
                    path = checkpoint(done_steps)
                    log(f"stop signal received: checkpoint {path} written after step {done_steps}; requeue to continue")
                    raise Preempted(done_steps, str(path))
                if (
                    settings.checkpoint_every
                    and done_steps % settings.checkpoint_every == 0
                    and done_steps < settings.steps
                ):
                    checkpoint(done_steps)
    except BaseException:
        release_claim(claim)
        raise
    finally:
        metrics.close()
        set_teacher(transformer, True)

    final = make_token(settings.steps)
    load_tokens(pipe, [final])  # the vectors go into the rows; apply_token_spec(pipe, None, ...) now sees the token
    done_marker = None
    if group.is_main:
        save_token(final, out_dir / TOKEN_FILE)
        done_marker = write_marker(
            out_dir,
            DONE_MARKER,
            extra={
                "status": "ok",
                "token": token,
                "reward": expert.reward,
                "steps": settings.steps,
                "final_loss": losses[-1] if losses else None,
                "world_size": group.world_size,
                "resumed_from": resumed_from,
            },
            checksums=True,
        )
    group.barrier()
    release_claim(claim)
    return DistillResult(
        out_dir / TOKEN_FILE, settings.steps, losses[-1] if losses else None, losses, resumed_from, done_marker
    )
