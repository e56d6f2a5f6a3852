"""PickScore: human-preference reward from a CLIP model fine-tuned on Pick-a-Pic.

score = logit_scale * cos(image_embedding, text_embedding), each image scored against its own prompt (the
reference reports ~22.95 for SD3.5-M; Flow-GRPO divides by 26 to bring it near [0, 1], which
``normalize_by=26`` reproduces). The processor (CLIP-H image transform + tokenizer) and the model load from a
local directory or a hub id through transformers; under ``HF_HUB_OFFLINE=1`` a missing model fails fast with
the prefetch command (see :mod:`rewards.hub`).
"""

from __future__ import annotations

import numpy as np
import torch

from rewards.base import Reward, RewardError, RewardOutput
from rewards.hub import resolve_device

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class PickScoreReward(Reward):
    """Batched PickScore on one device. Details: ``logit`` (unnormalised score) and ``cosine``."""

    name = "pickscore"
    higher_is_better = True

    def __init__(self, model, processor, device: str, batch_size: int = 8, normalize_by: float | None = None):
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)
        self.batch_size = max(1, int(batch_size))
        if normalize_by is not None and float(normalize_by) <= 0:
            raise RewardError(f"pickscore: normalize_by must be positive, got {normalize_by!r}")
        self.normalize_by = None if normalize_by is None else float(normalize_by)
        self.max_length = int(model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def embed_images(self, images) -> torch.Tensor:
        pixels = self.processor(images=[im.convert("RGB") for im in images], return_tensors="pt")["pixel_values"]
        pixels = pixels.to(self.device, dtype=self.model.dtype)
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        return torch.nn.functional.normalize(self.model.visual_projection(pooled).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        tokens = self.processor(
            text=list(prompts), padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        out = self.model.text_model(
            input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
        )
        return torch.nn.functional.normalize(self.model.text_projection(out.pooler_output).float(), dim=-1)

    def score(self, images, prompts, metadata) -> RewardOutput:
        cosines = []
        for start in range(0, len(images), self.batch_size):
            img = self.embed_images(images[start : start + self.batch_size])
            txt = self.embed_texts(prompts[start : start + self.batch_size])
            cosines.append((img * txt).sum(dim=-1).cpu())
        cosine = torch.cat(cosines).numpy().astype(np.float32)
        logit = (self.model.logit_scale.exp().float().cpu().item() * cosine).astype(np.float32)
        scores = logit / self.normalize_by if self.normalize_by else logit
        return RewardOutput(scores=scores, details={"logit": logit, "cosine": cosine})


def build_pickscore(
    model: str,
    processor: str,
    device: str | None,
    batch_size: int,
    normalize_by: float | None,
    dtype: str,
    cache_dir: str | None,
) -> PickScoreReward:
    """Load the CLIP processor and the PickScore model from paths already resolved by ``rewards.builtin``."""
    from transformers import AutoProcessor, CLIPModel

    if dtype not in _DTYPES:
        raise RewardError(f"pickscore: dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    device = resolve_device(device)
    proc = AutoProcessor.from_pretrained(processor, cache_dir=cache_dir)
    clip = CLIPModel.from_pretrained(model, dtype=_DTYPES[dtype], cache_dir=cache_dir).to(device)
    return PickScoreReward(clip, proc, device=device, batch_size=batch_size, normalize_by=normalize_by)
