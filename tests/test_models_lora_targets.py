"""The published LoRA target lists attach to the real diffusers transformers, and only where intended."""

from __future__ import annotations

import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from peft import LoraConfig

from mrlora.models.errors import UnknownArchError
from mrlora.models.lora_targets import LORA_TARGETS, block_linear_names, lora_target_modules


def _wrap(pipeline_cls, model_dir: str, arch: str):
    """The transformer with a LoRA on ``arch``'s targets, and the names of the layers peft wrapped."""
    transformer = pipeline_cls.from_pretrained(model_dir).transformer
    targets = lora_target_modules(transformer, arch)
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    wrapped = {name for name, module in transformer.named_modules() if hasattr(module, "lora_A")}
    assert wrapped == set(targets)
    return transformer, wrapped


def test_sd3_adapter_covers_the_joint_attention_but_not_the_second_attention(tiny_sd3_dir: str) -> None:
    _, wrapped = _wrap(StableDiffusion3Pipeline, tiny_sd3_dir, "sd3")
    expected_block0 = {f"transformer_blocks.0.{s}" for s in LORA_TARGETS["sd3"]}
    assert expected_block0 <= wrapped
    # the published suffixes are attn.*: SD3.5's dual-attention attn2 stays frozen, like the feed-forward
    assert not any(".attn2." in n or ".ff." in n or "ff_context" in n or n == "proj_out" for n in wrapped)


def test_flux_adapter_adds_feed_forward_but_not_the_single_block_mlp(tiny_flux_dir: str) -> None:
    transformer, wrapped = _wrap(FluxPipeline, tiny_flux_dir, "flux")
    assert {
        "transformer_blocks.0.attn.to_add_out",
        "transformer_blocks.0.ff.net.0.proj",
        "transformer_blocks.0.ff.net.2",
        "transformer_blocks.0.ff_context.net.0.proj",
        "transformer_blocks.0.ff_context.net.2",
        "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k",
        "single_transformer_blocks.0.attn.to_v",
    } <= wrapped
    assert not any(n.endswith((".proj_mlp", "proj_out")) for n in wrapped)  # single-block MLP and output layer
    trainable = {n for n, p in transformer.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)


def test_adapter_changes_the_output(tiny_flux_dir: str) -> None:
    pipe = FluxPipeline.from_pretrained(tiny_flux_dir)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(height=64, width=64, num_inference_steps=2, max_sequence_length=16, output_type="latent")
    before = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    targets = lora_target_modules(pipe.transformer, "flux")
    # init_lora_weights=False: random A *and* B, so the adapter is not a no-op from the start.
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=targets))
    after = pipe("a cat", generator=torch.Generator().manual_seed(0), **kwargs).images
    assert not torch.allclose(before, after)


def test_unknown_arch_and_unmatched_suffix_are_reported(tiny_sd3_dir: str) -> None:
    transformer = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir).transformer
    with pytest.raises(UnknownArchError, match="no LoRA targets for arch 'sdxl'"):
        lora_target_modules(transformer, "sdxl")
    with pytest.raises(UnknownArchError, match="no layers named proj_mlp"):
        block_linear_names(transformer, ("attn.to_q", "proj_mlp"))
