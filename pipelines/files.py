"""User-supplied JSON files (sweeps, groups): read with one-line errors naming the file."""

from __future__ import annotations

import json
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
