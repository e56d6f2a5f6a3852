"""One precedence rule for config values, visible to the user: preset < preset's per-reward values < the user's
overrides in order; ``--print-config`` says where each value came from."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from mrlora.config import config_for_reward, load_config

REPO = Path(__file__).resolve().parents[1]


def test_a_users_global_setting_beats_the_presets_per_reward_value(caplog):
    preset = load_config("tiny-sd3")
    assert config_for_reward(preset, "colourfulness").train.lr == 1e-2  # the preset's per-reward lr
    with caplog.at_level(logging.WARNING, logger="mrlora.config"):
        cfg = load_config("tiny-sd3", ["train.lr=1e-4"])
    for reward in cfg.rewards:
        assert config_for_reward(cfg, reward).train.lr == 1e-4, reward
    assert "per-reward value of colourfulness (0.01)" in caplog.text
    # other per-reward values of the preset stay
    assert config_for_reward(cfg, "colourfulness").sample.group_size == 8


def test_the_users_own_per_reward_setting_is_the_most_specific():
    cfg = load_config("tiny-sd3", ["train.lr=1e-4", "per_reward.colourfulness.train.lr=5e-3"])
    assert config_for_reward(cfg, "colourfulness").train.lr == 5e-3
    assert config_for_reward(cfg, "brightness").train.lr == 1e-4


def test_print_config_says_where_each_value_came_from():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.mapreduce",
            "--model",
            "tiny-sd3",
            "--cycles",
            "3",
            "--set",
            "train.lr=1e-4",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(" = ", 1) for line in proc.stdout.splitlines() if " = " in line)
    assert lines["train.lr"] == "0.0001  # command line"
    assert lines["mapreduce.cycles"] == "3  # command line"
    assert lines["train.max_grad_norm"].endswith("# preset")
    assert (
        "colourfulness expert uses this instead of sample.group_size"
        in lines["per_reward.colourfulness.sample.group_size"]
    )


def test_a_negative_weight_on_the_launcher_says_how_to_allow_it_there():
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "launch.mapreduce",
            "--model",
            "tiny-sd3",
            "--weights",
            "1",
            "-1",
            "1",
            "--print-config",
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "--set mapreduce.allow_negative_weights=True" in proc.stderr
