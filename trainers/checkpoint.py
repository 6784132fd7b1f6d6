"""Training checkpoints as safetensors + JSON: tensors in one file, everything else in the
other, never pickle (``torch.load`` of a pickle runs whatever code the file names, so a shared
or downloaded run folder could run a shell command; neither of these formats can).

A checkpoint is a folder holding ``state.json`` and ``tensors-<id>.safetensors``. The state
is a tree of dicts, lists and tuples with JSON values and tensors at its leaves (an optimiser's
``state_dict()``, a stream's position, a training history): each tensor goes into the
safetensors file under its path in the tree (``runs/topk-4608/opt/state/0/exp_avg``) and the
JSON keeps the tree with ``{"__tensor__": path}`` in its place; tuples and dicts with integer
keys (an optimiser's per-parameter state) are marked so they come back as they went in.

Writing follows the commit-record pattern of :mod:`actstore.commits`: the tensor file first,
under a fresh name, then ``state.json``, which names that file and its SHA-256, replaces the
old one by a rename (the commit point); older tensor files go last. A crash leaves the old
checkpoint or the new one, never a mix; a damaged or foreign file is a :class:`CheckpointError`,
never loaded. :func:`read_state` reads the JSON alone (tensors left as references), so a run
can check whose checkpoint it is before loading any weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

STATE_FILE = "state.json"
FORMAT = "actstore-checkpoint"
VERSION = 1
_TENSOR, _TUPLE, _INT_KEYS = "__tensor__", "__tuple__", "__int_keys__"
_MARKERS = (_TENSOR, _TUPLE, _INT_KEYS)


class CheckpointError(ValueError):
    """A checkpoint folder cannot be read: damaged, incomplete, or not an actstore checkpoint."""


def exists(folder: str | Path) -> bool:
    """Whether ``folder`` holds a checkpoint (its ``state.json``)."""
    return (Path(folder) / STATE_FILE).is_file()


def save(folder: str | Path, state: Mapping[str, Any]) -> None:
    """Write ``state`` (see the module docstring) as the checkpoint in ``folder``, atomically."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(state, (), tensors)
    name = f"tensors-{uuid.uuid4().hex[:16]}.safetensors"
    partial = root / f"{name}.partial"
    save_file(tensors, str(partial))
    _sync(partial)
    digest = _sha256(partial)
    os.replace(partial, root / name)
    doc = {"format": FORMAT, "version": VERSION, "tensors": name, "sha256": digest, "state": tree}
    partial = root / f"{STATE_FILE}.{uuid.uuid4().hex[:8]}.partial"
    partial.write_text(json.dumps(doc))
    _sync(partial)
    os.replace(partial, root / STATE_FILE)  # the commit point
    for old in root.glob("tensors-*.safetensors*"):
        if old.name != name:
            old.unlink(missing_ok=True)


def read_state(folder: str | Path) -> dict[str, Any]:
    """The checkpoint's state from its JSON alone: tensors stay ``{"__tensor__": path}``."""
    return _decode(_read_doc(Path(folder))["state"], None)


def load(folder: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """The whole state, its tensors on ``device``, after checking the tensor file's digest."""
    root = Path(folder)
    doc = _read_doc(root)
    path = root / doc["tensors"]
    if not path.is_file():
        raise CheckpointError(f"checkpoint {root} is incomplete: {doc['tensors']} is missing")
    if _sha256(path) != doc["sha256"]:
        raise CheckpointError(f"checkpoint {root} is damaged: {doc['tensors']} does not match its recorded SHA-256")
    try:
        tensors = load_file(str(path), device=str(device))
    except SafetensorError as e:
        raise CheckpointError(f"checkpoint {root} is damaged: {doc['tensors']}: {e}") from None
    return _decode(doc["state"], tensors)


# ---- the tree --------------------------------------------------------------------------------
def _encode(node: Any, path: tuple[str, ...], tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(node, torch.Tensor):
        key = "/".join(path) or "root"
        if key in tensors:
            raise ValueError(f"checkpoint state: two tensors at {key!r}")
        tensors[key] = node.detach().cpu().contiguous()
        return {_TENSOR: key}
    if isinstance(node, Mapping):
        if node and all(isinstance(k, int) and not isinstance(k, bool) for k in node):
            return {_INT_KEYS: {str(k): _encode(v, (*path, str(k)), tensors) for k, v in node.items()}}
        for k in node:
            if not isinstance(k, str) or k in _MARKERS:
                raise ValueError(f"checkpoint state: key {k!r} at {'/'.join(path)!r} cannot be saved")
        return {k: _encode(v, (*path, k), tensors) for k, v in node.items()}
    if isinstance(node, tuple):
        return {_TUPLE: [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(node)]}
    if isinstance(node, list):
        return [_encode(v, (*path, str(i)), tensors) for i, v in enumerate(node)]
    if node is None or isinstance(node, bool | int | float | str):
        return node
    raise ValueError(f"checkpoint state: {type(node).__name__} at {'/'.join(path)!r} is neither a tensor nor a JSON value")


def _decode(node: Any, tensors: Mapping[str, torch.Tensor] | None) -> Any:
    if isinstance(node, list):
        return [_decode(v, tensors) for v in node]
    if not isinstance(node, dict):
        return node
    if _TENSOR in node:
        if tensors is None:
            return dict(node)
        if node[_TENSOR] not in tensors:
            raise CheckpointError(f"checkpoint tensor {node[_TENSOR]!r} is missing from its tensor file")
        return tensors[node[_TENSOR]]
    if _TUPLE in node:
        return tuple(_decode(v, tensors) for v in node[_TUPLE])
    if _INT_KEYS in node:
        return {int(k): _decode(v, tensors) for k, v in node[_INT_KEYS].items()}
    return {k: _decode(v, tensors) for k, v in node.items()}


# ---- files -----------------------------------------------------------------------------------
def _read_doc(root: Path) -> dict[str, Any]:
    path = root / STATE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{root} holds no checkpoint ({STATE_FILE} is missing)") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is damaged: {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an actstore checkpoint")
    if doc.get("version") != VERSION:
        raise CheckpointError(f"{path} is a version {doc.get('version')!r} checkpoint; this actstore reads version {VERSION}")
    name = doc.get("tensors")
    if not isinstance(name, str) or Path(name).name != name or not name.startswith("tensors-") \
            or not isinstance(doc.get("sha256"), str) or "state" not in doc:
        raise CheckpointError(f"checkpoint {path} is damaged: its tensor file entry is malformed")
    return doc


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    return h.hexdigest()


def _sync(path: Path) -> None:
    """Flush ``path`` to the disk, so the rename that follows never outlives its data."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
