"""Which forward passes a harvest runs, and where their rows go: batches independent of shards.

The store's windows are numbered ``0 .. n_windows - 1`` in text order (:mod:`pipelines.text`).
The model always sees the same batches whatever the shard size, the number of ranks or where
a previous run stopped: batch ``g`` is windows ``[g * B, min((g + 1) * B, n_windows))``. Every
window is thus computed in the same company, so a resumed or multi-rank harvest stores the
same bits as one uninterrupted run even though batches straddle shard boundaries, and
``--batch-size`` windows really go through the model per pass (a shard boundary no longer cuts a
batch short).

A rank runs exactly the batches that hold at least one window of a shard it still has to
write (its *spans*), and sends each run of rows to its shard; rows of other shards in such a
batch (a neighbour rank's, or already committed) are computed and dropped: at most one batch
per span end.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Span:
    """Shard ``shard`` holds windows ``[first, stop)``."""

    shard: int
    first: int
    stop: int


@dataclass(frozen=True)
class Segment:
    """Windows ``[lo, hi)`` of a batch (offsets within it) belong to ``shard``, from its window ``offset``."""

    shard: int
    lo: int
    hi: int
    offset: int


@dataclass(frozen=True)
class Batch:
    """Global batch ``index``: windows ``[first, first + size)``, and where its rows go."""

    index: int
    first: int
    size: int
    segments: tuple[Segment, ...]


def plan_batches(spans: Iterable[Span], n_windows: int, batch_size: int) -> Iterator[Batch]:
    """The batches holding a window of ``spans`` (disjoint), in window order, each with its segments."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    todo = sorted((s for s in spans if s.stop > s.first), key=lambda s: s.first)
    k, last = 0, -1
    for span in todo:
        for g in range(max(span.first // batch_size, last + 1), (span.stop - 1) // batch_size + 1):
            first, stop = g * batch_size, min((g + 1) * batch_size, n_windows)
            while todo[k].stop <= first:
                k += 1
            segments = []
            for s in itertools.islice(todo, k, None):
                if s.first >= stop:
                    break
                lo, hi = max(s.first, first), min(s.stop, stop)
                segments.append(Segment(s.shard, lo - first, hi - first, lo - s.first))
            yield Batch(g, first, stop - first, tuple(segments))
            last = g
