"""The training loop's KL term uses the configured form: published (std_dev_t, no dt) or the transition std."""

from __future__ import annotations

import pytest
import torch

from mrlora.config import load_config


@pytest.fixture(scope="module")
def step_inputs(tiny_sd3_dir):
    from mrlora.models.loading import load_pipeline
    from mrlora.sampling import flow_model, sample
    from mrlora.training.lora import add_lora

    pipe = load_pipeline(tiny_sd3_dir, "sd3", "fp32", "cpu")
    res = sample(
        pipe,
        ["a cat", "a dog"],
        seeds=[1, 2],
        num_steps=3,
        guidance_scale=4.5,
        resolution=32,
        noise_level=0.7,
        max_sequence_length=16,
        decode=False,
    )
    torch.manual_seed(0)
    params = add_lora(pipe.transformer, load_config("tiny-sd3"))
    with torch.no_grad():
        for key, p in params.items():
            if "lora_B" in key:
                p.normal_(0, 0.05)  # move the policy away from the reference so the KL is not 0
    return pipe, flow_model(pipe), res


@pytest.mark.parametrize("j", [0, 1])
def test_kl_forms_differ_by_one_over_minus_dt_at_the_trained_step(step_inputs, j):
    from mrlora.training.loop import _micro_batch_loss

    pipe, model, res = step_inputs
    sel, adv = torch.arange(2), torch.tensor([1.0, -1.0])
    kl = {}
    for form in ("published", "transition"):
        cfg = load_config("tiny-sd3", ["train.beta=0.04", f"train.kl_form={form}"])
        terms = _micro_batch_loss(cfg, model, pipe.transformer, pipe.transformer, res, res.embeds, sel, j, adv, 4.5)
        kl[form] = float(terms.kl)
    assert kl["published"] > 0
    minus_dt = float(res.sigmas[j] - res.sigmas[j + 1])
    assert kl["transition"] == pytest.approx(kl["published"] / minus_dt, rel=1e-4)


def test_zero_advantage_weights_reach_the_loss(step_inputs):
    from mrlora.grpo import zero_advantage_weights
    from mrlora.training.loop import _micro_batch_loss

    pipe, model, res = step_inputs
    cfg = load_config("tiny-sd3", ["train.beta=0.04"])
    adv = torch.tensor([0.0, 2.0])
    both = _micro_batch_loss(
        cfg,
        model,
        pipe.transformer,
        pipe.transformer,
        res,
        res.embeds,
        torch.arange(2),
        0,
        adv,
        4.5,
        zero_advantage_weights(adv),
    )
    kept = _micro_batch_loss(
        cfg, model, pipe.transformer, pipe.transformer, res, res.embeds, torch.tensor([1]), 0, adv[1:], 4.5
    )
    # the zero-advantage sample is gone: the loss equals the kept sample's loss alone
    assert float(both.loss) == pytest.approx(float(kept.loss), rel=1e-5)
