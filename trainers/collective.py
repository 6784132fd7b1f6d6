"""One rank decides, every rank learns the answer: for what only rank 0's machine can see.

:func:`from_rank0` runs a function on rank 0 alone and broadcasts its result, or its exception,
to every rank of the process group (``torch.distributed.broadcast_object_list``). An exception
is raised on every rank, so none waits for an answer that never comes. Used for a run folder on
rank 0's disk (:meth:`pipelines.runtime.Ranks.from_main`) and the checkpoint in it
(:meth:`trainers.trainer.Trainer.load_checkpoint`): the other ranks' machines need not hold it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def from_rank0(fn: Callable[[], T], rank: int, world_size: int, group: dist.ProcessGroup | None = None) -> T:
    """``fn()`` computed by rank 0 of ``world_size`` and given to every rank (``group``: the
    process group to broadcast over, None for the default one)."""
    if world_size <= 1:
        return fn()
    box: list[object] = [None]
    if rank == 0:
        try:
            box[0] = (True, fn())
        except Exception as e:  # raised on every rank below
            box[0] = (False, e)
    dist.broadcast_object_list(box, src=0, group=group)
    ok, value = box[0]  # type: ignore[misc]
    if not ok:
        raise value
    return value
