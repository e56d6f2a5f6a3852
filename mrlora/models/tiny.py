"""Tiny random SD3 / FLUX models, written to disk in the normal diffusers layout.

Why: every code path that touches a model (loading, sampling, LoRA training, merging, eval) must run on a
machine with no GPU and no hub access, and the loading code users rely on (``from_pretrained``) must be the code
under test. So we build real diffusers/transformers modules from small configs, save them as a complete model
directory, and load them back exactly like ``stabilityai/stable-diffusion-3.5-medium`` or
``black-forest-labs/FLUX.1-dev``.

Shapes (each choice that a real model would not make is explained):

- SD3: ``SD3Transformer2DModel`` patch 1, head dim 8, 4 heads, joint/caption dim 32, pooled 64, in/out channels
  4; like SD3.5-M it uses RMS qk-norm and a dual-attention first block. Two layers instead of one, because the
  last SD3 block is "context pre-only" and has no ``to_add_out``: with a single layer one of the published LoRA
  targets would not exist. ``sample_size`` 8 (not 32) so the pipeline's default resolution is 64 px.
- FLUX: ``FluxTransformer2DModel`` 1 double + 1 single block, head dim 16, 2 heads, joint 32, pooled 32, rope
  axes (4, 4, 8), guidance embedding on (as FLUX.1-dev), in_channels 16 (4 latent channels packed 2x2).
- Text: two ``CLIPTextModelWithProjection`` (SD3; pooled 32 + 32 = 64) or one ``CLIPTextModel`` (FLUX; pooled 32),
  hidden 32, 5 layers, vocab 1000; ``T5EncoderModel`` d_model 32, 2 layers.
- VAE: ``AutoencoderKL`` with 4 one-layer blocks of 8 channels. Four blocks, not one, because the pipelines
  derive the latent downsampling from the block count (2 ** (blocks - 1)): 64 px -> 8x8 latents, which FLUX
  packs into 16 tokens. Scaling/shift factors are the real models' values. The decoder is rewired into a smooth
  colour map of the latent (``_make_decoder_legible``), so cheap image rewards respond to what the LoRA learns.
- Scheduler: ``FlowMatchEulerDiscreteScheduler`` with SD3.5's shift 3.0, or FLUX.1-dev's dynamic shifting.

Builds are deterministic given the seed, atomic (built in a hidden sibling directory, ``TINY_COMPLETE.json``
written last, then renamed into place; a killed build leaves only a ``.partial`` sibling that the next build
removes) and idempotent (a complete directory is left untouched).

CLI: ``python -m mrlora.models.tiny --arch sd3 --out DIR [--seed N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

from mrlora.cli import add_version_flag, main_entry
from mrlora.models.errors import TinyBuildError, UnknownArchError
from mrlora.runstore import pid_alive

TINY_VERSION = 2  # bump when the tiny configs change, so cached builds are not reused across versions
TINY_ARCHS = ("sd3", "flux")
MARKER = "TINY_COMPLETE.json"
DEFAULT_RESOLUTION = 64

_PARTIAL_TAG = ".partial-"
_STALE_FOREIGN_PARTIAL_S = 24 * 3600  # partial dirs from other hosts: we cannot check their pid


@dataclass(frozen=True)
class TinyMarker:
    """Contents of ``TINY_COMPLETE.json``: what was built, so a rebuild request can be checked against it."""

    arch: str
    seed: int
    version: int
    diffusers: str
    transformers: str
    created: float


def process_group_rank() -> int:
    """This process's rank when a torch.distributed process group is up, else 0 (never imports torch itself).

    Why builds care: transformers' ``save_pretrained`` writes weights only on rank 0 of an initialised group, so a
    build on another rank would end "complete" with text encoders that have no weights.
    """
    torch = sys.modules.get("torch")
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank())
    return 0


def check_arch(arch: str) -> str:
    if arch not in TINY_ARCHS:
        raise UnknownArchError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    return arch


def read_marker(out: str | os.PathLike[str]) -> TinyMarker | None:
    """The marker of a complete tiny build at ``out``, or None if the directory is absent or incomplete."""
    path = Path(out) / MARKER
    try:
        data = json.loads(path.read_text())
        return TinyMarker(**data)
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (ValueError, TypeError) as exc:
        raise TinyBuildError(f"{path} is unreadable ({exc}); delete {Path(out)} and build again") from exc


# --------------------------------------------------------------------------------------------------------------
# component configs


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for one component without disturbing the caller's RNG state."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _clip_config(tokenizer: Any, with_projection: bool) -> Any:
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=1000,
        hidden_size=32,
        intermediate_size=37,
        num_hidden_layers=5,
        num_attention_heads=4,
        max_position_embeddings=tokenizer.model_max_length,
        projection_dim=32 if with_projection else 512,
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _t5_config(tokenizer: Any) -> Any:
    from transformers import T5Config

    return T5Config(
        vocab_size=1000,
        d_model=32,
        d_kv=8,
        d_ff=37,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )


def _vae(arch: str) -> Any:
    from diffusers import AutoencoderKL

    # The real models' latent statistics: SD3.5 (1.5305, 0.0609), FLUX.1 (0.3611, 0.1159).
    scaling, shift = (1.5305, 0.0609) if arch == "sd3" else (0.3611, 0.1159)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=DEFAULT_RESOLUTION,
        scaling_factor=scaling,
        shift_factor=shift,
        use_quant_conv=False,
        use_post_quant_conv=False,
        mid_block_add_attention=True,
    )


def _make_decoder_legible(vae: Any, seed: int, gain: float = 0.5) -> None:
    """Rewire the random VAE decoder into a smooth colour map of the latent, so image rewards can be learnt.

    Why: a randomly initialised ``AutoencoderKL`` decoder ends in a GroupNorm that removes each group's mean, and
    its random residual blocks wash out the rest, so every latent decodes to nearly the same image statistics
    (measured: brightness std 0.002 over random latents). A cheap reward then has nothing to learn and the tiny
    demo's curves are flat noise. Like the "latent preview" of real pipelines, we make the decoder transparent,
    using only the stock layers so saving, loading and decoding stay the real code:

    - ``conv_in`` writes each latent mix ``s_k = A_k . z`` (random ``A``) into a channel pair ``(s_k, -s_k)``;
      a pair is one GroupNorm group, so the group's mean is exactly 0 and the norms only divide by its rms:
      ``u_k = s_k / rms(s_k)``, whose spatial mean (-1..1) says how uniform and how signed the latent is;
    - every residual branch (resnet ``conv2``, attention ``to_out``) is zero, so those blocks are identities;
    - the upsampling convs blur each channel on its own (a 3x3 binomial kernel), so 8x8 latents become smooth
      64 px images instead of blocks, whose JPEG size follows the latent (the conv's zero padding fades the
      outer ~8 px towards grey);
    - ``conv_out`` reads ``silu(u) - silu(-u) = u`` from each pair, so ``rgb = gain * M u`` (random ``M``).

    Brightness, colourfulness and JPEG size then follow the latent (brightness std 0.03 over random latents,
    15x the random decoder's) and a LoRA that moves the latent moves the reward. Scale is normalised away, so
    a uniform latent gives a flat, bright or dark, compressible image and a mixed one a colourful, busier one:
    the cheap rewards pull against each other, as the demo needs. The encoder stays random: nothing trains
    through it.
    """
    import torch

    decoder = vae.decoder
    channels = decoder.conv_in.out_channels
    n = decoder.conv_in.in_channels
    if channels != 2 * n or decoder.conv_norm_out.num_groups != n:
        raise TinyBuildError(
            f"the legible decoder needs one GroupNorm group of 2 channels per latent channel, got "
            f"{channels} channels in {decoder.conv_norm_out.num_groups} groups for {n} latent "
            f"channels"
        )
    generator = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=generator)
    colours = torch.randn(3, n, generator=generator) / n**0.5
    blur = torch.tensor([[1.0, 2.0, 1.0], [2.0, 4.0, 2.0], [1.0, 2.0, 1.0]]) / 16
    with torch.no_grad():
        for param in decoder.parameters():
            param.zero_()
        for module in decoder.modules():
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.fill_(1.0)
        for k in range(n):
            decoder.conv_in.weight[2 * k, :, 1, 1] = mix[k]
            decoder.conv_in.weight[2 * k + 1, :, 1, 1] = -mix[k]
            decoder.conv_out.weight[:, 2 * k, 1, 1] = gain * colours[:, k]
            decoder.conv_out.weight[:, 2 * k + 1, 1, 1] = -gain * colours[:, k]
        for block in decoder.up_blocks:
            for upsampler in block.upsamplers or []:
                for c in range(channels):
                    upsampler.conv.weight[c, c] = blur


def _scheduler(arch: str) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    if arch == "sd3":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=3.0,
        use_dynamic_shifting=True,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )


def build_pipeline(arch: str, seed: int = 0) -> Any:
    """The tiny pipeline in memory (fp32, CPU). ``build_tiny`` saves it; tests may use it directly."""
    check_arch(arch)
    from diffusers import FluxPipeline, FluxTransformer2DModel, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

    from mrlora.models.tiny_tokenizers import build_clip_tokenizer, build_t5_tokenizer

    base = seed * 100  # each component gets its own stream, so changing one config leaves the others unchanged
    vae_scale = 8
    with _seeded(base + 1):
        vae = _vae(arch)
    _make_decoder_legible(vae, seed=base + 6)
    if arch == "sd3":
        with _seeded(base + 2):
            transformer = SD3Transformer2DModel(
                sample_size=DEFAULT_RESOLUTION // vae_scale,
                patch_size=1,
                in_channels=4,
                out_channels=4,
                num_layers=2,
                attention_head_dim=8,
                num_attention_heads=4,
                joint_attention_dim=32,
                caption_projection_dim=32,
                pooled_projection_dim=64,
                pos_embed_max_size=32,
                dual_attention_layers=(0,),
                qk_norm="rms_norm",
            )
        tokenizer, tokenizer_2, tokenizer_3 = build_clip_tokenizer(), build_clip_tokenizer(), build_t5_tokenizer()
        with _seeded(base + 3):
            text_encoder = CLIPTextModelWithProjection(_clip_config(tokenizer, with_projection=True))
        with _seeded(base + 4):
            text_encoder_2 = CLIPTextModelWithProjection(_clip_config(tokenizer_2, with_projection=True))
        with _seeded(base + 5):
            text_encoder_3 = T5EncoderModel(_t5_config(tokenizer_3))
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=_scheduler(arch),
            vae=vae,
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            text_encoder_2=text_encoder_2.eval(),
            tokenizer_2=tokenizer_2,
            text_encoder_3=text_encoder_3.eval(),
            tokenizer_3=tokenizer_3,
        )
    with _seeded(base + 2):
        transformer = FluxTransformer2DModel(
            patch_size=1,
            in_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=32,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),
        )
    tokenizer, tokenizer_2 = build_clip_tokenizer(), build_t5_tokenizer()
    with _seeded(base + 3):
        text_encoder = CLIPTextModel(_clip_config(tokenizer, with_projection=False))
    with _seeded(base + 5):
        text_encoder_2 = T5EncoderModel(_t5_config(tokenizer_2))
    return FluxPipeline(
        transformer=transformer,
        scheduler=_scheduler(arch),
        vae=vae,
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2.eval(),
        tokenizer_2=tokenizer_2,
    )


# --------------------------------------------------------------------------------------------------------------
# atomic, idempotent build on disk


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """No per-shard progress bars in job logs for a build that takes a second."""
    from diffusers.utils import logging as d_logging
    from transformers.utils import logging as t_logging

    states = [(mod, mod.is_progress_bar_enabled()) for mod in (d_logging, t_logging)]
    for mod, _ in states:
        mod.disable_progress_bar()
    try:
        yield
    finally:
        for mod, enabled in states:
            if enabled:
                mod.enable_progress_bar()


def _partial_path(out: Path) -> Path:
    """A hidden sibling of ``out`` named after this host and pid, so a later build can tell if it is abandoned."""
    return out.with_name(f".{out.name}{_PARTIAL_TAG}{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}")


def _remove_stale_partials(out: Path) -> None:
    """Delete ``.partial`` siblings left by killed builds (own host: dead pid; other hosts: older than a day)."""
    host = socket.gethostname()
    prefix = f".{out.name}{_PARTIAL_TAG}"
    try:
        siblings = list(out.parent.iterdir())
    except FileNotFoundError:
        return
    for path in siblings:
        if not path.name.startswith(prefix):
            continue
        parts = path.name[len(prefix) :].rsplit("-", 2)  # <host>-<pid>-<token>; host may contain dashes
        if len(parts) == 3 and parts[1].isdigit():
            owner_host, pid = parts[0], int(parts[1])
            if owner_host == host:
                stale = not pid_alive(pid)
            else:
                stale = _age(path) > _STALE_FOREIGN_PARTIAL_S
        else:
            stale = _age(path) > _STALE_FOREIGN_PARTIAL_S
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _check_existing(out: Path, marker: TinyMarker, arch: str, seed: int) -> Path:
    if (marker.arch, marker.seed, marker.version) != (arch, seed, TINY_VERSION):
        raise TinyBuildError(
            f"{out} already holds a tiny model (arch={marker.arch}, seed={marker.seed}, version={marker.version}), "
            f"not the requested arch={arch}, seed={seed}, version={TINY_VERSION}; choose another directory or "
            f"delete it"
        )
    return out


def _move_aside_incomplete(out: Path) -> None:
    """Rename an incomplete directory out of the way (atomic for readers), then delete it.

    The temporary name follows the ``.partial`` pattern, so a deletion killed half-way is cleaned up later too.
    """
    trash = _partial_path(out)
    try:
        os.rename(out, trash)
    except FileNotFoundError:
        return  # another process moved it first
    shutil.rmtree(trash, ignore_errors=True)


def build_tiny(arch: str, out: str | os.PathLike[str], seed: int = 0, replace_incomplete: bool = False) -> Path:
    """Build the tiny ``arch`` model into ``out`` unless a complete build with the same seed is already there.

    ``out`` appears only once the model is complete (marker written, then one rename). If ``out`` exists without
    a marker it is replaced when it is empty or ``replace_incomplete`` is set (used for mrlora's own cache);
    otherwise a ``TinyBuildError`` says what to do, so an unrelated directory is never deleted.
    Concurrent builders are safe: the first rename wins and the others discard their copy.
    """
    check_arch(arch)
    out = Path(out).expanduser().absolute()
    marker = read_marker(out)
    if marker is not None:
        return _check_existing(out, marker, arch, seed)
    rank = process_group_rank()
    if rank != 0:
        raise TinyBuildError(
            f"cannot build the tiny {arch} model on rank {rank} of a process group (transformers "
            f"writes weights only on rank 0); build it before starting the job "
            f"(python -m mrlora.models.tiny --arch {arch} --out DIR) or let rank 0 build it"
        )
    if out.exists():
        if not out.is_dir():
            raise TinyBuildError(f"{out} exists and is not a directory; choose another output path")
        if any(out.iterdir()) and not replace_incomplete:
            raise TinyBuildError(
                f"{out} exists but holds no complete tiny model (no {MARKER}); delete it or choose another --out"
            )
        _move_aside_incomplete(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(out)

    import diffusers
    import transformers

    partial = _partial_path(out)
    try:
        pipe = build_pipeline(arch, seed)
        with _quiet_progress_bars():
            pipe.save_pretrained(partial, safe_serialization=True)
        done = TinyMarker(
            arch=arch,
            seed=seed,
            version=TINY_VERSION,
            diffusers=diffusers.__version__,
            transformers=transformers.__version__,
            created=time.time(),
        )
        tmp_marker = partial / f".{MARKER}.tmp"
        tmp_marker.write_text(json.dumps(asdict(done), indent=2) + "\n")
        os.replace(tmp_marker, partial / MARKER)
        try:
            os.rename(partial, out)
        except OSError:
            # Lost the race: someone else renamed a build into place (or created the directory) meanwhile.
            winner = read_marker(out)
            if winner is None:
                raise TinyBuildError(
                    f"could not move the finished build into {out}: something else created it meanwhile; "
                    f"delete it and build again"
                ) from None
            return _check_existing(out, winner, arch, seed)
        return out
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mrlora.models.tiny",
        description="Build a tiny random SD3 or FLUX model directory (diffusers layout, no download).",
    )
    parser.add_argument("--arch", required=True, choices=TINY_ARCHS, help="which pipeline to build")
    parser.add_argument("--out", required=True, help="output model directory (created atomically)")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    print(build_tiny(args.arch, args.out, seed=args.seed))
    return 0


if __name__ == "__main__":
    main_entry(main, prog="mrlora.models.tiny")
