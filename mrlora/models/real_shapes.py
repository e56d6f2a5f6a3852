"""Random models with the *real* transformer shapes of SD3.5 Medium / FLUX.1-dev, written without a download.

Why: tiny models (``mrlora.models.tiny``) exercise every code path but none of the real sizes: 2.5B (SD3.5-M)
or 12B (FLUX.1-dev) parameters, 1536- or 3072-wide layers, dual attention, qk RMSNorm, 4096-wide T5 context.
Memory, dtype and shape bugs only show at those sizes, and the first place to meet them must not be a user's
first GPU job. This builder writes a complete diffusers model directory whose transformer has the published
config (``mrlora.models.real_configs``; depth may be reduced for FLUX on a small machine) with random weights,
loadable by ``mrlora.models.loading.load_pipeline`` and the public ``from_pretrained``.

- Transformer: built on the meta device (buffers real: SD3's sin-cos position table is part of the checkpoint),
  then materialised one top-level module or block at a time with PyTorch's default initialisation, cast, written
  into its safetensors shard and dropped again, so peak memory stays near one block plus the position table,
  never the model (FLUX.1-dev at full depth is 24 GB in bf16). Shards plus
  ``diffusion_pytorch_model.safetensors.index.json``, as diffusers' own ``save_pretrained`` lays them out.
- Text encoders at their real widths (CLIP-L 768, CLIP-G 1280 with their projections, so the pooled vector is
  the real 2048 / 768; T5 d_model 4096) but shallow (``TEXT_LAYERS``) and with the tiny tokenizers' 1000-word
  vocabulary: every tensor the transformer receives has its real shape at a fraction of the 5B T5's size.
- VAE: the real ``AutoencoderKL`` config (16 latent channels, 8x downsampling, the real scaling/shift), random.
- Scheduler: the same ones as the tiny builds (SD3.5's shift 3.0, FLUX.1-dev's dynamic shifting).

Builds are deterministic given the seed and atomic (built in a hidden sibling, ``REAL_SHAPES_COMPLETE.json``
written last, then renamed into place). CLI::

    python -m mrlora.models.real_shapes --arch sd3 --out /tmp/sd35m-shapes
    python -m mrlora.models.real_shapes --arch flux --out /tmp/flux-shapes --double-layers 2 --single-layers 2
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from mrlora.cli import add_version_flag
from mrlora.models.errors import ModelError, TinyBuildError
from mrlora.models.real_configs import PIPELINES, real_components

MARKER = "REAL_SHAPES_COMPLETE.json"
TEXT_LAYERS = {"clip": 2, "t5": 1}  # CLIP: two, so the penultimate hidden state SD3 reads is a real layer's
TEXT_VOCAB = 1000  # the tiny tokenizers' vocabulary (mrlora.models.tiny_tokenizers)
SHARD_BYTES = 2 * 10**9
WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"


def transformer_config(
    arch: str, layers: int | None = None, double_layers: int | None = None, single_layers: int | None = None
) -> dict:
    """The published transformer config, optionally shallower (same widths; SD3's block roles kept).

    SD3: ``layers`` blocks; the dual-attention blocks are the published ones that still exist, never the last
    block (it is "context pre-only" and has no second attention). FLUX: ``double_layers`` / ``single_layers``.
    """
    cfg = real_components(arch)["transformer"][1]
    if arch == "sd3":
        if double_layers is not None or single_layers is not None:
            raise TinyBuildError("--double-layers/--single-layers are FLUX's; for sd3 use --layers N")
        if layers is not None:
            if layers < 2:
                raise TinyBuildError("--layers must be at least 2 (the last SD3 block is context pre-only)")
            cfg["num_layers"] = layers
            cfg["dual_attention_layers"] = [i for i in cfg["dual_attention_layers"] if i < layers - 1]
    else:
        if layers is not None:
            raise TinyBuildError("--layers is SD3's; for flux use --double-layers N --single-layers M")
        for key, value in (("num_layers", double_layers), ("num_single_layers", single_layers)):
            if value is not None:
                if value < 1:
                    raise TinyBuildError(f"FLUX needs at least one block of each kind, got {key}={value}")
                cfg[key] = value
    return cfg


# --------------------------------------------------------------------------------------------- the transformer


def _units(model: Any) -> Iterator[tuple[str, Any]]:
    """(prefix, module) in state_dict order: each block on its own, every other top-level module whole."""
    import torch

    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for i, block in enumerate(child):
                yield f"{name}.{i}.", block
        else:
            yield f"{name}.", child


def _materialise(unit: Any) -> None:
    """Give ``unit``'s meta parameters storage and PyTorch's default init (what a fresh diffusers model gets).

    Layers initialise themselves (``reset_parameters``); the only parameters without one in these models are
    diffusers' RMSNorm weights, which start at one. Buffers were built for real and are left alone.
    """
    import torch

    with torch.no_grad():
        for module in unit.modules():
            own = dict(module.named_parameters(recurse=False))
            if not own:
                continue
            for key, param in own.items():
                setattr(
                    module,
                    key,
                    torch.nn.Parameter(torch.empty_like(param, device="cpu"), requires_grad=param.requires_grad),
                )
            if hasattr(module, "reset_parameters"):
                module.reset_parameters()
            else:
                for key, param in module.named_parameters(recurse=False):
                    if param.dim() != 1:
                        raise TinyBuildError(f"no initialiser for {type(module).__name__}.{key} {tuple(param.shape)}")
                    param.fill_(1.0 if key == "weight" else 0.0)


def _plan_shards(shapes: dict[str, tuple[int, ...]], itemsize: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name, shape in shapes.items():
        nbytes = itemsize * _numel(shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def write_transformer(arch: str, config: dict, out: Path, dtype: str = "bf16", seed: int = 0) -> dict:
    """Write the random transformer of ``config`` into ``out`` (config.json, shards, index); return a summary."""
    import torch
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from mrlora.models.loading import torch_dtype
    from mrlora.reduce.safetensors_io import DTYPE_NAMES, OutEntry, StreamingWriter

    cls = SD3Transformer2DModel if arch == "sd3" else FluxTransformer2DModel
    target = torch_dtype(dtype)
    with init_empty_weights(include_buffers=False):
        model = cls.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_config(out)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    itemsize = torch.empty((), dtype=target).element_size()
    shards = _plan_shards(shapes, itemsize)
    names = [f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    file_of = {key: names[i] for i, keys in enumerate(shards) for key in keys}
    writers: dict[str, Any] = {}
    remaining = {name: len(keys) for name, keys in zip(names, shards)}
    peak_unit = 0
    torch.manual_seed(seed)
    try:
        for prefix, unit in _units(model):
            _materialise(unit)
            tensors = {prefix + k: v for k, v in unit.state_dict().items()}
            peak_unit = max(peak_unit, sum(t.numel() for t in tensors.values()))
            for key, tensor in tensors.items():
                fname = file_of[key]
                if fname not in writers:
                    entries = [OutEntry(k, DTYPE_NAMES[target], shapes[k]) for k in shards[names.index(fname)]]
                    writers[fname] = StreamingWriter(out / fname, entries, {"format": "pt"}).__enter__()
                writers[fname].write(key, tensor.to(target).contiguous())
                remaining[fname] -= 1
                if remaining[fname] == 0:
                    writers.pop(fname).close()
            del tensors
            unit.to_empty(device="meta")  # drop the block's storage before the next one
    finally:
        for writer in writers.values():
            writer.close()
    if any(remaining.values()):
        raise TinyBuildError(f"transformer shards incomplete: {remaining}")
    total = itemsize * sum(_numel(s) for s in shapes.values())
    (out / WEIGHTS_INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": file_of}, indent=2, sort_keys=True) + "\n"
    )
    return {
        "params": sum(_numel(s) for s in shapes.values()),
        "bytes": total,
        "shards": len(shards),
        "largest_unit_params": peak_unit,
    }


# ------------------------------------------------------------------------------------------ the other components


def _clip(cls_name: str, real: dict, tokenizer: Any) -> Any:
    import transformers

    config = transformers.CLIPTextConfig(
        **{
            **real,
            "vocab_size": TEXT_VOCAB,
            "num_hidden_layers": TEXT_LAYERS["clip"],
            "max_position_embeddings": tokenizer.model_max_length,
        },
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return getattr(transformers, cls_name)(config)


def _t5(real: dict, tokenizer: Any) -> Any:
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        **{**real, "vocab_size": TEXT_VOCAB, "num_layers": TEXT_LAYERS["t5"]},
        dropout_rate=0.0,
        is_encoder_decoder=False,
        use_cache=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return T5EncoderModel(config)


def _write_components(arch: str, out: Path, dtype: str, seed: int) -> dict[str, list]:
    """Text encoders, tokenizers, VAE and scheduler into ``out``; returns their model_index.json entries."""
    from diffusers import AutoencoderKL

    from mrlora.models.loading import torch_dtype
    from mrlora.models.tiny import _quiet_progress_bars, _scheduler, _seeded
    from mrlora.models.tiny_tokenizers import build_clip_tokenizer, build_t5_tokenizer

    target = torch_dtype(dtype)
    index: dict[str, list] = {}

    def save(name: str, obj: Any, library: str) -> None:
        with _quiet_progress_bars():
            obj.save_pretrained(out / name)
        index[name] = [library, type(obj).__name__]

    base = seed * 100
    for i, (name, (cls_name, real)) in enumerate(sorted(real_components(arch).items())):
        if name == "transformer":
            continue
        with _seeded(base + 10 + i):
            if name == "vae":
                save(name, AutoencoderKL.from_config(real).to(target).eval(), "diffusers")
                continue
            tok_name = name.replace("text_encoder", "tokenizer")
            if cls_name == "T5EncoderModel":
                tokenizer = build_t5_tokenizer()
                model = _t5(real, tokenizer)
            else:
                tokenizer = build_clip_tokenizer()
                model = _clip(cls_name, real, tokenizer)
            save(name, model.to(target).eval(), "transformers")
            del model
            save(tok_name, tokenizer, "transformers")
    save("scheduler", _scheduler(arch), "diffusers")
    if arch == "sd3":
        index.update({"feature_extractor": [None, None], "image_encoder": [None, None]})
    return index


# ------------------------------------------------------------------------------------------------------- build


def read_marker(out: str | os.PathLike[str]) -> dict | None:
    """The marker of a complete real-shape build at ``out``, or None."""
    try:
        return json.loads((Path(out) / MARKER).read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except ValueError as exc:
        raise TinyBuildError(f"{Path(out) / MARKER} is unreadable ({exc}); delete {out} and build again") from exc


def build_real_shapes(
    arch: str,
    out: str | os.PathLike[str],
    seed: int = 0,
    dtype: str = "bf16",
    layers: int | None = None,
    double_layers: int | None = None,
    single_layers: int | None = None,
) -> Path:
    """Build the real-shape ``arch`` model into ``out`` (atomically); a complete identical build is reused."""
    import diffusers

    from mrlora.models.tiny import _partial_path, check_arch, process_group_rank

    check_arch(arch)
    if process_group_rank() != 0:
        raise TinyBuildError(
            "build real-shape models before starting a distributed job: on a rank other than 0 "
            "transformers writes no text-encoder weights"
        )
    config = transformer_config(arch, layers, double_layers, single_layers)
    out = Path(out).expanduser().absolute()
    wanted = {"arch": arch, "seed": seed, "dtype": dtype, "transformer": config}
    marker = read_marker(out)
    if marker is not None:
        if {k: marker.get(k) for k in wanted} != json.loads(json.dumps(wanted)):
            raise TinyBuildError(
                f"{out} already holds a different real-shape build ({marker.get('arch')}, "
                f"{marker.get('transformer', {}).get('num_layers')} layers); delete it or choose "
                f"another --out"
            )
        return out
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise TinyBuildError(
            f"{out} exists and holds no complete real-shape build (no {MARKER}); delete it or choose another --out"
        )
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = _partial_path(out)
    t0 = time.perf_counter()
    try:
        index = {"_class_name": PIPELINES[arch], "_diffusers_version": diffusers.__version__}
        index.update(_write_components(arch, partial, dtype, seed))
        summary = write_transformer(arch, config, partial / "transformer", dtype, seed * 100 + 2)
        index["transformer"] = ["diffusers", "SD3Transformer2DModel" if arch == "sd3" else "FluxTransformer2DModel"]
        (partial / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
        done = {**wanted, "summary": summary, "seconds": round(time.perf_counter() - t0, 1), "created": time.time()}
        tmp = partial / f".{MARKER}.tmp"
        tmp.write_text(json.dumps(done, indent=2) + "\n")
        os.replace(tmp, partial / MARKER)
        if out.exists():
            out.rmdir()  # empty (checked above)
        os.rename(partial, out)
        return out
    finally:
        if partial.exists():
            shutil.rmtree(partial, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mrlora.models.real_shapes",
        description="Write a diffusers model directory with the real SD3.5-M / FLUX.1-dev transformer shapes and "
        "random weights (no download; streamed, one block in memory at a time). Text encoders have "
        "their real widths but 1-2 layers.",
    )
    parser.add_argument("--arch", required=True, choices=("sd3", "flux"), help="sd3: SD3.5 Medium; flux: FLUX.1-dev")
    parser.add_argument("--out", required=True, help="output model directory (created atomically)")
    parser.add_argument("--layers", type=int, help="sd3: number of joint blocks (default 24, the real depth)")
    parser.add_argument("--double-layers", type=int, help="flux: double-stream blocks (default 19)")
    parser.add_argument("--single-layers", type=int, help="flux: single-stream blocks (default 38)")
    parser.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"), help="weight dtype on disk")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed (default 0)")
    add_version_flag(parser)
    args = parser.parse_args(argv)
    try:
        path = build_real_shapes(
            args.arch,
            args.out,
            seed=args.seed,
            dtype=args.dtype,
            layers=args.layers,
            double_layers=args.double_layers,
            single_layers=args.single_layers,
        )
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
