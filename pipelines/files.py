"""JSON files: user-supplied ones (sweeps, groups) read with one-line errors naming the file;
results written whole or not at all."""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any


def read_json(path: str, what: str, hint: str = "") -> Any:
    """The JSON document in ``path``; a missing file or bad JSON is a ``ValueError`` naming
    ``what`` the file is (``"sweep file"``), with ``hint`` after a missing one."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{what} {path} does not exist{hint}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{what} {path} is not valid JSON ({e})") from None


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` through a temporary file and a rename: a reader (or a
    rerun after a crash) finds the old file or the whole new one, never a half-written one."""
    target = Path(path)
    partial = target.with_name(f"{target.name}.{uuid.uuid4().hex[:8]}.partial")
    try:
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, doc: Any) -> None:
    """``doc`` as indented JSON, written by :func:`write_text_atomic`."""
    write_text_atomic(path, json.dumps(doc, indent=2, default=str) + "\n")
