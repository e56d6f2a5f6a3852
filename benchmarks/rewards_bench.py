"""Reward throughput on CPU: images/s per reward at batch 8, 512 px.

PickScore and GenEval run tiny random models (built and saved to a temp dir, then loaded through the reward
factories), so their figures measure the pipeline overhead (pre/post-processing, masks at 512 px, CLIP
crops), not the real networks. OCR runs the real PP-OCR ONNX models on images with rendered text.

    python benchmarks/rewards_bench.py [--batch 8] [--size 512] [--rounds 3] [--rewards ocr pickscore ...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from rewards import build_reward
from rewards.ocr import extract_target
from rewards.prompts import load_prompt_source

ALL = ["ocr", "pickscore", "geneval", "jpeg_compressibility", "jpeg_incompressibility", "brightness", "colourfulness"]


def make_images(n: int, size: int, texts: list[str]) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    font = ImageFont.load_default(size=size // 10)
    images = []
    for i in range(n):
        base = rng.integers(120, 256, (size // 16, size // 16, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((size, size), Image.BILINEAR)
        ImageDraw.Draw(image).text((size // 16, size // 2), texts[i], font=font, fill="black")
        images.append(image)
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="images per reward call")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels")
    parser.add_argument("--rounds", type=int, default=3, help="timed calls per reward (after one warm-up)")
    parser.add_argument("--rewards", nargs="+", default=ALL, choices=ALL, help="rewards to benchmark")
    args = parser.parse_args()

    ocr_items = load_prompt_source(f"gen:ocr:{args.batch}", seed=0)
    geneval_items = load_prompt_source(f"gen:geneval:{args.batch}", seed=0)
    texts = [extract_target(p.prompt) for p in ocr_items]
    images = make_images(args.batch, args.size, texts)

    with tempfile.TemporaryDirectory() as tmp:
        kwargs: dict[str, dict] = {"ocr": {"backend": "rapidocr"}}
        if {"pickscore", "geneval"} & set(args.rewards):
            from rewards.tiny_models import save_tiny_clip, save_tiny_mask2former

            clip = str(save_tiny_clip(Path(tmp) / "clip"))
            kwargs["pickscore"] = {"model": clip, "processor": clip, "device": "cpu", "batch_size": args.batch}
            if "geneval" in args.rewards:
                m2f = str(save_tiny_mask2former(Path(tmp) / "m2f"))
                # threshold 0 keeps the random model's detections so colour classification runs too
                kwargs["geneval"] = {
                    "backend": "local",
                    "detector": m2f,
                    "clip": clip,
                    "device": "cpu",
                    "batch_size": args.batch,
                    "threshold": 0.0,
                    "counting_threshold": 0.0,
                }
        print(f"batch {args.batch}, {args.size}x{args.size} px, {args.rounds} timed rounds, CPU")
        print(f"{'reward':24s} {'load s':>8s} {'images/s':>10s} {'ms/image':>10s}")
        for name in args.rewards:
            t0 = time.perf_counter()
            reward = build_reward(name, **kwargs.get(name, {}))
            load = time.perf_counter() - t0
            if name == "geneval":
                prompts, meta = [i.prompt for i in geneval_items], [i.metadata for i in geneval_items]
            else:
                prompts, meta = [i.prompt for i in ocr_items], None
            reward(images, prompts, meta)  # warm-up
            t0 = time.perf_counter()
            for _ in range(args.rounds):
                reward(images, prompts, meta)
            per_image = (time.perf_counter() - t0) / (args.rounds * args.batch)
            print(f"{name:24s} {load:8.2f} {1 / per_image:10.2f} {1000 * per_image:10.1f}", flush=True)


if __name__ == "__main__":
    main()
