"""A tiny random FLUX (built on first use, no download): the FLUX code path on a laptop or CI.

Measured with the tiny presets' rewards (6 steps per cycle): brightness rises clearly (0.49 -> 0.81), but
colourfulness and JPEG size barely move (+-1 %), unlike tiny SD3; the tiny FLUX (one double and one single
block, rope positions only) shapes little of its image. Use ``tiny-sd3`` to watch experts learn.
"""

from configs.common import FLUX_TARGETS, base_config
from configs.tiny import apply_tiny


def get_config():
    c = apply_tiny(base_config(), "flux")
    c.lora.target_modules = list(FLUX_TARGETS)
    c.sample.guidance_scale, c.sample.noise_level = 3.5, 0.9
    # with 4 steps the last one (sigma ~0.35 -> 0) shapes the image most; 0.99 would skip it
    c.train.timestep_fraction = 1.0
    c.train.drop_zero_advantage = False  # as the flux preset: published FLUX training keeps them
    return c
