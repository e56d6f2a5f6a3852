"""The in-process GenEval scorer: Mask2Former instance segmentation + CLIP colour classification.

The reference runs mmdet 2.x's Mask2Former in a separate server, the users' biggest setup pain. transformers
ships Mask2Former and CLIP, so the detector runs in the training/eval process itself. Post-processing follows
mmdet's Mask2Former instance head (the one GenEval used): per image the top-k (query, class) pairs by class
probability, masks = sigmoid(mask logits) > 0.5 at image resolution, score = class probability x mean mask
probability inside the mask, box = the mask's bounding box. Colours follow GenEval: each object's masked
pixels pasted on grey (#999999), cropped to its box, classified by CLIP zero-shot over 10 colours with the
three GenEval templates.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from rewards.geneval_rules import (
    COLORS,
    COUNTING_THRESHOLD,
    MAX_OBJECTS,
    PARTIAL_CREDITS,
    THRESHOLD,
    Detection,
    GenEvalResult,
    canonical_class,
    evaluate,
    select_detections,
    validate_metadata,
)

COLOUR_TEMPLATES = ("a photo of a {c} {cls}", "a photo of a {c}-colored {cls}", "a photo of a {c} object")
GREY = (153, 153, 153)


class Detector(Protocol):
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        """All detections per image (any score); thresholds are applied by the rules."""


class ColourClassifier(Protocol):
    def classify(self, image: Image.Image, class_name: str, detections: list[Detection]) -> list[str]:
        """One colour name (from ``COLORS``) per detection."""


class Mask2FormerDetector:
    """COCO instance segmentation with ``Mask2FormerForUniversalSegmentation`` (mmdet-style post-processing).

    ``min_score`` drops (query, class) pairs whose class probability alone is below it before masks are
    upsampled; since score <= class probability, the default 0.3 (GenEval's lowest threshold) loses nothing.
    """

    def __init__(
        self, model, processor, device: str, top_k: int = 100, min_score: float = THRESHOLD, batch_size: int = 8
    ) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)
        self.top_k = int(top_k)
        self.min_score = float(min_score)
        self.batch_size = max(1, int(batch_size))
        id2label = model.config.id2label
        self.class_names = [canonical_class(str(id2label[i])) for i in range(len(id2label))]

    @torch.no_grad()
    def detect(self, images: Sequence[Image.Image]) -> list[list[Detection]]:
        out: list[list[Detection]] = []
        for start in range(0, len(images), self.batch_size):
            out.extend(self._detect_batch([im.convert("RGB") for im in images[start : start + self.batch_size]]))
        return out

    def _detect_batch(self, images: list[Image.Image]) -> list[list[Detection]]:
        inputs = self.processor(images=images, return_tensors="pt")
        pixels = inputs["pixel_values"].to(self.device, dtype=self.model.dtype)
        outputs = self.model(pixel_values=pixels, pixel_mask=inputs["pixel_mask"].to(self.device))
        class_probs = outputs.class_queries_logits.float().softmax(-1)[..., :-1]  # drop "no object"
        mask_logits = outputs.masks_queries_logits.float()
        padded_hw = pixels.shape[-2:]
        results = []
        for b, image in enumerate(images):
            valid = inputs["pixel_mask"][b].bool()
            valid_h = int(valid.any(dim=1).sum())
            valid_w = int(valid.any(dim=0).sum())
            results.append(self._instances(class_probs[b], mask_logits[b], padded_hw, (valid_h, valid_w), image))
        return results

    def _instances(self, probs, mask_logits, padded_hw, valid_hw, image) -> list[Detection]:
        num_queries, num_classes = probs.shape
        flat = probs.flatten()
        k = min(self.top_k, flat.numel())
        top_scores, top_index = flat.topk(k)
        keep = top_scores >= self.min_score
        top_scores, top_index = top_scores[keep], top_index[keep]
        if top_index.numel() == 0:
            return []
        queries, labels = top_index // num_classes, top_index % num_classes
        # Several (query, class) pairs share a query's mask: upsample each distinct mask once.
        unique_queries, pair_to_mask = torch.unique(queries, return_inverse=True)
        masks = F.interpolate(mask_logits[unique_queries][None], size=padded_hw, mode="bilinear", align_corners=False)
        masks = masks[..., : valid_hw[0], : valid_hw[1]]
        masks = F.interpolate(masks, size=(image.height, image.width), mode="bilinear", align_corners=False)[0]
        probs_px = masks.sigmoid()
        binary = probs_px > 0.5
        area = binary.flatten(1).sum(-1)
        mask_scores = (probs_px * binary).flatten(1).sum(-1) / area.clamp(min=1)
        scores = (top_scores * mask_scores[pair_to_mask]).cpu().numpy()
        binary_np = binary.cpu().numpy()
        boxes = [_mask_box(m) for m in binary_np]
        detections = []
        for i, m in enumerate(pair_to_mask.tolist()):
            if boxes[m] is None:  # empty mask: nothing there
                continue
            detections.append(Detection(self.class_names[int(labels[i])], float(scores[i]), boxes[m], binary_np[m]))
        return detections


def _mask_box(mask: np.ndarray) -> tuple[float, float, float, float] | None:
    """Tight (x0, y0, x1, y1) around a boolean mask, or None when it is empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    return float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)


class ClipColourClassifier:
    """CLIP zero-shot colour of each object (masked crop on grey), text classifiers cached per class."""

    def __init__(self, model, processor, device: str, colours: Sequence[str] = COLORS) -> None:
        self.model = model.eval().requires_grad_(False)
        self.processor = processor
        self.device = torch.device(device)
        self.colours = tuple(colours)
        self.max_length = int(model.config.text_config.max_position_embeddings)
        self._text_cache: dict[str, torch.Tensor] = {}

    @torch.no_grad()
    def _text_classifier(self, class_name: str) -> torch.Tensor:
        if class_name not in self._text_cache:
            prompts = [t.format(c=c, cls=class_name) for c in self.colours for t in COLOUR_TEMPLATES]
            tokens = self.processor(
                text=prompts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            pooled = self.model.text_model(
                input_ids=tokens["input_ids"].to(self.device), attention_mask=tokens["attention_mask"].to(self.device)
            ).pooler_output
            emb = F.normalize(self.model.text_projection(pooled).float(), dim=-1)
            emb = emb.view(len(self.colours), len(COLOUR_TEMPLATES), -1).mean(dim=1)
            self._text_cache[class_name] = F.normalize(emb, dim=-1)
        return self._text_cache[class_name]

    @staticmethod
    def crop(image: Image.Image, det: Detection) -> Image.Image:
        image = image.convert("RGB")
        if det.mask is not None:
            grey = Image.new("RGB", image.size, GREY)
            image = Image.composite(image, grey, Image.fromarray(det.mask.astype(np.uint8) * 255, mode="L"))
        x0, y0, x1, y1 = det.box
        x0, y0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
        x1, y1 = min(image.width, max(x0 + 1, int(np.ceil(x1)))), min(image.height, max(y0 + 1, int(np.ceil(y1))))
        return image.crop((x0, y0, x1, y1))

    @torch.no_grad()
    def classify(self, image: Image.Image, class_name: str, detections: list[Detection]) -> list[str]:
        if not detections:
            return []
        crops = [self.crop(image, det) for det in detections]
        pixels = self.processor(images=crops, return_tensors="pt")["pixel_values"].to(
            self.device, dtype=self.model.dtype
        )
        pooled = self.model.vision_model(pixel_values=pixels).pooler_output
        emb = F.normalize(self.model.visual_projection(pooled).float(), dim=-1)
        best = (emb @ self._text_classifier(class_name).T).argmax(dim=-1).cpu().tolist()
        return [self.colours[i] for i in best]


class GenEvalScorer:
    """Detector + colour classifier + the GenEval rules: images and metadata in, :class:`GenEvalResult` out."""

    def __init__(
        self,
        detector: Detector,
        colours: ColourClassifier,
        threshold: float = THRESHOLD,
        counting_threshold: float = COUNTING_THRESHOLD,
        max_per_class: int = MAX_OBJECTS,
        partial_credit: str = "reward_server",
    ) -> None:
        if partial_credit not in PARTIAL_CREDITS:
            raise ValueError(f"geneval: partial_credit must be one of {PARTIAL_CREDITS}, got {partial_credit!r}")
        self.partial_credit = partial_credit
        self.detector = detector
        self.colours = colours
        self.threshold = float(threshold)
        self.counting_threshold = float(counting_threshold)
        self.max_per_class = int(max_per_class)

    def score(self, images: Sequence[Image.Image], metadata: Sequence[dict]) -> list[GenEvalResult]:
        for i, meta in enumerate(metadata):
            validate_metadata(meta, where=f"metadata[{i}]")
        all_detections = self.detector.detect(list(images))
        results = []
        for image, meta, detections in zip(images, metadata, all_detections):
            kept = select_detections(
                detections, meta.get("tag"), self.threshold, self.counting_threshold, self.max_per_class
            )
            results.append(
                evaluate(
                    kept,
                    meta,
                    lambda name, dets, im=image: self.colours.classify(im, name, dets),
                    partial_credit=self.partial_credit,
                )
            )
        return results


def load_scorer(
    detector: str,
    clip: str,
    device: str,
    batch_size: int = 8,
    threshold: float = THRESHOLD,
    counting_threshold: float = COUNTING_THRESHOLD,
    max_per_class: int = MAX_OBJECTS,
    cache_dir: str | None = None,
    partial_credit: str = "reward_server",
) -> GenEvalScorer:
    """Load the Mask2Former detector and the CLIP colour model into a scorer.

    ``detector`` and ``clip`` are what ``rewards.hub.resolve_model`` returned (its callers resolve before
    importing this module, so a missing model fails before torch is imported).
    """
    from transformers import AutoImageProcessor, AutoProcessor, CLIPModel, Mask2FormerForUniversalSegmentation

    det_model = Mask2FormerForUniversalSegmentation.from_pretrained(detector, cache_dir=cache_dir).to(device)
    det_processor = AutoImageProcessor.from_pretrained(detector, cache_dir=cache_dir)
    clip_model = CLIPModel.from_pretrained(clip, cache_dir=cache_dir).to(device)
    clip_processor = AutoProcessor.from_pretrained(clip, cache_dir=cache_dir)
    return GenEvalScorer(
        Mask2FormerDetector(
            det_model, det_processor, device, min_score=min(threshold, counting_threshold), batch_size=batch_size
        ),
        ClipColourClassifier(clip_model, clip_processor, device),
        threshold=threshold,
        counting_threshold=counting_threshold,
        max_per_class=max_per_class,
        partial_credit=partial_credit,
    )
