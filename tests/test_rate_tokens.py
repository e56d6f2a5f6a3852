"""Token files, token specs and mixing tokens into prompts (no distillation: vectors are made by hand)."""

from __future__ import annotations

import pytest
import torch

from mrlora.rate.cli import main as rate_main
from mrlora.rate.compose import apply_token_spec, load_tokens
from mrlora.rate.encoders import add_token, read_rows, token_row_ids
from mrlora.rate.errors import TokenExistsError, TokenFileError, TokenSpecError, UnknownTokenError
from mrlora.rate.spec import SpecItem, parse_token_spec
from mrlora.rate.token_file import RateToken, load_token, save_token

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd3_pipe(mrlora_cache):
    from mrlora.models.loading import load_pipeline

    return load_pipeline("tiny:sd3")


def hand_token(name: str, arch: str = "sd3", value: float = 1.0) -> RateToken:
    encoders = ["clip_l", "clip_g", "t5"] if arch == "sd3" else ["clip", "t5"]
    g = torch.Generator().manual_seed(sum(map(ord, name)))
    return RateToken(
        token=name,
        arch=arch,
        vectors={e: value * torch.randn(1, 32, generator=g) for e in encoders},
        base=f"tiny:{arch}",
        reward=name.strip("<>"),
    )


def test_parse_token_spec():
    assert parse_token_spec("<picks> 3 <ocr> 2") == [SpecItem("<picks>", 3), SpecItem("<ocr>", 2)]
    assert parse_token_spec("<picks>@0.5 <ocr>@1.5 2") == [SpecItem("<picks>", 1, 0.5), SpecItem("<ocr>", 2, 1.5)]
    assert parse_token_spec("<ocr> <ocr> 2") == [SpecItem("<ocr>", 3)]
    assert parse_token_spec("") == []
    for bad, why in [
        ("3 <ocr>", "starts with a count"),
        ("<ocr> 2 3", "two counts"),
        ("<ocr> 0", ">= 1"),
        ("<ocr>@x", "not a number"),
        ("<ocr>@1 <ocr>@2", "two scales"),
    ]:
        with pytest.raises(TokenSpecError, match=why):
            parse_token_spec(bad)


def test_token_file_round_trip_and_metadata(tmp_path):
    from safetensors import safe_open

    token = hand_token("<ocr>")
    path = save_token(token, tmp_path / "ocr.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        meta = fh.metadata()
    assert meta["token"] == "<ocr>" and meta["arch"] == "sd3"
    assert meta["encoders"] == '["clip_l", "clip_g", "t5"]' and '"t5": 32' in meta["dims"]
    back = load_token(path)
    assert back.token == "<ocr>" and back.base == "tiny:sd3" and back.reward == "ocr"
    for name, vec in token.vectors.items():
        assert torch.equal(back.vectors[name], vec)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(TokenFileError, match="not a readable safetensors"):
        load_token(tmp_path / "junk.safetensors")
    with pytest.raises(TokenFileError, match="does not exist"):
        load_token(tmp_path / "missing.safetensors")


def test_apply_token_spec_appends_tokens_and_scales_rows(sd3_pipe):
    pipe = sd3_pipe
    ocr, picks = hand_token("<ocr>"), hand_token("<picks>")
    prompt = apply_token_spec(pipe, [ocr, picks], "<picks> 3 <ocr>@0.5", "a sign")
    assert prompt == "a sign <picks> <picks> <picks> <ocr>"
    rows = read_rows(pipe, "<ocr>")
    for name in rows:
        torch.testing.assert_close(rows[name], 0.5 * ocr.vectors[name])
        torch.testing.assert_close(read_rows(pipe, "<picks>")[name], picks.vectors[name])
    ids = pipe.tokenizer(prompt).input_ids
    assert ids.count(token_row_ids(pipe, "<picks>")["clip_l"]) == 3
    # a second spec re-scales (one pipeline serves every mix); tokens left out are back at scale 1
    assert apply_token_spec(pipe, None, "<picks>@2", ["x", "y"]) == ["x <picks>", "y <picks>"]
    torch.testing.assert_close(read_rows(pipe, "<ocr>")["t5"], ocr.vectors["t5"])
    torch.testing.assert_close(read_rows(pipe, "<picks>")["t5"], 2 * picks.vectors["t5"])
    with pytest.raises(UnknownTokenError, match="<geneval>"):
        apply_token_spec(pipe, None, "<geneval> 2", "a sign")


def test_token_already_in_vocabulary_is_refused(sd3_pipe):
    with pytest.raises(TokenExistsError, match="already in the clip_l"):
        add_token(sd3_pipe, "<|startoftext|>")


def test_token_for_another_base_is_refused_before_anything_changes(sd3_pipe, tmp_path):
    flux_token = save_token(hand_token("<f>", arch="flux"), tmp_path / "f.safetensors")
    with pytest.raises(TokenFileError, match="flux model but the pipeline is sd3"):
        load_tokens(sd3_pipe, [flux_token])
    wide = hand_token("<wide>")
    wide.vectors["t5"] = torch.randn(1, 64)
    with pytest.raises(TokenFileError, match="t5 is 32 wide here but the token's embedding is 64"):
        load_tokens(sd3_pipe, [hand_token("<fine>"), wide])
    assert "<fine>" not in sd3_pipe.tokenizer.get_vocab()  # nothing installed when one of the files is bad


def test_cli_generate_unknown_token_exits_2(tmp_path, tiny_sd3_dir, capsys):
    path = save_token(hand_token("<ocr>"), tmp_path / "ocr.safetensors")
    code = rate_main(
        [
            "generate",
            "--base",
            tiny_sd3_dir,
            "--tokens",
            str(path),
            "--spec",
            "<picks> 3",
            "--prompt",
            "a sign",
            "--out",
            str(tmp_path / "img.png"),
        ]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "<picks>" in err and "add its token file" in err
    assert not (tmp_path / "img.png").exists()
    code = rate_main(
        [
            "generate",
            "--base",
            tiny_sd3_dir,
            "--tokens",
            str(path),
            "--spec",
            "<ocr> 0",
            "--prompt",
            "a sign",
            "--out",
            str(tmp_path / "img.png"),
        ]
    )
    assert code == 2 and ">= 1" in capsys.readouterr().err


def test_legacy_clip_eos_config_still_pools_at_end_of_text_after_adding_a_token(mrlora_cache):
    """Released CLIP configs say eos_token_id=2, which makes transformers pool at the highest token id;
    after add_token that would be the RaTE token. The pooled embedding must stay at the real end of text."""
    from mrlora.models.loading import load_pipeline

    pipe = load_pipeline("tiny:sd3", arch="sd3", dtype="fp32", device="cpu")
    encoder, tokenizer = pipe.text_encoder, pipe.tokenizer
    for module in encoder.modules():  # make the tiny encoder look like a released checkpoint
        if hasattr(module, "eos_token_id"):
            module.eos_token_id = 2
    encoder.config.eos_token_id = 2

    def pooled(text):
        ids = tokenizer(text, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            out = encoder(ids, output_hidden_states=True)
        eos_pos = int((ids[0] == tokenizer.eos_token_id).nonzero()[0])
        at_eos = encoder.text_projection(out.last_hidden_state[0, eos_pos])
        return out.text_embeds[0], at_eos

    before, _ = pooled("a red apple")
    add_token(pipe, "<rate-eos-check>")
    after, _ = pooled("a red apple")
    torch.testing.assert_close(after, before)
    with_token, at_eos = pooled("a red apple <rate-eos-check>")
    torch.testing.assert_close(with_token, at_eos)


def test_generate_with_tokens_makes_the_images_eval_scores(mrlora_cache):
    """docs/rate.md promises it: the RaTE CLI's images for a seed are the ones an eval job makes for that seed,
    up to float rounding (mrlora's ODE sampler vs the diffusers pipeline call eval uses)."""
    import numpy as np

    from eval.model import generate
    from eval.rate import mixed_prompts
    from mrlora.models.loading import load_pipeline
    from mrlora.rate.generate import generate_with_tokens

    pipe = load_pipeline("tiny:sd3")
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = ["a photo of a cat", 'a sign that says "OPEN"'], [3, 4]
    settings = dict(steps=4, guidance_scale=4.5, resolution=64, max_sequence_length=32)
    ours = generate_with_tokens(pipe, [hand_token("<ocr>", value=40.0)], "<ocr> 2", prompts, seeds=seeds, **settings)
    theirs = generate(
        pipe,
        mixed_prompts(pipe, "<ocr> 2", prompts),
        seeds,
        settings["steps"],
        settings["guidance_scale"],
        settings["resolution"],
        settings["max_sequence_length"],
    )
    plain = generate(
        pipe,
        prompts,
        seeds,
        settings["steps"],
        settings["guidance_scale"],
        settings["resolution"],
        settings["max_sequence_length"],
    )
    for a, b, c in zip(ours, theirs, plain):
        # the two samplers order a few float ops differently: measured at most 1/255 on 0-1 pixels of 12288
        diff = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert diff.max() <= 1 and (diff > 0).mean() < 0.001, (diff.max(), int((diff > 0).sum()))
        assert not np.array_equal(np.asarray(a), np.asarray(c))  # the mix is in effect, not ignored by both
