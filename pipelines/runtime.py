"""What every stage needs from the machine it runs on: a device, its place in a ``torchrun`` job,
and a progress bar.

- :func:`resolve_device` turns a ``--device`` name (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into
  a :class:`torch.device`, checked by :func:`actstore.devices.check_device` (a name the machine
  cannot serve is one ``ValueError`` naming the fix). ``auto`` is this rank's GPU when CUDA is
  present, else the CPU; it is every command's default (harvest, train-sae, eval, lora).
- :func:`join_ranks` joins the job ``torchrun --nproc_per_node N`` describes (it sets ``RANK``,
  ``LOCAL_RANK`` and ``WORLD_SIZE``) for the duration of a stage: one process group, NCCL on
  CUDA and gloo on the CPU, each CUDA rank on its own GPU (``cuda:LOCAL_RANK``). Without
  ``torchrun`` it is a single process, rank 0 of 1. ``actstore.stream`` then gives each rank a
  disjoint part of a store, :class:`trainers.trainer.Trainer` averages gradients over the ranks,
  and a harvest's ranks write disjoint shards.
  Every rank waits for the others through a gloo group on the CPU (also on CUDA, where the
  NCCL group carries only the gradients) with an explicit timeout, ``ACTSTORE_RANK_TIMEOUT``
  seconds (default 7200): a harvest rank that finishes its shards early waits at the final
  barrier for the slowest one, which may take far longer than NCCL's default 10 minutes; a rank
  that dies still ends the job, after the timeout, with an error naming the ranks missing.
- :func:`progress_bar` draws one rich bar over a count (tokens, windows), or nothing.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

from actstore.devices import check_device
from trainers.collective import from_rank0

T = TypeVar("T")


def resolve_device(device: str | torch.device) -> torch.device:
    """``auto``: this rank's CUDA GPU (``cuda:LOCAL_RANK``, modulo the GPUs there are) when there
    is one, else the CPU; any other name checked (an unknown name or a GPU the machine lacks: a
    ``ValueError``)."""
    if device == "auto":
        if torch.cuda.is_available():
            local_rank = int(os.environ.get("LOCAL_RANK", "0"))
            return torch.device("cuda", local_rank % torch.cuda.device_count())
        return torch.device("cpu")
    return check_device(device)


DEFAULT_RANK_TIMEOUT_S = 7200.0


def rank_timeout() -> timedelta:
    """How long a rank waits for the others (``ACTSTORE_RANK_TIMEOUT`` seconds, default 2 hours)."""
    raw = os.environ.get("ACTSTORE_RANK_TIMEOUT", "")
    try:
        seconds = float(raw) if raw else DEFAULT_RANK_TIMEOUT_S
    except ValueError:
        raise ValueError(f"ACTSTORE_RANK_TIMEOUT must be a number of seconds, got {raw!r}") from None
    return timedelta(seconds=seconds)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: rank ``rank`` of ``world_size``, computing on ``device``."""

    rank: int
    world_size: int
    device: torch.device
    control: dist.ProcessGroup | None = field(default=None, repr=False)
    """The gloo group barriers go through (None: the default group)."""

    @property
    def main(self) -> bool:
        """Whether this process writes the outputs (rank 0)."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.world_size <= 1:
            return
        if self.control is None and dist.get_backend() != "gloo":  # a caller's NCCL group: no monitored barrier
            dist.barrier()
            return
        dist.monitored_barrier(self.control, timeout=rank_timeout(), wait_all_ranks=True)


    def from_main(self, fn: Callable[[], T]) -> T:
        """``fn()`` run by rank 0 alone, its result (or its exception) given to every rank: what
        only rank 0's machine can see (a run folder on its disk) decides for the whole job."""
        return from_rank0(fn, self.rank, self.world_size, self.control)


@contextmanager
def join_ranks(device: str | torch.device) -> Iterator[Ranks]:
    """Join the ``torchrun`` job described by the environment (a single process when there is
    none) on ``device`` (:func:`resolve_device`, so a bad name fails before any rank waits).

    A process group the caller set up is used as it is and left to the caller; one made here is
    torn down on the way out, after every rank is done.
    """
    dev = resolve_device(device)
    if dist.is_available() and dist.is_initialized():  # the caller set it up
        yield Ranks(dist.get_rank(), dist.get_world_size(), dev)
        return
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield Ranks(0, 1, dev)
        return
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(local)
    timeout = rank_timeout()
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=timeout,
                            **({"device_id": dev} if dev.type == "cuda" else {}))
    control = dist.new_group(backend="gloo", timeout=timeout) if dev.type == "cuda" else None
    ranks = Ranks(rank, world, dev, control)
    try:
        yield ranks
        ranks.barrier()  # every rank done before any tears the group down (gloo can abort a straggler otherwise)
    finally:
        dist.destroy_process_group()


@contextmanager
def progress_bar(enabled: bool, label: str, total: int, done: int = 0, unit: str = "tokens",
                 show_rate: bool = False) -> Iterator[Callable[[int], None]]:
    """Yields ``update(completed)``, which moves the bar to ``completed`` of ``total`` (``done``
    at the start). ``show_rate`` adds the rate since the bar opened, the elapsed time and the ETA."""
    if not enabled:
        yield lambda completed: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TextColumn(unit)]
    if show_rate:
        columns += [TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA")]
    bar = Progress(*columns, TimeRemainingColumn())
    task = bar.add_task(label, total=total, completed=done, rate="")
    t0 = time.perf_counter()

    def update(completed: int) -> None:
        rate = (completed - done) / max(time.perf_counter() - t0, 1e-9)
        bar.update(task, completed=min(completed, total), rate=f"{rate:,.0f} {unit}/s" if show_rate else "")

    with bar:
        yield update
