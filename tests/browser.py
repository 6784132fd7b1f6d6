"""Headless Chromium for tests that check the static HTML dashboards.

``dump_dom`` returns a page's DOM after its scripts ran; ``screenshot`` writes a PNG of it.
Both take file:// or http:// URLs and run a fresh browser profile per call, so nothing is
shared between tests. Tests that need a browser carry ``@need_chromium()``: they skip where
no chromium is installed (``.ci/run`` installs it).
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

CHROMIUM: str | None = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)

FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--allow-file-access-from-files",
    "--virtual-time-budget=5000",
)


def need_chromium() -> pytest.MarkDecorator:
    """Marker that skips a test where no chromium is installed."""
    return pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium on this machine (apt-get install chromium); .ci/run installs it",
    )


def _run(args: list[str], url: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run chromium headless with ``args`` on ``url`` in a throwaway profile; raise on failure."""
    if CHROMIUM is None:
        raise RuntimeError("no chromium on this machine")
    with tempfile.TemporaryDirectory(prefix="actstore-chromium-") as profile:
        cmd = [CHROMIUM, *FLAGS, f"--user-data-dir={profile}", *args, url]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"chromium exited {proc.returncode} on {url}:\n{proc.stderr}")
    return proc


def dump_dom(url: str, width: int = 1280, height: int = 900, timeout: float = 60) -> str:
    """The DOM of ``url`` serialised after its scripts ran (chromium's ``--dump-dom``)."""
    proc = _run([f"--window-size={width},{height}", "--dump-dom"], url, timeout)
    if not proc.stdout.strip():
        raise RuntimeError(f"chromium dumped no DOM for {url}:\n{proc.stderr}")
    return proc.stdout


def screenshot(
    url: str, path: str | Path, width: int = 1280, height: int = 900, timeout: float = 60
) -> Path:
    """Write a ``width`` x ``height`` PNG of ``url`` to ``path`` and return it."""
    out = Path(path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    proc = _run(
        [f"--screenshot={out}", f"--window-size={width},{height}", "--hide-scrollbars"],
        url,
        timeout,
    )
    if not out.is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}:\n{proc.stderr}")
    return out
