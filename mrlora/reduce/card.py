"""The model card (README.md) of an exported model, and publishing the export to the Hugging Face Hub.

Why a card of our own: the export copies every file of the base, including the base's README.md, which
describes the base and not what MapReduce LoRA did to it. ``--model-card`` replaces it with a card that says
what the model is (base, rewards and their merge weights, cycles, steps per cycle, the training recipe), how it
scores (the run's finished evals, through the eval report's own tables, so the card and ``eval.report`` show the
same numbers), and keeps the base's licence in the front matter, since the weights are still a derivative of
the base and the Hub shows the licence from there.

Why the push checks first: an upload needs the network and a token, and a cluster node often has neither
(``HF_HUB_OFFLINE=1`` is the usual setting there). Checking both before the export starts means a refused push
leaves nothing behind instead of a finished export the user did not want here.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from mrlora.reduce.errors import ReduceError

log = logging.getLogger("mrlora.reduce")

CARD_NAME = "README.md"
TAGS = ("text-to-image", "diffusers", "mrlora", "mapreduce-lora", "flow-grpo")
ARCH_TAGS = {"sd3": "stable-diffusion-3", "flux": "flux"}
LICENSE_KEYS = ("license", "license_name", "license_link")
# the choices of the training recipe a reader of a card needs to reproduce or judge the model (docs/recipe.md)
RECIPE_KEYS = (
    "lora.rank",
    "lora.alpha",
    "train.lr",
    "train.beta",
    "train.kl_form",
    "train.clip_range",
    "train.adv_std",
    "train.updates_per_round",
    "train.ema",
    "train.ema_schedule",
    "sample.num_steps",
    "sample.group_size",
    "sample.prompts_per_step",
    "sample.noise_level",
    "sample.guidance_scale",
    "sample.resolution",
    "mapreduce.merge_mode",
)
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_HUB_CACHE_RE = re.compile(r"models--([^/]+?)--([^/]+)/snapshots/")


class PublishError(ReduceError):
    """The export cannot be pushed from here (offline, no token); the message says what to do."""


def hub_id(base_id: str | None, base_dir: Path | str | None = None) -> str | None:
    """The Hub repository id of the base, when it has one: the configured id, or the id a hub-cache snapshot
    path encodes (``.../models--org--name/snapshots/<sha>``). None for a local or tiny model."""
    if base_id and _HUB_ID_RE.match(base_id) and not Path(base_id).exists():
        return base_id
    match = _HUB_CACHE_RE.search(Path(base_dir or base_id or "").absolute().as_posix() + "/")
    return f"{match.group(1)}/{match.group(2)}" if match else None


def base_card_metadata(base_dir: Path | str) -> dict:
    """The YAML front matter of the base's own README.md ({} when it has none)."""
    from huggingface_hub.repocard import metadata_load

    readme = Path(base_dir) / CARD_NAME
    if not readme.is_file():
        return {}
    try:
        return metadata_load(readme) or {}
    except Exception as exc:  # a malformed card of the base must not stop the export; its licence is unknown
        log.warning("cannot read the front matter of %s (%s); the card will not name a licence", readme, exc)
        return {}


def _front_matter(base_id: str | None, base_dir: Path | str, arch: str | None) -> dict:
    meta: dict = {}
    hub = hub_id(base_id, base_dir)
    if hub:
        meta["base_model"] = hub
        meta["base_model_relation"] = "finetune"
    meta["library_name"] = "diffusers"
    meta["pipeline_tag"] = "text-to-image"
    base_meta = base_card_metadata(base_dir)
    for key in LICENSE_KEYS:
        if base_meta.get(key):
            meta[key] = base_meta[key]
    meta["tags"] = list(TAGS) + ([ARCH_TAGS[arch]] if arch in ARCH_TAGS else [])
    return meta


def _run_summary(cfg, cycle: int) -> list[str]:
    from mrlora.config import config_for_reward, normalised_weights

    rewards = list(cfg.rewards)
    weights = normalised_weights(cfg.weights, cfg.mapreduce.allow_negative_weights)
    lines = [
        "## Training",
        "",
        f"MapReduce LoRA: per cycle, one Flow-GRPO LoRA expert per reward is trained for {cfg.train.steps} "
        f"optimizer steps on the current model (Map), then the experts are merged exactly into it with the weights "
        f"below (Reduce). This model is the base after **{cycle}** of the run's {cfg.mapreduce.cycles} planned "
        f"cycles ({cycle * cfg.train.steps} steps per expert in all).",
        "",
        "| reward | merge weight | prompts | KL beta |",
        "|---|---|---|---|",
    ]
    for reward, w in zip(rewards, weights):
        rcfg = config_for_reward(cfg, reward)
        lines.append(f"| {reward} | {w:.4g} | `{cfg.prompts.get(reward, '-')}` | {rcfg.train.beta:g} |")
    lines += ["", "Recipe (`docs/recipe.md` of mrlora explains each choice):", "", "| key | value |", "|---|---|"]
    for key in RECIPE_KEYS:
        node = cfg
        for part in key.split("."):
            node = node.get(part) if node is not None else None
        if node is not None:
            lines.append(f"| `{key}` | `{node!r}` |")
    return lines


def _updates_summary(update_dirs: list[Path]) -> list[str]:
    from mrlora.reduce.store import read_update_info

    lines = ["## Updates", "", "The base with these merged updates folded into its transformer, in order:", ""]
    for d in update_dirs:
        info = read_update_info(d)
        parts = [f"{r} {w:.4g}" for r, w in zip(info.get("rewards") or [], info.get("weights") or [])]
        lines.append(f"- `{d.name}`" + (f": {', '.join(parts)}" if parts else ""))
    return lines


def eval_section(run_root: Path | str) -> list[str]:
    """The run's finished evals (``<RUN_DIR>/evals/*``) as the eval report's summary table; [] when none."""
    from eval.plan import EvalDir
    from eval.report import base_input, change_table, load_input, ordered, summary_table
    from eval.report_compare import setting_differences
    from mrlora.runstore import RunDir

    evals_dir = RunDir(run_root).evals_dir
    if not evals_dir.is_dir():
        return []
    found = sorted(p for p in evals_dir.iterdir() if p.is_dir() and EvalDir(p).done() is not None)
    if not found:
        return []
    inputs = ordered([load_input(p) for p in found])
    lines = [
        "## Evaluation",
        "",
        "The run's evals (`eval.run`), mean ± 95% interval per reward (n images):",
        "",
        summary_table(inputs).markdown(),
    ]
    base = base_input(inputs)
    if base is not None and len(inputs) > 1:
        lines += ["", f"Change against {base.label}:", "", change_table(inputs, base).markdown()]
    differences = setting_differences([i.label for i in inputs], [i.settings for i in inputs])
    if differences:
        lines += ["", "Not all directly comparable: " + " | ".join(d.sentence() for d in differences) + "."]
    return lines


def model_card(
    base_dir: Path | str,
    base_id: str | None,
    arch: str | None,
    run_cfg=None,
    run_root: Path | str | None = None,
    cycle: int | None = None,
    update_dirs: list[Path] | None = None,
    title: str | None = None,
) -> str:
    """The README.md text: front matter (base_model, library_name, licence of the base, tags) and a body with
    the run's config summary and eval summary (or, for an export of bare updates, the updates)."""
    from huggingface_hub import ModelCard, ModelCardData

    meta = _front_matter(base_id, base_dir, arch)
    data = ModelCardData(**meta)
    shown_base = hub_id(base_id, base_dir) or base_id or str(base_dir)
    body = [
        f"# {title or 'MapReduce LoRA model'}",
        "",
        f"A full diffusers model: `{shown_base}` with reward-aligned updates trained by "
        "mrlora (MapReduce LoRA) folded into its transformer. No adapter is needed.",
        "",
        "```python",
        "import torch",
        "from diffusers import DiffusionPipeline",
        "",
        'pipe = DiffusionPipeline.from_pretrained("<this repo or folder>", torch_dtype=torch.bfloat16).to("cuda")',
        'image = pipe("a photo of a red apple on a table").images[0]',
        "```",
        "",
    ]
    if run_cfg is not None and cycle is not None:
        body += _run_summary(run_cfg, cycle)
    elif update_dirs:
        body += _updates_summary(list(update_dirs))
    if run_root is not None:
        evals = eval_section(run_root)
        body += ["", *evals] if evals else ["", "## Evaluation", "", "The run has no finished evals yet."]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body).rstrip() + "\n")
    return str(card)


# ------------------------------------------------------------------------------------------------ the Hub


def check_can_push(repo_id: str) -> str:
    """The token to push with; raise PublishError (saying what to do) when offline or no token is configured."""
    from huggingface_hub import constants, get_token

    if "/" not in repo_id or not _HUB_ID_RE.match(repo_id):
        raise PublishError(f"--push-to-hub {repo_id!r} is not a Hub repository id; give it as OWNER/NAME")
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in constants.ENV_VARS_TRUE_VALUES
    if offline or constants.HF_HUB_OFFLINE:
        raise PublishError(
            "--push-to-hub needs the network but HF_HUB_OFFLINE=1 is set: run the export on a machine with "
            "network access (e.g. the login node) with HF_HUB_OFFLINE unset, or export here without "
            "--push-to-hub and upload the folder later with `hf upload REPO_ID DIR`"
        )
    token = get_token()
    if not token:
        raise PublishError(
            "--push-to-hub needs a Hugging Face token and none is configured: run `hf auth login` (or set "
            "HF_TOKEN to a token with write access, from https://huggingface.co/settings/tokens), then run the "
            "export again"
        )
    return token


def push_to_hub(folder: Path | str, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Create ``repo_id`` (kept if it exists) and upload the export folder; return the repository URL."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    from mrlora.reduce.export import EXPORT_MARKER

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        api.upload_folder(
            folder_path=str(folder),
            repo_id=repo_id,
            repo_type="model",
            commit_message="Upload model exported by mrlora",
            ignore_patterns=[EXPORT_MARKER, ".tmp-*"],
        )
    except (HfHubHTTPError, OSError) as exc:
        raise PublishError(
            f"the export {folder} is complete but pushing it to {repo_id} failed ({exc}); check the token's write "
            f"access to {repo_id}, then run the same command again (the export is reused) or "
            f"`hf upload {repo_id} {folder}`"
        ) from None
    log.info("pushed %s to %s", folder, url)
    return str(url)
