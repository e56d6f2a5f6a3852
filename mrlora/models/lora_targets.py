"""Which transformer layers get a LoRA, per architecture (the published Flow-GRPO / MapReduce-LoRA choices).

The published adapters name their targets as peft suffixes, and peft adapts a layer when its dotted name ends
in ``"." + suffix``. The lists (defined once, in ``configs.common``):

- SD3.5-M: ``attn.to_q, attn.to_k, attn.to_v, attn.to_out.0, attn.add_q_proj, attn.add_k_proj,
  attn.add_v_proj, attn.to_add_out``. The ``attn.`` prefix matters: SD3.5-M's second image attention
  (``attn2.*`` in the 13 dual-attention blocks) does not match and stays frozen, and the last block has no
  ``to_add_out`` (its text stream ends there): 191 layers.
- FLUX.1-dev adds the double blocks' feed-forward ``ff.net.0.proj, ff.net.2, ff_context.net.0.proj,
  ff_context.net.2``. Single blocks match only ``attn.to_q/k/v``; their ``proj_mlp`` and fused ``proj_out``
  stay frozen: 342 layers.

``block_linear_names`` turns a suffix list into the explicit dotted names of the matching ``nn.Linear`` layers
inside the transformer blocks, and that list goes to ``peft.LoraConfig(target_modules=...)``, so the adapter's
``target_modules`` is explicit and a suffix a user widens to (e.g. ``proj_out``) can never reach FLUX's final
output layer, which shares the name but lies outside every block.
"""

from __future__ import annotations

from typing import Any

from configs.common import FLUX_TARGETS, SD3_TARGETS
from mrlora.models.errors import UnknownArchError

LORA_TARGETS: dict[str, tuple[str, ...]] = {"sd3": tuple(SD3_TARGETS), "flux": tuple(FLUX_TARGETS)}

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
        hint = (
            f"is model.arch={arch_hint!r} right for this checkpoint?"
            if arch_hint
            else "check lora.target_modules against the transformer's layer names"
        )
        raise UnknownArchError(
            f"{type(transformer).__name__} has no layers named {', '.join(missing)} inside its blocks; {hint}"
        )
    return names
