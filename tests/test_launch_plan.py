"""The planner (pure): job graph per cycle, windows, sequential ordering, per-reward resources, resume and adopt."""

import pytest

from launch.plan import Job, PlanError, Progress, build_plan, format_plan, submission_dependencies
from launch.profiles import profile_from_dict
from launch.runs import progress_of
from mrlora.runstore import CHECKPOINT_MARKER, DONE_MARKER, MERGE_MARKER, RunDir, write_marker

REWARDS = ["geneval", "pickscore", "ocr"]
BASE = {
    "name": "t",
    "partition": "gpu",
    "account": "",
    "qos": "",
    "expert_time_min": 60,
    "nodes_per_expert": 2,
    "gpus_per_node": 4,
    "cpus_per_gpu": 2,
    "mem_per_gpu_gb": 8,
    "gres_gpu": True,
    "merge_time_min": 20,
    "merge_partition": "cpu",
    "merge_cpus": 4,
    "merge_mem_gb": 16,
    "window_cycles": 2,
    "setup": [],
}


def profile(**over):
    return profile_from_dict({**BASE, **over})


def plan(cycles=3, mode="parallel", progress=None, prof=None, rewards=REWARDS, window=None):
    return build_plan(
        run_ts="20260101_000000",
        rewards=rewards,
        cycles=cycles,
        profile=prof or profile(),
        mode=mode,
        progress=progress,
        window_cycles=window,
    )


def keys(jobs):
    return [j.key for j in jobs]


def test_parallel_cycle_is_one_array_then_a_merge_then_the_next_array():
    p = plan(cycles=2, window=5)
    assert keys(p.jobs) == ["c0001-experts", "c0001-merge", "c0002-experts", "c0002-merge"]
    arr, merge, arr2, merge2 = p.jobs
    assert arr.array and arr.rewards == tuple(REWARDS) and arr.after == ()
    assert merge.after == ("c0001-experts",) and merge.resources.partition == "cpu"
    assert arr2.after == ("c0001-merge",) and merge2.final and not merge.final
    assert arr.resources.nodes == 2 and arr.resources.procs == 8 and arr.resources.time_min == 60
    assert arr.name(p.run_ts) == "mrlora-20260101_000000-c0001-experts"


def test_windows_bound_the_queue_and_the_last_merge_of_each_window_extends_the_chain():
    p = plan(cycles=5, window=2)
    assert p.n_windows == 3
    assert {j.cycle for j in p.window(0)} == {1, 2}
    assert {j.cycle for j in p.window(2)} == {5}
    extenders = [j.key for j in p.jobs if j.extends]
    assert extenders == ["c0002-merge", "c0004-merge"]  # not the final merge: nothing left to submit
    # a window's first experts depend on the previous window's merge only in the plan, not at submission
    first_of_w1 = p.window(1)[0]
    assert first_of_w1.after == ("c0002-merge",)
    assert submission_dependencies(first_of_w1, {}) == []


def test_sequential_mode_serialises_experts_then_merge():
    p = plan(cycles=2, mode="sequential", window=5)
    assert keys(p.jobs)[:4] == ["c0001-geneval", "c0001-pickscore", "c0001-ocr", "c0001-merge"]
    by = p.by_key()
    assert by["c0001-pickscore"].after == ("c0001-geneval",)
    assert by["c0001-ocr"].after == ("c0001-pickscore",)
    assert by["c0001-merge"].after == ("c0001-ocr",)
    assert by["c0002-geneval"].after == ("c0001-merge",)
    assert not any(j.array for j in p.jobs)


def test_different_per_reward_resources_split_the_array_into_one_job_per_reward():
    prof = profile(rewards={"geneval": {"nodes_per_expert": 4, "expert_time_min": 120}})
    p = plan(cycles=1, prof=prof)
    assert keys(p.jobs) == ["c0001-geneval", "c0001-pickscore", "c0001-ocr", "c0001-merge"]
    by = p.by_key()
    assert by["c0001-geneval"].resources.nodes == 4 and by["c0001-geneval"].resources.time_min == 120
    assert by["c0001-ocr"].resources.nodes == 2
    assert set(by["c0001-merge"].after) == {"c0001-geneval", "c0001-pickscore", "c0001-ocr"}


def test_per_reward_override_equal_to_the_default_keeps_one_array():
    prof = profile(rewards={"ocr": {"nodes_per_expert": 2}})
    assert plan(cycles=1, prof=prof).jobs[0].array


def test_bad_requests_are_rejected():
    with pytest.raises(PlanError, match="cycles must be >= 1"):
        plan(cycles=0)
    with pytest.raises(PlanError, match="twice"):
        plan(rewards=["ocr", "ocr"])
    with pytest.raises(PlanError, match="mode"):
        plan(mode="diagonal")


def _synthetic_run(tmp_path) -> RunDir:
    """Cycle 1 merged; cycle 2: geneval DONE, pickscore has a checkpoint at step 40, ocr has nothing."""
    run = RunDir(tmp_path / "m" / "20260101_000000")
    for r in REWARDS:
        (run.adapter_dir(1, r)).mkdir(parents=True)
        write_marker(run.expert_dir(1, r), DONE_MARKER)
    run.merged_dir(1).mkdir(parents=True)
    (run.merged_dir(1) / "update.safetensors").write_bytes(b"u")
    write_marker(run.merged_dir(1), MERGE_MARKER)
    run.adapter_dir(2, "geneval").mkdir(parents=True)
    write_marker(run.expert_dir(2, "geneval"), DONE_MARKER)
    ckpt = run.checkpoint_dir(2, "pickscore", 40)
    ckpt.mkdir(parents=True)
    (ckpt / "adapter_model.safetensors").write_bytes(b"w")
    write_marker(ckpt, CHECKPOINT_MARKER)
    return run


def test_resume_skips_merged_cycles_and_done_experts(tmp_path):
    run = _synthetic_run(tmp_path)
    p = plan(cycles=3, progress=progress_of(run, REWARDS), window=5)
    assert p.first_cycle == 2
    first = p.jobs[0]
    # geneval is DONE: only pickscore (continues from its checkpoint inside training) and ocr run
    assert first.rewards == ("pickscore", "ocr") and first.after == ()
    assert keys(p.jobs) == ["c0002-experts", "c0002-merge", "c0003-experts", "c0003-merge"]
    assert p.jobs[2].rewards == tuple(REWARDS)


def test_resume_with_every_expert_done_plans_only_the_merge(tmp_path):
    run = _synthetic_run(tmp_path)
    for r in ("pickscore", "ocr"):
        run.adapter_dir(2, r).mkdir(parents=True, exist_ok=True)
        write_marker(run.expert_dir(2, r), DONE_MARKER)
    p = plan(cycles=2, progress=progress_of(run, REWARDS))
    assert keys(p.jobs) == ["c0002-merge"] and p.jobs[0].after == ()


def test_resume_of_a_finished_run_plans_nothing(tmp_path):
    run = _synthetic_run(tmp_path)
    p = plan(cycles=1, progress=progress_of(run, REWARDS))
    assert p.complete and "nothing to do" in format_plan(p, profile())


def test_adopt_depends_on_live_jobs_instead_of_resubmitting_them():
    progress = Progress(done=frozenset({(1, "geneval")}), live={(1, "pickscore"): "500"})
    p = plan(cycles=2, progress=progress, window=5)
    first, merge = p.jobs[0], p.jobs[1]
    assert first.rewards == ("ocr",) and not first.array
    assert merge.after == (first.key,) and merge.after_ids == ("500",)
    assert sorted(submission_dependencies(merge, {first.key: "600"})) == ["500", "600"]


def test_adopt_of_a_live_merge_continues_after_it():
    progress = Progress(merged=frozenset(), live={(1, r): "500" for r in REWARDS} | {(1, "merge"): "501"})
    p = plan(cycles=2, progress=progress, window=5)
    assert keys(p.jobs) == ["c0002-experts", "c0002-merge"]
    assert p.jobs[0].after_ids == ("501",)


def test_adopting_a_fully_queued_window_submits_nothing_and_keeps_the_queue_one_window_deep():
    """Cycles 1-2 queued (window 2) when the user raises the run to 5 cycles and adopts: nothing is submitted
    now (at most one window is ever queued ahead); the queued merge of cycle 2 extends the chain with cycles
    3-4 when it has finished (it reads the new cycle count then), and the merge of cycle 4 with cycle 5."""
    live = {(c, r): f"{c}00" for c in (1, 2) for r in REWARDS} | {(1, "merge"): "101", (2, "merge"): "201"}
    p = plan(cycles=5, progress=Progress(live=live), window=2)
    assert p.window(0) == [] and not p.complete
    assert keys(p.window(1)) == ["c0003-experts", "c0003-merge", "c0004-experts", "c0004-merge"]
    assert p.window(1)[0].after_ids == ("201",)
    assert keys(p.window(2)) == ["c0005-experts", "c0005-merge"]


def test_format_plan_lists_every_job_with_its_dependencies():
    text = format_plan(plan(cycles=3, window=2), profile())
    assert "mrlora-20260101_000000-c0003-merge" in text
    assert "submits window 1" in text and "array[3]" in text
    assert len([line for line in text.splitlines() if "mrlora-" in line]) == 6


def test_job_roles():
    p = plan(cycles=1, mode="sequential")
    assert [j.role for j in p.jobs] == ["geneval", "pickscore", "ocr", "merge"]
    assert isinstance(p.jobs[0], Job)


def test_queued_jobs_map_back_to_the_units_they_produce(tmp_path):
    from launch.journal import new_record, write_record
    from launch.runs import live_units
    from launch.slurm import QueuedJob

    run = RunDir(tmp_path / "m" / "20260101_000000")
    common = dict(window=0, after=(), log_dir="/x")
    write_record(
        run,
        new_record(
            job_id="500", key="c0002-experts", name="n", cycle=2, kind="expert", rewards=REWARDS, array=True, **common
        ),
    )
    write_record(
        run,
        new_record(job_id="501", key="c0002-merge", name="n", cycle=2, kind="merge", rewards=(), array=False, **common),
    )
    queued = [QueuedJob("500_2", "n", "RUNNING", "", ""), QueuedJob("501", "n", "PENDING", "", "Dependency")]
    live = live_units(run, queued)
    assert live == {(2, "ocr"): "500", (2, "merge"): "501"}  # tasks 0 and 1 have finished
    p = plan(
        cycles=3,
        progress=Progress(done=frozenset({(2, "geneval"), (2, "pickscore")}), merged=frozenset({1}), live=live),
        window=5,
    )
    assert keys(p.jobs) == ["c0003-experts", "c0003-merge"] and p.jobs[0].after_ids == ("501",)
