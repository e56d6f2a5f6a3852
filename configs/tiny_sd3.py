"""A tiny random SD3 (built on first use, no download): the embedded default for laptops, CI and tests."""

from configs.common import SD3_TARGETS, base_config
from configs.tiny import apply_tiny


def get_config():
    c = apply_tiny(base_config(), "sd3")
    c.lora.target_modules = list(SD3_TARGETS)
    c.sample.guidance_scale, c.sample.noise_level = 4.5, 0.7
    return c
