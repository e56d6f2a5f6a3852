"""The full config tree with the published Flow-GRPO / MapReduce LoRA defaults (docs/design.md section 5).

Every field lives here once, with its meaning; presets only change values. The tree is locked after loading
(``mrlora.config.load_config``), so a typo in ``--set`` is an error naming the key, never a silent new field.
Only the per-reward maps (``prompts``, ``reward_models``, ``per_reward``) accept new keys, because a user may
add a reward of their own.
"""

import ml_collections

# The published adapters' LoRA targets (Flow-GRPO scripts/train_sd3.py and train_flux.py), matched like peft
# matches them: a layer gets a LoRA when its dotted name ends in "." + one of these. So SD3.5-M's second image
# attention (attn2.*, blocks 0-12) and FLUX's single-block proj_mlp / proj_out stay frozen, as in the paper:
# 191 adapted layers on SD3.5-M, 342 on FLUX.1-dev (docs/recipe.md). Widen with e.g.
# --set "lora.target_modules=[..., 'attn2.to_q', 'attn2.to_k', 'attn2.to_v', 'attn2.to_out.0']".
SD3_TARGETS = (
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
)
# FLUX adds the feed-forward projections of the double blocks (image and text streams).
FLUX_TARGETS = SD3_TARGETS + ("ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2")


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.seed = 42

    c.model = ml_collections.ConfigDict()
    c.model.name = ""  # preset name, recorded in run.json and used for OUT_ROOT/<name>/
    c.model.arch = "sd3"  # "sd3" | "flux": which diffusers pipeline and sampler
    c.model.pretrained = ""  # local dir, hub id, or tiny:sd3 / tiny:flux (built on first use)
    c.model.dtype = "bf16"  # "fp32" | "bf16" | "fp16": weights and sampling dtype on the device
    c.model.gradient_checkpointing = False

    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 32
    c.lora.alpha = 64
    c.lora.target_modules = list(SD3_TARGETS)
    c.lora.init = "gaussian"  # peft init_lora_weights; B starts at zero either way

    c.sample = ml_collections.ConfigDict()
    c.sample.num_steps = 10  # SDE steps per training sample
    c.sample.eval_num_steps = 40  # ODE steps for evaluation
    c.sample.guidance_scale = 4.5
    c.sample.resolution = 512
    c.sample.noise_level = 0.7  # a in std_dev_t = a * sqrt(sigma / (1 - sigma))
    c.sample.group_size = 16  # images per prompt (G)
    # prompts per optimizer step, over all processes: published 32-GPU configs sample 48 prompts x 24 images per
    # epoch and take 2 optimizer steps on them (config/grpo.py), i.e. 24 prompts per step
    c.sample.prompts_per_step = 24
    c.sample.batch_size = 8  # images per sampling forward pass on one process
    c.sample.max_sequence_length = 128  # T5 tokens; train_sd3.py encodes prompts (and "") with 128

    c.train = ml_collections.ConfigDict()
    c.train.steps = 100  # optimizer steps per expert per cycle (= merge_steps)
    # Optimizer steps per sampling round (published recipe: 2, i.e. gradient_accumulation = batches // 2). A
    # round samples updates_per_round x prompts_per_step prompts, normalises advantages over all of them, then
    # takes this many optimizer steps on shuffled equal chunks: the later steps are off-policy, so the PPO ratio
    # clip acts. train.steps and train.checkpoint_every must be multiples of it (checkpoints at round ends).
    c.train.updates_per_round = 2
    c.train.lr = 3e-4
    c.train.adam_beta1 = 0.9
    c.train.adam_beta2 = 0.999
    c.train.weight_decay = 1e-4
    c.train.adam_epsilon = 1e-8
    c.train.max_grad_norm = 1.0
    c.train.clip_range = 1e-4  # PPO ratio clip epsilon
    c.train.adv_clip_max = 5.0
    # "batch": std of all the round's rewards (every published SD3/FLUX config: sample.global_std=True);
    # "group": each prompt group's own std
    c.train.adv_std = "batch"
    # Samples whose advantage is exactly 0 leave the loss (policy and KL), which is then a mean over the rest:
    # published SD3 training (train_sd3.py) does this, published FLUX training does not (the flux presets say so).
    c.train.drop_zero_advantage = True
    c.train.beta = 0.04  # KL weight to the reference (adapter disabled); 0 disables the KL forward
    # "published": mean over pixels of (mean - mean_ref)^2 / (2 std_dev_t^2), no dt (Flow-GRPO); "transition":
    # divide by the transition variance std_dev_t^2 * (-dt) instead, the exact Gaussian KL, 1/(-dt) times larger
    # (3.7x-25x on SD3.5-M's steps): scale beta down by about 13 (SD3.5-M) or 7 (FLUX) to compare (docs/recipe.md)
    c.train.kl_form = "published"
    c.train.timestep_fraction = 0.99  # fraction of the stored SDE steps trained on
    c.train.micro_batch = 4  # samples per backward pass on one process (gradient accumulation inside a step)
    c.train.cfg = True  # apply CFG in the training forward, as in sampling
    # with true CFG (SD3), gradients flow through the conditional prediction only (published train_sd3.py)
    c.train.cfg_detach_uncond = True
    c.train.ema = True
    c.train.ema_decay = 0.9
    c.train.ema_every = 8
    # "published": Flow-GRPO's cadence, two updates after steps 7, 15, ... with decay min(0.9, (1+s)/(10+s));
    # "per_update": one update after steps 8, 16, ..., warm-up by the number of EMA updates (mrlora.ema)
    c.train.ema_schedule = "published"
    c.train.checkpoint_every = 20
    c.train.deepspeed = ""  # "" | "zero2": DeepSpeed ZeRO-2 through accelerate for the large model

    c.rewards = ["geneval", "pickscore", "ocr"]
    c.weights = [1.0, 1.0, 1.0]  # Reduce weights, one per reward, normalised to sum 1

    # Prompt source per reward: a file (GenEval metadata .jsonl or one prompt per line) or gen:<kind>:<n>.
    c.prompts = ml_collections.ConfigDict()
    c.prompts.geneval = "gen:geneval:2000"
    c.prompts.pickscore = "gen:simple:2000"
    c.prompts.ocr = "gen:ocr:2000"

    # Keyword arguments of each reward's factory (rewards.build_reward(name, **kwargs)).
    c.reward_models = ml_collections.ConfigDict()
    # backend "local" or "server" with url=...; jpeg_quality 75: Flow-GRPO JPEG-compresses images before GenEval
    # scoring in training (eval scores the images as generated)
    c.reward_models.geneval = ml_collections.ConfigDict({"backend": "local", "jpeg_quality": 75})
    c.reward_models.pickscore = ml_collections.ConfigDict(
        {
            "processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
            "model": "yuvalkirstain/PickScore_v1",
            "normalize_by": 26.0,  # Flow-GRPO's scaling of logit_scale * cos
        }
    )
    c.reward_models.ocr = ml_collections.ConfigDict({"backend": "rapidocr"})

    # Per-reward overrides, same tree shape as the top level (e.g. per_reward.pickscore.train.beta = 0.01).
    c.per_reward = ml_collections.ConfigDict()
    c.per_reward.geneval = ml_collections.ConfigDict({"train": {"beta": 0.04}})
    c.per_reward.pickscore = ml_collections.ConfigDict({"train": {"beta": 0.01}})
    c.per_reward.ocr = ml_collections.ConfigDict({"train": {"beta": 0.04}})

    c.mapreduce = ml_collections.ConfigDict()
    c.mapreduce.cycles = 80
    c.mapreduce.mode = "parallel"  # "parallel" | "sequential"
    c.mapreduce.merge_mode = "exact"  # "exact" | "reference" (public code: average A and B; inexact)
    c.mapreduce.allow_negative_weights = False
    # The merge job materialises the model (fp32 master + the transformer in model.dtype, cycle_XXXX/base/)
    # whenever it would otherwise take K or more stored updates on top of the newest materialised base, so a Map
    # start reads one base and < K updates whatever the cycle (0: never; docs/internals.md "Materialised bases").
    c.mapreduce.materialise_every = 1
    c.mapreduce.keep_bases = 1  # materialised bases kept (older ones are rebuilt from the updates)
    c.mapreduce.keep_step_checkpoints = False  # keep the step checkpoints of experts whose cycle is merged
    c.mapreduce.rate_after_cycles = []  # cycles whose experts are distilled into RaTE tokens (--rate-after-cycle)

    # RaTE: distil each expert into one token embedding per text encoder (mrlora.rate, docs/rate.md).
    c.rate = ml_collections.ConfigDict()
    c.rate.steps = 500
    c.rate.lr = 5e-3
    c.rate.batch_size = 4  # samples per process per step
    c.rate.teacher_reuse = 1  # steps that share one teacher batch (fresh noise and s every step)
    c.rate.logit_mean = 0.0  # s ~ sigmoid(N(logit_mean, logit_std)) in the flow-matching loss
    c.rate.logit_std = 1.0
    c.rate.checkpoint_every = 50

    c.logging = ml_collections.ConfigDict()
    c.logging.wandb = False
    c.logging.tensorboard = False
    c.logging.project = "mrlora"
    return c
