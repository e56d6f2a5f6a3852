"""Tiny models: built without the hub, loaded by the public diffusers classes, usable by every later stage."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from PIL import Image

from mrlora.models.errors import ModelNotFoundError, TinyBuildError, UnknownArchError
from mrlora.models.loading import detect_arch, load_pipeline, resolve_model, tiny_cache_dir
from mrlora.models.tiny import MARKER, TINY_VERSION, build_pipeline, build_tiny, read_marker

REPO_ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {"sd3": StableDiffusion3Pipeline, "flux": FluxPipeline}


@pytest.fixture
def tiny_dirs(tiny_sd3_dir: str, tiny_flux_dir: str) -> dict[str, str]:
    return {"sd3": tiny_sd3_dir, "flux": tiny_flux_dir}


def _generate(pipe, prompt: str = "a photo of a red cat", seed: int = 0, **kwargs) -> Image.Image:
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        prompt,
        height=64,
        width=64,
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(seed),
        max_sequence_length=32,
        **kwargs,
    )
    return out.images[0]


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_public_pipeline_class_loads_and_generates(tiny_dirs: dict[str, str], arch: str) -> None:
    path = tiny_dirs[arch]
    assert json.loads((Path(path) / "model_index.json").read_text())["_class_name"] == PIPELINES[arch].__name__
    assert read_marker(path).arch == arch
    pipe = PIPELINES[arch].from_pretrained(path)
    image = _generate(pipe)
    assert isinstance(image, Image.Image)
    assert image.size == (64, 64)
    pixels = np.asarray(image).astype(np.float32)
    assert pixels.std() > 1.0, "a random model should not decode to a flat image"
    # Same seed -> the same image; another seed -> a different one.
    assert np.array_equal(np.asarray(_generate(pipe, seed=0)), np.asarray(image))
    assert not np.array_equal(np.asarray(_generate(pipe, seed=1)), np.asarray(image))


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_load_pipeline_resolves_presets_and_checks_arch(tiny_dirs: dict[str, str], arch: str) -> None:
    assert resolve_model(f"tiny-{arch}") == tiny_dirs[arch]
    assert detect_arch(tiny_dirs[arch]) == arch
    pipe = load_pipeline(f"tiny:{arch}", arch=arch, dtype="bf16", device="cpu")
    assert isinstance(pipe, PIPELINES[arch])
    assert pipe.transformer.dtype == torch.bfloat16
    other = "flux" if arch == "sd3" else "sd3"
    with pytest.raises(UnknownArchError, match=f"is a {arch} model but arch='{other}'"):
        load_pipeline(tiny_dirs[arch], arch=other)


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_saved_vae_decodes_latents_to_images_that_differ(tiny_dirs: dict[str, str], arch: str) -> None:
    """The tiny VAE, loaded from disk, shows its latent: what lets the cheap rewards be learnt at all."""
    from diffusers import AutoencoderKL

    from rewards.image_stats import brightness

    vae = AutoencoderKL.from_pretrained(tiny_dirs[arch], subfolder="vae")
    pipe_cls = PIPELINES[arch]
    processor = pipe_cls.from_pretrained(
        tiny_dirs[arch],
        transformer=None,
        text_encoder=None,
        text_encoder_2=None,
        **({"text_encoder_3": None} if arch == "sd3" else {}),
    ).image_processor

    def images(latents: torch.Tensor) -> list[Image.Image]:
        with torch.no_grad():
            return processor.postprocess(vae.decode(latents).sample, output_type="pil")

    latents = torch.randn(16, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    lum = np.array([brightness(im) for im in images(latents)])
    # a random AutoencoderKL gives std ~0.002 here: every latent decodes to the same statistics
    assert lum.std() > 0.01, f"brightness std {lum.std():.4f} over random latents: the decoder hides the latent"
    # one latent, a smooth image: neighbouring pixels differ far less than the image varies
    pixels = np.asarray(images(latents[:1])[0], dtype=np.float64)
    assert np.abs(np.diff(pixels, axis=1)).mean() < 0.25 * pixels.std()
    # a uniform latent (the rewards' "flat" end) decodes to one flat colour (the blur's zero padding fades the
    # outer 8 px towards grey), and its sign picks the colour
    flat_a, flat_b = images(torch.stack([torch.ones(4, 8, 8), -torch.ones(4, 8, 8)]))
    for flat in (flat_a, flat_b):
        assert np.asarray(flat, dtype=np.float64)[8:-8, 8:-8].std(axis=(0, 1)).max() < 1.0
    assert brightness(flat_a) != pytest.approx(brightness(flat_b), abs=0.05)


def test_default_resolution_is_64px(tiny_sd3_dir: str) -> None:
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (64, 64)


def test_build_is_deterministic_given_seed(tiny_sd3_dir: str) -> None:
    saved = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir).transformer.state_dict()
    rebuilt = build_pipeline("sd3", seed=0).transformer.state_dict()
    other = build_pipeline("sd3", seed=1).transformer.state_dict()
    assert saved.keys() == rebuilt.keys()
    assert all(torch.equal(saved[k], rebuilt[k]) for k in saved)
    assert not all(torch.equal(saved[k], other[k]) for k in saved)


def test_complete_build_is_left_alone(tiny_sd3_dir: str) -> None:
    marker = Path(tiny_sd3_dir) / MARKER
    before = (marker.stat().st_mtime_ns, sorted(p.name for p in Path(tiny_sd3_dir).iterdir()))
    assert build_tiny("sd3", tiny_sd3_dir, seed=0) == Path(tiny_sd3_dir)
    assert (marker.stat().st_mtime_ns, sorted(p.name for p in Path(tiny_sd3_dir).iterdir())) == before
    with pytest.raises(TinyBuildError, match="seed=0.*not the requested arch=sd3, seed=7"):
        build_tiny("sd3", tiny_sd3_dir, seed=7)


def test_unrelated_directory_is_never_overwritten(tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(TinyBuildError, match="no complete tiny model"):
        build_tiny("flux", out)
    assert (out / "notes.txt").read_text() == "keep me"


def test_killed_build_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build killed mid-way leaves a .partial sibling, a stale lock and maybe an unmarked cache dir."""
    monkeypatch.setenv("MRLORA_CACHE", str(tmp_path))
    out = tiny_cache_dir("flux")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = os.uname().nodename
    partial = out.with_name(f".{out.name}.partial-{host}-{dead.pid}-0000")
    (partial / "transformer").mkdir(parents=True)
    (partial / "model_index.json").write_text("{}")
    out.mkdir()
    (out / "model_index.json").write_text('{"_class_name": "FluxPipeline"}')  # looks complete-ish, no marker
    out.with_name(out.name + ".lock").write_text(json.dumps({"host": host, "pid": dead.pid, "time": 0}))

    path = resolve_model("tiny:flux")

    assert Path(path) == out
    assert read_marker(out) is not None and read_marker(out).arch == "flux"
    assert not partial.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no lock, trash or partial left behind
    assert detect_arch(path) == "flux"


def test_missing_local_path_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such-model"
    with pytest.raises(ModelNotFoundError, match=f"model path '{missing}' does not exist"):
        resolve_model(str(missing))
    with pytest.raises(ModelNotFoundError, match="not a diffusers model directory"):
        detect_arch(tmp_path)


def test_offline_missing_hub_id_says_how_to_predownload(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # so "org/model" cannot accidentally be a relative directory
    repo = "mrlora-tests/not-a-real-model"
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model(repo)
    message = str(info.value)
    assert repr(repo) in message
    assert f"huggingface-cli download {repo}" in message
    assert "HF_HUB_OFFLINE" in message


def test_unknown_tiny_arch_lists_choices() -> None:
    with pytest.raises(UnknownArchError, match="tiny:sd3, tiny:flux"):
        resolve_model("tiny:sdxl")


@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_tokenizers_take_added_tokens_and_any_text(tiny_dirs: dict[str, str], arch: str) -> None:
    pipe = PIPELINES[arch].from_pretrained(tiny_dirs[arch])
    tokenizers = [pipe.tokenizer, pipe.tokenizer_2] + ([pipe.tokenizer_3] if arch == "sd3" else [])
    for tok in tokenizers:
        assert tok.add_tokens(["<rate_ocr>"]) == 1
        token_id = tok.convert_tokens_to_ids("<rate_ocr>")
        ids = tok("a sign <rate_ocr> that says hello").input_ids
        assert ids.count(token_id) == 1
        assert token_id not in tok("a sign that says hello").input_ids
        # Unseen words and non-ASCII text still encode to real ids.
        assert len(tok("Zyxwv ünïcødé 日本 quokka!!").input_ids) > 3
    # CLIP pools at the first EOS, so EOS must be recognised even with added tokens above it.
    clip = pipe.tokenizer
    assert clip.eos_token_id == pipe.text_encoder.config.eos_token_id
    assert clip.eos_token_id == max(v for k, v in clip.get_vocab().items() if k != "<rate_ocr>")


def test_pipeline_generates_with_added_token(tiny_sd3_dir: str) -> None:
    """What RaTE does: add a token, resize the text encoders' embeddings, prompt with it."""
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3_dir)
    for tok, enc in [
        (pipe.tokenizer, pipe.text_encoder),
        (pipe.tokenizer_2, pipe.text_encoder_2),
        (pipe.tokenizer_3, pipe.text_encoder_3),
    ]:
        tok.add_tokens(["<rate_ocr>"])
        enc.resize_token_embeddings(max(len(tok), enc.get_input_embeddings().num_embeddings))
    image = _generate(pipe, prompt="a sign that says hello <rate_ocr>")
    assert image.size == (64, 64)


def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    out = tmp_path / "occupied"
    out.mkdir()
    (out / "file").write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "mrlora.models.tiny", "--arch", "sd3", "--out", str(out)],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["occupied"]


def test_models_package_imports_without_torch() -> None:
    code = (
        "import sys, mrlora.models as m; "
        "assert m.MODEL_PRESETS['sd35m'] == 'stabilityai/stable-diffusion-3.5-medium'; "
        "assert 'torch' not in sys.modules, 'mrlora.models imported torch'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO_ROOT, timeout=120)


def test_concurrent_builders_leave_one_complete_model(tmp_path: Path) -> None:
    """Two processes building into the same empty cache at once (``resolve_model`` under its lock, and the CLI
    straight into the directory): both succeed with the same complete model, and nothing is left over."""
    env = {**os.environ, "MRLORA_CACHE": str(tmp_path)}
    out = tmp_path / f"tiny-flux-v{TINY_VERSION}"  # where resolve_model builds it
    commands = [
        [sys.executable, "-c", "from mrlora.models.loading import resolve_model; print(resolve_model('tiny:flux'))"],
        [sys.executable, "-m", "mrlora.models.tiny", "--arch", "flux", "--out", str(out)],
    ]
    procs = [
        subprocess.Popen(c, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for proc, (stdout, stderr) in zip(procs, results):
        assert proc.returncode == 0, stderr
        assert stdout.strip().splitlines()[-1] == str(out)
    assert read_marker(out).arch == "flux"
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]
    FluxPipeline.from_pretrained(str(out))  # the winner's copy is whole


def test_waits_for_a_live_builder_instead_of_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While another live process holds the lock, resolve_model waits for its result and leaves its lock alone."""
    monkeypatch.setenv("MRLORA_CACHE", str(tmp_path))
    out = tiny_cache_dir("sd3")
    lock = out.with_name(out.name + ".lock")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock.write_text(json.dumps({"host": os.uname().nodename, "pid": holder.pid, "time": 0}))
        builder = threading.Timer(0.5, build_tiny, args=("sd3", out))  # the "other process" finishing its build
        builder.start()
        calls = []
        monkeypatch.setattr("mrlora.models.loading.build_tiny", lambda *a, **k: calls.append(k) or build_tiny(*a, **k))
        assert resolve_model("tiny:sd3") == str(out)
        builder.join()
        assert all(not k.get("replace_incomplete") for k in calls), "the waiter must not build while the lock is live"
        assert lock.exists()
    finally:
        holder.kill()
        holder.wait()
