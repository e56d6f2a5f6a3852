"""Stable Diffusion 3.5 Medium: the paper's SD3.5-M recipe (LoRA r=32 on attention, 10 SDE steps, CFG 4.5)."""

from configs.common import SD3_TARGETS, base_config


def get_config():
    c = base_config()
    c.model.name = "sd35m"
    c.model.arch = "sd3"
    c.model.pretrained = "stabilityai/stable-diffusion-3.5-medium"
    c.model.dtype = "bf16"
    c.lora.rank, c.lora.alpha = 32, 64
    c.lora.target_modules = list(SD3_TARGETS)
    c.sample.num_steps, c.sample.eval_num_steps = 10, 40
    c.sample.guidance_scale, c.sample.noise_level, c.sample.resolution = 4.5, 0.7, 512
    c.sample.group_size = 24
    return c
