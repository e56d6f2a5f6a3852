"""The launcher's RaTE job: distil the expert of (cycle, reward) of a run into a token, inside the run dir.

``distill_in_run(run_root, cycle, reward)`` is what a job wrapper calls after the chosen cycle's expert is
DONE. The teacher is the expert's final ``adapter/`` on top of the base it was trained from (the model after
cycle - 1, chosen by ``runstore.map_start`` and loaded by ``mrlora.reduce.load_pipeline_after`` exactly as
for the Map step), so the token steers exactly that base toward the expert. Output (a seam other packages
read; see docs/rate.md)::

    cycle_XXXX/rate/<reward>/checkpoint-<step>/   token vectors + optimizer state + COMPLETE.json
    cycle_XXXX/rate/<reward>/metrics.jsonl
    cycle_XXXX/rate/<reward>/token.safetensors    the token (see mrlora.rate.token_file)
    cycle_XXXX/rate/<reward>/DONE.json            written last

Re-running it continues from the newest complete checkpoint, or returns the DONE content at once.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any

from mrlora.rate.errors import RateError

RATE_DIR = "rate"


def rate_dir(run_root: str | Path, cycle: int, reward: str) -> Path:
    from mrlora.runstore import RunDir

    return RunDir(run_root).cycle_dir(cycle) / RATE_DIR / reward


def default_token(reward: str) -> str:
    return f"<{reward}>"


def settings_for_run(cfg: Any, reward: str, token: str, overrides: dict[str, Any] | None = None):
    """Distillation settings from a run's config: sampling values from ``sample.*``, RaTE values from
    ``rate.*`` when the config has that section, then explicit ``overrides``."""
    from mrlora.rate.distill import DistillSettings

    values: dict[str, Any] = {
        "token": token,
        "resolution": int(cfg.sample.resolution),
        "guidance_scale": float(cfg.sample.guidance_scale),
        "teacher_steps": int(cfg.sample.eval_num_steps),
        "max_sequence_length": int(cfg.sample.max_sequence_length),
        "batch_size": int(cfg.sample.batch_size),
        "seed": int(cfg.seed),
    }
    known = {f.name for f in fields(DistillSettings)}
    section = cfg.get("rate") if hasattr(cfg, "get") else None
    if section is not None:
        values.update({k: v for k, v in dict(section).items() if k in known})
    for key, value in (overrides or {}).items():
        if key not in known:
            raise RateError(f"unknown RaTE setting {key!r}; known: {', '.join(sorted(known))}")
        values[key] = value
    return DistillSettings(**values).validate()


def distill_in_run(
    run_root: str, cycle: int, reward: str, token: str | None = None, overrides: dict[str, Any] | None = None
) -> dict:
    """Distil expert ``cycle_XXXX/<reward>/adapter`` into ``token`` (default ``<reward>``); return DONE's content.

    ``overrides``: DistillSettings fields (``steps``, ``lr``, ``checkpoint_every``, ...) over the config's.
    Requires the expert's DONE.json. Distributed setup comes from the environment like the Map step.
    """
    import torch

    from mrlora.config import run_reward_config
    from mrlora.rate.distill import DistillSettings, distill_token, init_process_group
    from mrlora.rate.teacher import attach_expert
    from mrlora.reduce import load_pipeline_after, map_start
    from mrlora.runstore import DONE_MARKER, RunDir, read_marker
    from rewards.prompts import load_prompt_source

    run = RunDir(run_root)
    out = rate_dir(run_root, cycle, reward)
    done = read_marker(out, DONE_MARKER)
    if done is not None:
        return done
    cfg = run_reward_config(run.read_run_json()["config"], reward)
    if run.expert_done(cycle, reward) is None:
        raise RateError(
            f"expert {reward} of cycle {cycle} is not finished ({run.expert_dir(cycle, reward) / DONE_MARKER} "
            f"missing); run the Map step of cycle {cycle} first"
        )
    token = token or default_token(reward)
    settings: DistillSettings = settings_for_run(cfg, reward, token, overrides)
    group = init_process_group()
    try:
        device = f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"
        # the base the expert was trained from (reference mode: without the update its LoRA continued)
        start = map_start(run.root, cycle).base
        pipe = load_pipeline_after(start, cfg.model.pretrained, cfg.model.arch, cfg.model.dtype, device)
        updates = list(start.chain)
        expert = attach_expert(pipe.transformer, run.adapter_dir(cycle, reward), cfg.model.arch, cfg.model.pretrained)
        prompts = [item.prompt for item in load_prompt_source(cfg.prompts[reward], seed=int(cfg.seed))]
        result = distill_token(
            pipe,
            prompts,
            settings,
            out,
            expert=expert,
            base_id=cfg.model.pretrained,
            group=group,
            info={"run": str(run.root), "cycle": cycle, "base_updates": [str(u) for u in updates]},
        )
    finally:
        group.close()
    return result.done or read_marker(out, DONE_MARKER) or {}
