"""Exponential moving average of the LoRA weights: what an expert saves (as the published Flow-GRPO recipe).

Single-step policy-gradient updates are noisy; the EMA smooths them at no training cost. The EMA lives in fp32 on
the parameters' device. Two schedules (``train.ema_schedule``):

- ``"published"`` (default), what Flow-GRPO's train_sd3.py does: its ``ema.step(params, global_step)`` runs after
  every sampling batch, and updates when ``(global_step + 1) % every == 0`` with decay
  ``min(decay, (1 + global_step) / (10 + global_step))``. A published optimizer step spans two sampling batches
  (``gradient_accumulation_steps = num_batches_per_epoch // 2`` on the 32-GPU configs), and each batch sees the
  weights after the same number of steps, so after optimizer steps s = every-1, 2*every-1, ... the EMA takes two
  updates in a row with that decay (the result of decay d twice is one update with decay d^2).
- ``"per_update"``: one update every ``every`` steps (after step every, 2*every, ...), warm-up by the number n of
  EMA updates so far, decay = min(decay, (1 + n) / (10 + n)).
"""

from __future__ import annotations

from typing import Iterable

import torch

from mrlora.config import EMA_SCHEDULES

PUBLISHED_BATCHES_PER_STEP = 2  # sampling batches per optimizer step in the published 32-GPU configs


class LoraEMA:
    """EMA of named parameters (the LoRA A/B matrices)."""

    def __init__(
        self,
        named_params: Iterable[tuple[str, torch.nn.Parameter]],
        decay: float,
        every: int,
        schedule: str = "per_update",
    ):
        if schedule not in EMA_SCHEDULES:
            raise ValueError(f"EMA schedule must be one of {EMA_SCHEDULES}, got {schedule!r}")
        self.schedule = schedule
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA interval must be >= 1, got {every}")
        self.decay, self.every = float(decay), int(every)
        self.params = dict(named_params)
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.num_updates = 0

    def current_decay(self, optimizer_step: int | None = None) -> float:
        """The decay of the next update: warm-up by EMA updates (per_update) or by optimizer step (published)."""
        n = self.num_updates if self.schedule == "per_update" else int(optimizer_step or 0)
        return min(self.decay, (1 + n) / (10 + n))

    @torch.no_grad()
    def step(self, optimizer_step: int) -> bool:
        """Call after optimizer step number ``optimizer_step`` (1-based); True when the EMA was updated."""
        if self.schedule == "published":
            if (optimizer_step + 1) % self.every:
                return False
            repeats = PUBLISHED_BATCHES_PER_STEP
        else:
            if optimizer_step % self.every:
                return False
            repeats = 1
        d = self.current_decay(optimizer_step)
        for _ in range(repeats):
            for name, p in self.params.items():
                self.shadow[name].mul_(d).add_(p.detach().float(), alpha=1 - d)
            self.num_updates += 1
        return True

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {name: t.clone() for name, t in self.shadow.items()}

    def load_state_dict(self, shadow: dict[str, torch.Tensor], num_updates: int) -> None:
        missing = set(self.shadow) ^ set(shadow)
        if missing:
            raise ValueError(f"EMA state does not match the adapter: differing keys {sorted(missing)[:5]}")
        for name, t in shadow.items():
            self.shadow[name].copy_(t)
        self.num_updates = int(num_updates)
