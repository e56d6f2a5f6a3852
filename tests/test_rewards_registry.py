"""The reward registry: names, custom rewards (module path, decorator, entry point), errors, torch-free import."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import rewards
from rewards import Reward, RewardError, RewardOutput, UnknownRewardError, available_rewards, build_reward

BUILTINS = {
    "geneval",
    "pickscore",
    "ocr",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "brightness",
    "colourfulness",
}
CUSTOM = textwrap.dedent("""
    import numpy as np
    from rewards import Reward, RewardOutput, register_reward

    class Width(Reward):
        name = "width"

        def __init__(self, scale=1.0):
            self.scale = scale

        def score(self, images, prompts, metadata):
            return RewardOutput(scores=np.array([im.width * self.scale for im in images]),
                                details={"tag_len": np.array([len(m.get("tag", "")) for m in metadata])})

    @register_reward("{name}")
    def build(scale=1.0):
        return Width(scale)

    def not_a_reward():
        return 42
""")


def test_builtins_are_registered():
    assert BUILTINS <= set(available_rewards())


def test_unknown_reward_lists_known_names():
    with pytest.raises(UnknownRewardError) as info:
        build_reward("pickscor")
    message = str(info.value)
    assert "'pickscor'" in message and "Did you mean 'pickscore'" in message
    for name in BUILTINS:
        assert name in message


def test_import_is_torch_free():
    code = (
        "import sys, rewards, rewards.prompts, rewards.prefetch; "
        "heavy = [m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules]; print(heavy)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def _write_module(tmp_path, monkeypatch, module, name):
    (tmp_path / f"{module}.py").write_text(CUSTOM.replace("{name}", name))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_custom_reward_by_module_path(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "my_width_reward", "width_by_path")
    reward = build_reward("my_width_reward:build", scale=2.0)
    out = reward([Image.new("RGB", (5, 3))], ["p"], [{"tag": "abc"}])
    assert out.scores.tolist() == [10.0] and out.scores.dtype == np.float32
    assert out.details["tag_len"].tolist() == [3]
    assert "width_by_path" in available_rewards()  # importing the module ran its decorator


def test_module_path_errors(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "my_width_reward2", "width_errors")
    with pytest.raises(UnknownRewardError, match="cannot import module 'no_such_mod'"):
        build_reward("no_such_mod:build")
    with pytest.raises(UnknownRewardError, match="has no attribute 'nope'"):
        build_reward("my_width_reward2:nope")
    with pytest.raises(RewardError, match="returned int, expected a subclass of rewards.Reward"):
        build_reward("my_width_reward2:not_a_reward")
    with pytest.raises(RewardError, match=r"bad config kwargs \['scael'\].*reward_models.width_errors"):
        build_reward("width_errors", scael=2)


def test_entry_point_reward(tmp_path, monkeypatch):
    _write_module(tmp_path, monkeypatch, "my_width_ep", "width_ep_registered")
    dist = tmp_path / "my_width_ep-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: my-width-ep\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[mrlora.rewards]\nwidth_ep = my_width_ep:build\n")
    assert "width_ep" in available_rewards()
    assert build_reward("width_ep")([Image.new("RGB", (7, 1))], ["p"]).scores.tolist() == [7.0]


def test_batch_and_output_are_validated():
    class Broken(Reward):
        name = "broken"

        def score(self, images, prompts, metadata):
            return RewardOutput(scores=np.zeros(len(images) + 1))

    img = Image.new("RGB", (4, 4))
    with pytest.raises(RewardError, match="2 images, 1 prompts"):
        Broken()([img, img], ["a"])
    with pytest.raises(RewardError, match="returned 3 scores for 2 images"):
        Broken()([img, img], ["a", "b"])
    assert len(Broken()([], [])) == 0
    with pytest.raises(ValueError, match="details"):
        RewardOutput(scores=np.zeros(2), details={"x": np.zeros(3)})


def test_duplicate_registration_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        rewards.register_reward("brightness")(lambda: None)


def test_prefetch_dry_run_lists_models():
    out = subprocess.run(
        [sys.executable, "-m", "rewards.prefetch", "--rewards", "pickscore", "geneval", "ocr", "--dry-run"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    for model in (
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        "yuvalkirstain/PickScore_v1",
        "facebook/mask2former-swin-small-coco-instance",
        "openai/clip-vit-large-patch14",
    ):
        assert model in out.stdout
    override = subprocess.run(
        [
            sys.executable,
            "-m",
            "rewards.prefetch",
            "--rewards",
            "pickscore",
            "--dry-run",
            "--set",
            "pickscore.model=me/MyPick",
        ],
        capture_output=True,
        text=True,
    )
    assert "me/MyPick" in override.stdout and "PickScore_v1" not in override.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "rewards.prefetch", "--rewards", "nope", "--dry-run"], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown reward 'nope'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize(
    "name, model",
    [
        ("pickscore", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"),
        ("geneval", "facebook/mask2former-swin-small-coco-instance"),
    ],
)
def test_offline_missing_model_fails_fast_with_prefetch_command(tmp_path, monkeypatch, name, model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(rewards.MissingModelError) as info:
        build_reward(name, cache_dir=str(tmp_path), device="cpu")
    message = str(info.value)
    assert f"python -m rewards.prefetch --rewards {name} --cache {tmp_path}" in message
    assert model in message and "HF_HUB_OFFLINE=1" in message


def test_missing_local_directory_is_named(tmp_path):
    with pytest.raises(rewards.MissingModelError, match="nope' does not exist"):
        build_reward("pickscore", model=str(tmp_path / "nope"), processor=str(tmp_path / "nope"), device="cpu")
