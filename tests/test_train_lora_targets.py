"""The config's LoRA suffixes reach only layers inside the transformer blocks."""

import pytest

from mrlora.config import load_config
from mrlora.training.errors import TrainError
from mrlora.training.lora import add_lora


@pytest.fixture(scope="module")
def flux_transformer(tiny_flux_dir):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")


def test_default_flux_targets_leave_the_single_block_mlp_frozen(flux_transformer):
    params = add_lora(flux_transformer, load_config("tiny-flux"))
    modules = {key.rsplit(".lora_", 1)[0] for key in params}
    assert any(m.endswith("ff.net.2") for m in modules)
    assert any(m.startswith("single_transformer_blocks.") and m.endswith(".attn.to_q") for m in modules)
    assert not any(m.endswith(("proj_mlp", "proj_out")) for m in modules)  # as in the published adapter


def test_widened_proj_out_reaches_the_blocks_but_never_the_output_projection(tiny_flux_dir):
    from diffusers import FluxTransformer2DModel

    transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    cfg = load_config("tiny-flux", ["lora.target_modules=['attn.to_q', 'proj_mlp', 'proj_out']"])
    modules = {key.rsplit(".lora_", 1)[0] for key in add_lora(transformer, cfg)}
    assert "proj_out" not in modules  # the final output layer shares the suffix
    assert any(m.startswith("single_transformer_blocks.") and m.endswith(".proj_out") for m in modules)


def test_unknown_target_suffix_is_an_error_naming_it(tiny_sd3_dir):
    from diffusers import SD3Transformer2DModel

    transformer = SD3Transformer2DModel.from_pretrained(tiny_sd3_dir, subfolder="transformer")
    cfg = load_config("tiny-sd3", ["lora.target_modules=['to_q', 'to_qq']"])
    with pytest.raises(TrainError, match="to_qq"):
        add_lora(transformer, cfg)
