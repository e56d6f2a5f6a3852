"""Which text encoders a pipeline has, and how a new token gets (and trains) one embedding row in each.

RaTE gives each reward one new token per text encoder: SD3.5 has CLIP-L, CLIP-G and T5; FLUX has CLIP and T5.
The names used here (``clip_l``, ``clip_g``, ``t5``, ``clip``) are what token files record, so a token saved
from one copy of a base loads into any other copy of the same base and refuses to load into a different one.

Why training goes through a forward hook instead of the embedding matrix: an optimizer over the whole matrix
would touch every row (AdamW's decoupled weight decay shrinks rows whose gradient is zero), and the promise of
RaTE is that the base model stays bit-identical except for the new rows. So the trainable vector lives in its
own tensor, a hook substitutes it at the token's positions, and only at the end is it written into the row.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch

from mrlora.rate.errors import RateError, TokenExistsError

_INSTALLED_ATTR = "_mrlora_rate_installed"  # pipeline attribute: {token: {encoder name: row id}}


@dataclass(frozen=True)
class EncoderSlot:
    """One text encoder of a pipeline: the name token files use, and the pipeline attributes holding it."""

    name: str
    tokenizer_attr: str
    encoder_attr: str


ENCODER_SLOTS: dict[str, tuple[EncoderSlot, ...]] = {
    "sd3": (
        EncoderSlot("clip_l", "tokenizer", "text_encoder"),
        EncoderSlot("clip_g", "tokenizer_2", "text_encoder_2"),
        EncoderSlot("t5", "tokenizer_3", "text_encoder_3"),
    ),
    "flux": (
        EncoderSlot("clip", "tokenizer", "text_encoder"),
        EncoderSlot("t5", "tokenizer_2", "text_encoder_2"),
    ),
}


def pipeline_arch(pipe: Any) -> str:
    """``sd3`` or ``flux`` from the pipeline class (the same rule as ``mrlora.models.loading.detect_arch``)."""
    name = type(pipe).__name__
    if name.startswith("StableDiffusion3"):
        return "sd3"
    if name.startswith("Flux"):
        return "flux"
    raise RateError(f"RaTE supports StableDiffusion3Pipeline and FluxPipeline, not {name}")


def encoder_slots(pipe: Any) -> list[EncoderSlot]:
    """The slots of ``pipe`` whose encoder is loaded (SD3 may run without T5: then it has no t5 row)."""
    slots = []
    for slot in ENCODER_SLOTS[pipeline_arch(pipe)]:
        if getattr(pipe, slot.encoder_attr, None) is not None and getattr(pipe, slot.tokenizer_attr, None) is not None:
            slots.append(slot)
    return slots


def embedding_dims(pipe: Any) -> dict[str, int]:
    return {
        s.name: int(getattr(pipe, s.encoder_attr).get_input_embeddings().weight.shape[1]) for s in encoder_slots(pipe)
    }


def validate_token_string(token: str) -> str:
    if not isinstance(token, str) or not token.strip() or token != token.strip() or any(c.isspace() for c in token):
        raise RateError(f"token {token!r} must be a non-empty string without spaces, e.g. '<ocr>'")
    if "@" in token or token.isdigit():
        raise RateError(f"token {token!r} may not contain '@' or be a number (token specs use them); try '<ocr>'")
    return token


def installed_tokens(pipe: Any) -> dict[str, dict[str, int]]:
    """Tokens this module added to ``pipe``: {token: {encoder name: row id}}."""
    return getattr(pipe, _INSTALLED_ATTR, {})


def check_token_is_new(pipe: Any, token: str) -> None:
    """Raise ``TokenExistsError`` if any tokenizer of ``pipe`` already knows ``token``."""
    validate_token_string(token)
    for slot in encoder_slots(pipe):
        tokenizer = getattr(pipe, slot.tokenizer_attr)
        if token in tokenizer.get_vocab():
            raise TokenExistsError(
                f"token {token!r} is already in the {slot.name} tokenizer's vocabulary (id "
                f"{tokenizer.convert_tokens_to_ids(token)}); a RaTE token must be new. Pick another string, e.g. "
                f"'<{token.strip('<>')}-rate>'"
            )


def add_token(pipe: Any, token: str) -> dict[str, int]:
    """Add ``token`` to every tokenizer and give it an embedding row; return its row id per encoder.

    Idempotent for tokens this module installed; a token the tokenizer knew before is refused. The embedding
    matrix grows only when the new id is past its end (real tokenizers often leave spare rows); old rows are
    copied unchanged. The new row starts as the mean of the existing rows until a vector is written into it.
    """
    registry = installed_tokens(pipe)
    if token in registry:
        return registry[token]
    check_token_is_new(pipe, token)
    ids: dict[str, int] = {}
    for slot in encoder_slots(pipe):
        tokenizer = getattr(pipe, slot.tokenizer_attr)
        encoder = getattr(pipe, slot.encoder_attr)
        tokenizer.add_tokens([token])
        row = int(tokenizer.convert_tokens_to_ids(token))
        table = encoder.get_input_embeddings()
        if row >= table.weight.shape[0]:
            old_rows = table.weight.shape[0]
            encoder.resize_token_embeddings(row + 1, mean_resizing=False)
            table = encoder.get_input_embeddings()
            with torch.no_grad():
                table.weight[old_rows:] = table.weight[:old_rows].mean(dim=0)
        else:
            with torch.no_grad():
                table.weight[row] = table.weight[: min(len(tokenizer) - 1, table.weight.shape[0])].mean(dim=0)
        _fix_legacy_eos_pooling(encoder, tokenizer)
        ids[slot.name] = row
    registry = dict(registry)
    registry[token] = ids
    setattr(pipe, _INSTALLED_ATTR, registry)
    return ids


def _fix_legacy_eos_pooling(encoder: Any, tokenizer: Any) -> None:
    """Make a CLIP text encoder pool at its real end-of-text token once a token with a higher id exists.

    Released CLIP configs (the ones SD3.5 and FLUX ship) still say ``eos_token_id=2``; transformers then pools
    at the *highest token id* in the sequence, which was the end-of-text token only while no token had a
    larger id. After ``add_tokens`` the new RaTE token would be pooled instead. Pointing the encoder at the
    tokenizer's real eos id switches transformers to its "first eos position" pooling, which gives the same
    result as before for prompts without the token.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None or eos == 2:
        return
    for module in encoder.modules():
        if getattr(module, "eos_token_id", None) == 2:
            module.eos_token_id = eos
    config = getattr(encoder, "config", None)
    if config is not None and getattr(config, "eos_token_id", None) == 2:
        config.eos_token_id = eos


def token_row_ids(pipe: Any, token: str) -> dict[str, int]:
    """Row id of ``token`` per encoder (the token must have been added with ``add_token``)."""
    registry = installed_tokens(pipe)
    if token not in registry:
        raise RateError(f"token {token!r} is not installed in this pipeline; load it first")
    return registry[token]


def read_rows(pipe: Any, token: str) -> dict[str, torch.Tensor]:
    """The current embedding row of ``token`` per encoder, as (1, dim) fp32 CPU tensors."""
    out = {}
    for slot in encoder_slots(pipe):
        row = token_row_ids(pipe, token)[slot.name]
        weight = getattr(pipe, slot.encoder_attr).get_input_embeddings().weight
        out[slot.name] = weight[row : row + 1].detach().to(device="cpu", dtype=torch.float32).clone()
    return out


def write_rows(pipe: Any, token: str, vectors: Mapping[str, torch.Tensor], scale: float = 1.0) -> None:
    """Write ``scale * vectors[name]`` into the row of ``token`` in each encoder (only that row changes)."""
    ids = token_row_ids(pipe, token)
    for slot in encoder_slots(pipe):
        weight = getattr(pipe, slot.encoder_attr).get_input_embeddings().weight
        vec = vectors[slot.name].reshape(-1)
        with torch.no_grad():
            weight[ids[slot.name]] = (vec.to(torch.float32) * float(scale)).to(device=weight.device, dtype=weight.dtype)


@contextlib.contextmanager
def substituted_rows(pipe: Any, token: str, vectors: Mapping[str, torch.Tensor]) -> Iterator[None]:
    """While active, every encoder embeds ``token`` as ``vectors[name]`` (differentiable), not its stored row.

    The embedding matrices themselves are never modified, so gradients reach only ``vectors``.
    """
    ids = token_row_ids(pipe, token)
    handles = []

    def make_hook(row: int, vec: torch.Tensor):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            input_ids = args[0]
            mask = (input_ids == row).unsqueeze(-1)
            if not bool(mask.any()):
                return output
            return torch.where(mask, vec.reshape(-1).to(dtype=output.dtype, device=output.device), output)

        return hook

    try:
        for slot in encoder_slots(pipe):
            table = getattr(pipe, slot.encoder_attr).get_input_embeddings()
            handles.append(table.register_forward_hook(make_hook(ids[slot.name], vectors[slot.name])))
        yield
    finally:
        for handle in handles:
            handle.remove()
