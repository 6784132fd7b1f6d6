"""Joining a ``torchrun`` job: one process group per run, gloo on CPU, NCCL on CUDA.

``torchrun --nproc_per_node N`` starts N copies of a command with ``RANK``, ``LOCAL_RANK`` and
``WORLD_SIZE`` set; :func:`data_parallel` joins them for the duration of a run (each CUDA rank
on its own device, ``cuda:LOCAL_RANK``). ``actstore.stream`` then gives each rank a disjoint part
of the store and :class:`trainers.trainer.Trainer` averages gradients over the ranks.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist

from actstore.devices import check_device


@dataclass(frozen=True)
class Ranks:
    rank: int
    world_size: int
    device: str

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.world_size > 1:
            dist.barrier()


@contextmanager
def data_parallel(device: str) -> Iterator[Ranks]:
    """Join the torchrun job described by the environment (a single process when there is none);
    ``device`` is checked first (an unknown name or a GPU the machine lacks: a ``ValueError``)."""
    check_device(device)
    if dist.is_available() and dist.is_initialized():  # the caller set it up
        yield Ranks(dist.get_rank(), dist.get_world_size(), device)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Ranks(0, 1, device)
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield Ranks(rank, world, device)
        dist.barrier()  # every rank done before any tears the group down (gloo can abort a straggler otherwise)
    finally:
        dist.destroy_process_group()
