"""The built-in offline corpus ``builtin:python-docs``: docstrings of the Python standard library.

Real English prose present on every machine, so harvests, tests and demos run offline. Texts
come in a fixed order (sorted file paths, then source order), so a given seed always yields
the same tokens. Test suites and very short docstrings are left out.
"""

from __future__ import annotations

import ast
import logging
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "builtin:python-docs"
MIN_CHARS = 200
_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "lib2to3", "__pycache__"}


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(root).parts))


def _docstrings(source: str) -> Iterator[str]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= MIN_CHARS:
                yield doc


def python_docs() -> Iterator[str]:
    """Every qualifying docstring of the standard library, in a deterministic order."""
    for path in _stdlib_files():
        try:
            source = path.read_text(encoding="utf-8")
            yield from _docstrings(source)
        except (SyntaxError, UnicodeDecodeError, ValueError) as e:
            log.debug("skipping %s: %s", path, e)
