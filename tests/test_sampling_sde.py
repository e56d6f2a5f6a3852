"""The SDE sampler: its log-probs are the density it samples from, its ODE path is diffusers' sampler, and a
sample does not depend on the batch it was drawn in."""

from __future__ import annotations

import math

import pytest
import torch

from mrlora.sampling import SamplingError, flow_model, gaussian_log_prob, sample, sde_std_dev, sde_step, step_log_prob

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_sampled_step_log_prob_is_the_gaussian_density_it_was_drawn_from():
    g = torch.Generator().manual_seed(0)
    x, v, noise = (torch.randn(3, 4, 8, 8, generator=g) for _ in range(3))
    sigma, sigma_next, sigma_1 = 0.6, 0.35, 0.9
    out = sde_step(v, x, sigma, sigma_next, sigma_1, 0.7, noise=noise)

    dt = sigma_next - sigma
    std_dev_t = 0.7 * math.sqrt(sigma / (1 - sigma))
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * math.sqrt(-dt)
    torch.testing.assert_close(out.next_latents, mean + std * noise)
    expected = torch.distributions.Normal(mean, std).log_prob(out.next_latents).mean(dim=(1, 2, 3))
    torch.testing.assert_close(out.log_prob, expected, rtol=1e-5, atol=1e-5)
    # scoring the same transition (training) gives the same density
    rescored = sde_step(v, x, sigma, sigma_next, sigma_1, 0.7, next_latents=out.next_latents)
    torch.testing.assert_close(rescored.log_prob, out.log_prob)


def test_std_at_sigma_one_uses_second_sigma_and_stays_finite():
    std = sde_std_dev(torch.tensor([1.0, 0.5]), torch.tensor(0.8), 0.7)
    assert torch.isfinite(std).all()
    torch.testing.assert_close(std, torch.tensor([0.7 * math.sqrt(1 / 0.2), 0.7 * math.sqrt(0.5 / 0.5)]))


def test_ode_step_is_euler_and_has_no_log_prob():
    x, v = torch.randn(2, 4), torch.randn(2, 4)
    out = sde_step(v, x, 0.5, 0.25, 0.9, 0.0)
    torch.testing.assert_close(out.next_latents, x - 0.25 * v)
    assert out.log_prob is None


def test_gaussian_log_prob_averages_over_non_batch_dims():
    x = torch.zeros(2, 3)
    lp = gaussian_log_prob(x, torch.zeros(2, 3), torch.ones(2, 3))
    torch.testing.assert_close(lp, torch.full((2,), -0.5 * math.log(2 * math.pi)))


@pytest.fixture(scope="module", params=["sd3", "flux"])
def tiny_pipe(request):
    from mrlora.models.loading import load_pipeline

    fixture = "tiny_sd3_dir" if request.param == "sd3" else "tiny_flux_dir"
    path = request.getfixturevalue(fixture)
    return request.param, load_pipeline(path, request.param, "fp32", "cpu")


KW = dict(num_steps=3, resolution=32, max_sequence_length=16)


def test_ode_path_matches_the_diffusers_pipeline(tiny_pipe):
    arch, pipe = tiny_pipe
    guidance = 4.5 if arch == "sd3" else 3.5
    res = sample(pipe, ["a red cube"], seeds=[7], guidance_scale=guidance, noise_level=0.0, decode=False, **KW)
    assert res.log_probs is None and res.latents.shape[1] == KW["num_steps"] + 1
    ref = pipe(
        ["a red cube"],
        num_inference_steps=KW["num_steps"],
        guidance_scale=guidance,
        height=32,
        width=32,
        latents=res.latents[:, 0],
        output_type="latent",
        max_sequence_length=16,
    ).images
    torch.testing.assert_close(ref.float(), res.latents[:, -1], rtol=1e-5, atol=1e-5)


def test_recomputed_log_prob_equals_the_sampled_one_exactly(tiny_pipe):
    """The ratio new/old at the first inner step (weights unchanged) is exactly 1."""
    arch, pipe = tiny_pipe
    prompts = ["a cat", "a dog", "a cat"]
    res = sample(pipe, prompts, seeds=[1, 2, 3], guidance_scale=4.0, noise_level=0.8, decode=False, **KW)
    model = flow_model(pipe)
    for j in range(KW["num_steps"]):
        out = step_log_prob(
            model,
            pipe.transformer,
            res.latents[:, j],
            res.latents[:, j + 1],
            j,
            res.timesteps,
            res.sigmas,
            res.embeds,
            4.0,
            0.8,
        )
        assert torch.equal(torch.exp(out.log_prob - res.log_probs[:, j]), torch.ones(3))


def test_samples_do_not_depend_on_batching_and_seeds_matter(tiny_pipe):
    arch, pipe = tiny_pipe
    kw = dict(guidance_scale=2.0, noise_level=0.7, decode=False, **KW)
    full = sample(pipe, ["a", "b", "c"], seeds=[5, 6, 7], **kw)
    split = sample(pipe, ["a", "b", "c"], seeds=[5, 6, 7], batch_size=1, **kw)
    torch.testing.assert_close(split.latents, full.latents, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.log_probs, full.log_probs, rtol=1e-4, atol=1e-5)
    other = sample(pipe, ["a"], seeds=[8], **kw)
    assert not torch.allclose(other.latents[0], full.latents[0])
    images = sample(pipe, ["a"], seeds=[5], **{**kw, "decode": True}).images
    assert len(images) == 1 and images[0].size == (32, 32)


def test_seed_count_must_match_prompts(tiny_pipe):
    _, pipe = tiny_pipe
    with pytest.raises(SamplingError, match="one seed per prompt"):
        sample(pipe, ["a", "b"], seeds=[1], guidance_scale=1.0, noise_level=0.5, **KW)


def test_training_forward_can_treat_the_unconditional_prediction_as_a_constant(tiny_sd3_dir):
    """Published Flow-GRPO detaches CFG's unconditional half in training: same value, gradient gs * d(cond)."""
    from mrlora.models.loading import load_pipeline
    from mrlora.sampling import PromptEmbeds

    pipe = load_pipeline(tiny_sd3_dir, "sd3", "fp32", "cpu")
    res = sample(pipe, ["a cat"], seeds=[1], guidance_scale=4.5, noise_level=0.7, decode=False, **KW)
    model, weight = flow_model(pipe), pipe.transformer.proj_out.weight
    weight.requires_grad_(True)

    def run(embeds, detach):
        weight.grad = None
        v = model.velocity(pipe.transformer, res.latents[:, 0], res.timesteps[:1], embeds, 4.5, detach_uncond=detach)
        v.sum().backward()
        return v.detach(), weight.grad.clone()

    v_detached, g_detached = run(res.embeds, True)
    v_full, g_full = run(res.embeds, False)
    _, g_cond = run(PromptEmbeds(res.embeds.prompt_embeds, res.embeds.pooled), False)  # conditional pass only
    assert torch.equal(v_detached, v_full)
    torch.testing.assert_close(g_detached, 4.5 * g_cond, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(g_full, g_detached, rtol=1e-3)
