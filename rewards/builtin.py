"""Registration of the built-in rewards (torch-free: every factory imports its heavy module when called).

Each factory's keyword arguments are the reward's config dict ``reward_models.<name>``; each ``models``
function lists the hub models those kwargs would load, for ``python -m rewards.prefetch``. The model-free
rewards accept (and ignore) ``device`` and ``batch_size`` so one config shape fits every reward.
"""

from __future__ import annotations

from rewards.base import Reward, RewardError, register_reward
from rewards.hub import ModelRef, resolve_model
from rewards.ocr import build_ocr

DEFAULT_PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
DEFAULT_PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
# HF port of the Swin-S Mask2Former COCO instance model GenEval runs through mmdet, and the CLIP ViT-L/14
# (OpenAI weights) GenEval uses for colours.
DEFAULT_GENEVAL_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
DEFAULT_GENEVAL_CLIP = "openai/clip-vit-large-patch14"


def _pickscore_models(
    model: str = DEFAULT_PICKSCORE_MODEL, processor: str = DEFAULT_PICKSCORE_PROCESSOR, **_ignored
) -> list[ModelRef]:
    return [ModelRef(processor, "CLIP processor", weights=False), ModelRef(model, "PickScore model")]


@register_reward("pickscore", models=_pickscore_models)
def pickscore(
    model: str = DEFAULT_PICKSCORE_MODEL,
    processor: str = DEFAULT_PICKSCORE_PROCESSOR,
    device: str | None = None,
    batch_size: int = 8,
    normalize_by: float | None = None,
    dtype: str = "float32",
    cache_dir: str | None = None,
) -> Reward:
    """PickScore human preference: logit_scale * cos(image, prompt) (optionally / normalize_by, e.g. 26)."""
    # Resolve (and, offline, fail) before importing torch/transformers: a missing model is reported in ms.
    processor = resolve_model(processor, reward="pickscore", purpose="CLIP processor", cache_dir=cache_dir)
    model = resolve_model(model, reward="pickscore", purpose="PickScore model", cache_dir=cache_dir)
    from rewards.pickscore import build_pickscore

    return build_pickscore(
        model=model,
        processor=processor,
        device=device,
        batch_size=batch_size,
        normalize_by=normalize_by,
        dtype=dtype,
        cache_dir=cache_dir,
    )


def _ocr_models(**_ignored) -> list[ModelRef]:
    return []  # PP-OCR ONNX models ship inside the rapidocr-onnxruntime wheel; PaddleOCR fetches its own


register_reward("ocr", models=_ocr_models)(build_ocr)  # rewards.ocr is torch-free; its engines load lazily


def _geneval_models(
    backend: str = "auto",
    url: str | None = None,
    detector: str = DEFAULT_GENEVAL_DETECTOR,
    clip: str = DEFAULT_GENEVAL_CLIP,
    **_ignored,
) -> list[ModelRef]:
    if backend == "server" or (backend == "auto" and url):
        return []  # the models live with the server
    return [ModelRef(detector, "Mask2Former detector"), ModelRef(clip, "CLIP colour model")]


@register_reward("geneval", models=_geneval_models, train_only=("jpeg_quality",))
def geneval(
    backend: str = "auto",
    url: str | None = None,
    detector: str = DEFAULT_GENEVAL_DETECTOR,
    clip: str = DEFAULT_GENEVAL_CLIP,
    device: str | None = None,
    batch_size: int = 8,
    signal: str = "score",
    jpeg_quality: int | None = None,
    partial_credit: str | None = None,
    threshold: float | None = None,
    counting_threshold: float | None = None,
    max_per_class: int | None = None,
    timeout: float = 120.0,
    retries: int = 3,
    backoff: float = 1.0,
    cache_dir: str | None = None,
) -> Reward:
    """GenEval: detector-checked objects, counts, colours, positions (partial credit; verdicts in details).

    ``backend``: ``"local"`` (Mask2Former + CLIP in this process), ``"server"`` (``url`` of
    ``python -m rewards.geneval_server``) or ``"auto"`` (server when ``url`` is set). ``jpeg_quality``: JPEG-
    compress each image at this quality before scoring, as Flow-GRPO's training reward does (75; training only:
    eval drops it). ``partial_credit``: the training score's rule, ``"reward_server"`` (default, what the
    published experts train on) or ``"clipped"`` (rewards.geneval_rules); on a server it is the server's flag.
    """
    from rewards.geneval import GenEvalReward
    from rewards.geneval_rules import COUNTING_THRESHOLD, MAX_OBJECTS, PARTIAL_CREDITS, THRESHOLD

    if partial_credit is not None and partial_credit not in PARTIAL_CREDITS:
        raise RewardError(f"geneval: partial_credit must be one of {PARTIAL_CREDITS}, got {partial_credit!r}")

    if backend == "auto":
        backend = "server" if url else "local"
    if backend == "server":
        if not url:
            raise RewardError("geneval: backend='server' needs url='http://HOST:PORT' (see rewards.geneval_server)")
        if (
            threshold is not None
            or counting_threshold is not None
            or max_per_class is not None
            or partial_credit is not None
        ):
            raise RewardError(
                "geneval: thresholds and partial_credit are set on the server (python -m rewards.geneval_server --help)"
            )
        from rewards.geneval_client import GenEvalClient

        scorer = GenEvalClient(url, timeout=timeout, retries=retries, backoff=backoff, batch_size=batch_size)
    elif backend == "local":
        detector = resolve_model(detector, reward="geneval", purpose="Mask2Former detector", cache_dir=cache_dir)
        clip = resolve_model(clip, reward="geneval", purpose="CLIP colour model", cache_dir=cache_dir)
        from rewards.geneval_detector import load_scorer
        from rewards.hub import resolve_device

        scorer = load_scorer(
            detector,
            clip,
            resolve_device(device),
            batch_size=batch_size,
            threshold=THRESHOLD if threshold is None else threshold,
            counting_threshold=COUNTING_THRESHOLD if counting_threshold is None else counting_threshold,
            max_per_class=MAX_OBJECTS if max_per_class is None else max_per_class,
            cache_dir=cache_dir,
            partial_credit=partial_credit or "reward_server",
        )
    else:
        raise RewardError(f"geneval: backend must be 'local', 'server' or 'auto', got {backend!r}")
    return GenEvalReward(scorer, signal=signal, jpeg_quality=jpeg_quality)


@register_reward("jpeg_compressibility")
def jpeg_compressibility(quality: int = 95, device: str | None = None, batch_size: int | None = None) -> Reward:
    """-(JPEG size in kB at quality 95): smaller files score higher (DDPO)."""
    from rewards.image_stats import JpegSizeReward

    return JpegSizeReward(compressible=True, quality=quality)


@register_reward("jpeg_incompressibility")
def jpeg_incompressibility(quality: int = 95, device: str | None = None, batch_size: int | None = None) -> Reward:
    """+(JPEG size in kB at quality 95): more detailed images score higher (DDPO)."""
    from rewards.image_stats import JpegSizeReward

    return JpegSizeReward(compressible=False, quality=quality)


@register_reward("brightness")
def brightness(device: str | None = None, batch_size: int | None = None) -> Reward:
    """Mean BT.601 luma in [0, 1]."""
    from rewards.image_stats import BrightnessReward

    return BrightnessReward()


@register_reward("colourfulness")
def colourfulness(device: str | None = None, batch_size: int | None = None) -> Reward:
    """Hasler-Suesstrunk colourfulness M (0 for grey images)."""
    from rewards.image_stats import ColourfulnessReward

    return ColourfulnessReward()
