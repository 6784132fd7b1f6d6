"""The headline figures each benchmark writes with ``--json`` and ``run_all.py`` gathers.

A headline is ``(figure, measured, goal)``, all strings as printed; ``goal`` is empty where
the benchmark only reports. Each script adds ``{"headline": [...]}`` to its JSON file.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

Headline = list[tuple[str, str, str]]


def write_json(path: str | None, headline: Headline, **figures: Any) -> None:
    """Write ``figures`` and the headline to ``path`` (nothing when no path was asked for)."""
    if path:
        Path(path).write_text(json.dumps({"headline": headline, **figures}, indent=2, default=str) + "\n")


@contextlib.contextmanager
def scratch(out: str | None, prefix: str) -> Iterator[Path]:
    """``out`` (made if missing, kept), or a temporary folder removed afterwards, also on failure:
    benchmark stores run to gigabytes."""
    if out:
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)
        return
    root = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)
