"""Device names, checked once: every place that takes a ``device`` string (a stream's
``device=``, the commands' ``--device``) turns a name the machine cannot serve into one clear
``ValueError`` here instead of an error deep inside torch on the first copy.

:func:`rank_cpus` is the number of cores this process may use: its CPU affinity, shared with
the other ranks on this node (``LOCAL_WORLD_SIZE``) unless the launcher already narrowed it; the
harvest's compression pool and the stream's gather workers are sized by it (not by torch's
intra-op threads, which ``torchrun`` sets to 1).
"""

from __future__ import annotations

import os

import torch

SUPPORTED = ("cpu", "cuda")


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a :class:`torch.device`, or a ``ValueError`` naming the fix: an unknown
    name, a type actstore does not run on, CUDA on a machine without it, or ``cuda:N`` past the
    last GPU."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type not in SUPPORTED:
        raise ValueError(f"device {device!r} is not supported; use cpu, cuda or cuda:N")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asks for CUDA, but no CUDA GPU is visible here; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                             f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return dev


def rank_cpus() -> int:
    """Cores this process may use: its affinity, divided among the node's ranks (``LOCAL_WORLD_SIZE``)
    when every rank was given the same cores."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    if allowed < (os.cpu_count() or allowed):  # the launcher pinned this rank to its own cores
        return max(1, allowed)
    return max(1, allowed // max(1, local_ranks))
