"""RaTE distillation on tiny models: what a user relies on when turning an expert into a token.

The teacher is a hand-made LoRA on the final adaptive norm (``norm_out.linear``) that shifts every output
strongly, so "does the token steer the base toward the expert" has a clear answer on a random tiny model.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mrlora.rate.compose import apply_token_spec
from mrlora.rate.distill import DistillSettings, _generator, distill_token, flow_matching_loss
from mrlora.rate.errors import TeacherMismatchError
from mrlora.rate.teacher import attach_expert, set_teacher
from mrlora.rate.token_file import load_token
from mrlora.runstore import DONE_MARKER, read_marker

PROMPTS = ["a red car", "a dog on a beach", "two cats", "a tree in snow", "a blue house", "a person with a kite"]
EVAL_PROMPTS = ["a green apple", "a cat on a bench", "a city at night", "a boat on a lake"]
TOKEN = "<bright>"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_expert(
    out: Path, arch: str, base: str | None = None, magnitude: float = 5.0, rank: int = 2, in_features: int | None = None
) -> Path:
    """A LoRA on ``norm_out.linear`` (the final AdaLN scale/shift) with a large random update, expert format."""
    from mrlora.models.loading import load_pipeline

    transformer = load_pipeline(f"tiny:{arch}").transformer
    layer = dict(transformer.named_modules())["norm_out.linear"]
    g = torch.Generator().manual_seed(0)
    fan_in = in_features or layer.in_features
    a = torch.randn(rank, fan_in, generator=g) * magnitude / fan_in**0.5
    b = torch.randn(layer.out_features, rank, generator=g) * magnitude / rank**0.5
    out.mkdir(parents=True, exist_ok=True)
    save_file(
        {"norm_out.linear.lora_A.weight": a, "norm_out.linear.lora_B.weight": b}, str(out / "adapter_model.safetensors")
    )
    (out / "adapter_config.json").write_text(
        json.dumps({"r": rank, "lora_alpha": rank, "target_modules": ["norm_out.linear"], "peft_type": "LORA"})
    )
    (out / "mrlora.json").write_text(
        json.dumps({"arch": arch, "base": base or f"tiny:{arch}", "reward": "brightness", "scale": 1.0})
    )
    return out


def teacher_pipe(arch: str, expert: Path):
    from mrlora.models.loading import load_pipeline, resolve_model

    pipe = load_pipeline(f"tiny:{arch}")
    info = attach_expert(pipe.transformer, expert, arch, resolve_model(f"tiny:{arch}"))
    return pipe, info


def settings(arch: str, **kw) -> DistillSettings:
    values = dict(
        token=TOKEN,
        steps=30,
        lr=0.2,
        batch_size=4,
        teacher_steps=4,
        resolution=64,
        max_sequence_length=32,
        checkpoint_every=10,
        guidance_scale=4.5 if arch == "sd3" else 3.5,
    )
    values.update(kw)
    return DistillSettings(**values)


def final_latents(pipe, prompts, teacher: bool, guidance: float):
    from mrlora.sampling import sample

    set_teacher(pipe.transformer, teacher)
    try:
        res = sample(
            pipe,
            prompts,
            seeds=list(range(len(prompts))),
            num_steps=4,
            guidance_scale=guidance,
            resolution=64,
            noise_level=0.0,
            max_sequence_length=32,
            decode=False,
        )
    finally:
        set_teacher(pipe.transformer, True)
    return res.latents[:, -1]


def snapshot(pipe) -> dict[str, torch.Tensor]:
    out = {}
    for comp in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, comp, None)
        if module is not None:
            for name, t in module.state_dict().items():
                out[f"{comp}.{name}"] = t.detach().clone()
    return out


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, mrlora_cache):
    """One SD3 distillation shared by the checks below (30 steps, ~15 s), single-threaded for the module."""
    from mrlora.reduce.job import single_threaded

    with single_threaded():
        root = tmp_path_factory.mktemp("rate_sd3")
        expert = make_expert(root / "expert", "sd3")
        pipe, info = teacher_pipe("sd3", expert)
        before = snapshot(pipe)
        s = settings("sd3")
        # a fixed evaluation batch of the loss, drawn like the loop draws its batches
        x0 = final_latents(pipe, PROMPTS[:4], teacher=True, guidance=s.guidance_scale)
        g = _generator(123)
        noise, u = torch.randn(x0.shape, generator=g), torch.sigmoid(torch.randn((4,), generator=g))
        teacher_latents = final_latents(pipe, EVAL_PROMPTS, teacher=True, guidance=s.guidance_scale)
        base_latents = final_latents(pipe, EVAL_PROMPTS, teacher=False, guidance=s.guidance_scale)
        from mrlora.rate.encoders import add_token, read_rows

        add_token(pipe, TOKEN)
        init_vectors = read_rows(pipe, TOKEN)
        set_teacher(pipe.transformer, False)
        with torch.no_grad():
            loss_before = flow_matching_loss(
                pipe, TOKEN, init_vectors, x0, PROMPTS[:4], noise, u, s.guidance_scale, 32
            ).item()
        set_teacher(pipe.transformer, True)
        # add_token above registered the token; distill_token must start from a pipeline without it, so reload
        pipe, info = teacher_pipe("sd3", expert)
        result = distill_token(pipe, PROMPTS, s, root / "out", expert=info, base_id="tiny:sd3", log=lambda m: None)
        set_teacher(pipe.transformer, False)
        with torch.no_grad():
            loss_after = flow_matching_loss(pipe, TOKEN, None, x0, PROMPTS[:4], noise, u, s.guidance_scale, 32).item()
        set_teacher(pipe.transformer, True)
        yield {
            "root": root,
            "expert": expert,
            "pipe": pipe,
            "before": before,
            "result": result,
            "settings": s,
            "loss_before": loss_before,
            "loss_after": loss_after,
            "teacher": teacher_latents,
            "base": base_latents,
        }


def test_only_the_new_embedding_rows_change(distilled):
    pipe, before = distilled["pipe"], distilled["before"]
    from mrlora.rate.encoders import token_row_ids

    rows = token_row_ids(pipe, TOKEN)
    after = snapshot(pipe)
    assert set(after) == set(before)
    changed_tables = 0
    for name, old in before.items():
        new = after[name]
        table = {
            "text_encoder.text_model.embeddings.token_embedding.weight": "clip_l",
            "text_encoder_2.text_model.embeddings.token_embedding.weight": "clip_g",
            "text_encoder_3.shared.weight": "t5",
            "text_encoder_3.encoder.embed_tokens.weight": "t5",
        }.get(name)
        if table is None:
            assert torch.equal(new, old), f"{name} changed during distillation"
            continue
        row = rows[table]
        keep = torch.ones(new.shape[0], dtype=torch.bool)
        keep[row] = False
        assert torch.equal(
            new[keep][: old.shape[0] - (0 if row >= old.shape[0] else 1)],
            old[torch.arange(old.shape[0]) != row] if row < old.shape[0] else old,
        ), name
        assert not torch.equal(new[row], old[row] if row < old.shape[0] else torch.zeros_like(new[row]))
        changed_tables += 1
    assert changed_tables >= 3  # clip_l, clip_g and t5 (t5's table may appear under two tied names)


def test_distillation_loss_falls(distilled):
    assert distilled["loss_after"] < distilled["loss_before"] * 0.99, (
        distilled["loss_before"],
        distilled["loss_after"],
    )
    metrics = [json.loads(l) for l in (distilled["root"] / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 31))


def test_token_moves_generations_toward_the_teacher(distilled):
    pipe, s = distilled["pipe"], distilled["settings"]
    teacher, base = distilled["teacher"], distilled["base"]
    student = final_latents(
        pipe, apply_token_spec(pipe, None, TOKEN, EVAL_PROMPTS), teacher=False, guidance=s.guidance_scale
    )
    d_base = (base - teacher).pow(2).mean().item()
    d_student = (student - teacher).pow(2).mean().item()
    assert d_student < 0.95 * d_base, (d_base, d_student)


def test_saved_token_reloads_and_reproduces_images(distilled):
    from mrlora.models.loading import load_pipeline
    from mrlora.rate.generate import generate_with_tokens

    pipe = distilled["pipe"]
    token_path = distilled["result"].token_path
    done = read_marker(token_path.parent, DONE_MARKER, verify="sha256")
    assert done is not None and done["steps"] == 30 and done["token"] == TOKEN
    token = load_token(token_path)
    assert token.token == TOKEN and token.arch == "sd3" and token.dims == {"clip_l": 32, "clip_g": 32, "t5": 32}

    def images(p):
        set_teacher(p.transformer, False) if hasattr(p.transformer, "peft_config") else None
        imgs = generate_with_tokens(
            p,
            [token_path],
            f"{TOKEN} 2",
            ["a cat on a bench"],
            seeds=[7],
            steps=4,
            guidance_scale=4.5,
            resolution=64,
            max_sequence_length=32,
        )
        return torch.from_numpy(np.asarray(imgs[0]).copy())

    fresh = load_pipeline("tiny:sd3")
    a = images(fresh)
    b = images(pipe)
    set_teacher(pipe.transformer, True)
    assert torch.equal(a, b)
    without = torch.from_numpy(
        np.asarray(
            generate_with_tokens(
                fresh,
                None,
                "",
                ["a cat on a bench"],
                seeds=[7],
                steps=4,
                guidance_scale=4.5,
                resolution=64,
                max_sequence_length=32,
            )[0]
        ).copy()
    )
    assert not torch.equal(a, without)


def test_preemption_and_crash_resume_like_an_uninterrupted_run(tmp_path, monkeypatch):
    import os
    import signal

    import mrlora.sampling as sampling
    from mrlora.training.errors import Preempted

    expert = make_expert(tmp_path / "expert", "sd3")
    s = settings("sd3", steps=6, checkpoint_every=4, batch_size=2)
    pipe, info = teacher_pipe("sd3", expert)
    whole = distill_token(pipe, PROMPTS, s, tmp_path / "whole", expert=info, base_id="tiny:sd3", log=lambda m: None)

    real_sample = sampling.sample

    def interrupt_at(call: int, action):
        calls = {"n": 0}

        def wrapped(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == call:
                action()
            return real_sample(*args, **kwargs)

        return wrapped

    def crash():
        raise KeyboardInterrupt("simulated kill")

    out = tmp_path / "interrupted"
    # 1. SIGUSR2 (Slurm's warning) during step 2: the step finishes, checkpoint-2 is written, Preempted is raised
    monkeypatch.setattr(sampling, "sample", interrupt_at(2, lambda: os.kill(os.getpid(), signal.SIGUSR2)))
    pipe, info = teacher_pipe("sd3", expert)
    with pytest.raises(Preempted) as exc:
        distill_token(pipe, PROMPTS, s, out, expert=info, base_id="tiny:sd3", log=lambda m: None)
    assert exc.value.step == 2 and read_marker(out / "checkpoint-2", "COMPLETE.json") is not None
    # 2. a hard kill during step 5 of the resumed run: checkpoint-4 (periodic) is the newest complete one
    monkeypatch.setattr(sampling, "sample", interrupt_at(3, crash))
    pipe, info = teacher_pipe("sd3", expert)
    with pytest.raises(KeyboardInterrupt):
        distill_token(pipe, PROMPTS, s, out, expert=info, base_id="tiny:sd3", log=lambda m: None)
    assert read_marker(out, DONE_MARKER) is None and not (out / "token.safetensors").exists()
    # 3. the rerun continues from checkpoint-4 and ends exactly where the uninterrupted run ended
    monkeypatch.setattr(sampling, "sample", real_sample)
    pipe, info = teacher_pipe("sd3", expert)
    resumed = distill_token(pipe, PROMPTS, s, out, expert=info, base_id="tiny:sd3", log=lambda m: None)
    assert resumed.resumed_from == 4
    a, b = load_token(whole.token_path), load_token(resumed.token_path)
    for name in a.vectors:
        assert torch.equal(a.vectors[name], b.vectors[name]), name
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(l)["step"] for l in lines] == [1, 2, 3, 4, 5, 6]
    # a finished distillation is not redone
    pipe, info = teacher_pipe("sd3", expert)
    again = distill_token(pipe, PROMPTS, s, out, expert=info, base_id="tiny:sd3", log=lambda m: None)
    assert again.done is not None and again.losses == []


def test_flux_distillation_trains_clip_and_t5_rows(tmp_path):
    expert = make_expert(tmp_path / "expert", "flux")
    pipe, info = teacher_pipe("flux", expert)
    before = snapshot(pipe)
    result = distill_token(
        pipe,
        PROMPTS,
        settings("flux", steps=4, checkpoint_every=0),
        tmp_path / "out",
        expert=info,
        base_id="tiny:flux",
        log=lambda m: None,
    )
    token = load_token(result.token_path)
    assert token.arch == "flux" and sorted(token.vectors) == ["clip", "t5"]
    after = snapshot(pipe)
    changed = sorted(n for n in before if before[n].shape != after[n].shape or not torch.equal(before[n], after[n]))
    assert all("embed" in n or n.endswith("shared.weight") for n in changed), changed
    assert any(n.startswith("text_encoder.") for n in changed) and any(n.startswith("text_encoder_2.") for n in changed)


# ------------------------------------------------------------------------------------------------- bad input


def _cli(capsys, *args: str) -> tuple[int, str]:
    """Run ``python -m mrlora.rate`` in-process (the subprocess form is exercised by the torchrun test)."""
    from mrlora.rate.cli import main

    capsys.readouterr()
    code = main(list(args))
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", ["arch", "base", "shape"])
def test_teacher_from_another_base_is_refused(tmp_path, tiny_sd3_dir, case, capsys):
    if case == "arch":
        expert = make_expert(tmp_path / "expert", "sd3")
        meta = json.loads((expert / "mrlora.json").read_text())
        (expert / "mrlora.json").write_text(json.dumps({**meta, "arch": "flux"}))
        expected = "flux"
    elif case == "base":
        expert = make_expert(tmp_path / "expert", "sd3", base="stabilityai/stable-diffusion-3.5-medium")
        expected = "stable-diffusion-3.5-medium"
    else:
        expert = make_expert(tmp_path / "expert", "sd3", in_features=48)
        expected = "do not fit"
    from mrlora.models.loading import load_pipeline

    pipe = load_pipeline(tiny_sd3_dir)
    with pytest.raises(TeacherMismatchError, match=expected):
        attach_expert(pipe.transformer, expert, "sd3", tiny_sd3_dir)
    assert not hasattr(pipe.transformer, "peft_config")  # nothing attached
    code, err = _cli(
        capsys,
        "distill",
        "--base",
        tiny_sd3_dir,
        "--teacher",
        str(expert),
        "--token",
        TOKEN,
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--prompts",
        "gen:simple:8",
    )
    assert code == 2 and expected in err, err
    assert not (tmp_path / "out").exists()


def test_token_already_in_vocabulary_is_refused_by_the_cli(tmp_path, tiny_sd3_dir, capsys):
    expert = make_expert(tmp_path / "expert", "sd3")
    code, err = _cli(
        capsys,
        "distill",
        "--base",
        tiny_sd3_dir,
        "--teacher",
        str(expert),
        "--token",
        "<|endoftext|>",
        "--out",
        str(tmp_path / "out"),
        "--steps",
        "2",
        "--prompts",
        "gen:simple:8",
    )
    assert code == 2 and "already in the clip_l tokenizer's vocabulary" in err, err
    assert not (tmp_path / "out").exists()


def test_cli_distill_then_generate(tmp_path, tiny_sd3_dir, capsys):
    from PIL import Image

    expert = make_expert(tmp_path / "expert", "sd3")
    code, err = _cli(
        capsys,
        "distill",
        "--base",
        tiny_sd3_dir,
        "--teacher",
        str(expert),
        "--token",
        "<ocr>",
        "--out",
        str(tmp_path / "tok"),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--teacher-steps",
        "2",
        "--resolution",
        "64",
        "--max-sequence-length",
        "32",
        "--prompts",
        "gen:simple:8",
    )
    assert code == 0, err
    code, err = _cli(
        capsys,
        "generate",
        "--base",
        tiny_sd3_dir,
        "--tokens",
        str(tmp_path / "tok" / "token.safetensors"),
        "--spec",
        "<ocr>@1.5 2",
        "--prompt",
        "a sign",
        "--out",
        str(tmp_path / "img.png"),
        "--steps",
        "2",
        "--max-sequence-length",
        "32",
    )
    assert code == 0, err
    assert Image.open(tmp_path / "img.png").size == (64, 64)
