"""Exponential moving average of the LoRA weights: what an expert saves (as the published Flow-GRPO recipe).

Single-step policy-gradient updates are noisy; the EMA smooths them at no training cost. The EMA lives in fp32 on
the parameters' device, is updated every ``every`` optimizer steps, and uses the published warm-up
decay = min(decay, (1 + n) / (10 + n)) (n = number of EMA updates so far), so early on it follows the live
weights instead of staying stuck at the initial adapter.
"""

from __future__ import annotations

from typing import Iterable

import torch


class LoraEMA:
    """EMA of named parameters (the LoRA A/B matrices)."""

    def __init__(self, named_params: Iterable[tuple[str, torch.nn.Parameter]], decay: float, every: int):
        if not 0 <= decay < 1:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        if every < 1:
            raise ValueError(f"EMA interval must be >= 1, got {every}")
        self.decay, self.every = float(decay), int(every)
        self.params = dict(named_params)
        self.shadow = {name: p.detach().float().clone() for name, p in self.params.items()}
        self.num_updates = 0

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def step(self, optimizer_step: int) -> bool:
        """Call after optimizer step number ``optimizer_step`` (1-based); updates every ``every`` steps."""
        if optimizer_step % self.every:
            return False
        d = self.current_decay()
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
