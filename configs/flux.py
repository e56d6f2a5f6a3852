"""FLUX.1-dev: r=64 on attention + feed-forward, 6 SDE steps, CFG 3.5, noise level 0.9, bf16, eval 28 steps."""

from configs.common import FLUX_TARGETS, base_config


def get_config():
    c = base_config()
    c.model.name = "flux"
    c.model.arch = "flux"
    c.model.pretrained = "black-forest-labs/FLUX.1-dev"
    c.model.dtype = "bf16"
    c.model.gradient_checkpointing = True
    c.lora.rank, c.lora.alpha = 64, 128
    c.lora.target_modules = list(FLUX_TARGETS)
    c.sample.num_steps, c.sample.eval_num_steps = 6, 28
    c.sample.guidance_scale, c.sample.noise_level, c.sample.resolution = 3.5, 0.9, 512
    c.sample.max_sequence_length = 512
    c.sample.group_size = 24
    c.train.deepspeed = "zero2"
    c.train.drop_zero_advantage = False  # published FLUX training keeps zero-advantage samples in the loss
    c.per_reward.pickscore.train.beta = 0.0  # published FLUX PickScore config: no KL
    return c
