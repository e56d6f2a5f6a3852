"""Cluster profiles: what a cluster looks like to the launcher, as a typed, validated TOML file.

The schema is the one of ``configs/clusters/local.toml`` and ``example-gpu.toml`` (the latter explains every
key): where jobs go (partition, account, qos), how big an expert is (``nodes_per_expert`` nodes x
``gpus_per_node`` processes, CPUs and memory per GPU, time limit), the merge job's size, how many cycles are
queued ahead (``window_cycles``; clusters cap MaxSubmitJobs), shell ``setup`` lines and extra ``[env]`` for
jobs. ``[rewards.<name>]`` tables override the expert keys for one reward (GenEval may need more time than OCR).

Unknown keys are errors naming the key and the file: a misspelt ``expert_time_min`` silently falling back to a
default would cost a user a day of queue time. Optional launcher keys (not in the example files):
``signal_delay_s`` (USR2 this long before the time limit, default 120), ``max_requeues`` (default 20),
``executor`` ("auto" | "slurm" | "local"), ``chain_extension`` ("compute-node": a window's last merge submits
the next window; "login-node": for sites that forbid sbatch on compute nodes, the user or a scrontab line runs
``python -m launch.mapreduce --resume RUN --adopt``) and ``description``.

The validated profile is stored in ``run.json`` (``to_dict``), so resume and the chain's window extension use
exactly the resources the run started with. Login-node module: stdlib + tomli only.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli

from mrlora.cli import UserError

PROFILES_DIR = Path(__file__).resolve().parents[1] / "configs" / "clusters"
EXECUTORS = ("auto", "slurm", "local")
# Who submits the next window of cycles: the window's last merge job, from its compute node (needs sbatch
# there), or the user / a scrontab line on the login node (python -m launch.mapreduce --resume RUN --adopt).
CHAIN_EXTENSIONS = ("compute-node", "login-node")

# key -> (type, default); default None = required
EXPERT_KEYS: dict[str, tuple[type, Any]] = {
    "partition": (str, None),
    "account": (str, None),
    "qos": (str, None),
    "expert_time_min": (int, None),
    "nodes_per_expert": (int, None),
    "gpus_per_node": (int, None),
    "cpus_per_gpu": (int, None),
    "mem_per_gpu_gb": (float, None),
    "gres_gpu": (bool, None),
}
TOP_KEYS: dict[str, tuple[type, Any]] = {
    "name": (str, None),
    **EXPERT_KEYS,
    "merge_time_min": (int, None),
    "merge_partition": (str, None),
    "merge_cpus": (int, None),
    "merge_mem_gb": (float, None),
    "window_cycles": (int, None),
    "setup": (list, None),
    "env": (dict, {}),
    "rewards": (dict, {}),
    # launcher options with defaults (not required in profile files)
    "description": (str, ""),
    "executor": (str, "auto"),
    "signal_delay_s": (int, 120),
    "max_requeues": (int, 20),
    "chain_extension": (str, "compute-node"),
    # what one node can give a job (GB of host memory); 0 = unknown, not checked. Catches a per-GPU memory that
    # multiplies out to more than a node has, which Slurm would otherwise leave pending forever.
    "max_mem_per_node_gb": (float, 0.0),
}
POSITIVE = ("expert_time_min", "nodes_per_expert", "cpus_per_gpu", "merge_time_min", "merge_cpus", "window_cycles")
NON_NEGATIVE = (
    "gpus_per_node",
    "mem_per_gpu_gb",
    "merge_mem_gb",
    "signal_delay_s",
    "max_requeues",
    "max_mem_per_node_gb",
)


class ProfileError(UserError, ValueError):
    """A cluster profile that cannot be used; the message names the file and key."""


@dataclass(frozen=True)
class Resources:
    """The size and placement of one job: ``nodes`` x ``procs_per_node`` processes."""

    nodes: int = 1
    gpus_per_node: int = 0
    gres_gpu: bool = True  # --gres=gpu:N (True) or --gpus-per-node=N (False)
    cpus_per_task: int = 1
    mem_gb: float = 0.0  # per node; 0 = the partition's default
    time_min: int = 60
    partition: str = ""
    account: str = ""
    qos: str = ""
    # processes per node; 0 = one per GPU (a training job). An eval shard is one process driving its GPUs.
    tasks_per_node: int = 0

    @property
    def procs_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def procs(self) -> int:
        return self.nodes * self.procs_per_node

    def key(self) -> tuple:
        """Hashable identity: jobs with equal keys can be tasks of one Slurm array."""
        return (
            self.nodes,
            self.gpus_per_node,
            self.gres_gpu,
            self.cpus_per_task,
            self.mem_gb,
            self.time_min,
            self.partition,
            self.account,
            self.qos,
            self.tasks_per_node,
        )

    @property
    def gpu_hours(self) -> float:
        """GPU-hours this job may use: nodes x GPUs x its time limit (an upper bound: jobs may end earlier)."""
        return self.nodes * self.gpus_per_node * self.time_min / 60

    def describe(self) -> str:
        """``2 nodes x 8 GPU, 8 CPU/task, 768 GB/node, 240 min @gpu``: everything sbatch is asked for."""
        size = f"{self.nodes} node{'s' if self.nodes != 1 else ''}"
        if self.gpus_per_node:
            size += f" x {self.gpus_per_node} GPU"
        mem = f"{self.mem_gb:g} GB/node" if self.mem_gb else "default mem"
        return (
            f"{size}, {self.procs} proc, {self.cpus_per_task} CPU/proc, {mem}, {self.time_min} min "
            f"@{self.partition or 'default'}"
        )


@dataclass(frozen=True)
class ClusterProfile:
    """A validated profile. Build with ``load_profile`` / ``profile_from_dict``; store with ``to_dict``."""

    name: str
    values: dict = field(repr=False)  # every top-level key, validated, defaults filled in
    reward_overrides: dict = field(default_factory=dict, repr=False)
    path: str = ""

    def __getattr__(self, key: str):
        values = self.__dict__.get("values", {})
        if key in values:
            return values[key]
        raise AttributeError(key)

    @property
    def setup_lines(self) -> list[str]:
        """``setup`` plus one ``export`` per ``[env]`` entry: what every job runs before python."""
        import shlex

        return [*self.values["setup"], *(f"export {k}={shlex.quote(str(v))}" for k, v in self.values["env"].items())]

    def _expert(self, v: dict) -> Resources:
        gpus = v["gpus_per_node"]
        return Resources(
            nodes=v["nodes_per_expert"],
            gpus_per_node=gpus,
            gres_gpu=v["gres_gpu"],
            cpus_per_task=v["cpus_per_gpu"],
            mem_gb=v["mem_per_gpu_gb"] * max(1, gpus),
            time_min=v["expert_time_min"],
            partition=v["partition"],
            account=v["account"],
            qos=v["qos"],
        )

    @property
    def expert(self) -> Resources:
        return self._expert(self.values)

    def expert_resources(self, reward: str) -> Resources:
        return self._expert({**self.values, **self.reward_overrides.get(reward, {})})

    @property
    def merge(self) -> Resources:
        v = self.values
        return Resources(
            nodes=1,
            gpus_per_node=0,
            cpus_per_task=v["merge_cpus"],
            mem_gb=v["merge_mem_gb"],
            time_min=v["merge_time_min"],
            partition=v["merge_partition"],
            account=v["account"],
            qos=v["qos"],
        )

    def to_dict(self) -> dict:
        out = {k: v for k, v in self.values.items() if k != "rewards"}
        out["rewards"] = {r: dict(o) for r, o in self.reward_overrides.items()}
        out["path"] = self.path
        return out


def _unknown(key: str, known, where: str) -> ProfileError:
    close = difflib.get_close_matches(key, sorted(known), n=2)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return ProfileError(f"{where}: unknown key {key!r}.{hint} Known keys: {', '.join(sorted(known))}")


def _typed(where: str, key: str, value: Any, expected: type) -> Any:
    if expected is bool:
        ok = isinstance(value, bool)
    elif expected is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif expected is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    else:
        ok = isinstance(value, expected)
    if not ok:
        raise ProfileError(f"{where}: {key} must be a {expected.__name__}, got {type(value).__name__} {value!r}")
    return value


def _check_ranges(where: str, values: dict) -> None:
    for key in POSITIVE:
        if key in values and values[key] < 1:
            raise ProfileError(f"{where}: {key} must be >= 1, got {values[key]}")
    for key in NON_NEGATIVE:
        if key in values and values[key] < 0:
            raise ProfileError(f"{where}: {key} must be >= 0, got {values[key]}")


def _check_node_memory(where: str, expert: dict, top: dict) -> None:
    """Per-node memory an expert asks for (``mem_per_gpu_gb`` x ``gpus_per_node``) against the node's capacity."""
    cap = float(top.get("max_mem_per_node_gb") or 0)
    if not cap:
        return
    asked = float(expert["mem_per_gpu_gb"]) * max(1, int(expert["gpus_per_node"]))
    if asked > cap:
        raise ProfileError(
            f"{where}: mem_per_gpu_gb {expert['mem_per_gpu_gb']:g} x gpus_per_node "
            f"{expert['gpus_per_node']} = {asked:g} GB per node, more than max_mem_per_node_gb "
            f"{cap:g}; lower mem_per_gpu_gb to at most {cap / max(1, int(expert['gpus_per_node'])):g}"
        )
    if float(top["merge_mem_gb"]) > cap:
        raise ProfileError(f"{where}: merge_mem_gb {top['merge_mem_gb']:g} is more than max_mem_per_node_gb {cap:g}")


def profile_from_dict(data: dict, name: str = "", where: str = "cluster profile") -> ClusterProfile:
    """Validate a profile given as a dict (a parsed TOML file, or the copy stored in run.json)."""
    data = dict(data)
    path = data.pop("path", "")
    values: dict = {}
    for key, value in data.items():
        if key not in TOP_KEYS:
            raise _unknown(key, TOP_KEYS, where)
        values[key] = _typed(where, key, value, TOP_KEYS[key][0])
    values.setdefault("name", name)
    missing = [k for k, (_, default) in TOP_KEYS.items() if default is None and k not in values]
    if missing:
        raise ProfileError(
            f"{where}: missing key(s) {', '.join(missing)}; every cluster key is required "
            f"(see configs/clusters/example-gpu.toml for what each means)"
        )
    for key, (_, default) in TOP_KEYS.items():
        values.setdefault(key, dict(default) if isinstance(default, dict) else default)  # no shared {} between profiles
    if not all(isinstance(s, str) for s in values["setup"]):
        raise ProfileError(f"{where}: setup must be a list of shell lines (strings)")
    for k, v in values["env"].items():
        if not isinstance(v, (str, int, float, bool)):
            raise ProfileError(f"{where}: [env] {k} must be a string or number, got {v!r}")
    if values["executor"] not in EXECUTORS:
        raise ProfileError(f"{where}: executor must be one of {EXECUTORS}, got {values['executor']!r}")
    if values["chain_extension"] not in CHAIN_EXTENSIONS:
        raise ProfileError(
            f"{where}: chain_extension must be one of {CHAIN_EXTENSIONS}, got "
            f"{values['chain_extension']!r} (login-node where compute nodes may not call sbatch)"
        )
    _check_ranges(where, values)
    _check_node_memory(where, values, values)
    if values["expert_time_min"] * 60 <= values["signal_delay_s"]:
        raise ProfileError(
            f"{where}: signal_delay_s ({values['signal_delay_s']}) must be shorter than "
            f"expert_time_min ({values['expert_time_min']} min), or jobs are signalled at once"
        )
    overrides: dict = {}
    for reward, table in values.pop("rewards").items():
        rwhere = f"{where} [rewards.{reward}]"
        if not isinstance(table, dict):
            raise ProfileError(f"{rwhere} must be a table of expert keys")
        checked = {}
        for key, value in table.items():
            if key not in EXPERT_KEYS:
                raise _unknown(key, EXPERT_KEYS, rwhere + " (per-reward tables override expert keys only)")
            checked[key] = _typed(rwhere, key, value, EXPERT_KEYS[key][0])
        _check_ranges(rwhere, checked)
        _check_node_memory(rwhere, {**values, **checked}, values)
        overrides[reward] = checked
    values["rewards"] = {}
    return ClusterProfile(name=values["name"], values=values, reward_overrides=overrides, path=str(path))


def available_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILES_DIR.glob("*.toml")) if PROFILES_DIR.is_dir() else []


def profile_path(name_or_path: str) -> Path:
    """Resolve a profile name (configs/clusters/<name>.toml) or a path to a .toml file."""
    candidate = Path(name_or_path).expanduser()
    if candidate.suffix == ".toml" or "/" in name_or_path:
        if not candidate.is_file():
            raise ProfileError(f"cluster profile file {candidate} does not exist")
        return candidate
    path = PROFILES_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = available_profiles()
        close = difflib.get_close_matches(name_or_path, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ProfileError(
            f"unknown cluster profile {name_or_path!r}.{hint} Known profiles: "
            f"{', '.join(known) or 'none'} (in {PROFILES_DIR}); or pass a path to a .toml file"
        )
    return path


def load_profile(name_or_path: str) -> ClusterProfile:
    """Read and validate a cluster profile by name or path; raise ProfileError naming the file and key."""
    path = profile_path(name_or_path)
    try:
        data = tomli.loads(path.read_text(encoding="utf-8"))
    except tomli.TOMLDecodeError as exc:
        raise ProfileError(f"{path}: not valid TOML ({exc})") from None
    data["path"] = str(path)
    return profile_from_dict(data, name=path.stem, where=str(path))


def default_profile() -> ClusterProfile:
    """The profile used when none is named: one process per job on the default partition."""
    return profile_from_dict(
        {
            "name": "default",
            "description": "built-in: 1 node x 1 process per job, default partition",
            "partition": "",
            "account": "",
            "qos": "",
            "expert_time_min": 60,
            "nodes_per_expert": 1,
            "gpus_per_node": 0,
            "cpus_per_gpu": 1,
            "mem_per_gpu_gb": 0,
            "gres_gpu": False,
            "merge_time_min": 30,
            "merge_partition": "",
            "merge_cpus": 1,
            "merge_mem_gb": 0,
            "window_cycles": 4,
            "setup": [],
        }
    )
