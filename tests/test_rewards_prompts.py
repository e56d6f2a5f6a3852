"""Prompt sources: file loaders (errors name file:line), generated sets, the CLI, and the real file formats."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from rewards.geneval_rules import COCO_CLASSES, TAGS, validate_metadata
from rewards.ocr import extract_target
from rewards.prompts import PromptItem, PromptSourceError, load_geneval_metadata, load_prompt_source

DATA = Path("/work/shared/data/prompts")


def test_generated_geneval_covers_every_tag_and_is_valid():
    items = load_prompt_source("gen:geneval:120", seed=3)
    assert len(items) == 120
    tags = [item.metadata["tag"] for item in items]
    assert {tag: tags.count(tag) for tag in TAGS} == {tag: 20 for tag in TAGS}
    for item in items:
        validate_metadata(item.metadata)
        assert item.metadata["prompt"] == item.prompt
        assert all(c["class"] in COCO_CLASSES for c in item.metadata["include"])
    counting = [i for i in items if i.metadata["tag"] == "counting"]
    assert all(i.metadata["exclude"][0]["count"] == i.metadata["include"][0]["count"] + 1 for i in counting)
    assert load_prompt_source("gen:geneval:120", seed=3) == items  # reproducible
    assert load_prompt_source("gen:geneval:120", seed=4) != items


def test_generated_ocr_and_simple_prompts():
    ocr = load_prompt_source("gen:ocr:50", seed=0)
    assert len(ocr) == 50 and all(extract_target(i.prompt) for i in ocr)
    assert len({extract_target(i.prompt) for i in ocr}) > 25
    simple = load_prompt_source("gen:simple:10", seed=0)
    assert len(simple) == 10 and all(i.metadata == {} and i.prompt for i in simple)


@pytest.mark.parametrize("spec", ["gen:geneval", "gen:geneval:x", "gen:poems:3", "gen:ocr:0"])
def test_bad_generated_specs(spec):
    with pytest.raises(PromptSourceError):
        load_prompt_source(spec)


def test_file_errors_name_file_and_line(tmp_path):
    bad_json = tmp_path / "a.jsonl"
    bad_json.write_text('{"prompt": "ok"}\n\n{"prompt": "x",\n')
    with pytest.raises(PromptSourceError, match=r"a\.jsonl:3: not valid JSON"):
        load_prompt_source(str(bad_json))
    bad_meta = tmp_path / "b.jsonl"
    teal_cup = {"tag": "colors", "prompt": "p", "include": [{"class": "cup", "count": 1, "color": "teal"}]}
    bad_meta.write_text(json.dumps(teal_cup) + "\n")
    with pytest.raises(PromptSourceError, match=r"b\.jsonl:1: include\[0\] colour 'teal'"):
        load_prompt_source(str(bad_meta))
    no_prompt = tmp_path / "c.jsonl"
    no_prompt.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(PromptSourceError, match=r"c\.jsonl:2: .*\"prompt\""):
        load_prompt_source(str(no_prompt))
    binary = tmp_path / "d.txt"
    binary.write_bytes(b"fine\nalso fine\n\xff\xfe\n")
    with pytest.raises(PromptSourceError, match=r"d\.txt:3: not valid UTF-8"):
        load_prompt_source(str(binary))
    with pytest.raises(PromptSourceError, match="does not exist"):
        load_prompt_source(str(tmp_path / "missing.txt"))
    plain = tmp_path / "e.jsonl"
    plain.write_text('{"prompt": "no geneval"}\n')
    with pytest.raises(PromptSourceError, match="has no GenEval 'include'"):
        load_geneval_metadata(plain)


def test_plain_list_skips_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text('A sign that says "Hi"\n\n  a cat  \n')
    assert load_prompt_source(str(path)) == [PromptItem('A sign that says "Hi"'), PromptItem("a cat")]


def test_cli_writes_loadable_files(tmp_path):
    out = tmp_path / "sets" / "train.jsonl"
    run = subprocess.run(
        [sys.executable, "-m", "rewards.prompts", "--kind", "geneval", "--n", "12", "--seed", "1", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    assert load_prompt_source(str(out)) == load_prompt_source("gen:geneval:12", seed=1)
    txt = tmp_path / "ocr.txt"
    subprocess.run(
        [sys.executable, "-m", "rewards.prompts", "--kind", "ocr", "--n", "5", "--out", str(txt)],
        check=True,
        capture_output=True,
    )
    assert [i.prompt for i in load_prompt_source(str(txt))] == [i.prompt for i in load_prompt_source("gen:ocr:5")]


def test_cli_errors_leave_no_file(tmp_path):
    out = tmp_path / "x.txt"
    run = subprocess.run(
        [sys.executable, "-m", "rewards.prompts", "--kind", "geneval", "--n", "3", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and ".jsonl" in run.stderr and "Traceback" not in run.stderr
    run = subprocess.run(
        [sys.executable, "-m", "rewards.prompts", "--kind", "ocr", "--n", "0", "--out", str(out)],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and ">= 1" in run.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not DATA.exists(), reason="real prompt sets not available")
def test_real_prompt_files_load():
    geneval = load_geneval_metadata(DATA / "geneval_test_metadata.jsonl")
    assert len(geneval) > 2000 and {i.metadata["tag"] for i in geneval} == set(TAGS)
    ocr = load_prompt_source(str(DATA / "ocr_test.txt"))
    assert len(ocr) > 1000 and all(extract_target(i.prompt) for i in ocr)
    assert json.loads(json.dumps(geneval[0].metadata)) == geneval[0].metadata
