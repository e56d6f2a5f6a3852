"""Rewards behind one interface: ``reward(images, prompts, metadata) -> RewardOutput``.

Used by training (Map: Flow-GRPO advantages) and by eval. Importing this package is cheap and torch-free
(config validation on login nodes imports it); each built-in's factory imports torch / transformers only when
the reward is built. Built-ins: ``geneval``, ``pickscore``, ``ocr`` and the model-free ``jpeg_compressibility``,
``jpeg_incompressibility``, ``brightness``, ``colourfulness``.

Adding a fourth reward in one file
----------------------------------
Write ``mypkg/aesthetic.py``::

    import numpy as np
    from rewards import Reward, RewardOutput, register_reward

    class Aesthetic(Reward):
        name = "aesthetic"
        higher_is_better = True

        def __init__(self, model_path, device="cpu", batch_size=8):
            ...  # load weights here (heavy imports inside the factory or this class)

        def score(self, images, prompts, metadata):
            values = np.array([...], dtype=np.float32)       # one float per image
            return RewardOutput(scores=values, details={})  # optional named sub-scores of length N

    @register_reward("aesthetic")
    def build(**kwargs):  # kwargs = the config's reward_models.aesthetic dict
        return Aesthetic(**kwargs)

Then name it in a config in one of three ways:

- ``"mypkg.aesthetic:build"`` -- the module path of the factory; nothing to install or import first;
- ``"aesthetic"`` after ``import mypkg.aesthetic`` (the decorator registered it);
- ``"aesthetic"`` from an installed package that declares the entry point
  ``[project.entry-points."mrlora.rewards"] aesthetic = "mypkg.aesthetic:build"``.

To have ``python -m rewards.prefetch`` download its weights, give the decorator
``models=lambda **kw: [ModelRef(kw.get("model_path", "org/model"), "aesthetic model")]`` (or set a
``reward_models`` attribute on an entry-point factory).
"""

from rewards import builtin as _builtin  # noqa: F401  (registers the built-ins; torch-free)
from rewards.base import (
    ENTRY_POINT_GROUP,
    MissingModelError,
    Reward,
    RewardError,
    RewardOutput,
    UnknownRewardError,
    available_rewards,
    build_reward,
    get_reward_spec,
    register_reward,
)
from rewards.hub import ModelRef

__all__ = [
    "ENTRY_POINT_GROUP",
    "MissingModelError",
    "ModelRef",
    "Reward",
    "RewardError",
    "RewardOutput",
    "UnknownRewardError",
    "available_rewards",
    "build_reward",
    "get_reward_spec",
    "register_reward",
]
