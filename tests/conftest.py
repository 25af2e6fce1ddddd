"""Shared fixtures. tests/ is not a package (robustbench installs a top-level ``tests``)."""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from robustkit.testing import TinyCNN, random_batch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if os.environ.get("ROBUSTKIT_SHARED_DATA"):
    SHARED_DATA = Path(os.environ["ROBUSTKIT_SHARED_DATA"])


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: two shared cores, tiny tensors; thread hand-offs cost more
    than the maths (one AutoAttack test took 65 s with the default threads, 1 s with one)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _logger_levels():
    """A test that calls a script's ``main`` (a benchmark sets ``robustkit`` to WARNING, a
    non-zero rank sets the root to WARNING) leaves the levels as it found them: later tests read
    INFO records with caplog."""
    loggers = [logging.getLogger(), logging.getLogger("robustkit")]
    levels = [lg.level for lg in loggers]
    yield
    for lg, level in zip(loggers, levels, strict=True):
        lg.setLevel(level)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture
def shared_data() -> Path:
    """``../shared/data`` next to the checkout; tests using it skip cleanly when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"offline data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture
def tiny_cnn() -> TinyCNN:
    torch.manual_seed(0)
    return TinyCNN().eval()


@pytest.fixture
def batch():
    return random_batch(8, (3, 32, 32), 10, seed=0)


@pytest.fixture
def failing_replace(monkeypatch):
    """``failing_replace(code, target, after=0)``: ``os.replace`` raises ``OSError(code)`` for
    files named ``target`` after ``after`` successful replaces (a full disk, a read-only
    remount mid-run, caught where atomic writes commit)."""

    def install(code: int, target: str, after: int = 0) -> None:
        real, seen = os.replace, []

        def replace(src, dst, *a, **kw):
            if os.path.basename(dst) == target:
                seen.append(dst)
                if len(seen) > after:
                    raise OSError(code, os.strerror(code))
            return real(src, dst, *a, **kw)

        monkeypatch.setattr(os, "replace", replace)

    return install


@pytest.fixture
def chromium_images():
    """``load(page) -> (loaded, total)``: the images of an HTML page robustkit wrote that headless
    Chromium (Debian's package) loaded, read from the page's ``data-loaded`` attribute
    (``robustkit.reports.html``); skips the test when Chromium is not installed."""
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium not installed")

    def load(page: Path) -> tuple[int, int]:
        dom = subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu",
                              "--allow-file-access-from-files", "--virtual-time-budget=5000",
                              "--dump-dom", Path(page).as_uri()],
                             capture_output=True, text=True, timeout=120, check=True).stdout
        found = re.search(r'data-loaded="(\d+)/(\d+)"', dom)
        assert found, dom[:500]
        return int(found.group(1)), int(found.group(2))

    return load
