"""The Flow-GRPO objective as pure tensor functions (docs/design.md section 5).

Kept free of models, processes and files so each formula can be tested on its own: advantages normalised within
each prompt's group of G samples, the PPO-style clipped ratio loss over stored SDE steps, and the KL to the
reference policy (the same transformer with the adapter disabled), in the published form by default
(docs/recipe.md lists every choice and where it comes from). The training loop in
``mrlora.training.loop`` only wires these to the sampler and the optimizer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mrlora.config import ADV_STD as ADV_STD_MODES
from mrlora.config import KL_FORMS
from mrlora.sampling import sde_std_dev

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


def kl_std(form: str, sigma, sigma_next, sigma_1, noise_level: float) -> torch.Tensor:
    """The std the KL term divides by, for one SDE step from ``sigma`` to ``sigma_next``.

    ``"published"`` (Flow-GRPO's train_sd3.py / train_flux.py, kept on purpose by its maintainers): std_dev_t
    itself, with no dt. ``"transition"``: the transition std std_dev_t * sqrt(-dt), which makes the term the
    exact KL of the two Gaussian transitions; it is 1/(-dt) times larger (3.7x-25x per trained step on
    SD3.5-M's 10-step schedule, 4.7x-10.4x on FLUX's 6), so it needs a smaller beta (docs/recipe.md).
    """
    if form not in KL_FORMS:
        raise ValueError(f"KL form must be one of {KL_FORMS}, got {form!r}")
    sigma = torch.as_tensor(sigma, dtype=torch.float32).reshape(-1)  # (1,) for one step, (B,) per sample
    std_dev_t = sde_std_dev(sigma, torch.as_tensor(sigma_1, dtype=torch.float32).reshape(-1)[:1], noise_level)
    if form == "published":
        return std_dev_t
    return std_dev_t * torch.sqrt(sigma - torch.as_tensor(sigma_next, dtype=torch.float32).reshape(-1))


def kl_to_reference(mean: torch.Tensor, ref_mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample KL term: mean over pixels of (m - m_ref)^2, divided by 2 std^2 (``std`` from :func:`kl_std`).

    With the transition std this is the exact KL between N(mean, std^2) and N(ref_mean, std^2) per pixel,
    averaged; with std_dev_t (the published form) it is that KL times -dt.
    """
    per_pixel = (mean - ref_mean) ** 2
    per_sample = per_pixel.mean(dim=tuple(range(1, per_pixel.ndim)))
    return per_sample / (2 * std.reshape(-1) ** 2)


def zero_advantage_weights(advantages: torch.Tensor) -> torch.Tensor:
    """Per-sample loss weights that drop samples whose advantage is exactly 0 (published SD3 training).

    Flow-GRPO's train_sd3.py removes those samples before batching, so each loss is a mean over the samples
    that remain. With fixed micro-batches the same mean comes from weighting: 0 for a dropped sample and
    n / n_kept for a kept one (``advantages`` are one optimizer step's samples on this process). When nothing
    is dropped every weight is 1; when everything is, all are 0 (the step still runs, its gradient is zero).
    """
    keep = (advantages != 0).float()
    kept = float(keep.sum())
    return keep * (advantages.numel() / kept) if kept else keep


def grpo_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    clip_range: float,
    beta: float = 0.0,
    mean: torch.Tensor | None = None,
    ref_mean: torch.Tensor | None = None,
    std: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
) -> LossTerms:
    """The per-step Flow-GRPO loss: clipped policy loss + beta * KL to the reference (when beta > 0).

    ``std`` is the KL's divisor (:func:`kl_std`); ``weights`` (per sample, e.g. :func:`zero_advantage_weights`)
    weight both terms, whose means are then taken as usual.
    """
    ratio = torch.exp(log_prob - old_log_prob)
    per_sample = torch.maximum(
        -advantages * ratio, -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    )
    clip_fraction = ((ratio - 1.0).abs() > clip_range).float().mean()
    w = torch.ones_like(per_sample) if weights is None else weights.to(per_sample)
    policy = (w * per_sample).mean()
    if beta > 0:
        if mean is None or ref_mean is None or std is None:
            raise ValueError("beta > 0 needs mean, ref_mean and std for the KL term")
        kl = (w * kl_to_reference(mean, ref_mean, std)).mean()
    else:
        kl = torch.zeros((), device=log_prob.device)
    return LossTerms(policy + beta * kl, policy, kl, ratio, clip_fraction)


def train_step_indices(num_steps: int, fraction: float) -> list[int]:
    """Which stored SDE steps are trained on: the first int(num_steps * fraction) (at least 1), as published."""
    if not 0 < fraction <= 1:
        raise ValueError(f"timestep fraction must be in (0, 1], got {fraction}")
    return list(range(max(1, int(num_steps * fraction))))
