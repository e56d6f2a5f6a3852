"""Whether the evals of one report can be compared, and what each of them lacks.

Why: a mean over another prompt set, another seed's noise, other sampler steps, another guidance scale or
resolution is a different measurement; drawing it on the same axis as the others invites a wrong conclusion.
The report refuses such a mix unless ``--allow-mixed`` is given, and then opens with a warning section that
names every setting that differs and which evals hold which value. A reward one eval did not score is never
dropped silently either: the report names it and the evals that lack it.

The settings compared are the ones recorded in each eval's ``eval.json`` (``eval.settings.EvalSettings``) that
change the images or the set of images; the checkpoint, the reward list, batch size and shard count do not.
"""

from __future__ import annotations

from dataclasses import dataclass

# setting key in eval.json -> what a reader calls it
COMPARED_SETTINGS = {
    "prompts_sha256": "prompt set",
    "num_prompts": "number of prompts",
    "samples": "samples per prompt",
    "seed": "seed",
    "steps": "sampler steps",
    "guidance_scale": "CFG (guidance scale)",
    "resolution": "resolution",
    "max_sequence_length": "max text length",
    "dtype": "dtype",
}

# settings that must agree for two evals' images of one (prompt, sample) to share their noise
SAME_NOISE = ("prompts_sha256", "seed", "resolution")


@dataclass(frozen=True)
class SettingDifference:
    """One setting whose value differs across the evals: value -> labels of the evals holding it."""

    key: str
    values: dict

    def sentence(self) -> str:
        parts = [f"{_show(self.key, value)} ({', '.join(labels)})" for value, labels in self.values.items()]
        return f"{COMPARED_SETTINGS[self.key]}: " + "; ".join(parts)


def _show(key: str, value) -> str:
    if key == "prompts_sha256" and isinstance(value, str):
        return f"sha256 {value[:12]}"
    return repr(value) if isinstance(value, str) else str(value)


def setting_differences(labels: list[str], settings: list[dict]) -> list[SettingDifference]:
    """Every compared setting that does not hold one value across all evals."""
    out = []
    for key in COMPARED_SETTINGS:
        groups: dict = {}
        for label, s in zip(labels, settings):
            groups.setdefault(s.get(key), []).append(label)
        if len(groups) > 1:
            out.append(SettingDifference(key, groups))
    return out


def prompt_files(labels: list[str], settings: list[dict]) -> str:
    """Which prompt file each prompt set came from (the sha256 alone does not tell a reader which file)."""
    by_sha: dict = {}
    for label, s in zip(labels, settings):
        by_sha.setdefault((s.get("prompts_sha256"), s.get("prompts")), []).append(label)
    return "; ".join(f"{path} = sha256 {str(sha)[:12]} ({', '.join(ls)})" for (sha, path), ls in by_sha.items())


def mixed_settings_error(differences: list[SettingDifference]) -> str:
    """The message of a refused mix: what differs, and the two ways on."""
    return (
        "these evals were made with different settings, so their numbers are not comparable: "
        + " | ".join(d.sentence() for d in differences)
        + ". Evaluate them again with the same settings (python -m eval.run ... with the same --prompts, "
        "--seed, --samples, --sample-steps, --cfg, --resolution), or pass --allow-mixed to draw them together "
        "under a warning section"
    )


def missing_rewards(labels: list[str], scored: list[set[str]]) -> dict[str, list[str]]:
    """Reward -> labels of the evals that did not score it (only rewards some eval lacks)."""
    every = sorted(set().union(*scored)) if scored else []
    return {
        r: [label for label, s in zip(labels, scored) if r not in s] for r in every if not all(r in s for s in scored)
    }


def direction_conflicts(labels: list[str], directions: list[dict[str, bool]]) -> dict[str, dict[bool, list[str]]]:
    """Rewards recorded as higher-is-better by some evals and lower-is-better by others (a changed reward)."""
    out: dict[str, dict[bool, list[str]]] = {}
    for label, d in zip(labels, directions):
        for reward, higher in d.items():
            out.setdefault(reward, {}).setdefault(bool(higher), []).append(label)
    return {r: groups for r, groups in out.items() if len(groups) > 1}
