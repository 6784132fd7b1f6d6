"""Helpers shared by test modules (fixtures stay in ``conftest.py``)."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def run_cli_here(*args: object) -> Any:
    """The CLI in this process (typer's runner: the same option parsing and error handling as
    ``actstore ...``, without a fresh interpreter importing torch and transformers for each
    call); the result has ``exit_code``, ``stdout``, ``stderr`` and ``exception``."""
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def folder_bytes(root: str | Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> SHA-256 of its bytes), symlinks by target:
    two calls compare equal exactly when nothing in the folder changed."""
    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {p.readlink()}"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out
