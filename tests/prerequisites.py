"""What a test does when something the test command installs is missing: skip on a laptop, fail on CI.

Why: the Slurm and browser checks skip where their prerequisites cannot exist (no root, no chromium). On CI
``tests/cluster/install-test-env.sh`` installs them, so a skip there would mean a green run that never tested
the cluster; ``.ci/run`` sets ``CI`` and a missing prerequisite becomes a failure.
"""

from __future__ import annotations

import os

import pytest


def missing_prerequisite(reason: str) -> None:
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(
            f"{reason} (on CI the test command installs it: see tests/cluster/install-test-env.sh)", pytrace=False
        )
    pytest.skip(reason)
