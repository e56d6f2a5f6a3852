"""Shared settings of the tiny presets: random models built on first use, CPU, rewards a tiny model can learn.

The cheap rewards pull in different directions (bright vs. colourful vs. compressible), so the demo shows each
expert improving its own reward and the merge trading them off, instead of random scores from random models.
"""

import ml_collections


def apply_tiny(c: ml_collections.ConfigDict, arch: str) -> ml_collections.ConfigDict:
    c.model.name = f"tiny-{arch}"
    c.model.arch = arch
    c.model.pretrained = f"tiny:{arch}"
    c.model.dtype = "fp32"
    c.model.gradient_checkpointing = False
    c.lora.rank, c.lora.alpha = 4, 8
    c.sample.num_steps, c.sample.eval_num_steps = 4, 6
    c.sample.resolution = 64
    c.sample.group_size = 4
    c.sample.prompts_per_step = 2
    c.sample.batch_size = 8
    c.sample.max_sequence_length = 32
    c.train.steps = 6
    c.train.updates_per_round = 1  # one sampling round per step keeps the tiny tests' step counts free
    c.train.lr = 3e-2  # measured: brightness and JPEG size rise on every seed in 6 steps; 1e-2 is slow for JPEG
    c.train.clip_range = 0.2
    c.train.beta = 0.0
    c.train.adv_std = "group"  # what the tiny presets' learning was measured with (groups of 4-8)
    c.train.micro_batch = 8
    c.train.checkpoint_every = 3
    c.train.ema_every = 1
    c.train.ema_schedule = "per_update"  # what the tiny demo's merged numbers were measured with
    c.train.deepspeed = ""
    c.rewards = ["brightness", "colourfulness", "jpeg_compressibility"]
    c.weights = [1.0, 1.0, 1.0]
    c.prompts = ml_collections.ConfigDict({name: "gen:simple:64" for name in c.rewards})
    c.reward_models = ml_collections.ConfigDict({name: {} for name in c.rewards})
    c.per_reward = ml_collections.ConfigDict({name: {} for name in c.rewards})
    # Colourfulness is the noisiest of the three on the tiny model (a step's mean moves +-5 on its own): groups
    # of 8 and a gentler lr make it rise on every seed measured (+4..+12 in 6 steps; lr 3e-2 overshoots).
    c.per_reward.colourfulness = {"sample": {"group_size": 8}, "train": {"lr": 1e-2}}
    c.mapreduce.cycles = 2
    c.rate.steps = 20
    c.rate.lr = 5e-2
    c.rate.checkpoint_every = 10
    return c
