"""The job graph of a MapReduce LoRA run, as a pure function of config, profile and what is already done.

Per cycle: the experts (one Slurm array with one task per reward when every reward needs the same resources,
else one job per reward), then one merge job ``afterok`` on all of them, then the next cycle's experts
``afterok`` on that merge. Sequential mode chains the experts one after the other instead (for allocations too
small to hold them at once). Optional RaTE jobs (``rate_after_cycles``) distil the experts of a chosen cycle into
tokens: one array (or one job per reward) ``afterok`` on that cycle's experts, beside the chain: nothing waits
for them, so a slow or failed distillation never holds up the next cycle. Only a window of ``window_cycles`` cycles is submitted at a time; the last merge of
a window submits the next one from its compute node, so the queue never holds more than one window of jobs.

Nothing here talks to Slurm or touches disk: first launch, ``--resume``, ``--adopt``, ``--dry-run`` and the
chain's own window extension all call ``build_plan`` with a different ``Progress`` and submit window 0. That
keeps the logic testable without a scheduler and makes ``--dry-run`` show exactly what is submitted.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from launch.profiles import ClusterProfile, Resources
from mrlora.cli import UserError

MODES = ("parallel", "sequential")
MERGE = "merge"
EXPERTS = "experts"
RATE = "rate"


class PlanError(UserError, ValueError):
    """The request cannot be planned (bad cycles, no rewards...); the message says what to change."""


def safe_name(text: str) -> str:
    """A string usable inside a Slurm job name and a file name."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def job_prefix(run_ts: str) -> str:
    return f"mrlora-{run_ts}-"


def run_comment(run_ts: str) -> str:
    return f"mrlora:{run_ts}"


def rate_unit(reward: str) -> str:
    """The unit name of ``reward``'s RaTE token in ``Progress.live`` and the job journal ("rate:<reward>")."""
    return f"{RATE}:{reward}"


@dataclass(frozen=True)
class Job:
    """One Slurm submission: an expert array, a single expert, a merge, or RaTE distillations (array or single).

    ``after`` names jobs of the same plan this one waits for (afterok); ``after_ids`` are ids of jobs already
    in the queue (adopted from an earlier launcher). ``window`` 0 is submitted now; window k > 0 is submitted
    by the ``extends`` merge of window k - 1 once it has finished.
    """

    key: str
    cycle: int
    kind: str  # "expert" | "merge" | "rate"
    rewards: tuple[str, ...]  # expert / RaTE tasks in array order; empty for a merge
    resources: Resources
    after: tuple[str, ...] = ()
    after_ids: tuple[str, ...] = ()
    window: int = 0
    # What the plan expects of a merge, shown by --dry-run; the merge job itself decides at run time from the
    # run directory (launch.jobs.MergeTask), so a run whose cycle count was raised after submission still extends.
    extends: bool = False  # merge that submits the next window when it has finished
    final: bool = False  # merge of the run's last cycle

    @property
    def array(self) -> bool:
        return self.kind != MERGE and len(self.rewards) > 1

    @property
    def role(self) -> str:
        if self.kind == MERGE:
            return MERGE
        if self.kind == RATE:
            return RATE if self.array else f"{RATE}-{safe_name(self.rewards[0])}"
        return EXPERTS if self.array else safe_name(self.rewards[0])

    def name(self, run_ts: str) -> str:
        return f"{job_prefix(run_ts)}{self.key}"


def job_key(cycle: int, role: str) -> str:
    return f"c{cycle:04d}-{role}"


@dataclass(frozen=True)
class Progress:
    """What the run already holds: finished experts, merges and RaTE tokens, and work owned by queued jobs.

    ``live`` maps (cycle, reward), (cycle, "merge") or (cycle, rate_unit(reward)) to the queued/running job id
    that will produce it.
    """

    done: frozenset = frozenset()  # {(cycle, reward)}
    merged: frozenset = frozenset()  # {cycle}
    live: dict = field(default_factory=dict)
    rate_done: frozenset = frozenset()  # {(cycle, reward)} with cycle_XXXX/rate/<reward>/DONE.json

    @property
    def last_merged(self) -> int:
        last = 0
        while last + 1 in self.merged:
            last += 1
        return last


@dataclass
class Plan:
    run_ts: str
    mode: str
    rewards: tuple[str, ...]
    cycles: int
    first_cycle: int
    window_cycles: int
    jobs: list[Job]
    rate_after_cycles: tuple[int, ...] = ()

    @property
    def complete(self) -> bool:
        return not self.jobs

    def window(self, index: int) -> list[Job]:
        return [j for j in self.jobs if j.window == index]

    @property
    def n_windows(self) -> int:
        return 1 + max((j.window for j in self.jobs), default=0)

    def by_key(self) -> dict[str, Job]:
        return {j.key: j for j in self.jobs}

    def topological(self) -> list[Job]:
        """Jobs in an order where every job comes after what it depends on (the local executor's order)."""
        return list(self.jobs)  # build_plan appends a job only after its dependencies


def build_plan(
    *,
    run_ts: str,
    rewards: list[str] | tuple[str, ...],
    cycles: int,
    profile: ClusterProfile,
    mode: str = "parallel",
    progress: Progress | None = None,
    window_cycles: int | None = None,
    rate_after_cycles: Iterable[int] = (),
) -> Plan:
    """Every job still needed to finish ``cycles`` cycles, in dependency order, grouped into windows.

    ``rate_after_cycles``: cycles whose experts are distilled into RaTE tokens (one task per reward whose token
    is neither done nor queued). A cycle already merged gets its RaTE jobs in window 0 with nothing to wait for.
    """
    rewards = tuple(rewards)
    if cycles < 1:
        raise PlanError(f"cycles must be >= 1, got {cycles}")
    rate_cycles = tuple(sorted(set(int(c) for c in rate_after_cycles)))
    bad = [c for c in rate_cycles if not 1 <= c <= cycles]
    if bad:
        raise PlanError(
            f"--rate-after-cycle {' '.join(map(str, bad))}: a RaTE cycle must be one of the run's "
            f"cycles 1..{cycles}; pick cycles in that range (or raise --cycles)"
        )
    if not rewards:
        raise PlanError("no rewards to train; name at least one with --rewards")
    if len(set(rewards)) != len(rewards):
        raise PlanError(f"a reward is named twice in {list(rewards)}")
    if mode not in MODES:
        raise PlanError(f"mode must be one of {MODES}, got {mode!r}")
    progress = progress or Progress()
    window = window_cycles or profile.window_cycles
    if window < 1:
        raise PlanError(f"window_cycles must be >= 1, got {window}")
    first = progress.last_merged + 1
    plan = Plan(
        run_ts=run_ts,
        mode=mode,
        rewards=rewards,
        cycles=cycles,
        first_cycle=first,
        window_cycles=window,
        jobs=[],
        rate_after_cycles=rate_cycles,
    )

    def add_rate_jobs(cycle: int, after: tuple[str, ...], after_ids: tuple[str, ...], win: int) -> None:
        """RaTE of ``cycle``: grouped like the experts (one array when every reward needs the same resources)."""
        if cycle not in rate_cycles:
            return
        todo = [
            r for r in rewards if (cycle, r) not in progress.rate_done and (cycle, rate_unit(r)) not in progress.live
        ]
        plan.jobs.extend(
            _array_or_one_per_reward(
                cycle, RATE, todo, profile, after, after_ids, win, RATE, lambda r: f"{RATE}-{safe_name(r)}"
            )
        )

    for cycle in rate_cycles:
        if cycle < first:  # merged, so every expert of it is DONE
            add_rate_jobs(cycle, (), (), 0)
    if first > cycles:
        return plan

    # what the next cycle's experts wait for: a planned merge (key) or a queued one (id); nothing for cycle 1
    prev_key: tuple[str, ...] = ()
    prev_ids: tuple[str, ...] = ()
    for cycle in range(first, cycles + 1):
        win = (cycle - first) // window
        last_of_window = cycle == cycles or (cycle - first + 1) % window == 0
        todo = [r for r in rewards if (cycle, r) not in progress.done and (cycle, r) not in progress.live]
        live_ids = tuple(dict.fromkeys(progress.live[(cycle, r)] for r in rewards if (cycle, r) in progress.live))

        expert_keys: list[str] = []
        if mode == "parallel":
            jobs = _array_or_one_per_reward(cycle, "expert", todo, profile, prev_key, prev_ids, win, EXPERTS, safe_name)
            plan.jobs.extend(jobs)
            expert_keys.extend(job.key for job in jobs)
            merge_after, merge_ids = tuple(expert_keys), live_ids
            if not expert_keys and not live_ids:  # every expert already done: merge right after the last one
                merge_after, merge_ids = prev_key, prev_ids
        else:
            # sequential: each expert waits for the previous one of its cycle (or the previous merge)
            chain_key, chain_ids = prev_key, prev_ids
            for r in rewards:
                if (cycle, r) in progress.done:
                    continue
                if (cycle, r) in progress.live:
                    chain_key, chain_ids = (), (progress.live[(cycle, r)],)
                    continue
                job = Job(
                    job_key(cycle, safe_name(r)),
                    cycle,
                    "expert",
                    (r,),
                    profile.expert_resources(r),
                    chain_key,
                    chain_ids,
                    win,
                )
                plan.jobs.append(job)
                expert_keys.append(job.key)
                chain_key, chain_ids = (job.key,), ()
            merge_after, merge_ids = chain_key, chain_ids

        # RaTE needs the experts' DONE, not the merge: it waits for this cycle's expert jobs only
        rate_after = (tuple(expert_keys), live_ids)
        if (cycle, MERGE) in progress.live:
            prev_key, prev_ids = (), (progress.live[(cycle, MERGE)],)
            add_rate_jobs(cycle, *rate_after, win)
            continue
        merge = Job(
            job_key(cycle, MERGE),
            cycle,
            MERGE,
            (),
            profile.merge,
            merge_after,
            merge_ids,
            win,
            extends=last_of_window and cycle < cycles,
            final=cycle == cycles,
        )
        plan.jobs.append(merge)
        add_rate_jobs(cycle, *rate_after, win)
        prev_key, prev_ids = (merge.key,), ()
    return plan


def _array_or_one_per_reward(
    cycle: int,
    kind: str,
    todo: list[str],
    profile: ClusterProfile,
    after: tuple[str, ...],
    after_ids: tuple[str, ...],
    win: int,
    array_name: str,
    single_name: Callable[[str], str],
) -> list[Job]:
    """The jobs running ``todo``'s tasks of ``kind`` in ``cycle``: one array when every reward needs the same
    resources (one line in squeue, one dependency for the merge), else one job per reward (a Slurm array has a
    single resource request)."""
    if len(todo) > 1 and len({profile.expert_resources(r).key() for r in todo}) == 1:
        return [
            Job(
                job_key(cycle, array_name),
                cycle,
                kind,
                tuple(todo),
                profile.expert_resources(todo[0]),
                after,
                after_ids,
                win,
            )
        ]
    return [
        Job(job_key(cycle, single_name(r)), cycle, kind, (r,), profile.expert_resources(r), after, after_ids, win)
        for r in todo
    ]


def submission_dependencies(job: Job, plan_ids: dict[str, str]) -> list[str]:
    """Job ids ``job`` must wait for when its window is submitted.

    Dependencies on jobs of an earlier window are dropped: a window is submitted only after the merge that
    ends the previous one has finished, so everything it waited for is complete.
    """
    ids = list(job.after_ids)
    for key in job.after:
        if key in plan_ids:
            ids.append(plan_ids[key])
    return ids


def format_plan(plan: Plan, profile: ClusterProfile) -> str:
    """The plan as a table a person reads: one line per job, grouped by window."""
    if plan.complete:
        return f"run {plan.run_ts}: all {plan.cycles} cycles are merged; nothing to do"
    lines = [
        f"run {plan.run_ts}: cycles {plan.first_cycle}..{plan.cycles}, {plan.mode} mode, rewards "
        f"{', '.join(plan.rewards)}, {len(plan.jobs)} jobs in {plan.n_windows} window(s) of "
        f"{plan.window_cycles} cycle(s); profile {profile.name}"
        + (
            f"; RaTE tokens after cycle(s) {', '.join(map(str, plan.rate_after_cycles))} (beside the chain: "
            f"nothing waits for them)"
            if plan.rate_after_cycles
            else ""
        ),
    ]
    by_key = plan.by_key()
    rows = []
    for job in plan.jobs:
        tasks = {"expert": ",".join(job.rewards), MERGE: "merge", RATE: "RaTE " + ",".join(job.rewards)}[job.kind]
        if job.array:
            tasks = f"array[{len(job.rewards)}]: {tasks}"
        after = [*job.after, *(f"job {i}" for i in job.after_ids)]
        if job.window > 0 and job.after and all(by_key[k].window < job.window for k in job.after):
            after = ["(previous window's merge submits it)"]
        note = f"  -> submits window {job.window + 1}" if job.extends else ""
        rows.append(
            (str(job.window), job.name(plan.run_ts), tasks, job.resources.describe(), (" ".join(after) or "-") + note)
        )
    heads = ("window", "job name", "tasks", "resources", "after")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads[:-1])]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths) + "  {}"
    header = fmt.format(*heads)
    lines.append(header)
    lines.append("-" * len(header))
    lines.extend(fmt.format(*row) for row in rows)
    window_h = sum(j.resources.gpu_hours for j in plan.window(0))
    total_h = sum(j.resources.gpu_hours for j in plan.jobs)
    if total_h:
        lines.append(
            f"GPU-hours at the time limits (an upper bound): {window_h:,.0f} for the jobs submitted now, "
            f"{total_h:,.0f} for the rest of the run (cycles {plan.first_cycle}..{plan.cycles})"
        )
    return "\n".join(lines)
