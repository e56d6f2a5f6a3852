"""Every command ends the same way: one error line and exit 2 for a user error, 130 on Ctrl-C, quiet on a closed
pipe, and job logs that carry the library's log lines."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _python(code: str, **kwargs) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs
    )


def test_a_user_error_from_any_package_is_one_line_with_exit_2():
    code = (
        "from mrlora.cli import main_entry\nfrom mrlora.config import ConfigError\n"
        "def main(argv):\n    raise ConfigError('weights must not all be zero; pass --weights 1 1 1')\n"
        "main_entry(main, prog='mrlora.merge')\n"
    )
    proc = _python(code)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert err.strip() == "mrlora.merge: error: weights must not all be zero; pass --weights 1 1 1"


def test_a_bug_keeps_its_traceback():
    proc = _python("from mrlora.cli import main_entry\ndef main(argv):\n    return {}['x']\nmain_entry(main)\n")
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1 and "Traceback" in err and "KeyError" in err


def test_ctrl_c_exits_130():
    code = (
        "import sys, time\nfrom mrlora.cli import main_entry\n"
        "def main(argv):\n    print('ready', flush=True)\n    time.sleep(60)\nmain_entry(main, prog='x')\n"
    )
    proc = _python(code)
    assert proc.stdout.readline().strip() == "ready"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "Traceback" not in err


def test_a_closed_pipe_ends_the_command_quietly(tmp_path):
    code = (
        "from mrlora.cli import main_entry\n"
        "def main(argv):\n    for i in range(10**6):\n        print('row', i)\nmain_entry(main, prog='x')\n"
    )
    reader = subprocess.Popen(["head", "-n", "1"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen(
        [sys.executable, "-c", code], cwd=REPO, stdout=reader.stdin, stderr=subprocess.PIPE, text=True
    )
    reader.stdin.close()
    _, err = proc.communicate(timeout=60)
    reader.wait(timeout=30)
    assert proc.returncode == 141 and err == ""


def test_a_job_logs_what_library_loggers_say(tmp_path):
    """The merge job's ``logging.info`` lines reach its log (nothing set logging up on the job path before)."""
    code = (
        "import logging, sys\nfrom launch import jobs\n"
        "jobs._entrypoint = lambda m, f: ((lambda *a: logging.getLogger('mrlora.reduce').info('merged 3 experts')"
        " or {}), Exception)\n"
        "jobs.MergeTask(sys.argv[1], 1)()\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=60, env=env
    )
    assert proc.returncode == 0, proc.stderr
    assert "INFO mrlora.reduce: merged 3 experts" in proc.stderr


def test_log_level_comes_from_the_environment():
    code = (
        "import logging\nfrom mrlora.cli import setup_logging\nsetup_logging()\n"
        "logging.getLogger('a').info('hidden')\nlogging.getLogger('a').warning('shown')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "MRLORA_LOG_LEVEL": "warning"},
    )
    assert "shown" in proc.stderr and "hidden" not in proc.stderr


def test_every_package_error_base_is_a_user_error():
    from eval.errors import EvalError
    from launch.eval import TemplateError
    from launch.plan import PlanError
    from launch.profiles import ProfileError
    from launch.runs import LaunchError
    from launch.slurm import SlurmError
    from mrlora.cli import UserError
    from mrlora.config import ConfigError
    from mrlora.models.errors import ModelError
    from mrlora.rate.errors import RateError
    from mrlora.runstore import RunStoreError
    from mrlora.training.errors import TrainError
    from rewards.base import RewardError

    for base in (
        EvalError,
        TemplateError,
        PlanError,
        ProfileError,
        LaunchError,
        SlurmError,
        ConfigError,
        ModelError,
        RateError,
        RunStoreError,
        TrainError,
        RewardError,
    ):
        assert issubclass(base, UserError), base


COMMAND_MODULES = [
    "launch.mapreduce",
    "launch.status",
    "launch.logs",
    "launch.cancel",
    "launch.eval",
    "launch.jobs",
    "eval.run",
    "eval.report",
    "eval.aggregate",
    "mrlora.train",
    "mrlora.reduce.cli",
    "mrlora.rate.cli",
    "mrlora.models.tiny",
    "mrlora.models.real_shapes",
    "mrlora.completion",
    "rewards.prefetch",
    "rewards.prompts",
    "rewards.geneval_server",
]


def test_every_command_prints_the_same_version_line():
    code = (
        "import importlib, io, contextlib, sys\n"
        f"for name in {COMMAND_MODULES!r}:\n"
        "    out = io.StringIO()\n"
        "    with contextlib.redirect_stdout(out):\n"
        "        try:\n"
        "            importlib.import_module(name).main(['--version'])\n"
        "        except SystemExit as exc:\n"
        "            assert exc.code in (0, None), (name, exc.code)\n"
        "        else:\n"
        "            raise AssertionError(name + ' has no --version')\n"
        "    print(name, '|', out.getvalue().strip())\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    from mrlora.cli import code_version

    lines = dict(line.split(" | ", 1) for line in proc.stdout.splitlines() if " | " in line)
    assert set(lines) == set(COMMAND_MODULES)
    for name, line in lines.items():
        assert line.endswith(f"(mrlora) {code_version()}"), (name, line)


def test_the_mrlora_command_runs_each_tool_by_name():
    from mrlora.commands import COMMANDS

    assert {module for module, _ in COMMANDS.values()} <= set(COMMAND_MODULES)

    def run(*a):
        return subprocess.run(
            [sys.executable, "-m", "mrlora.commands", *a], cwd=REPO, capture_output=True, text=True, timeout=120
        )

    listing = run()
    assert listing.returncode == 0 and all(name in listing.stdout for name in COMMANDS)
    assert run("status", "--version").stdout.startswith("python -m launch.status (mrlora) ")
    wrong = run("prompts", "--kind", "simple", "--n", "2", "--out", "x.jsonl")
    assert wrong.returncode == 2 and "rename --out" in wrong.stderr and "Traceback" not in wrong.stderr
    unknown = run("statsu")
    assert unknown.returncode == 2 and "unknown command 'statsu'" in unknown.stderr
