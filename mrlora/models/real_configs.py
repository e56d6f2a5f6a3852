"""The published component configs of SD3.5 Medium and FLUX.1-dev, as plain dicts (no torch, no download).

Why here: the real-shape builder (``mrlora.models.real_shapes``) builds random models with these shapes, and the
login node's memory plan (``mrlora.memory_plan``) derives parameter counts from them arithmetically; both must
agree with the hub's ``config.json`` files, so the values live in one place. Keys are the constructor arguments
of the diffusers / transformers classes named in ``CLASSES``; values copied from the hub repos'
``transformer/``, ``text_encoder*/`` and ``vae/`` configs (stabilityai/stable-diffusion-3.5-medium,
black-forest-labs/FLUX.1-dev).
"""

from __future__ import annotations

import copy

from mrlora.models.errors import UnknownArchError

SD35M_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "out_channels": 16,
    "pos_embed_max_size": 384,
    "dual_attention_layers": list(range(13)),
    "qk_norm": "rms_norm",
}

FLUX_DEV_TRANSFORMER = {
    "patch_size": 1,
    "in_channels": 64,
    "out_channels": None,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}

# openai/clip-vit-large-patch14's text tower (SD3.5 text_encoder, FLUX text_encoder).
CLIP_L = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
# laion CLIP-ViT-bigG-14's text tower (SD3.5 text_encoder_2).
CLIP_G = {
    "vocab_size": 49408,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "max_position_embeddings": 77,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
# google/t5-v1_1-xxl's encoder (SD3.5 text_encoder_3, FLUX text_encoder_2).
T5_XXL = {
    "vocab_size": 32128,
    "d_model": 4096,
    "d_kv": 64,
    "d_ff": 10240,
    "num_layers": 24,
    "num_heads": 64,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "feed_forward_proj": "gated-gelu",
}


def _vae(scaling: float, shift: float) -> dict:
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 16,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 1024,
        "scaling_factor": scaling,
        "shift_factor": shift,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "mid_block_add_attention": True,
    }


# Per architecture: component name in the pipeline -> (class name, config).
_COMPONENTS = {
    "sd3": {
        "transformer": ("SD3Transformer2DModel", SD35M_TRANSFORMER),
        "text_encoder": ("CLIPTextModelWithProjection", CLIP_L),
        "text_encoder_2": ("CLIPTextModelWithProjection", CLIP_G),
        "text_encoder_3": ("T5EncoderModel", T5_XXL),
        "vae": ("AutoencoderKL", _vae(1.5305, 0.0609)),
    },
    "flux": {
        "transformer": ("FluxTransformer2DModel", FLUX_DEV_TRANSFORMER),
        "text_encoder": ("CLIPTextModel", CLIP_L),
        "text_encoder_2": ("T5EncoderModel", T5_XXL),
        "vae": ("AutoencoderKL", _vae(0.3611, 0.1159)),
    },
}

PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
REAL_NAMES = {"sd3": "SD3.5 Medium", "flux": "FLUX.1-dev"}


def real_components(arch: str) -> dict[str, tuple[str, dict]]:
    """``{component: (class name, config)}`` of the published ``arch`` pipeline (a deep copy: edit freely)."""
    try:
        return copy.deepcopy(_COMPONENTS[arch])
    except KeyError:
        raise UnknownArchError(f"no real config for arch {arch!r}; use one of {', '.join(_COMPONENTS)}") from None


def real_transformer_config(arch: str) -> dict:
    """The published transformer config of ``arch`` (``sd3``: SD3.5 Medium, ``flux``: FLUX.1-dev)."""
    return real_components(arch)["transformer"][1]
