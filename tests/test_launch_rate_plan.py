"""RaTE jobs in the plan (pure): after which jobs they run, what resume skips, bad cycles, sbatch rendering."""

import pytest

from launch.plan import RATE, PlanError, Progress, build_plan, format_plan, rate_unit, submission_dependencies
from launch.profiles import profile_from_dict
from launch.runs import live_units, progress_of, rate_dir
from launch.submit import render_sbatch
from mrlora.runstore import DONE_MARKER, MERGE_MARKER, RunDir, write_marker

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
TS = "20260101_000000"


def profile(**over):
    return profile_from_dict({**BASE, **over})


def plan(cycles=3, rate=(2,), mode="parallel", progress=None, prof=None, window=5):
    return build_plan(
        run_ts=TS,
        rewards=REWARDS,
        cycles=cycles,
        profile=prof or profile(),
        mode=mode,
        progress=progress,
        window_cycles=window,
        rate_after_cycles=rate,
    )


def keys(p):
    return [j.key for j in p.jobs]


def test_rate_array_waits_for_the_experts_of_its_cycle_and_nothing_waits_for_it():
    p = plan(cycles=3, rate=(2,))
    assert keys(p) == [
        "c0001-experts",
        "c0001-merge",
        "c0002-experts",
        "c0002-merge",
        "c0002-rate",
        "c0003-experts",
        "c0003-merge",
    ]
    rate = p.by_key()["c0002-rate"]
    assert rate.kind == RATE and rate.array and rate.rewards == tuple(REWARDS)
    assert rate.after == ("c0002-experts",), "RaTE needs the experts' DONE, not the merge"
    assert rate.resources == p.by_key()["c0002-experts"].resources
    assert rate.name(TS) == f"mrlora-{TS}-c0002-rate"
    assert not any("c0002-rate" in j.after for j in p.jobs), "the chain must not wait for RaTE"


def test_per_reward_resources_split_rate_like_the_experts():
    prof = profile(rewards={"geneval": {"nodes_per_expert": 4}})
    p = plan(cycles=1, rate=(1,), prof=prof)
    rate_jobs = [j for j in p.jobs if j.kind == RATE]
    assert [j.key for j in rate_jobs] == ["c0001-rate-geneval", "c0001-rate-pickscore", "c0001-rate-ocr"]
    assert rate_jobs[0].resources.nodes == 4 and rate_jobs[1].resources.nodes == 2
    assert all(j.after == ("c0001-geneval", "c0001-pickscore", "c0001-ocr") for j in rate_jobs)


def test_sequential_mode_rate_waits_for_every_expert_of_the_cycle():
    p = plan(cycles=2, rate=(1, 2), mode="sequential")
    rate1 = p.by_key()["c0001-rate"]
    assert rate1.after == ("c0001-geneval", "c0001-pickscore", "c0001-ocr")
    assert p.by_key()["c0002-geneval"].after == ("c0001-merge",)


def test_rate_belongs_to_the_window_of_its_cycle():
    p = plan(cycles=4, rate=(3,), window=2)
    rate = p.by_key()["c0003-rate"]
    assert rate.window == 1 and rate.after == ("c0003-experts",)
    assert submission_dependencies(rate, {"c0003-experts": "77"}) == ["77"]
    assert "RaTE geneval,pickscore,ocr" in format_plan(p, profile())


@pytest.mark.parametrize("bad", [(0,), (4,), (1, 9)])
def test_rate_cycle_outside_the_run_is_refused(bad):
    with pytest.raises(PlanError, match=r"1\.\.3"):
        plan(cycles=3, rate=bad)


def _run_with_cycle1_merged(tmp_path) -> RunDir:
    run = RunDir(tmp_path / "m" / TS)
    for r in REWARDS:
        run.adapter_dir(1, r).mkdir(parents=True)
        write_marker(run.expert_dir(1, r), DONE_MARKER)
    run.merged_dir(1).mkdir(parents=True)
    write_marker(run.merged_dir(1), MERGE_MARKER)
    return run


def test_resume_plans_only_missing_rate_tokens_of_merged_cycles_first(tmp_path):
    run = _run_with_cycle1_merged(tmp_path)
    out = rate_dir(run, 1, "pickscore")
    out.mkdir(parents=True)
    (out / "token.safetensors").write_bytes(b"t")
    write_marker(out, DONE_MARKER)
    progress = progress_of(run, REWARDS)
    assert progress.rate_done == frozenset({(1, "pickscore")})
    p = plan(cycles=2, rate=(1, 2), progress=progress)
    assert keys(p) == ["c0001-rate", "c0002-experts", "c0002-merge", "c0002-rate"]
    first = p.jobs[0]
    assert first.rewards == ("geneval", "ocr") and first.after == () and first.after_ids == ()


def test_resume_of_a_merged_run_with_every_token_done_plans_nothing(tmp_path):
    run = _run_with_cycle1_merged(tmp_path)
    for r in REWARDS:
        rate_dir(run, 1, r).mkdir(parents=True)
        write_marker(rate_dir(run, 1, r), DONE_MARKER)
    assert plan(cycles=1, rate=(1,), progress=progress_of(run, REWARDS)).complete
    # a merged run whose tokens are missing is not complete: only the RaTE jobs are planned
    assert keys(plan(cycles=1, rate=(1,), progress=progress_of(_run_with_cycle1_merged(tmp_path / "b"), REWARDS))) == [
        "c0001-rate"
    ]


def test_adopt_keeps_queued_rate_tasks_and_waits_for_queued_experts(tmp_path):
    from launch.journal import new_record, write_record
    from launch.slurm import QueuedJob

    run = RunDir(tmp_path / "m" / TS)
    common = dict(window=0, after=(), log_dir="/x", array=True)
    write_record(
        run, new_record(job_id="500", key="c0001-experts", name="n", cycle=1, kind="expert", rewards=REWARDS, **common)
    )
    write_record(
        run, new_record(job_id="502", key="c0001-rate", name="n", cycle=1, kind="rate", rewards=REWARDS, **common)
    )
    live = live_units(run, [QueuedJob("500_2", "n", "RUNNING", "", ""), QueuedJob("502_2", "n", "PENDING", "", "")])
    assert live == {(1, "ocr"): "500", (1, rate_unit("ocr")): "502"}
    p = plan(
        cycles=1,
        rate=(1,),
        progress=Progress(
            done=frozenset({(1, "geneval"), (1, "pickscore")}), live=live, rate_done=frozenset({(1, "geneval")})
        ),
    )
    assert keys(p) == ["c0001-merge", "c0001-rate-pickscore"]
    rate = p.by_key()["c0001-rate-pickscore"]
    assert rate.rewards == ("pickscore",) and rate.after == () and rate.after_ids == ("500",)


def test_rate_sbatch_is_the_expert_sbatch_with_its_own_name(tmp_path):
    p = plan(cycles=1, rate=(1,))
    prof = profile()
    expert, rate = p.by_key()["c0001-experts"], p.by_key()["c0001-rate"]
    a = render_sbatch(expert, TS, prof, [], tmp_path, python="python")
    b = render_sbatch(rate, TS, prof, ["11"], tmp_path, python="python")
    assert f"--job-name=mrlora-{TS}-c0001-rate" in b and f"--comment=mrlora:{TS}" in b
    assert "--dependency=afterok:11" in b and "--kill-on-invalid-dep=yes" in b and "--requeue" in b
    strip = lambda t: [x for x in t.splitlines() if "--job-name" not in x and "--dependency" not in x]  # noqa: E731
    assert strip(a) == strip(b)
