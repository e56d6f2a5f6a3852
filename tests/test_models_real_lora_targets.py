"""The default LoRA targets adapt exactly the published adapters' layers on the real architectures.

The transformers are built on the meta device from the real configs (``mrlora.models.real_configs``): the
real layer names and shapes, no weights, no download. peft's suffix rule leaves SD3.5-M's attn2 and FLUX's
single-block MLP without LoRA, so the counts are 191 (SD3.5-M, 18.8M LoRA parameters at r=32) and 342
(FLUX.1-dev, 179.3M at r=64).
"""

from __future__ import annotations

import pytest
import torch

from mrlora.config import load_config
from mrlora.models.lora_targets import block_linear_names
from mrlora.models.real_configs import real_transformer_config


def _meta_transformer(arch: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = SD3Transformer2DModel if arch == "sd3" else FluxTransformer2DModel
    with torch.device("meta"):
        return cls.from_config(real_transformer_config(arch))


def _lora_params(transformer, names: list[str], rank: int) -> int:
    modules = dict(transformer.named_modules())
    return sum(rank * (modules[n].in_features + modules[n].out_features) for n in names)


# By hand: SD3.5-M's adapted layers are all 1536 -> 1536, r=32: 191 x 32 x 3072. FLUX's attention layers are
# 3072 -> 3072 and its feed-forward 3072 <-> 12288, r=64: 19 x (8 x 64 x 6144 + 4 x 64 x 15360) + 38 x 3 x 64 x 6144.
@pytest.mark.parametrize(
    "preset, arch, count, params", [("sd35m", "sd3", 191, 191 * 32 * 3072), ("flux", "flux", 342, 179_306_496)]
)
def test_preset_targets_match_the_published_adapter(preset, arch, count, params):
    cfg = load_config(preset)
    transformer = _meta_transformer(arch)
    names = block_linear_names(transformer, cfg.lora.target_modules)
    assert len(names) == count
    assert _lora_params(transformer, names, cfg.lora.rank) == params
    assert not any(".attn2." in n or n.endswith((".proj_mlp", ".proj_out")) for n in names)


def test_widening_by_config_adds_the_second_attention():
    wide = load_config("sd35m").lora.target_modules + ["attn2.to_q", "attn2.to_k", "attn2.to_v", "attn2.to_out.0"]
    names = block_linear_names(_meta_transformer("sd3"), wide)
    assert len(names) == 191 + 13 * 4
