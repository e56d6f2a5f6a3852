"""Which transformer layers get a LoRA, per architecture (the published Flow-GRPO / MapReduce-LoRA choices).

SD3.5-M: the attention projections of the image and text streams (``to_q, to_k, to_v, to_out.0`` and
``add_q_proj, add_k_proj, add_v_proj, to_add_out``). These suffixes also cover SD3.5's second image attention
(``attn2``) in the dual-attention blocks.

FLUX.1-dev adds the feed-forward projections. diffusers names them (checked on ``FluxTransformer2DModel``):
double blocks ``ff.net.0.proj`` / ``ff.net.2`` (image MLP) and ``ff_context.net.0.proj`` / ``ff_context.net.2``
(text MLP); single blocks have ``attn.to_q/k/v`` (no ``to_out``), ``proj_mlp`` (MLP in) and ``proj_out`` (the
fused attention + MLP output).

``proj_out`` is ambiguous as a suffix: FLUX's final output layer is also called ``proj_out`` and must not get
a LoRA (the published adapters leave it alone, and it is outside every block). So ``lora_target_modules`` turns
the suffix lists into the full dotted names of the matching ``nn.Linear`` layers inside the transformer blocks;
pass that list to ``peft.LoraConfig(target_modules=...)`` so the adapter's ``target_modules`` is explicit.
"""

from __future__ import annotations

from typing import Any

from mrlora.models.errors import UnknownArchError

_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

LORA_TARGETS: dict[str, tuple[str, ...]] = {
    "sd3": _ATTENTION,
    "flux": _ATTENTION
    + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2", "proj_mlp", "proj_out"),
}

# LoRA goes only inside these containers; everything else (embedders, norms, the final proj_out) stays frozen.
BLOCK_CONTAINERS = ("transformer_blocks.", "single_transformer_blocks.")


def lora_targets(arch: str) -> tuple[str, ...]:
    """The published module-name suffixes for ``arch`` (``sd3`` or ``flux``)."""
    try:
        return LORA_TARGETS[arch]
    except KeyError:
        raise UnknownArchError(f"no LoRA targets for arch {arch!r}; use one of {', '.join(LORA_TARGETS)}") from None


def lora_target_modules(transformer: Any, arch: str) -> list[str]:
    """Full dotted names of the ``nn.Linear`` layers in ``transformer``'s blocks that match ``arch``'s suffixes.

    Raises ``UnknownArchError`` when a suffix matches nothing: that means the transformer is not the ``arch``
    the config says (or diffusers renamed a layer), and training would silently adapt fewer layers.
    """
    return block_linear_names(transformer, lora_targets(arch), arch_hint=arch)


def block_linear_names(transformer: Any, suffixes, arch_hint: str | None = None) -> list[str]:
    """Full dotted names of the ``nn.Linear`` layers inside the transformer blocks ending in one of ``suffixes``.

    This is how a config's suffix list (``lora.target_modules``) becomes the explicit list given to peft, so
    a suffix that also names a layer outside the blocks (FLUX's final ``proj_out``) never gets a LoRA.
    """
    import torch

    suffixes = tuple(suffixes)
    names: list[str] = []
    used: set[str] = set()
    for name, module in transformer.named_modules():
        if not isinstance(module, torch.nn.Linear) or not name.startswith(BLOCK_CONTAINERS):
            continue
        for suffix in suffixes:
            if name.endswith("." + suffix):
                names.append(name)
                used.add(suffix)
                break
    missing = [s for s in suffixes if s not in used]
    if missing:
        hint = f"is model.arch={arch_hint!r} right for this checkpoint?" if arch_hint else \
            "check lora.target_modules against the transformer's layer names"
        raise UnknownArchError(
            f"{type(transformer).__name__} has no layers named {', '.join(missing)} inside its blocks; {hint}"
        )
    return names
