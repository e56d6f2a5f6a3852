"""The Flow-GRPO objective as pure tensor functions (docs/design.md section 5).

Kept free of models, processes and files so each formula can be tested on its own: advantages normalised within
each prompt's group of G samples, the PPO-style clipped ratio loss over stored SDE steps, and the KL to the
reference policy (the same transformer with the adapter disabled). The training loop in
``mrlora.training.loop`` only wires these to the sampler and the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ADV_STD_MODES = ("group", "batch")
ADV_EPS = 1e-4


def group_advantages(
    rewards: torch.Tensor,
    group_ids: torch.Tensor,
    std_mode: str = "group",
    clip_max: float = 5.0,
    eps: float = ADV_EPS,
) -> torch.Tensor:
    """(r - mean of the sample's prompt group) / (std + eps), clipped to [-clip_max, clip_max].

    ``rewards`` (N,) over the whole step (all processes); ``group_ids`` (N,) integer prompt group of each sample.
    ``std_mode`` "group" divides by each group's own std, "batch" by the std of all N rewards (the published
    configs' choice, robust when a group's rewards are all equal). Std is the population std (ddof 0).
    """
    if std_mode not in ADV_STD_MODES:
        raise ValueError(f"std_mode must be one of {ADV_STD_MODES}, got {std_mode!r}")
    rewards = rewards.double()
    _, inverse = torch.unique(group_ids, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    counts = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, torch.ones_like(rewards))
    means = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, rewards) / counts
    centred = rewards - means[inverse]
    if std_mode == "group":
        var = torch.zeros(n_groups, dtype=torch.float64).index_add_(0, inverse, centred**2) / counts
        std = var.sqrt()[inverse]
    else:
        std = rewards.std(unbiased=False).expand_as(rewards)
    adv = centred / (std + eps)
    return adv.clamp(-clip_max, clip_max).float()


@dataclass
class LossTerms:
    """One micro-batch's loss and the statistics logged per step."""

    loss: torch.Tensor
    policy_loss: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clip_fraction: torch.Tensor


def clipped_policy_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), ratio = exp(new - old).

    Returns (loss, ratio, clip fraction: share of samples whose ratio left the clip range).
    """
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = torch.maximum(unclipped, clipped).mean()
    clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
    return loss, ratio, clip_fraction


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL between N(mean, std^2) and N(ref_mean, std^2): mean over pixels of (m - m_ref)^2 / (2 std^2).

    ``std`` is the transition std std_dev_t * sqrt(-dt) of the step (the same for both policies), which makes this
    the exact KL of the two Gaussian transitions (per pixel, averaged).
    """
    per_pixel = (mean - ref_mean) ** 2 / (2 * std**2)
    return per_pixel.mean(dim=tuple(range(1, per_pixel.ndim)))


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
) -> LossTerms:
    """The per-step Flow-GRPO loss: clipped policy loss + beta * KL to the reference (when beta > 0)."""
    policy, ratio, clip_fraction = clipped_policy_loss(log_prob, old_log_prob, advantages, clip_range)
    if beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("beta > 0 needs mean, ref_mean and std for the KL term")
        kl = kl_to_reference(mean, ref_mean, std).mean()
    else:
        kl = torch.zeros((), device=log_prob.device)
    return LossTerms(policy + beta * kl, policy, kl, ratio, clip_fraction)


def train_step_indices(num_steps: int, fraction: float) -> list[int]:
    """Which stored SDE steps are trained on: the first int(num_steps * fraction) (at least 1), as published."""
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep fraction must be in (0, 1], got {fraction}")
    return list(range(max(1, int(num_steps * fraction))))
