"""The built-in offline corpus ``builtin:python-docs``: docstrings of the Python standard library.

Real English prose present on every machine, so harvests, tests and demos run offline. Texts
come in a fixed order (sorted file paths, then source order), so a given seed always yields
the same tokens. Test suites and very short docstrings are left out.

Two splits, fixed by a checksum of each text so they never change with the order: ``test``
holds every tenth docstring (CRC-32 of the text mod 10 = 0, about 30k SmolLM2 tokens) and
``train`` the rest (about 270k). Harvests read ``train`` by default, so ``actstore eval`` and
``actstore lora`` measure on ``test`` text no SAE trained on these stores has seen.
"""

from __future__ import annotations

import ast
import logging
import sysconfig
import warnings
import zlib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

NAME = "builtin:python-docs"
MIN_CHARS = 200
SPLITS = ("train", "test", "all")
TEST_EVERY = 10
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


def in_split(text: str, split: str) -> bool:
    """Whether ``text`` belongs to ``split`` (see the module docstring)."""
    if split == "all":
        return True
    held_out = zlib.crc32(text.encode("utf-8")) % TEST_EVERY == 0
    return held_out if split == "test" else not held_out


@cache
def _all_docs() -> tuple[str, ...]:
    """Every qualifying docstring, parsed once per process (about 1.3 MB of text; parsing the
    standard library takes seconds, and eval and lora read the corpus more than once)."""
    docs: list[str] = []
    for path in _stdlib_files():
        try:
            docs.extend(_docstrings(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError, ValueError) as e:
            log.debug("skipping %s: %s", path, e)
    return tuple(docs)


def python_docs(split: str = "train") -> Iterator[str]:
    """The qualifying docstrings of the standard library in ``split``, in a deterministic order."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} of {NAME}; choose {', '.join(SPLITS)}")
    return (doc for doc in _all_docs() if in_split(doc, split))
