"""One Flow-GRPO expert, from the effective base to a saved EMA adapter, resumable at any round.

Per sampling round (docs/design.md section 5): every process samples its share of ``updates_per_round x
prompts_per_step x group_size`` images with the SDE sampler (no grad) and scores them; the rewards of all
processes are gathered so each prompt's group is normalised as a whole. The round's samples are then shuffled
(seeded by the round) and split into ``updates_per_round`` equal chunks, each one optimizer step: for every
trained SDE step and every micro-batch the transition log-prob is recomputed with gradients and the clipped GRPO
loss (plus beta * KL to the adapter-free reference) is back-propagated; gradients accumulate over all of them
(accelerate) into one AdamW step with grad-norm clipping, followed by the EMA update. The first step of a round is
on-policy (ratio exactly 1); later ones see weights that already moved, which is what the PPO clip is for.

Checkpoints and preemption stops happen only at round ends, so a checkpoint never needs the round's samples.
Everything a round depends on is either in the checkpoint (adapter, optimizer, EMA, RNG) or a pure function of
(seed, reward, cycle, round) (prompts, noise, shuffle), so a run restarted from a checkpoint retraces an
uninterrupted one.
"""

from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from mrlora import distributed
from mrlora.claim import acquire_on_main
from mrlora.claim import release as release_claim
from mrlora.grpo import group_advantages, grpo_loss, kl_std, train_step_indices, zero_advantage_weights
from mrlora.runstore import CHECKPOINT_MARKER, DONE_MARKER, read_marker, wait_for, write_marker
from mrlora.sampling import PromptEmbeds, flow_model, sample, step_log_prob
from mrlora.tracking import Lineage, open_tracker, standalone_lineage
from mrlora.training import checkpoint as ckpt
from mrlora.training.data import PromptSchedule, sample_seed
from mrlora.training.errors import Preempted, TrainError
from mrlora.training.lora import add_lora, load_lora_state, lora_state, write_expert_adapter
from mrlora.training.metrics import MetricsLog
from mrlora.training.signals import StopFlag

ADAPTER_DIR = "adapter"
METRICS_FILE = "metrics.jsonl"


@dataclass
class ExpertJob:
    """What to train and where. ``cfg`` already has ``per_reward[reward]`` applied (``config_for_reward``)."""

    cfg: Any
    reward: str
    out_dir: Path
    base_spec: str  # model spec for load_pipeline: local dir, hub id, tiny:<arch>
    base_id: str  # recorded in the adapter's mrlora.json
    prior_updates: list[Path] = field(default_factory=list)
    # a run's materialised model (cycle_XXXX/base, runstore.model_after) whose transformer replaces base_spec's
    start_base: Path | None = None
    # reference merge mode: start the LoRA from this adapter (the previous averaged merge) instead of fresh
    init_adapter: Path | None = None
    seed_salt: int = 0  # distinguishes experts (reward, cycle) so they do not share prompts and noise
    # the curve across the run this expert's metrics continue (mrlora.tracking); standalone: next to out_dir
    tracking: Lineage | None = None
    progress: bool = True
    extra_done: dict = field(default_factory=dict)


def _accelerator(cfg, n_backward: int, use_cpu: bool):
    from mrlora.training.accelerator import build_accelerator  # DDP or ZeRO-2, GPU or CPU (gloo)

    return build_accelerator(cfg, n_backward, use_cpu)


def _load_start_pipeline(job: "ExpertJob", device):
    """The pipeline of the model this expert starts from (``mrlora.reduce.load_pipeline_after``)."""
    from mrlora.reduce import load_pipeline_after
    from mrlora.runstore import ModelAfter

    cfg = job.cfg
    start = ModelAfter(-1, job.start_base, tuple(Path(d) for d in job.prior_updates))
    return load_pipeline_after(start, job.base_spec, cfg.model.arch, cfg.model.dtype, device)


class _Step:
    """Per-micro-batch statistics of one optimizer step: running means and running maxima."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.peaks: dict[str, float] = {}
        self.count = 0

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v)
        self.count += 1

    def peak(self, **values: float) -> None:
        for k, v in values.items():
            self.peaks[k] = max(self.peaks.get(k, -math.inf), float(v))

    def means(self) -> dict[str, float]:
        return {k: v / max(self.count, 1) for k, v in self.sums.items()}


def train_expert(job: ExpertJob) -> dict:
    """Train (or continue) one expert into ``job.out_dir``; return DONE.json's content.

    Raises :class:`Preempted` after checkpointing (at the end of the current sampling round) when SIGUSR2/SIGTERM
    arrived on any rank.
    """
    out_dir = Path(job.out_dir)
    done = read_marker(out_dir, DONE_MARKER)
    if done is not None:
        return done
    cfg = job.cfg
    dist = distributed.detect()
    distributed.export(dist)
    use_cpu = not torch.cuda.is_available()
    total = int(cfg.train.steps)
    per_round = int(cfg.train.get("updates_per_round", 1))  # run.json of older runs lacks the field
    group, per_step = int(cfg.sample.group_size), int(cfg.sample.prompts_per_step)
    if per_round < 1 or total % per_round or int(cfg.train.checkpoint_every) % per_round:
        raise TrainError(
            f"train.steps={total} and train.checkpoint_every={cfg.train.checkpoint_every} must be "
            f"multiples of train.updates_per_round={per_round} (>= 1)"
        )
    chunk_n = per_step * group // dist.world_size  # samples of one optimizer step on this process
    if chunk_n * dist.world_size != per_step * group:
        raise TrainError(
            f"{per_step} prompts x {group} samples per step cannot be split over {dist.world_size} processes; make "
            "sample.prompts_per_step * sample.group_size a multiple of the number of processes"
        )
    train_steps = train_step_indices(int(cfg.sample.num_steps), float(cfg.train.timestep_fraction))
    micro = int(cfg.train.micro_batch)
    n_backward = len(train_steps) * math.ceil(chunk_n / micro)
    accelerator = _accelerator(cfg, n_backward, use_cpu)
    is_main = accelerator.is_main_process
    # one writer per expert directory, even for a job started twice; released once DONE.json is written
    claim = acquire_on_main(
        out_dir, f"expert {job.reward}", is_main, lambda bad: distributed.any_rank(bad, accelerator)
    )
    if distributed.any_rank(read_marker(out_dir, DONE_MARKER) is not None, accelerator):
        release_claim(claim)  # finished by the writer that held the claim until a moment ago
        return wait_for(out_dir / DONE_MARKER, timeout=120) and read_marker(out_dir, DONE_MARKER, verify="none")
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)

    import rewards as rewards_pkg
    from rewards.prompts import load_prompt_source

    pipe = _load_start_pipeline(job, accelerator.device)
    transformer = pipe.transformer
    for name in ("vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.requires_grad_(False)
    if cfg.model.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    torch.manual_seed(int(cfg.seed))  # identical LoRA init on every rank
    params = add_lora(transformer, cfg)
    if job.init_adapter is not None:
        _load_initial_adapter(params, Path(job.init_adapter), cfg)
    optimizer = torch.optim.AdamW(
        list(params.values()),
        lr=cfg.train.lr,
        betas=(cfg.train.adam_beta1, cfg.train.adam_beta2),
        weight_decay=cfg.train.weight_decay,
        eps=cfg.train.adam_epsilon,
    )
    ema = None
    if cfg.train.ema:
        from mrlora.ema import LoraEMA

        # run.json of older runs lacks ema_schedule: they continue with the schedule they started with
        ema = LoraEMA(
            params.items(), cfg.train.ema_decay, cfg.train.ema_every, cfg.train.get("ema_schedule", "per_update")
        )
    reward_cfg = cfg.reward_models.get(job.reward)
    reward_kwargs = reward_cfg.to_dict() if hasattr(reward_cfg, "to_dict") else dict(reward_cfg or {})
    reward_fn = rewards_pkg.build_reward(job.reward, **reward_kwargs)
    if job.reward not in cfg.prompts:
        raise TrainError(f"no prompt source for reward {job.reward!r}; set prompts.{job.reward}=<file or gen:kind:n>")
    items = load_prompt_source(cfg.prompts[job.reward], int(cfg.seed))
    # one "plan" per sampling round: with one update per round, round r == optimizer step r (as before)
    schedule = PromptSchedule(len(items), per_round * per_step, group, int(cfg.seed), job.seed_salt)
    model = flow_model(pipe)
    wrapped, optimizer = accelerator.prepare(transformer, optimizer)

    start = _restore(job, accelerator, params, optimizer, ema, per_step)
    if start > total:
        raise TrainError(
            f"{out_dir} has a checkpoint at step {start}, beyond train.steps={total}; train with "
            f"--steps {start} or more, or use another output directory"
        )
    if start % per_round:
        raise TrainError(
            f"{out_dir} has a checkpoint at step {start}, inside a sampling round of "
            f"train.updates_per_round={per_round}; resume with the updates_per_round it was written with"
        )
    tracker = open_tracker(cfg.logging, job.tracking or standalone_lineage(out_dir, job.reward)) if is_main else None
    metrics = MetricsLog(out_dir / METRICS_FILE, start, is_main, tracker)
    sample_kw = dict(
        num_steps=int(cfg.sample.num_steps),
        guidance_scale=float(cfg.sample.guidance_scale),
        resolution=int(cfg.sample.resolution),
        noise_level=float(cfg.sample.noise_level),
        batch_size=int(cfg.sample.batch_size),
        max_sequence_length=int(cfg.sample.max_sequence_length),
    )
    train_guidance = float(cfg.sample.guidance_scale)
    from mrlora.progress import progress

    # a bar on a terminal; one log line per step (at most every 10 s) in a job's log file
    bar = progress(total, start, f"expert {job.reward}", enabled=is_main and job.progress)
    last_record: dict = metrics.records[-1] if metrics.records else {}
    try:
        with StopFlag() as stop:
            for round_ in range(start // per_round, total // per_round):
                t0 = time.perf_counter()
                plan = schedule.plan(round_, dist.rank, dist.world_size)
                idx = range(plan.local.start, plan.local.stop)
                prompts = [items[plan.prompt_indices[i]].prompt for i in idx]
                metadata = [dict(items[plan.prompt_indices[i]].metadata) for i in idx]
                transformer.eval()
                with torch.no_grad():
                    res = sample(pipe, prompts, seeds=plan.seeds[plan.local], transformer=transformer, **sample_kw)
                scores = torch.as_tensor(reward_fn(res.images, prompts, metadata).scores, dtype=torch.float32)
                all_scores = distributed.all_gather_cat(scores.to(accelerator.device), accelerator).cpu()
                adv_all = group_advantages(
                    all_scores, torch.tensor(plan.group_ids), cfg.train.adv_std, cfg.train.adv_clip_max
                )
                adv = adv_all[plan.local].to(accelerator.device)
                t_sample = time.perf_counter() - t0
                embeds = (
                    res.embeds
                    if cfg.train.cfg
                    else PromptEmbeds(res.embeds.prompt_embeds, res.embeds.pooled, text_ids=res.embeds.text_ids)
                )
                chunks = round_chunks(chunk_n * per_round, per_round, int(cfg.seed), job.seed_salt, round_, dist.rank)

                for update, chunk in enumerate(chunks):
                    t1 = time.perf_counter()
                    stats, grad_norm = _Step(), float("nan")
                    transformer.train()
                    chunk_adv = adv[chunk.to(adv.device)]
                    # published SD3 training drops exactly-zero advantages from the loss (train.drop_zero_advantage)
                    weights = zero_advantage_weights(chunk_adv) if _drop_zero_advantage(cfg) else None
                    for j in train_steps:
                        for mb in range(0, chunk_n, micro):
                            sel = chunk[mb : mb + micro]
                            with accelerator.accumulate(wrapped):
                                terms = _micro_batch_loss(
                                    cfg,
                                    model,
                                    wrapped,
                                    transformer,
                                    res,
                                    embeds,
                                    sel,
                                    j,
                                    chunk_adv[mb : mb + micro],
                                    train_guidance,
                                    None if weights is None else weights[mb : mb + micro],
                                )
                                accelerator.backward(terms.loss)
                                if accelerator.sync_gradients:
                                    norm = accelerator.clip_grad_norm_(list(params.values()), cfg.train.max_grad_norm)
                                    grad_norm = float(norm) if norm is not None else float("nan")  # DeepSpeed: None
                                optimizer.step()
                                optimizer.zero_grad(set_to_none=True)
                            stats.add(
                                loss=terms.loss.item(),
                                policy_loss=terms.policy_loss.item(),
                                kl=terms.kl.item(),
                                clip_fraction=terms.clip_fraction.item(),
                                ratio_mean=terms.ratio.mean().item(),
                                zero_adv_fraction=(chunk_adv[mb : mb + micro] == 0).float().mean().item(),
                            )
                            stats.peak(
                                ratio_max=terms.ratio.max().item(), ratio_max_dev=(terms.ratio - 1).abs().max().item()
                            )
                    done_steps = round_ * per_round + update + 1
                    if ema is not None:
                        ema.step(done_steps)
                    means = _reduce_stats(stats, accelerator)
                    elapsed = time.perf_counter() - t1 + t_sample / per_round
                    record = {
                        "step": done_steps,
                        "round": round_ + 1,
                        "update": update + 1,
                        "reward_mean": float(all_scores.mean()),
                        "reward_std": float(all_scores.std(unbiased=False)),
                        **means,
                        "lr": float(optimizer.param_groups[0]["lr"]),
                        "grad_norm": grad_norm,
                        "samples_per_s": per_step * group / elapsed,
                        "step_time_s": elapsed,
                        "sample_time_s": t_sample,
                        "processes": dist.world_size,
                    }
                    metrics.log(record)
                    last_record = record
                    bar.set_postfix(reward=f"{record['reward_mean']:.4f}", kl=f"{record['kl']:.2e}")
                    bar.update(1)
                # only at round ends: a checkpoint inside a round would need the round's samples to resume
                stopping = distributed.any_rank(stop.requested, accelerator)
                if done_steps % int(cfg.train.checkpoint_every) == 0 or done_steps == total or stopping:
                    path = _save(job, accelerator, params, optimizer, ema, done_steps, plan.data_position)
                    if stopping and done_steps < total:
                        raise Preempted(done_steps, str(path))
    except BaseException:
        release_claim(claim)
        raise
    finally:
        bar.close()
        metrics.close()
    done = _finish(job, accelerator, params, ema, total, last_record)
    release_claim(claim)
    return done


def round_chunks(n_local: int, n_chunks: int, seed: int, salt: int, round_: int, rank: int) -> list[torch.Tensor]:
    """This process's ``n_local`` sample indices of a round, split into ``n_chunks`` optimizer steps.

    With several steps per round the samples are shuffled first (a pure function of seed, salt, round and rank,
    drawn from its own generator so the global RNG stays untouched), so each step sees a mix of prompts. With
    one step the order does not change the summed gradient, and the samples keep their sampled order.
    """
    if n_chunks == 1:
        order = torch.arange(n_local)
    else:
        gen = torch.Generator().manual_seed(sample_seed(seed, salt, round_, -1 - rank))
        order = torch.randperm(n_local, generator=gen)
    size = n_local // n_chunks
    return [order[i * size : (i + 1) * size] for i in range(n_chunks)]


def _load_initial_adapter(params: dict[str, torch.nn.Parameter], path: Path, cfg) -> None:
    """Reference merge mode: set the fresh LoRA to the previous merge's averaged adapter (same rank and alpha)."""
    from mrlora.reduce import read_expert_adapter
    from mrlora.reduce.errors import ReduceError

    try:
        adapter = read_expert_adapter(path)
    except ReduceError as exc:
        raise TrainError(f"cannot continue from the merged adapter {path}: {exc}") from None
    scale = float(cfg.lora.alpha) / float(cfg.lora.rank)
    state = {}
    for module, pair in adapter.modules.items():
        if not math.isclose(pair.scale, scale, rel_tol=1e-6):
            raise TrainError(
                f"{path}: {module} has LoRA scale {pair.scale}, this config's lora.alpha/lora.rank is "
                f"{scale}; the run's LoRA settings changed since that merge"
            )
        state[f"{module}.lora_A.weight"] = pair.A
        state[f"{module}.lora_B.weight"] = pair.B
    load_lora_state(params, state)


def _drop_zero_advantage(cfg) -> bool:
    return bool(cfg.train.get("drop_zero_advantage", False))  # run.json of older runs lacks the field


def _micro_batch_loss(cfg, model, wrapped, transformer, res, embeds, sel, j, adv, guidance, weights=None):
    lat = res.latents[sel, j].to(transformer.device)
    nxt = res.latents[sel, j + 1].to(transformer.device)
    emb = embeds.select(sel)
    noise_level = float(cfg.sample.noise_level)
    # older runs' run.json lack these fields: they continue with the behaviour they were started with
    detach = bool(cfg.train.get("cfg_detach_uncond", False))
    out = step_log_prob(
        model, wrapped, lat, nxt, j, res.timesteps, res.sigmas, emb, guidance, noise_level, detach_uncond=detach
    )
    ref_mean = std = None
    beta = float(cfg.train.beta)
    if beta > 0:
        with torch.no_grad():
            transformer.disable_adapters()
            try:
                ref_mean = step_log_prob(
                    model, transformer, lat, nxt, j, res.timesteps, res.sigmas, emb, guidance, noise_level
                ).mean
            finally:
                transformer.enable_adapters()
        std = kl_std(
            cfg.train.get("kl_form", "transition"), res.sigmas[j], res.sigmas[j + 1], res.sigmas[1], noise_level
        ).to(out.mean.device)
    old = res.log_probs[sel, j].to(out.log_prob.device)
    return grpo_loss(
        out.log_prob, old, adv, float(cfg.train.clip_range), beta, out.mean, ref_mean, std, weights=weights
    )


def _reduce_stats(stats: _Step, accelerator) -> dict[str, float]:
    """Means averaged over processes, maxima maximised over processes."""
    means, peaks = stats.means(), dict(stats.peaks)
    if accelerator.num_processes > 1:
        keys = sorted(means)
        t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=accelerator.device)
        means = dict(zip(keys, accelerator.reduce(t, reduction="mean").tolist()))
        keys = sorted(peaks)
        t = torch.tensor([[peaks[k] for k in keys]], dtype=torch.float64, device=accelerator.device)
        peaks = dict(zip(keys, accelerator.gather(t).max(dim=0).values.tolist()))
    return {**{k: float(v) for k, v in means.items()}, **{k: float(v) for k, v in peaks.items()}}


def _restore(job: ExpertJob, accelerator, params, optimizer, ema, per_step: int) -> int:
    """Continue from the newest complete checkpoint (chosen and checksum-verified by rank 0, loaded by all)."""
    from accelerate.utils import broadcast_object_list

    restored = None
    if accelerator.is_main_process:
        restored = ckpt.load_latest(job.out_dir)
        # newer complete checkpoints failed their checksums: remove them, or saving that step again would keep them
        for newer_step, newer in ckpt.complete_checkpoints(job.out_dir):
            if restored is None or newer_step > restored.step:
                shutil.rmtree(newer)
    choice = [restored.step if restored is not None else None]
    if accelerator.num_processes > 1:
        broadcast_object_list(choice, from_process=0)
    step = choice[0]
    if step is None:
        return 0
    path = ckpt.checkpoint_path(job.out_dir, step)
    if restored is None:
        wait_for(path / CHECKPOINT_MARKER, timeout=120)
        restored = ckpt.load_step(path, step)
    load_lora_state(params, restored.adapter)
    if job.cfg.train.deepspeed == "zero2":
        from mrlora.training.accelerator import DEEPSPEED_STATE_DIR, load_sharded_state

        load_sharded_state(accelerator, path / DEEPSPEED_STATE_DIR)
    else:
        optimizer.load_state_dict(restored.state["optimizer"])
    if ema is not None:
        if restored.ema is None:
            raise TrainError(f"{path} has no EMA state but train.ema is on; resume with train.ema=False or delete it")
        ema.load_state_dict(restored.ema, restored.state["ema_updates"])
    if restored.state.get("data_position") != step * per_step:
        raise TrainError(
            f"{path} was written with a different sample.prompts_per_step (data position "
            f"{restored.state.get('data_position')} at step {step}); resume with the config it was started with"
        )
    rngs = restored.state["rng"]
    ckpt.set_rng_state(rngs[accelerator.process_index] if accelerator.process_index < len(rngs) else rngs[0])
    return step


def _save(job: ExpertJob, accelerator, params, optimizer, ema, step: int, data_position: int) -> Path:
    from accelerate.utils import gather_object

    weights = lora_state(params)
    mine = [{"rng": ckpt.rng_state(), "digest": ckpt.weights_digest(weights)}]
    per_rank = gather_object(mine) if accelerator.num_processes > 1 else mine
    digests = [r["digest"] for r in per_rank]
    if len(set(digests)) != 1:  # DDP keeps replicas equal; a mismatch means a broken process group or a bug
        raise TrainError(
            f"LoRA weights differ across ranks at step {step} (digests {digests}); not saving a "
            "checkpoint. Check that every rank runs the same code and config, then resume"
        )
    path = ckpt.checkpoint_path(job.out_dir, step)
    if job.cfg.train.deepspeed == "zero2":  # ZeRO-2 shards optimizer state: every rank writes its part
        if accelerator.is_main_process:
            ckpt.prepare_dir(path)
        accelerator.wait_for_everyone()
        from mrlora.training.accelerator import DEEPSPEED_STATE_DIR, save_sharded_state

        save_sharded_state(accelerator, path / DEEPSPEED_STATE_DIR)
        accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {
            "step": step,
            "data_position": data_position,
            "rng": [r["rng"] for r in per_rank],
            "rank_digests": digests,
            "optimizer": optimizer.state_dict() if job.cfg.train.deepspeed != "zero2" else None,
            "ema_updates": ema.num_updates if ema is not None else 0,
            "world_size": accelerator.num_processes,
        }
        ckpt.save_checkpoint(
            job.out_dir,
            step,
            weights,
            ema.state_dict() if ema is not None else None,
            state,
            job.cfg,
            job.base_id,
            job.reward,
            keep_existing=job.cfg.train.deepspeed == "zero2",
        )
    accelerator.wait_for_everyone()
    return path


def _finish(job: ExpertJob, accelerator, params, ema, total: int, last_record: dict) -> dict:
    """Write adapter/ (the EMA weights) and DONE.json last, on rank 0; every rank returns the marker."""
    out_dir = Path(job.out_dir)
    if accelerator.is_main_process:
        adapter_dir = out_dir / ADAPTER_DIR
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)  # leftover of a run killed between adapter/ and DONE.json
        weights = {k: v.clone() for k, v in ema.state_dict().items()} if ema is not None else lora_state(params)
        write_expert_adapter(adapter_dir, weights, job.cfg, job.base_id, job.reward)
        write_marker(
            out_dir,
            DONE_MARKER,
            {
                "status": "ok",
                "reward": job.reward,
                "steps": total,
                "adapter": ADAPTER_DIR,
                "weights": "ema" if ema is not None else "live",
                "final_metrics": last_record,
                "processes": accelerator.num_processes,
                **job.extra_done,
            },
        )
    accelerator.wait_for_everyone()
    done = wait_for(out_dir / DONE_MARKER, timeout=120) and read_marker(out_dir, DONE_MARKER, verify="none")
    if done is None:
        raise TrainError(f"{out_dir / DONE_MARKER} was written by rank 0 but is not readable here")
    return done
