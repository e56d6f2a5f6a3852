"""Config presets and command-line overrides: typos and wrong types are caught with the key named."""

import json
import subprocess
import sys

import pytest

from mrlora.config import (
    ConfigError,
    config_for_reward,
    config_from_dict,
    config_to_dict,
    load_config,
    normalised_weights,
)


@pytest.mark.parametrize("preset", ["sd35m", "flux", "tiny-sd3", "tiny-flux"])
def test_presets_load_and_round_trip_through_run_json(preset):
    cfg = load_config(preset)
    frozen = json.loads(json.dumps(config_to_dict(cfg)))
    assert config_to_dict(config_from_dict(frozen)) == frozen


def test_published_defaults():
    sd3, flux = load_config("sd35m"), load_config("flux")
    assert (sd3.lora.rank, sd3.lora.alpha, sd3.sample.num_steps, sd3.sample.guidance_scale) == (32, 64, 10, 4.5)
    assert (flux.lora.rank, flux.lora.alpha, flux.sample.num_steps, flux.sample.guidance_scale) == (64, 128, 6, 3.5)
    assert flux.sample.noise_level == 0.9 and sd3.sample.noise_level == 0.7
    assert set(sd3.lora.target_modules) < set(flux.lora.target_modules)
    assert config_for_reward(sd3, "pickscore").train.beta == 0.01
    assert config_for_reward(sd3, "geneval").train.beta == 0.04


def test_overrides_are_typed():
    cfg = load_config("tiny-sd3", ["train.lr=1e-4", "train.steps=3", "weights=[2, 1, 1]", "model.pretrained=/x"])
    assert cfg.train.lr == 1e-4 and cfg.train.steps == 3 and cfg.weights == [2, 1, 1]
    assert cfg.model.pretrained == "/x"


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lrr=1", "unknown config key 'train.lrr'.*train.lr"),
        ("trian.lr=1", "unknown config key 'trian.lr'"),
        ("train.lr=fast", "'train.lr' expects a number"),
        ("train.steps=2.5", "'train.steps' expects a whole number"),
        ("train.ema=maybe", "'train.ema' expects true or false"),
        ("weights=[1, -1, 1]", "negative merge weight"),
        ("weights=[0, 0, 0]", "all zero"),
        ("weights=[1, 1]", "2 values for 3 rewards"),
        ("mapreduce.cycles=0", "mapreduce.cycles"),
        ("rewards=['brightness', 'colourfulness', 'nosuch']", "prompts.nosuch: no prompt source"),
        ("train", "must look like key.path=value"),
    ],
)
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-sd3", [override])


def test_per_reward_overrides_apply_only_to_that_reward_and_are_validated():
    cfg = load_config("tiny-sd3", ["per_reward.brightness.train.lr=0.5"])
    assert config_for_reward(cfg, "brightness").train.lr == 0.5
    assert config_for_reward(cfg, "jpeg_compressibility").train.lr == cfg.train.lr
    with pytest.raises(ConfigError, match="per_reward.brightness.*train.lrx"):
        load_config("tiny-sd3", ["per_reward.brightness.train.lrx=0.5"])


def test_negative_weights_need_explicit_opt_in():
    assert normalised_weights([2, 1, 1]) == [0.5, 0.25, 0.25]
    with pytest.raises(ConfigError):
        normalised_weights([1, -1])
    assert normalised_weights([1, -1], allow_negative=True) == [0.5, -0.5]


def test_unknown_preset_suggests_the_close_one():
    with pytest.raises(ConfigError, match="Did you mean 'tiny-sd3'"):
        load_config("tiny-sd4")


def test_config_modules_do_not_import_torch():
    code = (
        "import mrlora.config, mrlora.runstore, sys; mrlora.config.load_config('flux'); "
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_unknown_reward_lists_the_registered_ones():
    with pytest.raises(ConfigError, match="unknown reward 'nosuch'; known rewards: .*brightness"):
        load_config("tiny-sd3", ["rewards=['brightness', 'colourfulness', 'nosuch']", "prompts.nosuch=gen:simple:4"])


@pytest.mark.parametrize("preset", ["sd35m", "flux"])
def test_preset_reward_kwargs_are_accepted_by_the_reward_factories(preset, monkeypatch):
    """Offline, a real preset's rewards fail only for the missing weights, never for a bad config key."""
    import rewards
    from rewards.base import MissingModelError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-mrlora-cache")
    cfg = load_config(preset)
    for name in cfg.rewards:
        try:
            rewards.build_reward(name, **cfg.reward_models[name].to_dict())
        except MissingModelError as exc:
            assert "python -m rewards.prefetch" in str(exc)


@pytest.mark.parametrize("name", ["merged", "rate", "rate-x"])
def test_reward_names_that_collide_with_run_directory_entries_are_refused(name):
    with pytest.raises(ConfigError, match="reserved"):
        load_config("tiny-sd3", [f"rewards=['brightness', {name!r}]", "weights=[1, 1]", f"prompts.{name}=gen:simple:4"])
