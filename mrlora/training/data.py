"""Which prompts and which noise seeds a sampling round uses: a pure function of (seed, salt, round).

A round feeds ``train.updates_per_round`` optimizer steps; the training loop builds the schedule with
``prompts_per_step`` = prompts of a whole round, so below "step" means a round (the same thing with one update
per round).

Why not a stateful sampler: a resumed run must see exactly the prompts and noise an uninterrupted run would have
seen, and the answer must not depend on how many processes share the work. So prompt order is a fixed
permutation per epoch of the prompt list (seeded), each step takes the next ``prompts_per_step`` positions, and
every sample's noise seed is a hash of (seed, salt, step, global sample index). The data position stored in a
checkpoint is then just a consistency check.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from mrlora.training.errors import TrainError


def salt_for(*parts: object) -> int:
    """A stable 32-bit integer for strings/ints (e.g. the reward name and cycle), independent of PYTHONHASHSEED."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little")


def sample_seed(seed: int, salt: int, step: int, index: int) -> int:
    """The noise seed of global sample ``index`` at optimizer step ``step`` (63-bit)."""
    digest = hashlib.sha256(f"{seed}:{salt}:{step}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class StepPlan:
    """The samples of one optimizer step: ``prompt_indices[i]`` and ``seeds[i]`` for global sample i.

    Samples of a prompt are contiguous (group ``i // group_size``); ``local`` is this rank's slice.
    """

    prompt_indices: list[int]
    seeds: list[int]
    group_ids: list[int]
    local: slice
    data_position: int  # prompts consumed after this step (over all processes)


class PromptSchedule:
    """Seeded epoch-wise permutations of ``n_prompts`` prompts, consumed ``prompts_per_step`` at a time."""

    def __init__(self, n_prompts: int, prompts_per_step: int, group_size: int, seed: int, salt: int):
        if n_prompts < 1:
            raise TrainError("the prompt source is empty; check the reward's prompts.<reward> setting")
        self.n, self.per_step, self.group_size = n_prompts, prompts_per_step, group_size
        self.seed, self.salt = int(seed), int(salt)
        self._perms: dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng([self.seed, self.salt, epoch]).permutation(self.n)}
        return self._perms[epoch]

    def prompt_at(self, position: int) -> int:
        return int(self._perm(position // self.n)[position % self.n])

    def plan(self, step: int, rank: int = 0, world_size: int = 1) -> StepPlan:
        total = self.per_step * self.group_size
        if total % world_size:
            raise TrainError(
                f"{self.per_step} prompts x {self.group_size} samples = {total} samples per step cannot be split "
                f"evenly over {world_size} processes; make sample.prompts_per_step * sample.group_size a multiple "
                f"of the number of processes"
            )
        start = step * self.per_step
        prompts = [self.prompt_at(start + p) for p in range(self.per_step)]
        indices = [prompts[i // self.group_size] for i in range(total)]
        seeds = [sample_seed(self.seed, self.salt, step, i) for i in range(total)]
        groups = [i // self.group_size for i in range(total)]
        per_rank = total // world_size
        return StepPlan(indices, seeds, groups, slice(rank * per_rank, (rank + 1) * per_rank), start + self.per_step)
