"""``--set key=value`` as people type it: unquoted lists, boolean spellings, non-finite weights, wrong types.
Each wrong value is refused with the key and what it expects, never a traceback or a silently garbled value."""

import pytest

from mrlora.config import ConfigError, load_config


@pytest.mark.parametrize("raw", ["[to_q,to_k]", "[to_q, to_k]", "to_q,to_k", "['to_q', 'to_k']", '["to_q",to_k]'])
def test_a_list_typed_without_quotes_is_a_list_of_names(raw):
    assert list(load_config("tiny-sd3", [f"lora.target_modules={raw}"]).lora.target_modules) == ["to_q", "to_k"]


def test_a_single_name_for_a_list_key_is_a_one_item_list():
    assert list(load_config("tiny-sd3", ["lora.target_modules=to_q"]).lora.target_modules) == ["to_q"]


def test_setting_the_rewards_as_a_list_gives_them_equal_weights():
    cfg = load_config("tiny-sd3", ["rewards=[brightness,colourfulness]"])
    assert list(cfg.rewards) == ["brightness", "colourfulness"] and list(cfg.weights) == [1.0, 1.0]
    cfg = load_config("tiny-sd3", ["rewards=[brightness,colourfulness]", "weights=[3,1]"])
    assert list(cfg.weights) == [3.0, 1.0]


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("false", False),
        ("False", False),
        ("no", False),
        ("0", False),
        ("off", False),
        ("true", True),
        ("Yes", True),
        ("1", True),
        ("on", True),
    ],
)
def test_booleans_accept_the_spellings_people_type(raw, expected):
    assert load_config("tiny-sd3", [f"train.ema={raw}"]).train.ema is expected


@pytest.mark.parametrize(
    "override, message",
    [
        ("weights=[1,1,nan]", r"weights: merge weights must be finite numbers, got \[1.0, 1.0, nan\]"),
        ("weights=[1,inf,1]", "must be finite numbers"),
        ("weights=[1,a,1]", r"config key 'weights\[1\]' expects a number"),
        ("train.ema=maybe", "config key 'train.ema' expects true or false"),
        ("train.steps=six", "config key 'train.steps' expects a whole number, got 'six'"),
        ("train.steps=2.5", "config key 'train.steps' expects a whole number"),
        ("train.lr=fast", "config key 'train.lr' expects a number"),
    ],
)
def test_a_wrong_value_says_what_the_key_expects(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("tiny-sd3", [override])


def test_numbers_keep_their_types():
    cfg = load_config("tiny-sd3", ["train.lr=1e-3", "train.steps=12", "weights=[1,2,3]", "train.clip_range=1"])
    assert cfg.train.lr == 1e-3 and cfg.train.steps == 12 and type(cfg.train.steps) is int
    assert list(cfg.weights) == [1.0, 2.0, 3.0] and all(type(w) is float for w in cfg.weights)
    assert type(cfg.train.clip_range) is float


def test_per_reward_values_typed_on_the_command_line_take_the_fields_types():
    from mrlora.config import config_for_reward

    cfg = load_config(
        "tiny-sd3",
        [
            "per_reward.brightness.train.ema=false",
            "per_reward.brightness.train.steps=3",
            "per_reward.brightness.lora.target_modules=[to_q,to_k]",
        ],
    )
    expert = config_for_reward(cfg, "brightness")
    assert (
        expert.train.ema is False and expert.train.steps == 3 and list(expert.lora.target_modules) == ["to_q", "to_k"]
    )
    with pytest.raises(ConfigError, match="per_reward.brightness: config key 'train.ema' expects true or false"):
        load_config("tiny-sd3", ["per_reward.brightness.train.ema=maybe"])
