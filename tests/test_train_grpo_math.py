"""Flow-GRPO math, prompt/seed scheduling, EMA and process-group detection: pure functions, no models."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from mrlora import distributed
from mrlora.ema import LoraEMA
from mrlora.grpo import (
    clipped_policy_loss,
    group_advantages,
    grpo_loss,
    kl_std,
    kl_to_reference,
    train_step_indices,
    zero_advantage_weights,
)
from mrlora.training.data import PromptSchedule, salt_for
from mrlora.training.errors import TrainError


def _groups(n_groups: int, size: int) -> torch.Tensor:
    return torch.arange(n_groups).repeat_interleave(size)


@pytest.mark.parametrize("mode", ["group", "batch"])
def test_advantages_are_zero_mean_within_each_prompt_group(mode):
    g = torch.Generator().manual_seed(0)
    rewards = torch.rand(5 * 6, generator=g) * torch.arange(5).repeat_interleave(6)  # groups on different scales
    groups = _groups(5, 6)
    adv = group_advantages(rewards, groups, mode, clip_max=5.0)
    for k in range(5):
        assert abs(float(adv[groups == k].mean())) < 1e-6
    if mode == "group":  # each non-constant group is standardised on its own
        for k in range(1, 5):
            assert float(adv[groups == k].std(unbiased=False)) == pytest.approx(1.0, rel=1e-3)


def test_batch_std_keeps_relative_scale_and_group_std_removes_it():
    rewards = torch.tensor([0.0, 1.0, 0.0, 10.0])
    groups = torch.tensor([0, 0, 1, 1])
    by_group = group_advantages(rewards, groups, "group")
    by_batch = group_advantages(rewards, groups, "batch")
    torch.testing.assert_close(by_group[:2], by_group[2:], rtol=1e-3, atol=0)  # up to the 1e-4 in (std + eps)
    assert float(by_batch[3]) == pytest.approx(10 * float(by_batch[1]), rel=1e-3)


def test_advantages_are_clipped_and_constant_groups_give_zero():
    rewards = torch.tensor([0.0] * 9 + [1.0] + [3.0, 3.0])
    groups = torch.tensor([0] * 10 + [1, 1])
    adv = group_advantages(rewards, groups, "group", clip_max=2.0)
    assert float(adv.max()) == 2.0
    assert torch.equal(adv[10:], torch.zeros(2))


def test_clipped_loss_at_ratio_one_is_minus_mean_advantage_and_clips_outside_range():
    adv = torch.tensor([1.0, -2.0, 0.5])
    lp = torch.tensor([0.1, 0.2, 0.3], requires_grad=True)
    loss, ratio, clip_frac = clipped_policy_loss(lp, lp.detach(), adv, 0.2)
    assert torch.equal(ratio, torch.ones(3)) and float(clip_frac) == 0.0
    assert float(loss.detach()) == pytest.approx(-float(adv.mean()))
    # a positive-advantage sample whose ratio already exceeds 1 + eps gets no further push
    new = torch.tensor([0.5, 0.2, 0.3], requires_grad=True)
    loss, ratio, clip_frac = clipped_policy_loss(new, lp.detach(), adv, 0.2)
    loss.backward()
    assert float(clip_frac) == pytest.approx(1 / 3)
    assert float(new.grad[0]) == 0.0 and float(new.grad[1]) != 0.0


def test_kl_is_zero_for_equal_means_and_matches_gaussian_kl():
    mean = torch.randn(2, 4, 3, 3)
    std = torch.full((2, 1, 1, 1), 0.3)
    assert torch.equal(kl_to_reference(mean, mean, std), torch.zeros(2))
    shifted = mean + 0.1
    expected = torch.distributions.kl_divergence(
        torch.distributions.Normal(mean, std.expand_as(mean)), torch.distributions.Normal(shifted, std.expand_as(mean))
    )
    torch.testing.assert_close(kl_to_reference(mean, shifted, std), expected.mean(dim=(1, 2, 3)))
    terms = grpo_loss(
        torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.1, beta=0.5, mean=mean, ref_mean=shifted, std=std
    )
    assert float(terms.loss) == pytest.approx(0.5 * float(expected.mean()), rel=1e-5)


def test_trained_step_fraction():
    assert train_step_indices(10, 0.99) == list(range(9))
    assert train_step_indices(4, 1.0) == [0, 1, 2, 3]
    assert train_step_indices(2, 0.1) == [0]


def test_ema_warms_up_then_uses_its_decay():
    p = torch.nn.Parameter(torch.zeros(2))
    ema = LoraEMA([("w", p)], decay=0.9, every=2)
    with torch.no_grad():
        p.fill_(1.0)
    assert not ema.step(1)  # not an EMA step
    assert ema.step(2)  # first update: decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.shadow["w"], torch.full((2,), 0.9))
    for step in range(4, 200, 2):
        ema.step(step)
    assert ema.current_decay() == 0.9
    torch.testing.assert_close(ema.shadow["w"], torch.ones(2))


def test_prompt_schedule_is_deterministic_and_shards_cover_the_step_exactly_once():
    sched = PromptSchedule(n_prompts=7, prompts_per_step=3, group_size=4, seed=1, salt=salt_for("brightness", 1))
    again = PromptSchedule(7, 3, 4, 1, salt_for("brightness", 1))
    plan = sched.plan(5)
    assert plan == again.plan(5)
    assert plan.group_ids == [i // 4 for i in range(12)]
    assert all(plan.prompt_indices[i] == plan.prompt_indices[4 * (i // 4)] for i in range(12))
    shards = [sched.plan(5, rank, 3) for rank in range(3)]
    covered = [i for s in shards for i in range(s.local.start, s.local.stop)]
    assert covered == list(range(12))
    assert all(s.seeds == plan.seeds and s.prompt_indices == plan.prompt_indices for s in shards)
    # each epoch visits every prompt once
    firsts = [sched.prompt_at(p) for p in range(7)]
    assert sorted(firsts) == list(range(7))
    assert sched.plan(5).seeds != sched.plan(6).seeds
    assert PromptSchedule(7, 3, 4, 1, salt_for("ocr", 1)).plan(5).seeds != plan.seeds
    with pytest.raises(TrainError, match="multiple of the number of processes"):
        sched.plan(0, 0, 5)


def test_detect_reads_torchrun_then_slurm_then_single(tmp_path, monkeypatch):
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "1234"}
    d = distributed.detect(env)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.master_port, d.source) == (
        1,
        2,
        1,
        "h0",
        1234,
        "torchrun",
    )
    fake = tmp_path / "scontrol"
    fake.write_text('#!/bin/sh\nif [ "$2" = hostnames ]; then echo localhost; echo node9; fi\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    slurm = {
        "SLURM_PROCID": "3",
        "SLURM_NTASKS": "4",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "x[1-2]",
        "SLURM_JOB_ID": "123457",
    }
    d = distributed.detect(slurm)
    assert (d.rank, d.world_size, d.local_rank, d.master_addr, d.source) == (3, 4, 1, "localhost", "slurm")
    assert d.master_port == distributed.port_for_job("123457") == 20000 + 123457 % 20000
    assert distributed.detect({**slurm, "SLURM_JOB_ID": "123458"}).master_port != d.master_port
    assert distributed.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == distributed.DistEnv()
    assert distributed.detect({}).world_size == 1


def test_detect_explains_a_missing_scontrol(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(distributed.DistributedError, match="scontrol show hostnames"):
        distributed.detect({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]"})


def test_published_kl_divides_by_std_dev_t_without_dt():
    # By hand: a step from sigma 0.5 to 0.25 at noise level 0.7 (any sigma_1): std_dev_t = 0.7 * sqrt(0.5 / 0.5)
    # = 0.7. Means 0.1 apart everywhere: published KL = 0.1^2 / (2 * 0.49) = 0.0102041; the transition form
    # divides by 2 * 0.49 * 0.25 instead: 0.0408163 (1/(-dt) = 4 times larger).
    mean = torch.zeros(2, 4, 3, 3)
    ref = mean + 0.1
    published = kl_to_reference(mean, ref, kl_std("published", 0.5, 0.25, 0.9, 0.7))
    transition = kl_to_reference(mean, ref, kl_std("transition", 0.5, 0.25, 0.9, 0.7))
    torch.testing.assert_close(published, torch.full((2,), 0.01 / 0.98), rtol=1e-5, atol=0)
    torch.testing.assert_close(transition, torch.full((2,), 0.01 / 0.245), rtol=1e-5, atol=0)
    # at sigma = 1 std_dev_t uses the schedule's second sigma: 0.7 * sqrt(1 / (1 - 0.96)) = 3.5
    torch.testing.assert_close(kl_std("published", 1.0, 0.96, 0.96, 0.7), torch.tensor([3.5]), rtol=1e-5, atol=0)
    with pytest.raises(ValueError, match="published"):
        kl_std("exact", 0.5, 0.25, 0.9, 0.7)


def test_zero_advantage_samples_leave_the_loss_and_the_rest_keep_their_mean():
    adv = torch.tensor([0.0, 1.5, 0.0, -0.5])
    weights = zero_advantage_weights(adv)
    torch.testing.assert_close(weights, torch.tensor([0.0, 2.0, 0.0, 2.0]))
    lp = torch.zeros(4, requires_grad=True)
    mean, ref, std = torch.zeros(4, 2, 2, 2), torch.full((4, 2, 2, 2), 0.2), torch.ones(4)
    ref[0] = 5.0  # a dropped sample's KL must not count either
    terms = grpo_loss(lp, lp.detach(), adv, 1e-4, beta=0.5, mean=mean, ref_mean=ref, std=std, weights=weights)
    # by hand, over the two kept samples: policy mean(-1.5, 0.5) = -0.5, KL 0.2^2 / 2 = 0.02
    assert float(terms.policy_loss.detach()) == pytest.approx(-0.5)
    assert float(terms.kl) == pytest.approx(0.02)
    assert torch.equal(zero_advantage_weights(torch.tensor([0.3, -0.3])), torch.ones(2))
    assert torch.equal(zero_advantage_weights(torch.zeros(3)), torch.zeros(3))


def test_presets_follow_each_architectures_published_recipe():
    from mrlora.config import config_for_reward, load_config

    sd3, flux = load_config("sd35m"), load_config("flux")
    for cfg in (sd3, flux):
        assert (cfg.train.adv_std, cfg.train.kl_form, cfg.train.cfg_detach_uncond) == ("batch", "published", True)
        assert (cfg.train.ema_schedule, cfg.train.ema_decay, cfg.train.ema_every) == ("published", 0.9, 8)
    assert sd3.train.drop_zero_advantage and not flux.train.drop_zero_advantage
    assert [config_for_reward(flux, r).train.beta for r in ("geneval", "pickscore", "ocr")] == [0.04, 0.0, 0.04]
    assert [config_for_reward(sd3, r).train.beta for r in ("geneval", "pickscore", "ocr")] == [0.04, 0.01, 0.04]


def test_published_ema_cadence_updates_twice_after_steps_7_15_with_step_warm_up():
    # Flow-GRPO: ema.step after each of the two sampling batches of an optimizer step, updating when
    # (step + 1) % 8 == 0 with decay min(0.9, (1 + step) / (10 + step)). By hand, weights 1 from step 1 on:
    # after step 7 the EMA is 1 - (8/17)^2; after step 15 it is 1 - (8/17 * 16/25)^2.
    p = torch.nn.Parameter(torch.zeros(1))
    ema = LoraEMA([("w", p)], decay=0.9, every=8, schedule="published")
    with torch.no_grad():
        p.fill_(1.0)
    assert [ema.step(s) for s in range(1, 8)] == [False] * 6 + [True]
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1 - (8 / 17) ** 2]))
    assert not ema.step(8)
    for s in range(9, 16):
        ema.step(s)
    torch.testing.assert_close(ema.shadow["w"], torch.tensor([1 - (8 / 17 * 16 / 25) ** 2]))
    with pytest.raises(ValueError, match="schedule"):
        LoraEMA([("w", p)], decay=0.9, every=8, schedule="nightly")
