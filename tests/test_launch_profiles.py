"""Cluster profiles: the shipped files load, unknown or mistyped keys are rejected naming the key and file."""

import pytest

from launch.profiles import ProfileError, available_profiles, load_profile, profile_from_dict

VALID = """
name = "mine"
partition = "gpu"
account = "proj"
qos = ""
expert_time_min = 240
merge_time_min = 30
nodes_per_expert = 2
gpus_per_node = 8
cpus_per_gpu = 4
mem_per_gpu_gb = 64
gres_gpu = false
merge_partition = "cpu"
merge_cpus = 8
merge_mem_gb = 100
window_cycles = 3
setup = ["module load cuda"]
[env]
HF_HUB_OFFLINE = "1"
[rewards.geneval]
expert_time_min = 360
nodes_per_expert = 4
"""


def write(tmp_path, text, name="mine.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_shipped_profiles_load():
    assert {"local", "example-gpu"} <= set(available_profiles())
    local = load_profile("local")
    assert local.expert.gpus_per_node == 2 and local.merge.partition == "cpu"
    gpu = load_profile("example-gpu")
    assert gpu.expert_resources("geneval").time_min == 360
    assert gpu.expert_resources("ocr").time_min == 240


def test_valid_profile_gives_typed_resources_and_per_reward_overrides(tmp_path):
    p = load_profile(write(tmp_path, VALID))
    e = p.expert
    assert (e.nodes, e.gpus_per_node, e.procs, e.cpus_per_task, e.mem_gb, e.time_min) == (2, 8, 16, 4, 512.0, 240)
    assert not e.gres_gpu and e.account == "proj"
    g = p.expert_resources("geneval")
    assert (g.nodes, g.time_min, g.gpus_per_node) == (4, 360, 8)
    assert p.merge.cpus_per_task == 8 and p.merge.mem_gb == 100 and p.merge.gpus_per_node == 0
    assert p.window_cycles == 3 and p.signal_delay_s == 120
    assert p.setup_lines == ["module load cuda", "export HF_HUB_OFFLINE=1"]


def test_profile_survives_the_run_json_round_trip(tmp_path):
    p = load_profile(write(tmp_path, VALID))
    q = profile_from_dict(p.to_dict())
    assert q.expert == p.expert and q.merge == p.merge
    assert q.expert_resources("geneval") == p.expert_resources("geneval")


@pytest.mark.parametrize(
    "text, message",
    [
        (VALID + "\nexpert_time_minutes = 5\n", "unknown key 'expert_time_minutes'"),
        (
            VALID.replace("nodes_per_expert = 4", "nodes_per_expertt = 4"),
            r"\[rewards.geneval\].*unknown key 'nodes_per_expertt'",
        ),
        (VALID.replace("[rewards.geneval]", "[rewards.geneval]\nmerge_cpus = 3"), "override expert keys only"),
        (VALID.replace("gpus_per_node = 8", 'gpus_per_node = "8"'), "gpus_per_node must be a int"),
        (VALID.replace("window_cycles = 3", "window_cycles = 0"), "window_cycles must be >= 1"),
        (VALID.replace('qos = ""\n', ""), "missing key.*qos"),
        (VALID + "\nsignal_delay_s = 99999\n", "signal_delay_s"),
        ("name = [", "not valid TOML"),
    ],
)
def test_bad_profiles_name_the_key_and_the_file(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ProfileError, match=message) as info:
        load_profile(path)
    assert "mine.toml" in str(info.value)


def test_unknown_profile_name_lists_known_ones():
    with pytest.raises(ProfileError, match="unknown cluster profile 'locall'.*Did you mean 'local'"):
        load_profile("locall")


def test_memory_a_node_cannot_hold_is_refused_before_anything_queues(tmp_path):
    capped = VALID.replace("window_cycles = 3", "window_cycles = 3\nmax_mem_per_node_gb = 600")
    assert load_profile(write(tmp_path, capped)).expert.mem_gb == 512  # 64 GB x 8 GPUs fits
    too_much = capped.replace("[rewards.geneval]", "[rewards.geneval]\nmem_per_gpu_gb = 128")
    with pytest.raises(ProfileError, match=r"rewards.geneval.*1024 GB per node.*max_mem_per_node_gb 600.*at most 75"):
        load_profile(write(tmp_path, too_much))


def test_the_plan_table_shows_cpus_memory_and_gpu_hours():
    from launch.plan import build_plan, format_plan

    profile = load_profile("example-gpu")
    plan = build_plan(run_ts="20260101_000000", rewards=["geneval", "pickscore", "ocr"], cycles=8, profile=profile)
    text = format_plan(plan, profile)
    assert "4 nodes x 8 GPU, 32 proc, 8 CPU/proc, 768 GB/node, 360 min @gpu" in text  # GenEval's own resources
    # per cycle: 32 GPUs x (6 h GenEval + 4 h + 4 h) = 448; 4 cycles in the first window, 8 in all
    assert "1,792 for the jobs submitted now, 3,584 for the rest of the run (cycles 1..8)" in text
