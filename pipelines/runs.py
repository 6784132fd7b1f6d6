"""Run folders (``train-sae --out``, ``lora --out``): what rerunning a command finds there.

A run records its identity (the store, or the model and SAEs; every setting that changes the
result; the number of ranks) in its checkpoint (:mod:`trainers.checkpoint`) and in the file
it writes last, when it is done (``summary.json``, ``lora.json``). Rerunning a command in its
folder then

- starts the run when the folder is empty or new;
- resumes it from the checkpoint when the identity is the same;
- changes nothing when the run is finished (it says so, and the caller reports the saved
  figures);
- refuses anything else in one line that names the differences and how to go on: the same
  settings, another ``--out``, or ``--overwrite`` to start again.

Nothing is loaded from a checkpoint before its identity matches, and an old pickled checkpoint
(``checkpoint.pt``, ``checkpoint/state.pt``) is never loaded at all: unpickling runs whatever
code the file names. ``--overwrite`` empties a folder only when it holds a run of actstore's.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from actstore.config import differences
from pipelines.tracking import WANDB_DIR
from trainers import checkpoint
from trainers.trainer import CHECKPOINT_DIR

log = logging.getLogger(__name__)

PICKLED = ("checkpoint.pt", f"{CHECKPOINT_DIR}/state.pt")
"""Checkpoints of earlier actstore versions, in pickle: recognised, never loaded."""
RUN_KEY = "run"
"""Where checkpoints and finished-run files keep ``{"identity": ...}``."""


class RunFolderError(ValueError):
    """A run folder holds something a rerun must not continue (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class RunFolder:
    """What a command found in its output folder."""

    path: Path
    state: Literal["new", "resume", "finished"]
    saved: dict[str, Any] | None = None
    """``resume``: the checkpoint's state from its JSON (tensors not loaded); ``finished``: the
    finished-run file."""


def plain(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists...): how an identity compares once saved."""
    return json.loads(json.dumps(value))


def open_run(out: str | Path, identity: Mapping[str, Any], *, finished_file: str, overwrite: bool = False,
             command: str = "this command") -> RunFolder:
    """Check ``out`` against a run of ``identity`` (see the module docstring); ``finished_file``
    is the file the run writes last. With ``overwrite`` an earlier run in ``out`` is removed."""
    root = Path(out)
    ours = plain(dict(identity))
    if overwrite:
        _clear(root, finished_file, command)
        return RunFolder(root, "new")
    if not root.exists() or not _contents(root):
        return RunFolder(root, "new")
    how = "rerun with that run's settings, choose another --out, or pass --overwrite to start again"
    finished = root / finished_file
    if finished.is_file():
        doc = _read_finished(finished, command)
        _same_run(root, _identity_of(doc), ours, how)
        return RunFolder(root, "finished", doc)
    pickled = [p for p in PICKLED if (root / p).exists()]
    if pickled:
        raise RunFolderError(
            f"{root} holds a checkpoint in the pickle format of an older actstore ({pickled[0]}), which is never loaded "
            "(unpickling can run code); pass --overwrite to start the run again, or choose another --out"
        )
    folder = root / CHECKPOINT_DIR
    if checkpoint.exists(folder):
        try:
            saved = checkpoint.read_state(folder)
        except checkpoint.CheckpointError as e:
            raise RunFolderError(f"{e}; pass --overwrite to start the run again, or choose another --out") from None
        _same_run(root, _identity_of(saved), ours, how)
        return RunFolder(root, "resume", saved)
    raise RunFolderError(f"output folder {root} already holds files but no {command} run; choose an empty or new --out")


def run_record(identity: Mapping[str, Any]) -> dict[str, Any]:
    """What a run saves under :data:`RUN_KEY` (checkpoint and finished-run file)."""
    return {"identity": plain(dict(identity))}


def _identity_of(doc: Mapping[str, Any]) -> Any:
    """The identity a checkpoint state or finished-run file recorded (None when it has none)."""
    record = doc.get(RUN_KEY)
    return record.get("identity") if isinstance(record, dict) else None


def _same_run(root: Path, theirs: Any, ours: Any, how: str) -> None:
    if theirs is None:
        raise RunFolderError(f"{root} holds a run without a recorded identity (an older actstore's); "
                             "choose another --out, or pass --overwrite to start again")
    diffs = differences(ours, theirs) if isinstance(theirs, dict) else ["identity: malformed"]
    if diffs:
        shown = "; ".join(diffs[:4]) + ("; ..." if len(diffs) > 4 else "")
        raise RunFolderError(f"{root} holds another run (yours vs. saved: {shown}); {how}")


def _read_finished(path: Path, command: str) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RunFolderError(f"{path} is damaged ({type(e).__name__}); pass --overwrite to run {command} again, "
                             "or choose another --out") from None
    if not isinstance(doc, dict):
        raise RunFolderError(f"{path} is not a {command} result; choose another --out")
    return doc


def _contents(root: Path) -> list[Path]:
    """What the folder holds besides a Weights & Biases log."""
    return [p for p in root.iterdir() if p.name != WANDB_DIR]


def _clear(root: Path, finished_file: str, command: str) -> None:
    """Empty ``root`` for a new run, when it holds an actstore run (or nothing)."""
    if not root.exists() or not _contents(root):
        return
    ours = [finished_file, CHECKPOINT_DIR, *PICKLED]
    if not any((root / name).exists() for name in ours):
        raise RunFolderError(f"--overwrite: {root} holds files but no {command} run; refusing to delete them, "
                             "choose another --out")
    log.info("overwriting the run in %s", root)
    for p in root.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
