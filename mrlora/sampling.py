"""Sampling from SD3 / FLUX flow-matching pipelines with per-step log-probabilities (docs/design.md section 5).

Why our own loop instead of ``pipeline(...)``: Flow-GRPO needs, for every denoising step, the latent before and
after the step and the log-density of the transition. diffusers' Euler scheduler is deterministic (an ODE), so
the policy has no density. We replace the step by the SDE of Flow-GRPO, whose marginals match the ODE's, and
whose transition is Gaussian with a known mean and std; ``noise_level=0`` gives back the plain Euler ODE used
for evaluation.

The same code serves training (sampling with the current policy, then recomputing log-probs with gradients
through :func:`predict_velocity` and :func:`sde_step`), evaluation and RaTE. Per-architecture details (prompt
encoding, latent packing, timestep scale, CFG vs. FLUX's guidance embedding) live in :class:`FlowModel`
subclasses; the math is shared.

Every sample draws all its noise (initial latent and per-step noise) from its own ``torch.Generator`` seeded
from ``seeds[i]``, so a sample does not depend on which batch or which process produced it: the key to a
resumed or differently-sharded run seeing the same samples.
"""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mrlora.cli import UserError

LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


class SamplingError(UserError, ValueError):
    """Bad sampling arguments (unknown pipeline, resolution the model cannot take, seeds/prompts mismatch)."""


# ------------------------------------------------------------------------------------------------ the SDE step


@dataclass
class StepOutput:
    """One SDE transition: the next latent, its log-density, the Gaussian mean and std it was drawn from."""

    next_latents: torch.Tensor
    log_prob: torch.Tensor | None  # (B,) mean over non-batch dims; None on the ODE path (noise_level 0)
    mean: torch.Tensor
    std: torch.Tensor  # (B, 1, ...) broadcastable std of the transition: std_dev_t * sqrt(-dt)


def sde_std_dev(sigma: torch.Tensor, sigma_1: torch.Tensor, noise_level: float) -> torch.Tensor:
    """std_dev_t = a * sqrt(sigma / (1 - sigma')), sigma' = sigma except at sigma = 1 where the second sigma is used.

    ``sigma_1`` is the schedule's second sigma (the first one below 1); fp32 in, fp32 out.
    """
    denom_sigma = torch.where(sigma >= 1.0, sigma_1.expand_as(sigma), sigma)
    return noise_level * torch.sqrt(sigma / (1.0 - denom_sigma))


def sde_step(
    velocity: torch.Tensor,
    latents: torch.Tensor,
    sigma: torch.Tensor | float,
    sigma_next: torch.Tensor | float,
    sigma_1: torch.Tensor | float,
    noise_level: float,
    *,
    next_latents: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One Flow-GRPO SDE step from ``sigma`` to ``sigma_next`` (all math in fp32).

    ``sigma`` / ``sigma_next`` are scalars or (B,) tensors (one per sample). Give ``next_latents`` to evaluate the
    log-density of an already-drawn transition (training), or ``noise`` (standard normal, latents' shape) to draw
    one. With ``noise_level == 0`` this is the Euler ODE step ``x + v * dt`` and ``log_prob`` is None.
    """
    x = latents.float()
    v = velocity.float()
    shape = (-1,) + (1,) * (x.ndim - 1)
    sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0]).reshape(shape)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
    sigma_next = sigma_next.reshape(shape)
    sigma_1 = torch.as_tensor(sigma_1, dtype=torch.float32, device=x.device).reshape(-1)[:1].reshape((1,) * x.ndim)
    dt = sigma_next - sigma
    if noise_level == 0:
        mean = x + v * dt
        out = mean if next_latents is None else next_latents.float()
        return StepOutput(out, None, mean, torch.zeros_like(sigma))
    std_dev_t = sde_std_dev(sigma, sigma_1, noise_level)
    mean = x * (1 + std_dev_t**2 / (2 * sigma) * dt) + v * (1 + std_dev_t**2 * (1 - sigma) / (2 * sigma)) * dt
    std = std_dev_t * torch.sqrt(-dt)
    if next_latents is None:
        if noise is None:
            raise SamplingError("sde_step needs either next_latents (to score) or noise (to sample)")
        next_latents = mean + std * noise.float()
    else:
        next_latents = next_latents.float()
    log_prob = gaussian_log_prob(next_latents.detach(), mean, std)
    return StepOutput(next_latents, log_prob, mean, std)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Per-sample Gaussian log-density of ``x`` under N(mean, std^2), averaged over all non-batch dims."""
    lp = -((x - mean) ** 2) / (2 * std**2) - torch.log(std) - LOG_SQRT_2PI
    return lp.mean(dim=tuple(range(1, lp.ndim)))


# --------------------------------------------------------------------------------------- per-architecture glue


@dataclass
class PromptEmbeds:
    """The text conditioning actually used, per sample (the unconditional one shared by all samples).

    ``negative_*`` is None when there is no negative pass (FLUX, or guidance_scale <= 1). ``text_ids`` is FLUX's
    positional ids of the text tokens.
    """

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor
    negative_prompt_embeds: torch.Tensor | None = None
    negative_pooled: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None

    def select(self, index: torch.Tensor | slice | Sequence[int]) -> "PromptEmbeds":
        """The embeddings of a subset of samples (the shared negative is kept as is)."""
        return PromptEmbeds(
            self.prompt_embeds[index],
            self.pooled[index],
            self.negative_prompt_embeds,
            self.negative_pooled,
            self.text_ids,
        )

    @staticmethod
    def cat(parts: Sequence["PromptEmbeds"]) -> "PromptEmbeds":
        first = parts[0]
        return PromptEmbeds(
            torch.cat([p.prompt_embeds for p in parts]),
            torch.cat([p.pooled for p in parts]),
            first.negative_prompt_embeds,
            first.negative_pooled,
            first.text_ids,
        )


class FlowModel(abc.ABC):
    """What the sampler needs from a pipeline: encode prompts, make latents, run the transformer, decode."""

    arch = ""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline

    @property
    def device(self) -> torch.device:
        return self.pipeline.transformer.device

    @property
    def dtype(self) -> torch.dtype:
        return self.pipeline.transformer.dtype

    def latent_size(self, resolution: int) -> int:
        scale = self.pipeline.vae_scale_factor
        if resolution % (scale * 2):
            raise SamplingError(f"resolution {resolution} must be a multiple of {scale * 2} for this model")
        return resolution // scale

    def schedule(self, num_steps: int, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (T,), sigmas (T+1,), ending at 0) of the pipeline's scheduler, without mutating it."""
        sched = type(self.pipeline.scheduler).from_config(self.pipeline.scheduler.config)
        self._set_timesteps(sched, num_steps, resolution)
        return sched.timesteps.float().cpu(), sched.sigmas.float().cpu()

    @abc.abstractmethod
    def _set_timesteps(self, sched, num_steps: int, resolution: int) -> None: ...

    @abc.abstractmethod
    def encode(self, prompts: list[str], guidance_scale: float, max_sequence_length: int) -> PromptEmbeds: ...

    @abc.abstractmethod
    def initial_latents(self, generators: list[torch.Generator], resolution: int) -> torch.Tensor: ...

    @abc.abstractmethod
    def velocity(
        self,
        transformer,
        latents: torch.Tensor,
        timesteps: torch.Tensor,
        embeds: PromptEmbeds,
        guidance_scale: float,
        detach_uncond: bool = False,
    ) -> torch.Tensor:
        """The (guided) velocity for ``latents`` at per-sample ``timesteps`` (scheduler scale, 0..1000).

        ``detach_uncond``: treat the unconditional prediction of true CFG as a constant for gradients.
        """
        ...

    @abc.abstractmethod
    def decode(self, latents: torch.Tensor, resolution: int) -> list: ...

    @torch.no_grad()
    def _vae_decode(self, latents: torch.Tensor) -> list:
        vae = self.pipeline.vae
        latents = latents.to(vae.dtype) / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents, return_dict=False)[0]
        return self.pipeline.image_processor.postprocess(image, output_type="pil")


class SD3Model(FlowModel):
    """StableDiffusion3Pipeline: three text encoders, true CFG with an empty negative prompt."""

    arch = "sd3"

    def __init__(self, pipeline: Any):
        super().__init__(pipeline)
        self._negative: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def _set_timesteps(self, sched, num_steps, resolution):
        kwargs = {}
        if sched.config.get("use_dynamic_shifting", False):
            from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

            seq = (self.latent_size(resolution) // self.pipeline.transformer.config.patch_size) ** 2
            kwargs["mu"] = calculate_shift(
                seq,
                sched.config.get("base_image_seq_len", 256),
                sched.config.get("max_image_seq_len", 4096),
                sched.config.get("base_shift", 0.5),
                sched.config.get("max_shift", 1.16),
            )
        sched.set_timesteps(num_steps, device="cpu", **kwargs)

    def encode(self, prompts, guidance_scale, max_sequence_length):
        pe, pooled = self._encode(prompts, max_sequence_length)
        if guidance_scale <= 1.0:
            return PromptEmbeds(pe, pooled)
        return PromptEmbeds(pe, pooled, *self._negative_embeds(max_sequence_length))

    def _negative_embeds(self, max_sequence_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty negative prompt (the pipeline's default), encoded once per model and sequence length.

        Training encodes every micro-batch; the three text encoders (T5-XXL on SD3.5) are frozen and "" holds no
        RaTE token, so its embedding never changes and needs no graph. Built outside inference mode, so a
        first call from an inference-mode caller does not leave a tensor that a later training step cannot use.
        """
        if max_sequence_length not in self._negative:
            with torch.inference_mode(False), torch.no_grad():
                self._negative[max_sequence_length] = self._encode([""], max_sequence_length)
        return self._negative[max_sequence_length]

    def _encode(self, prompts, max_sequence_length):
        pe, _, pooled, _ = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            prompt_3=prompts,
            device=self.device,
            do_classifier_free_guidance=False,
            max_sequence_length=max_sequence_length,
        )
        return pe, pooled

    def initial_latents(self, generators, resolution):
        size = self.latent_size(resolution)
        shape = (self.pipeline.transformer.config.in_channels, size, size)
        return torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)

    def velocity(self, transformer, latents, timesteps, embeds, guidance_scale, detach_uncond=False):
        x = latents.to(self.dtype)
        t = timesteps.to(device=x.device, dtype=x.dtype)
        if embeds.negative_prompt_embeds is None:
            return transformer(
                hidden_states=x,
                timestep=t,
                encoder_hidden_states=embeds.prompt_embeds,
                pooled_projections=embeds.pooled,
                return_dict=False,
            )[0]
        n = x.shape[0]
        neg = embeds.negative_prompt_embeds.expand(n, -1, -1)
        npooled = embeds.negative_pooled.expand(n, -1)
        out = transformer(
            hidden_states=torch.cat([x, x]),
            timestep=torch.cat([t, t]),
            encoder_hidden_states=torch.cat([neg, embeds.prompt_embeds]),
            pooled_projections=torch.cat([npooled, embeds.pooled]),
            return_dict=False,
        )[0]
        uncond, cond = out.float().chunk(2)
        if detach_uncond:
            uncond = uncond.detach()
        return uncond + guidance_scale * (cond - uncond)

    def decode(self, latents, resolution):
        return self._vae_decode(latents)


class FluxModel(FlowModel):
    """FluxPipeline: packed 2x2 latents, rope ids, and (FLUX.1-dev) guidance as an embedding, no negative pass.

    FLUX.1-dev is guidance-distilled: ``guidance_scale`` is fed to the transformer's guidance embedding. A FLUX
    transformer without ``guidance_embeds`` (e.g. schnell) is sampled unguided; true CFG is not implemented.
    """

    arch = "flux"

    def _set_timesteps(self, sched, num_steps, resolution):
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        seq = (self.latent_size(resolution) // 2) ** 2
        mu = calculate_shift(
            seq,
            sched.config.get("base_image_seq_len", 256),
            sched.config.get("max_image_seq_len", 4096),
            sched.config.get("base_shift", 0.5),
            sched.config.get("max_shift", 1.15),
        )
        sigmas = np.linspace(1.0, 1 / num_steps, num_steps)
        sched.set_timesteps(sigmas=sigmas, device="cpu", mu=mu)

    def encode(self, prompts, guidance_scale, max_sequence_length):
        pe, pooled, text_ids = self.pipeline.encode_prompt(
            prompt=prompts,
            prompt_2=prompts,
            device=self.device,
            max_sequence_length=max_sequence_length,
        )
        return PromptEmbeds(pe, pooled, text_ids=text_ids)

    def initial_latents(self, generators, resolution):
        size = self.latent_size(resolution)
        channels = self.pipeline.transformer.config.in_channels // 4
        noise = torch.stack([torch.randn((channels, size, size), generator=g) for g in generators])
        packed = self.pipeline._pack_latents(noise, len(generators), channels, size, size)
        return packed.to(self.device)

    def velocity(self, transformer, latents, timesteps, embeds, guidance_scale, detach_uncond=False):
        # guidance is an embedding here: there is no unconditional pass, so detach_uncond changes nothing
        x = latents.to(self.dtype)
        n = x.shape[0]
        side = int(round(math.sqrt(x.shape[1])))
        img_ids = self.pipeline._prepare_latent_image_ids(n, side, side, x.device, x.dtype)
        guidance = None
        if transformer_config(transformer).guidance_embeds:
            guidance = torch.full((n,), float(guidance_scale), device=x.device, dtype=torch.float32)
        out = transformer(
            hidden_states=x,
            timestep=(timesteps.to(device=x.device, dtype=x.dtype) / 1000),
            guidance=guidance,
            pooled_projections=embeds.pooled,
            encoder_hidden_states=embeds.prompt_embeds,
            txt_ids=embeds.text_ids,
            img_ids=img_ids,
            return_dict=False,
        )[0]
        return out.float()

    def decode(self, latents, resolution):
        unpacked = self.pipeline._unpack_latents(latents, resolution, resolution, self.pipeline.vae_scale_factor)
        return self._vae_decode(unpacked)


def transformer_config(transformer):
    """The diffusers config of a transformer that may be wrapped by peft, DDP or DeepSpeed."""
    module = transformer
    while not hasattr(module, "config") or not hasattr(module.config, "in_channels"):
        inner = getattr(module, "module", None) or getattr(module, "base_model", None)
        if inner is None:
            break
        module = inner
    return module.config


def flow_model(pipeline: Any) -> FlowModel:
    """The :class:`FlowModel` for a loaded diffusers pipeline (SD3 or FLUX)."""
    name = type(pipeline).__name__
    if name.startswith("StableDiffusion3"):
        return SD3Model(pipeline)
    if name.startswith("Flux"):
        return FluxModel(pipeline)
    raise SamplingError(f"unsupported pipeline {name}; mrlora samples StableDiffusion3Pipeline and FluxPipeline")


# --------------------------------------------------------------------------------------------------- sampling


@dataclass
class SampleResult:
    """What :func:`sample` produced for N prompts with T steps.

    ``latents`` (N, T+1, *latent) holds x_0 (noise) .. x_T (final, in the transformer's layout: packed for
    FLUX); ``log_probs`` (N, T) the log-density of each transition, None on the ODE path; ``timesteps`` (T,)
    scheduler timesteps; ``sigmas`` (T+1,) ending at 0; ``embeds`` the conditioning used; ``images`` PIL images
    (empty when ``decode=False``).
    """

    images: list
    latents: torch.Tensor
    log_probs: torch.Tensor | None
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    embeds: PromptEmbeds
    prompts: list[str] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)


def sample_generators(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    return [torch.Generator(device=device).manual_seed(int(s)) for s in seeds]


@torch.no_grad()
def sample(
    pipeline: Any,
    prompts: Sequence[str],
    *,
    seeds: Sequence[int] | None = None,
    generator: torch.Generator | None = None,
    num_steps: int,
    guidance_scale: float,
    resolution: int,
    noise_level: float,
    batch_size: int | None = None,
    max_sequence_length: int = 256,
    transformer: Any = None,
    decode: bool = True,
) -> SampleResult:
    """Sample one image per prompt with the SDE (``noise_level > 0``) or the ODE (``noise_level == 0``).

    Noise: ``seeds`` (one per prompt; each sample gets its own generator, so results do not depend on batching)
    or ``generator`` (one stream, drawn for each sample's seed in order); default seeds 0..N-1.
    ``transformer`` overrides ``pipeline.transformer`` (e.g. a peft-wrapped copy). Runs in ``batch_size`` chunks.
    """
    prompts = list(prompts)
    if not prompts:
        raise SamplingError("no prompts to sample")
    if seeds is None:
        if generator is not None:
            seeds = torch.randint(0, 2**62, (len(prompts),), generator=generator).tolist()
        else:
            seeds = list(range(len(prompts)))
    seeds = [int(s) for s in seeds]
    if len(seeds) != len(prompts):
        raise SamplingError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
    if num_steps < 1:
        raise SamplingError(f"num_steps must be >= 1, got {num_steps}")
    model = flow_model(pipeline)
    transformer = transformer if transformer is not None else pipeline.transformer
    timesteps, sigmas = model.schedule(num_steps, resolution)
    batch_size = batch_size or len(prompts)
    parts: list[tuple] = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        gens = sample_generators(seeds[chunk])
        embeds = model.encode(prompts[chunk], guidance_scale, max_sequence_length)
        x = model.initial_latents(gens, resolution).float()
        traj, lps = [x], []
        for i in range(num_steps):
            t = timesteps[i].expand(x.shape[0])
            v = model.velocity(transformer, x, t, embeds, guidance_scale)
            noise = None
            if noise_level > 0:
                noise = torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens]).to(x.device)
            step = sde_step(v, x, sigmas[i], sigmas[i + 1], sigmas[1], noise_level, noise=noise)
            x = step.next_latents
            traj.append(x)
            if step.log_prob is not None:
                lps.append(step.log_prob)
        images = model.decode(x, resolution) if decode else []
        parts.append((torch.stack(traj, dim=1), torch.stack(lps, dim=1) if lps else None, embeds, images))
    return SampleResult(
        images=[im for p in parts for im in p[3]],
        latents=torch.cat([p[0] for p in parts]),
        log_probs=torch.cat([p[1] for p in parts]) if noise_level > 0 else None,
        timesteps=timesteps,
        sigmas=sigmas,
        embeds=PromptEmbeds.cat([p[2] for p in parts]),
        prompts=prompts,
        seeds=seeds,
    )


def step_log_prob(
    model: FlowModel,
    transformer: Any,
    latents: torch.Tensor,
    next_latents: torch.Tensor,
    step_index: int,
    timesteps: torch.Tensor,
    sigmas: torch.Tensor,
    embeds: PromptEmbeds,
    guidance_scale: float,
    noise_level: float,
    detach_uncond: bool = False,
) -> StepOutput:
    """Recompute step ``step_index``'s transition density under ``transformer`` (with gradients if enabled).

    ``detach_uncond``: with true CFG, let gradients flow only through the conditional prediction, as published
    Flow-GRPO's training forward does (the value is unchanged; models without an unconditional pass ignore it).
    """
    t = timesteps[step_index].expand(latents.shape[0])
    v = model.velocity(transformer, latents, t, embeds, guidance_scale, detach_uncond=detach_uncond)
    return sde_step(
        v, latents, sigmas[step_index], sigmas[step_index + 1], sigmas[1], noise_level, next_latents=next_latents
    )
