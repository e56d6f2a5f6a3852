"""How much model and optimizer memory each training process holds, from the config alone (no torch).

Why: a FLUX.1-dev expert holds 24 GB of bf16 transformer, 9.5 GB of T5 and 180M LoRA parameters with their
gradients, Adam moments and EMA per process; whether that fits an 80 GB GPU must be visible on the login node
(``python -m launch.mapreduce ... --dry-run``) before hours in the queue, not from an out-of-memory error.

Parameter counts are derived arithmetically from the component configs: the published ones
(``mrlora.models.real_configs``) for a hub id or preset, or the ``config.json`` files of a local model directory
(a built tiny model, a real-shape build, a downloaded snapshot). The transformer's tensor names and shapes are
enumerated exactly as diffusers lays them out (tests compare them with the real classes), so the LoRA module
list follows the same suffix rule as training (``mrlora.models.lora_targets.block_linear_names``).

What a process holds, per the Map step (``mrlora.training``): every pipeline component in ``model.dtype``; the
LoRA weights in fp32 (kept fp32 whatever the base dtype) with an fp32 gradient, AdamW's two fp32 moments and the
fp32 EMA copy. Under ZeRO-2 (``train.deepspeed="zero2"``) gradients and optimizer state are partitioned over the
job's processes, and DeepSpeed keeps an fp32 master copy of each process's partition. Not counted: activations
(resolution, batch and gradient checkpointing decide those), DDP / DeepSpeed communication buckets, the CUDA
context.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2}
BLOCK_CONTAINERS = ("transformer_blocks.", "single_transformer_blocks.")
GPU_GB = 80.0  # the GPU size the dry run compares against (A100/H100 80 GB)


class MemoryPlanError(ValueError):
    """The model's configs cannot be read or are of an unknown class; the message says which file."""


# ------------------------------------------------------------------------------------- transformer tensors


def _linear(t: dict, name: str, out_f: int, in_f: int, bias: bool = True) -> None:
    t[f"{name}.weight"] = (out_f, in_f)
    if bias:
        t[f"{name}.bias"] = (out_f,)


def _timestep_mlp(t: dict, name: str, dim: int, in_f: int) -> None:
    _linear(t, f"{name}.linear_1", dim, in_f)
    _linear(t, f"{name}.linear_2", dim, dim)


def _attention(
    t: dict, name: str, dim: int, head_dim: int, qk_norm: bool, added: bool, add_out: bool, out: bool = True
) -> None:
    if qk_norm:
        t[f"{name}.norm_q.weight"] = (head_dim,)
        t[f"{name}.norm_k.weight"] = (head_dim,)
    for proj in ("to_q", "to_k", "to_v"):
        _linear(t, f"{name}.{proj}", dim, dim)
    if out:
        _linear(t, f"{name}.to_out.0", dim, dim)
    if added:
        for proj in ("add_q_proj", "add_k_proj", "add_v_proj"):
            _linear(t, f"{name}.{proj}", dim, dim)
        if add_out:
            _linear(t, f"{name}.to_add_out", dim, dim)
        if qk_norm:
            t[f"{name}.norm_added_q.weight"] = (head_dim,)
            t[f"{name}.norm_added_k.weight"] = (head_dim,)


def _feed_forward(t: dict, name: str, dim: int) -> None:
    _linear(t, f"{name}.net.0.proj", 4 * dim, dim)
    _linear(t, f"{name}.net.2", dim, 4 * dim)


def sd3_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of ``SD3Transformer2DModel(**c)`` (the position table included)."""
    hd, dim = (
        int(c.get("attention_head_dim", 64)),
        int(c.get("num_attention_heads", 18)) * int(c.get("attention_head_dim", 64)),
    )
    patch, layers = int(c.get("patch_size", 2)), int(c.get("num_layers", 18))
    out_ch = int(c.get("out_channels") or c.get("in_channels", 16))
    qk = c.get("qk_norm") is not None
    dual = set(c.get("dual_attention_layers") or ())
    t: dict[str, tuple[int, ...]] = {}
    side = int(c.get("pos_embed_max_size") or c.get("sample_size", 128) // patch)
    t["pos_embed.pos_embed"] = (1, side * side, dim)
    t["pos_embed.proj.weight"] = (dim, int(c.get("in_channels", 16)), patch, patch)
    t["pos_embed.proj.bias"] = (dim,)
    _timestep_mlp(t, "time_text_embed.timestep_embedder", dim, 256)
    _timestep_mlp(t, "time_text_embed.text_embedder", dim, int(c.get("pooled_projection_dim", 2048)))
    _linear(t, "context_embedder", int(c.get("caption_projection_dim", 1152)), int(c.get("joint_attention_dim", 4096)))
    for i in range(layers):
        b = f"transformer_blocks.{i}"
        pre_only = i == layers - 1
        _linear(t, f"{b}.norm1.linear", (9 if i in dual else 6) * dim, dim)
        _linear(t, f"{b}.norm1_context.linear", (2 if pre_only else 6) * dim, dim)
        _attention(t, f"{b}.attn", dim, hd, qk, added=True, add_out=not pre_only)
        if i in dual:
            _attention(t, f"{b}.attn2", dim, hd, qk, added=False, add_out=False)
        _feed_forward(t, f"{b}.ff", dim)
        if not pre_only:
            _feed_forward(t, f"{b}.ff_context", dim)
    _linear(t, "norm_out.linear", 2 * dim, dim)
    _linear(t, "proj_out", patch * patch * out_ch, dim)
    return t


def flux_tensors(c: dict) -> dict[str, tuple[int, ...]]:
    """State-dict names and shapes of ``FluxTransformer2DModel(**c)``."""
    hd = int(c.get("attention_head_dim", 128))
    dim = int(c.get("num_attention_heads", 24)) * hd
    in_ch, patch = int(c.get("in_channels", 64)), int(c.get("patch_size", 1))
    out_ch = int(c.get("out_channels") or in_ch)
    t: dict[str, tuple[int, ...]] = {}
    _timestep_mlp(t, "time_text_embed.timestep_embedder", dim, 256)
    if c.get("guidance_embeds", False):
        _timestep_mlp(t, "time_text_embed.guidance_embedder", dim, 256)
    _timestep_mlp(t, "time_text_embed.text_embedder", dim, int(c.get("pooled_projection_dim", 768)))
    _linear(t, "context_embedder", dim, int(c.get("joint_attention_dim", 4096)))
    _linear(t, "x_embedder", dim, in_ch)
    for i in range(int(c.get("num_layers", 19))):
        b = f"transformer_blocks.{i}"
        _linear(t, f"{b}.norm1.linear", 6 * dim, dim)
        _linear(t, f"{b}.norm1_context.linear", 6 * dim, dim)
        _attention(t, f"{b}.attn", dim, hd, True, added=True, add_out=True)
        _feed_forward(t, f"{b}.ff", dim)
        _feed_forward(t, f"{b}.ff_context", dim)
    for i in range(int(c.get("num_single_layers", 38))):
        b = f"single_transformer_blocks.{i}"
        _linear(t, f"{b}.norm.linear", 3 * dim, dim)
        _linear(t, f"{b}.proj_mlp", 4 * dim, dim)
        _linear(t, f"{b}.proj_out", dim, 5 * dim)
        _attention(t, f"{b}.attn", dim, hd, True, added=False, add_out=False, out=False)
    _linear(t, "norm_out.linear", 2 * dim, dim)
    _linear(t, "proj_out", patch * patch * out_ch, dim)
    return t


TRANSFORMERS = {"SD3Transformer2DModel": sd3_tensors, "FluxTransformer2DModel": flux_tensors}


def lora_modules(tensors: dict[str, tuple[int, ...]], suffixes: Iterable[str]) -> dict[str, tuple[int, int]]:
    """``{module: (in, out)}`` of the block linears a LoRA on ``suffixes`` adapts (training's suffix rule)."""
    suffixes = tuple(suffixes)
    found = {}
    for key, shape in tensors.items():
        if not key.endswith(".weight") or len(shape) != 2 or not key.startswith(BLOCK_CONTAINERS):
            continue
        module = key[: -len(".weight")]
        if any(module.endswith("." + s) for s in suffixes):
            found[module] = (shape[1], shape[0])
    return found


# ----------------------------------------------------------------------------------------- other components


def clip_params(c: dict, projection: bool) -> int:
    """Parameters of ``CLIPTextModel`` (``projection``: ``CLIPTextModelWithProjection``)."""
    h, i, layers = int(c["hidden_size"]), int(c["intermediate_size"]), int(c["num_hidden_layers"])
    per_layer = 4 * (h * h + h) + 2 * (2 * h) + (i * h + i) + (h * i + h)
    n = int(c["vocab_size"]) * h + int(c["max_position_embeddings"]) * h + layers * per_layer + 2 * h
    return n + (int(c["projection_dim"]) * h if projection else 0)


def t5_encoder_params(c: dict) -> int:
    """Parameters of ``T5EncoderModel`` (the shared embedding counted once; it is tied to the encoder's)."""
    d, inner, layers = int(c["d_model"]), int(c["num_heads"]) * int(c["d_kv"]), int(c["num_layers"])
    ff = (
        3 * d * int(c["d_ff"])
        if str(c.get("feed_forward_proj", "relu")).startswith("gated")
        else 2 * d * int(c["d_ff"])
    )
    per_layer = 4 * d * inner + d + ff + d
    return (
        int(c["vocab_size"]) * d
        + layers * per_layer
        + int(c["relative_attention_num_buckets"]) * int(c["num_heads"])
        + d
    )


def _resnet(cin: int, cout: int) -> int:
    n = 2 * cin + (cout * cin * 9 + cout) + 2 * cout + (cout * cout * 9 + cout)
    return n + (cout * cin + cout if cin != cout else 0)


def vae_params(c: dict) -> int:
    """Parameters of ``AutoencoderKL`` with ``DownEncoderBlock2D`` / ``UpDecoderBlock2D`` blocks."""
    ch = [int(x) for x in c["block_out_channels"]]
    lpb, lat = int(c.get("layers_per_block", 1)), int(c.get("latent_channels", 4))
    cin, cout = int(c.get("in_channels", 3)), int(c.get("out_channels", 3))
    last = ch[-1]
    mid = 2 * _resnet(last, last) + (
        4 * (last * last + last) + 2 * last if c.get("mid_block_add_attention", True) else 0
    )
    enc = ch[0] * cin * 9 + ch[0]
    prev = ch[0]
    for k, out in enumerate(ch):
        enc += _resnet(prev, out) + (lpb - 1) * _resnet(out, out)
        if k < len(ch) - 1:
            enc += out * out * 9 + out
        prev = out
    enc += mid + 2 * last + (2 * lat) * last * 9 + 2 * lat
    dec = last * lat * 9 + last + mid
    prev = last
    for k, out in enumerate(reversed(ch)):
        dec += _resnet(prev, out) + lpb * _resnet(out, out)
        if k < len(ch) - 1:
            dec += out * out * 9 + out
        prev = out
    dec += 2 * ch[0] + cout * ch[0] * 9 + cout
    quant = (2 * lat) * (2 * lat) + 2 * lat if c.get("use_quant_conv", True) else 0
    post = lat * lat + lat if c.get("use_post_quant_conv", True) else 0
    return enc + dec + quant + post


def component_params(cls_name: str, config: dict) -> int:
    if cls_name in TRANSFORMERS:
        return sum(_numel(s) for s in TRANSFORMERS[cls_name](config).values())
    if cls_name in ("CLIPTextModel", "CLIPTextModelWithProjection"):
        return clip_params(config, projection=cls_name.endswith("WithProjection"))
    if cls_name == "T5EncoderModel":
        return t5_encoder_params(config)
    if cls_name == "AutoencoderKL":
        return vae_params(config)
    raise MemoryPlanError(f"no parameter formula for {cls_name}; the memory plan knows {', '.join(KNOWN_CLASSES)}")


KNOWN_CLASSES = (*TRANSFORMERS, "CLIPTextModel", "CLIPTextModelWithProjection", "T5EncoderModel", "AutoencoderKL")


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


# -------------------------------------------------------------------------------------- where configs come from


def read_model_dir(path: Path | str) -> dict[str, tuple[str, dict]]:
    """``{component: (class, config)}`` from a diffusers model directory's JSON files (no weights read)."""
    path = Path(path)
    try:
        index = json.loads((path / "model_index.json").read_text())
    except (OSError, ValueError) as exc:
        raise MemoryPlanError(
            f"{path / 'model_index.json'} is unreadable ({exc}); is {path} a diffusers model directory?"
        ) from None
    components = {}
    for name, entry in index.items():
        if name.startswith("_") or not isinstance(entry, list) or entry[1] not in KNOWN_CLASSES:
            continue
        try:
            components[name] = (entry[1], json.loads((path / name / "config.json").read_text()))
        except (OSError, ValueError) as exc:
            raise MemoryPlanError(f"{path / name / 'config.json'} is unreadable ({exc})") from None
    if not any(cls in TRANSFORMERS for cls, _ in components.values()):
        raise MemoryPlanError(f"{path} has no SD3 or FLUX transformer in model_index.json")
    return components


def model_components(pretrained: str, arch: str) -> tuple[dict[str, tuple[str, dict]], str]:
    """The components of ``model.pretrained`` and where their configs came from (for the printout)."""
    spec = str(pretrained)
    local = Path(spec).expanduser()
    if local.is_dir():
        return read_model_dir(local), str(local)
    if spec.startswith("tiny:"):
        from mrlora.models.loading import tiny_cache_dir  # torch-free at import

        built = tiny_cache_dir(spec.split(":", 1)[1])
        if (built / "model_index.json").is_file():
            return read_model_dir(built), f"{spec} ({built})"
        raise MemoryPlanError(f"{spec} is not built yet (it is built on first use); nothing to plan for a few MB")
    from mrlora.models.real_configs import REAL_NAMES, real_components

    return real_components(arch), f"published {REAL_NAMES[arch]} configs"


# ------------------------------------------------------------------------------------------------ the estimate


@dataclass
class ProcessMemory:
    """Bytes one training process holds for weights and optimizer (see the module docstring for what is left out)."""

    dtype: str
    frozen: dict[str, int]  # component -> parameter count (held in ``dtype``)
    lora_params: int
    lora_modules: int
    processes: int = 1
    zero2: bool = False
    ema: bool = True
    source: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def frozen_bytes(self) -> dict[str, int]:
        return {k: v * BYTES[self.dtype] for k, v in self.frozen.items()}

    @property
    def lora_bytes(self) -> int:
        return 4 * self.lora_params

    @property
    def shard(self) -> int:
        return self.processes if self.zero2 else 1

    @property
    def grad_bytes(self) -> int:
        return 4 * self.lora_params // self.shard

    @property
    def adam_bytes(self) -> int:
        return 8 * self.lora_params // self.shard

    @property
    def master_bytes(self) -> int:
        """DeepSpeed's fp32 copy of this process's partition (ZeRO-2 only)."""
        return 4 * self.lora_params // self.shard if self.zero2 else 0

    @property
    def ema_bytes(self) -> int:
        return 4 * self.lora_params if self.ema else 0

    @property
    def total_bytes(self) -> int:
        return (
            sum(self.frozen_bytes.values())
            + self.lora_bytes
            + self.grad_bytes
            + self.adam_bytes
            + self.master_bytes
            + self.ema_bytes
        )


def estimate(cfg: Any, processes: int = 1) -> ProcessMemory:
    """The per-process memory of training one expert of ``cfg`` (already ``config_for_reward``-ed if needed)."""
    components, source = model_components(cfg.model.pretrained, cfg.model.arch)
    frozen = {name: component_params(cls, conf) for name, (cls, conf) in components.items()}
    cls, conf = next((cls, conf) for cls, conf in components.values() if cls in TRANSFORMERS)
    modules = lora_modules(TRANSFORMERS[cls](conf), cfg.lora.target_modules)
    rank = int(cfg.lora.rank)
    lora = sum(rank * (i + o) for i, o in modules.values())
    dtype = str(cfg.model.dtype).lower()
    if dtype not in BYTES:
        raise MemoryPlanError(f"model.dtype={cfg.model.dtype!r} is not one of fp32, bf16, fp16")
    return ProcessMemory(
        dtype=dtype,
        frozen=frozen,
        lora_params=lora,
        lora_modules=len(modules),
        processes=int(processes),
        zero2=cfg.train.deepspeed == "zero2",
        ema=bool(cfg.train.ema),
        source=source,
    )


def _gb(n: float) -> str:
    """Bytes in GB, or MB / kB for the tiny models (so their lines do not read 0.00 GB)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if abs(n) >= scale / 10:
            return f"{n / scale:.2f} {unit}"
    return f"{n / 1e3:.1f} kB"


def _count(n: int) -> str:
    return f"{n / 1e9:.3f}B" if n >= 1e8 else f"{n / 1e6:.3f}M"


def format_estimate(m: ProcessMemory, label: str) -> str:
    frozen = ", ".join(f"{name} {_count(m.frozen[name])} = {_gb(b)}" for name, b in sorted(m.frozen_bytes.items()))
    if m.zero2:
        zero = (
            f"ZeRO-2 over {m.processes} processes: gradients, Adam and fp32 master / {m.processes}"
            if m.processes > 1
            else "ZeRO-2 on one process: nothing to shard"
        )
    else:
        zero = f"DDP over {m.processes} processes, no sharding" if m.processes > 1 else "one process"
    lines = [
        f"  {label}: {_gb(m.total_bytes)} per process for weights + optimizer ({zero})",
        f"    weights {m.dtype}: {frozen}",
        f"    LoRA fp32: {m.lora_modules} modules, {_count(m.lora_params)} params: weights {_gb(m.lora_bytes)}, "
        f"grads {_gb(m.grad_bytes)}, Adam {_gb(m.adam_bytes)}"
        + (f", master {_gb(m.master_bytes)}" if m.zero2 else "")
        + (f", EMA {_gb(m.ema_bytes)}" if m.ema else ""),
    ]
    left = GPU_GB * 1e9 - m.total_bytes
    lines.append(
        f"    on an {GPU_GB:.0f} GB GPU: {_gb(left)} left for activations"
        if left > 0
        else f"    does NOT fit an {GPU_GB:.0f} GB GPU ({_gb(-left)} over): use train.deepspeed='zero2', more "
        f"processes, a lower lora.rank or model.dtype='bf16'"
    )
    return "\n".join(lines)


def format_plan_memory(cfg: Any, jobs: Iterable[Any]) -> str:
    """The dry run's memory section: one estimate per distinct expert job (reward settings and process count).

    ``jobs`` are ``launch.plan.Job``s (duck-typed: ``kind``, ``rewards``, ``resources.procs``, ``key``).
    """
    from mrlora.config import config_for_reward

    seen: dict[tuple, list[str]] = {}
    estimates: dict[tuple, ProcessMemory] = {}
    try:
        for job in jobs:
            if job.kind != "expert":
                continue
            for reward in job.rewards:
                rcfg = config_for_reward(cfg, reward)
                key = (
                    int(job.resources.procs),
                    rcfg.lora.rank,
                    tuple(rcfg.lora.target_modules),
                    rcfg.train.deepspeed,
                    rcfg.train.ema,
                    rcfg.model.dtype,
                )
                if key not in estimates:
                    estimates[key] = estimate(rcfg, job.resources.procs)
                names = seen.setdefault(key, [])
                if reward not in names:
                    names.append(reward)
    except MemoryPlanError as exc:
        return f"\nmemory per process: not estimated ({exc})"
    if not estimates:
        return ""
    first = next(iter(estimates.values()))
    out = [f"\nmemory per expert process (from {first.source}; activations not included):"]
    for key, m in estimates.items():
        out.append(format_estimate(m, f"{', '.join(seen[key])} ({key[0]} process{'es' if key[0] > 1 else ''})"))
    return "\n".join(out)
