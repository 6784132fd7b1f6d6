"""One rank decides, every rank learns the answer: for what only rank 0's machine can see.

:func:`from_rank0` runs a function on rank 0 alone and broadcasts its result, or its exception,
to every rank of the process group (``torch.distributed.broadcast_object_list``). An exception
is raised on every rank, so none waits for an answer that never comes. Used for a run folder on
rank 0's disk (:meth:`pipelines.runtime.Ranks.from_main`) and the checkpoint in it
(:meth:`trainers.trainer.Trainer.load_checkpoint`): the other ranks' machines need not hold it.

The trainer's data-parallel reductions are here too: gradients averaged in one flat all-reduce,
floating buffers averaged, fired-latent masks or-ed, and :func:`host_sum` for counts the host
needs, reduced on the CPU through a gloo group so the device is never synchronised.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import torch
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


def host_sum(value: int, group: dist.ProcessGroup | None = None) -> int:
    """The sum of every rank's ``value``, reduced on the host (``group``: a gloo group, or None
    for the default group when it is gloo): no device synchronisation."""
    count = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(count, group=group)
    return int(count[0])


def sum_ranks(t: torch.Tensor) -> torch.Tensor:
    """The sum of every rank's ``t`` (a copy; ``t`` is left as it was)."""
    t = t.clone()
    dist.all_reduce(t)
    return t


def any_rank(mask: torch.Tensor) -> torch.Tensor:
    """Elementwise or of every rank's boolean ``mask``."""
    flags = mask.to(torch.uint8)
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool()


def average_gradients(params: Iterable[torch.nn.Parameter], world_size: int) -> None:
    """Replace each parameter's gradient by its mean over the ranks, in one flat all-reduce
    (a missing gradient counts as zeros)."""
    params = list(params)
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for p in params:
        p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


@torch.no_grad()
def average_buffers(buffers: Iterable[torch.Tensor], world_size: int) -> None:
    """Average every floating buffer (BatchTopK's threshold) over the ranks, in place."""
    for buf in buffers:
        if buf.is_floating_point():
            dist.all_reduce(buf)
            buf /= world_size
