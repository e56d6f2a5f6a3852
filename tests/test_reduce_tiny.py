"""The Reduce step on the tiny SD3 / FLUX models: same images as peft's exact ``cat`` merge, run-level merge
jobs, and a streamed export that ``from_pretrained`` loads with the base's shard layout."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from peft import LoraConfig
from peft.tuners.lora import LoraModel

from configs.tiny_sd3 import get_config
from mrlora.config import config_to_dict
from mrlora.models.loading import load_pipeline
from mrlora.models.lora_targets import lora_target_modules
from mrlora.reduce import (
    ReduceError,
    apply_updates,
    export_model,
    merge_cycle_in_run,
    merge_experts,
    read_expert_adapter,
    save_expert_adapter,
    updates_after,
)
from mrlora.reduce.base import open_base
from mrlora.reduce.cli import main as cli_main
from mrlora.runstore import DONE_MARKER, RunDir, write_marker

WEIGHTS = [1.0, 2.0, 0.5]


def make_peft_experts(model_dir: str, arch: str, out: Path) -> tuple[list[Path], list[LoraConfig]]:
    """Three experts made with peft on the real transformer: mixed ranks and alphas, one covering fewer modules."""
    transformer = load_pipeline(model_dir, arch).transformer
    targets = lora_target_modules(transformer, arch)
    specs = [(2, 4.0, targets), (4, 4.0, targets), (3, 1.5, targets[: len(targets) // 2])]
    dirs, configs = [], []
    for i, (r, alpha, modules) in enumerate(specs):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=modules, init_lora_weights=False)
        transformer.add_adapter(cfg, adapter_name=f"e{i}")
        with torch.no_grad():  # peft's non-default init gives B ~ U(+-1/sqrt(r)); keep the update moderate
            for name, p in transformer.named_parameters():
                if f"lora_B.e{i}." in name:
                    p.mul_(0.2)
        dirs.append(
            save_expert_adapter(
                transformer,
                out / f"e{i}",
                arch=arch,
                lora_config=cfg,
                base=model_dir,
                reward=f"e{i}",
                adapter_name=f"e{i}",
            )
        )
        configs.append(cfg)
    return dirs, configs


def peft_cat_merged(model_dir: str, arch: str, dirs: list[Path], configs: list[LoraConfig], weights: list[float]):
    """peft's exact path: load the three adapters, add_weighted_adapter(cat), merge_and_unload."""
    pipe = load_pipeline(model_dir, arch)
    lora_model = LoraModel(pipe.transformer, configs[0], "e0")
    for i, cfg in enumerate(configs[1:], start=1):
        lora_model.peft_config[f"e{i}"] = cfg
        lora_model.inject_adapter(lora_model.model, f"e{i}")
    with torch.no_grad():
        for i, d in enumerate(dirs):
            for module, pair in read_expert_adapter(d).modules.items():
                layer = lora_model.model.get_submodule(module)
                layer.lora_A[f"e{i}"].weight.copy_(pair.A)
                layer.lora_B[f"e{i}"].weight.copy_(pair.B)
    lora_model.add_weighted_adapter([f"e{i}" for i in range(len(dirs))], weights, "merged", combination_type="cat")
    lora_model.set_adapter("merged")
    pipe.transformer = lora_model.merge_and_unload()
    return pipe


def generate(pipe, arch: str) -> torch.Tensor:
    kwargs = dict(
        prompt="a red cube on a table",
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
    )
    kwargs["guidance_scale"] = 4.5 if arch == "sd3" else 3.5
    with torch.no_grad():
        return pipe(**kwargs).images


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")
@pytest.mark.parametrize("arch", ["sd3", "flux"])
def test_fold_then_generate_matches_peft_cat(arch, request, tmp_path):
    model_dir = request.getfixturevalue(f"tiny_{arch}_dir")
    dirs, configs = make_peft_experts(model_dir, arch, tmp_path)
    norm = [w / sum(WEIGHTS) for w in WEIGHTS]
    merge_experts(dirs, WEIGHTS, tmp_path / "merged", base=model_dir, arch=arch)

    ours = load_pipeline(model_dir, arch)
    base_latents = generate(ours, arch)
    apply_updates(ours.transformer, [tmp_path / "merged"], dtype=torch.float32, arch=arch)
    theirs = peft_cat_merged(model_dir, arch, dirs, configs, norm)

    ours_sd, theirs_sd = ours.transformer.state_dict(), theirs.transformer.state_dict()
    assert ours_sd.keys() == theirs_sd.keys()
    for k, v in ours_sd.items():
        diff = (v - theirs_sd[k]).norm() / theirs_sd[k].norm().clamp_min(1e-12)
        assert diff < 1e-5, k
    base_sd = load_pipeline(model_dir, arch).transformer.state_dict()
    changed = sum(not torch.equal(base_sd[k], v) for k, v in ours_sd.items())
    assert changed == len(lora_target_modules(ours.transformer, arch))

    ours_latents, theirs_latents = generate(ours, arch), generate(theirs, arch)
    assert (ours_latents - base_latents).abs().max() > 1e-3  # the update really changes the images
    torch.testing.assert_close(ours_latents, theirs_latents, rtol=1e-4, atol=1e-4)


def random_experts(base_dir: Path, arch: str, out: Path, seed: int) -> list[Path]:
    base = open_base(base_dir)
    from mrlora.models.lora_targets import lora_targets

    modules = sorted(
        {
            n[: -len(".weight")]
            for s in base.shards
            for n in s.tensors
            if n.endswith(".weight")
            and n.startswith("transformer_blocks")
            and any(n[: -len(".weight")].endswith("." + t) for t in lora_targets(arch))
        }
    )
    g = torch.Generator().manual_seed(seed)
    dirs = []
    for i, rank in enumerate((2, 3, 4)):
        state = {}
        for m in modules:
            o, n = base.weight(m).shape
            state[f"{m}.lora_A.weight"] = torch.randn(rank, n, generator=g) * 0.1
            state[f"{m}.lora_B.weight"] = torch.randn(o, rank, generator=g) * 0.1
        dirs.append(
            save_expert_adapter(
                state,
                out / f"e{i}",
                arch=arch,
                base=str(base_dir),
                lora_config={"r": rank, "lora_alpha": 2 * rank, "target_modules": list(lora_targets(arch))},
            )
        )
    return dirs


def sharded_copy(model_dir: str, dest: Path) -> Path:
    """The tiny model with its transformer re-saved in several shards (like the real checkpoints)."""
    shutil.copytree(model_dir, dest)
    transformer = load_pipeline(model_dir, "sd3").transformer
    shutil.rmtree(dest / "transformer")
    transformer.save_pretrained(dest / "transformer", max_shard_size="150KB")
    assert (dest / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    return dest


def make_run(tmp_path: Path, base_dir: Path, rewards=("a", "b", "c")) -> RunDir:
    cfg = config_to_dict(get_config())
    cfg["model"]["pretrained"] = str(base_dir)
    cfg["rewards"], cfg["weights"] = list(rewards), WEIGHTS[: len(rewards)]
    run = RunDir.create(tmp_path / "runs", "tiny-sd3", run_ts="20261123_120000")
    run.write_run_json({"run_ts": run.run_ts, "model": "tiny-sd3", "config": cfg})
    return run


def finish_experts(run: RunDir, cycle: int, base_dir: Path, seed: int) -> None:
    tmp = run.root / f"tmp_experts_{cycle}"
    for reward, src in zip(("a", "b", "c"), random_experts(base_dir, "sd3", tmp, seed)):
        shutil.copytree(src, run.adapter_dir(cycle, reward))
        write_marker(run.expert_dir(cycle, reward), DONE_MARKER, extra={"status": "ok"})
    shutil.rmtree(tmp)


def test_run_merge_jobs_and_streamed_export(tiny_sd3_dir, tmp_path):
    base_dir = sharded_copy(tiny_sd3_dir, tmp_path / "base")
    run = make_run(tmp_path, base_dir)

    finish_experts(run, 1, base_dir, seed=1)
    (run.expert_dir(1, "c") / DONE_MARKER).unlink()
    with pytest.raises(ReduceError, match="c have no valid DONE"):
        merge_cycle_in_run(str(run.root), 1)
    assert not run.merged_dir(1).exists()
    write_marker(run.expert_dir(1, "c"), DONE_MARKER)
    marker = merge_cycle_in_run(str(run.root), 1)
    assert marker["exact"] is True and run.merge_done(1) is not None
    assert merge_cycle_in_run(str(run.root), 1) == marker  # idempotent
    finish_experts(run, 2, base_dir, seed=2)
    merge_cycle_in_run(str(run.root), 2)
    info = json.loads((run.merged_dir(2) / "update.json").read_text())
    assert info["cycle"] == 2 and info["rewards"] == ["a", "b", "c"] and info["arch"] == "sd3"

    out = Path(export_model(str(run.root), 2, str(tmp_path / "export")))
    # same shard layout and index; every other component byte-identical
    for f in sorted(p.relative_to(base_dir) for p in base_dir.rglob("*") if p.is_file()):
        assert (out / f).exists(), f
        if not (f.parent.name == "transformer" and f.name.endswith(".safetensors")):
            assert (out / f).read_bytes() == (base_dir / f).read_bytes(), f
    assert (out / "EXPORT_DONE.json").exists()

    from diffusers import StableDiffusion3Pipeline

    exported = StableDiffusion3Pipeline.from_pretrained(out).transformer.state_dict()
    expected = load_pipeline(str(base_dir), "sd3").transformer
    apply_updates(expected, updates_after(run.root, 2))
    expected = expected.state_dict()
    assert all(torch.equal(exported[k], v) for k, v in expected.items())
    base_sd = load_pipeline(str(base_dir), "sd3").transformer.state_dict()
    assert sum(not torch.equal(base_sd[k], v) for k, v in exported.items()) > 0

    assert export_model(str(run.root), 2, str(out)) == str(out)  # complete: returned as is


def test_export_cli_errors_leave_nothing(tiny_sd3_dir, tmp_path, capsys):
    run = make_run(tmp_path, Path(tiny_sd3_dir))
    out = tmp_path / "export"
    code = cli_main(["export", "--run", str(run.root), "--cycle", "1", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "cycle 1" in err and "no complete merge" in err
    assert not out.exists()

    flux_update = tmp_path / "flux_update"
    experts = random_experts(Path(tiny_sd3_dir), "sd3", tmp_path / "x", seed=0)
    merge_experts(experts, [1, 1, 1], flux_update, base=tiny_sd3_dir)
    info = json.loads((flux_update / "update.json").read_text())
    info["arch"] = "flux"
    (flux_update / "update.json").write_text(json.dumps(info))
    code = cli_main(["export", "--base", tiny_sd3_dir, "--updates", str(flux_update), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "update for flux but the base is sd3" in err
    assert not out.exists() and not list(tmp_path.glob(".tmp-export-*"))
