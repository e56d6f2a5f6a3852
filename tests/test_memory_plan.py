"""The login node's memory plan counts exactly the parameters the real classes hold, without torch.

The transformer's names and shapes are compared tensor by tensor with diffusers' classes built on the meta device
(real configs and shallow variants with the awkward cases: the context-pre-only last SD3 block, dual attention,
no guidance embedding); the text encoders' and VAE's formulas with the transformers / diffusers classes at
small widths. The estimate itself is checked against measured bytes at real shapes by
``benchmarks/real_shapes.py``.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from mrlora.config import load_config
from mrlora.memory_plan import (
    clip_params,
    estimate,
    flux_tensors,
    format_plan_memory,
    lora_modules,
    sd3_tensors,
    t5_encoder_params,
    vae_params,
)
from mrlora.models.real_configs import real_components, real_transformer_config


def _meta_shapes(cls_name: str, config: dict) -> dict:
    import diffusers

    with torch.device("meta"):
        model = getattr(diffusers, cls_name).from_config(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


SD3_SMALL = dict(
    sample_size=16,
    patch_size=2,
    in_channels=16,
    num_layers=3,
    attention_head_dim=8,
    num_attention_heads=4,
    joint_attention_dim=40,
    caption_projection_dim=32,
    pooled_projection_dim=24,
    out_channels=8,
    pos_embed_max_size=12,
    dual_attention_layers=[0, 1],
    qk_norm="rms_norm",
)
FLUX_SMALL = dict(
    patch_size=1,
    in_channels=16,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=40,
    pooled_projection_dim=24,
    guidance_embeds=False,
    axes_dims_rope=[4, 4, 8],
)


@pytest.mark.parametrize(
    "cls_name, config, tensors",
    [
        ("SD3Transformer2DModel", real_transformer_config("sd3"), sd3_tensors),
        ("SD3Transformer2DModel", SD3_SMALL, sd3_tensors),
        ("SD3Transformer2DModel", {**SD3_SMALL, "qk_norm": None, "dual_attention_layers": []}, sd3_tensors),
        ("FluxTransformer2DModel", real_transformer_config("flux"), flux_tensors),
        ("FluxTransformer2DModel", FLUX_SMALL, flux_tensors),
    ],
)
def test_transformer_tensors_match_diffusers(cls_name, config, tensors):
    assert tensors(config) == _meta_shapes(cls_name, config)


def test_published_sizes():
    sd3 = sum(torch.Size(s).numel() for s in sd3_tensors(real_transformer_config("sd3")).values())
    flux = sum(torch.Size(s).numel() for s in flux_tensors(real_transformer_config("flux")).values())
    assert round(sd3 / 1e9, 2) == 2.47 and round(flux / 1e9, 1) == 11.9


def test_text_encoder_and_vae_formulas_match_the_classes():
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    def count(model):
        return sum(p.numel() for p in model.parameters())

    clip = dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=24,
    )
    assert clip_params(clip, projection=True) == count(CLIPTextModelWithProjection(CLIPTextConfig(**clip)))
    assert clip_params(clip, projection=False) == count(CLIPTextModel(CLIPTextConfig(**clip)))
    t5 = dict(
        vocab_size=100,
        d_model=32,
        d_kv=8,
        d_ff=40,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        feed_forward_proj="gated-gelu",
    )
    assert t5_encoder_params(t5) == count(T5EncoderModel(T5Config(**t5, is_encoder_decoder=False)))
    vae = {**real_components("sd3")["vae"][1], "block_out_channels": [8, 16, 32, 32], "norm_num_groups": 4}
    assert vae_params(vae) == count(AutoencoderKL.from_config(vae))
    assert vae_params({**vae, "use_quant_conv": True, "use_post_quant_conv": True, "layers_per_block": 1}) == count(
        AutoencoderKL.from_config({**vae, "use_quant_conv": True, "use_post_quant_conv": True, "layers_per_block": 1})
    )


def test_lora_modules_follow_the_training_suffix_rule():
    from mrlora.models.lora_targets import block_linear_names

    for preset, arch in (("sd35m", "sd3"), ("flux", "flux")):
        cfg = load_config(preset)
        config = real_transformer_config(arch)
        cls_name = "SD3Transformer2DModel" if arch == "sd3" else "FluxTransformer2DModel"
        import diffusers

        with torch.device("meta"):
            model = getattr(diffusers, cls_name).from_config(config)
        tensors = sd3_tensors(config) if arch == "sd3" else flux_tensors(config)
        assert sorted(lora_modules(tensors, cfg.lora.target_modules)) == sorted(
            block_linear_names(model, cfg.lora.target_modules)
        )


def test_zero2_shards_gradients_and_optimizer_over_the_processes():
    cfg = load_config("flux")
    one, eight = estimate(cfg, processes=1), estimate(cfg, processes=8)
    assert cfg.train.deepspeed == "zero2"
    assert eight.adam_bytes * 8 == one.adam_bytes and eight.grad_bytes * 8 == one.grad_bytes
    assert eight.lora_bytes == one.lora_bytes and eight.frozen_bytes == one.frozen_bytes
    assert one.frozen["transformer"] * 2 == one.frozen_bytes["transformer"]  # bf16


def test_dry_run_section_is_torch_free_and_names_each_distinct_job():
    code = (
        "import sys\n"
        "from types import SimpleNamespace as N\n"
        "from mrlora.config import load_config\n"
        "from mrlora.memory_plan import format_plan_memory\n"
        "cfg = load_config('flux')\n"
        "res = N(procs=8)\n"
        "jobs = [N(kind='expert', rewards=tuple(cfg.rewards), resources=res, key=f'c{c}') for c in (1, 2)]\n"
        "jobs.append(N(kind='merge', rewards=(), resources=N(procs=1), key='m'))\n"
        "print(format_plan_memory(cfg, jobs))\n"
        "assert 'torch' not in sys.modules, 'memory plan imported torch'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert text.count("per process for weights + optimizer") == 1  # two cycles, one distinct job
    assert "ZeRO-2 over 8 processes" in text and "published FLUX.1-dev configs" in text
    assert "transformer 11.901B = 23.80 GB" in text


def test_an_oversized_plan_says_what_to_change():
    cfg = load_config("flux", ["model.dtype=fp32", "train.deepspeed=", "lora.rank=256"])
    from types import SimpleNamespace as N

    text = format_plan_memory(cfg, [N(kind="expert", rewards=("pickscore",), resources=N(procs=1), key="c1")])
    assert "does NOT fit an 80 GB GPU" in text and "zero2" in text
