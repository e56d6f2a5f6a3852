"""Job logs read as lines: no carriage-return progress bars when stderr is a file, one line per update instead."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_progress_in_a_log_file_is_plain_lines(tmp_path):
    code = (
        "from mrlora.cli import setup_logging\nsetup_logging()\nfrom mrlora.progress import progress\n"
        "bar = progress(3, 0, 'expert ocr', min_interval_s=0)\n"
        "for i in range(3):\n    bar.set_postfix(reward=f'{0.5 + i / 10:.4f}')\n    bar.update(1)\nbar.close()\n"
    )
    log = tmp_path / "job.log"
    with open(log, "w") as fh:
        subprocess.run([sys.executable, "-c", code], cwd=REPO, stderr=fh, check=True, timeout=60)
    text = log.read_text()
    assert "\r" not in text
    lines = [line for line in text.splitlines() if "expert ocr: step" in line]
    assert lines[-1].endswith("expert ocr: step 3/3 reward=0.7000"), text
    assert len(lines) >= 3


def test_a_disabled_progress_writes_nothing(capsys):
    from mrlora.progress import progress

    bar = progress(5, 0, "x", enabled=False)
    bar.update(5)
    bar.close()
    assert capsys.readouterr().err == ""
