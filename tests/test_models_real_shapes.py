"""The real-shape builder writes a model that the project's loader and the public pipelines accept, at real widths.

A shallow FLUX.1-dev (1 double + 1 single block, the real 3072 width, 64 latent channels packed, 4096-wide T5
context, 768 pooled CLIP-L) is built once for the module: ~0.6B parameters, ~30 s and ~3 GB on 2 cores, and the
real-shape smoke (``benchmarks/real_shapes.py``: Map step, kill, resume, merge, export, eval, memory plan) runs on
it. The full-depth SD3.5-M smoke is the benchmark's default, not a test (~13 minutes here).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from mrlora.models.errors import TinyBuildError
from mrlora.models.real_shapes import MARKER, WEIGHTS_INDEX, build_real_shapes, transformer_config

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "flux"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mrlora.models.real_shapes",
            "--arch",
            "flux",
            "--out",
            str(out),
            "--double-layers",
            "1",
            "--single-layers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.slow
def test_build_is_a_complete_sharded_diffusers_model(flux_dir):
    from diffusers import FluxTransformer2DModel

    index = json.loads((flux_dir / "transformer" / WEIGHTS_INDEX).read_text())
    with torch.device("meta"):
        meta = FluxTransformer2DModel.from_config(transformer_config("flux", double_layers=1, single_layers=1))
    assert set(index["weight_map"]) == set(meta.state_dict())
    assert all((flux_dir / "transformer" / f).is_file() for f in set(index["weight_map"].values()))
    marker = json.loads((flux_dir / MARKER).read_text())
    assert marker["transformer"]["attention_head_dim"] == 128 and marker["dtype"] == "bf16"
    # a second build of the same request is a no-op; a different one is refused instead of overwritten
    assert build_real_shapes("flux", flux_dir, double_layers=1, single_layers=1) == flux_dir
    with pytest.raises(TinyBuildError, match="different real-shape build"):
        build_real_shapes("flux", flux_dir, double_layers=2, single_layers=1)


@pytest.mark.slow
def test_loader_gives_real_widths_and_the_pipeline_generates(flux_dir):
    from mrlora.models.loading import load_pipeline

    pipe = load_pipeline(str(flux_dir), "flux", "bf16")
    t = pipe.transformer
    assert t.config.in_channels == 64 and t.inner_dim == 3072 and t.config.guidance_embeds
    assert pipe.text_encoder_2.config.d_model == 4096 and pipe.text_encoder.config.hidden_size == 768
    assert pipe.vae.config.latent_channels == 16 and {p.dtype for p in t.parameters()} == {torch.bfloat16}
    image = pipe(
        prompt="a red apple",
        num_inference_steps=1,
        height=64,
        width=64,
        guidance_scale=3.5,
        max_sequence_length=16,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64)


def test_depth_options_are_checked_against_the_arch():
    assert transformer_config("sd3", layers=3)["dual_attention_layers"] == [0, 1]  # never the pre-only last block
    assert transformer_config("sd3")["num_layers"] == 24
    with pytest.raises(TinyBuildError, match="--layers"):
        transformer_config("flux", layers=2)
    with pytest.raises(TinyBuildError, match="at least 2"):
        transformer_config("sd3", layers=1)
    with pytest.raises(TinyBuildError, match="FLUX's"):
        transformer_config("sd3", double_layers=2)


@pytest.mark.slow
def test_real_shape_smoke_trains_resumes_merges_and_plans_memory(flux_dir, tmp_path):
    """benchmarks/real_shapes.py on the shallow FLUX: Map step, kill, resume, merge, export, eval, memory plan."""
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "real_shapes.py"
    proc = subprocess.run(
        [sys.executable, str(script), "--arch", "flux", "--flux-model", str(flux_dir), "--keep", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    assert summary.startswith("real shapes: flux ok") and "memory-plan error 0.00%" in summary
    assert "(killed after checkpoint-1)" in proc.stdout and "ZeRO-2 fp32 master" in proc.stdout
    assert (tmp_path / "flux-exported" / "model_index.json").is_file()
