"""Session fixtures for tiny models (registered from tests/conftest.py via ``pytest_plugins``).

Why session scope and the mrlora cache: a tiny build takes a few seconds; building each architecture once per
test session, *into the same cache ``resolve_model("tiny:sd3")`` uses*, means every test and every job a test
launches (``MRLORA_CACHE`` is inherited by subprocesses and Slurm jobs) reuses that one build, and nothing is
written under ``~/.cache``.

- ``mrlora_cache`` (autouse): points ``MRLORA_CACHE`` at a session temp dir for the whole session.
- ``tiny_sd3_dir`` / ``tiny_flux_dir``: the built model directories (``str``), loadable with
  ``StableDiffusion3Pipeline`` / ``FluxPipeline.from_pretrained`` or ``mrlora.models.loading.load_pipeline``.
- ``one_torch_thread``: torch on one thread for the test (use it module-wide with
  ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def mrlora_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A session-wide ``MRLORA_CACHE`` so tiny builds never land in the user's home directory."""
    path = tmp_path_factory.mktemp("mrlora_cache")
    previous = os.environ.get("MRLORA_CACHE")
    os.environ["MRLORA_CACHE"] = str(path)
    try:
        yield path
    finally:
        if previous is None:
            os.environ.pop("MRLORA_CACHE", None)
        else:
            os.environ["MRLORA_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_sd3_dir(mrlora_cache: Path) -> str:
    from mrlora.models.loading import resolve_model

    return resolve_model("tiny:sd3")


@pytest.fixture(scope="session")
def tiny_flux_dir(mrlora_cache: Path) -> str:
    from mrlora.models.loading import resolve_model

    return resolve_model("tiny:flux")


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny models run fastest single-threaded, especially on a shared 2-core machine."""
    from mrlora.reduce.job import single_threaded

    with single_threaded():
        yield
