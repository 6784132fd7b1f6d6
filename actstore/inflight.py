"""Shards in flight: compress on one pool, store on another, commit one at a time, in order.

A writer that handles one shard at a time leaves the cores idle while a shard uploads and the
network idle while the next one compresses. Here each submitted shard goes through three stages
that overlap across shards:

1. *encode*: every inner chunk of every array is compressed (and checksummed), and each hook's
   statistics are computed, as separate jobs on the compression pool (blosc, crc32c and numpy
   release the GIL, so the pool spreads them over the cores the process may use);
2. *store*: as soon as an array's chunks are encoded, one job on the I/O pool assembles its shard
   object and stores it (a local file, or one S3 PUT, multipart for large objects);
3. *commit*: a single thread takes the shards in submission order, waits for all of a shard's
   objects, and calls the commit function: commits never race, shard ``n + 1`` never commits
   before shard ``n``, and once a shard fails none submitted after it commits (their objects are
   cleaned up like the failed one's): the committed shards are always a prefix of the submitted
   ones, as if they had been written one at a time. A rerun writes the rest.

At most ``max_in_flight`` shards are between submission and commit: :meth:`ShardPipeline.submit`
blocks until one commits (backpressure), so memory stays bounded by that many shards' inputs and
encoded bytes. A failure in any stage fails that shard's future (and nothing is committed for it).
The stages only ever wait on later-numbered pools (store waits on encode, commit on store), so
the pools cannot deadlock whatever their sizes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from .errors import ShardError
from .shardio import ArrayLayout

Pieces = list[memoryview | bytes]


class ShardPipeline:
    """The three pools, and the bound on shards in flight."""

    def __init__(self, compress_threads: int, store_threads: int, max_in_flight: int):
        if min(compress_threads, store_threads, max_in_flight) < 1:
            raise ValueError("compress_threads, store_threads and max_in_flight must be at least 1")
        self._encode = ThreadPoolExecutor(compress_threads, thread_name_prefix="actstore-encode")
        self._store = ThreadPoolExecutor(store_threads, thread_name_prefix="actstore-store")
        self._commit = ThreadPoolExecutor(1, thread_name_prefix="actstore-commit")
        self._slots = threading.BoundedSemaphore(max_in_flight)
        self._failed: BaseException | None = None
        """The first shard failure: no shard submitted after it commits (only the commit thread sets it)."""

    def submit(
        self,
        regions: Mapping[str, np.ndarray],
        layouts: Mapping[str, ArrayLayout],
        stats_jobs: Mapping[str, Callable[[], Any]],
        store: Callable[[str, Pieces], None],
        settle: Callable[[dict[str, Any], BaseException | None], None],
    ) -> Future[None]:
        """Encode ``regions[path]`` (one shard of the array ``layouts[path]``), run ``stats_jobs``,
        ``store(path, pieces)`` each array's shard object, then ``settle({name: stats result},
        None)`` to commit it, or ``settle({}, first_error)`` when a job failed (to clean up; it
        raises the error to fail the shard's future).

        Blocks while ``max_in_flight`` shards are in flight. The future is done once the shard
        is committed, or failed (with the first error of its jobs)."""
        self._slots.acquire()
        try:
            chunks = {
                path: [self._encode.submit(layouts[path].encode_chunk, data, c) for c in range(layouts[path].chunks_per_shard)]
                for path, data in regions.items()
            }
            stats = {name: self._encode.submit(job) for name, job in stats_jobs.items()}
            stored = [self._store.submit(self._assemble_and_store, layouts[path], jobs, store) for path, jobs in chunks.items()]
            done = self._commit.submit(self._settle_when_stored, stored, stats, settle)
        except BaseException:
            self._slots.release()
            raise
        done.add_done_callback(lambda _: self._slots.release())
        return done

    @staticmethod
    def _assemble_and_store(layout: ArrayLayout, jobs: list[Future], store: Callable[[str, Pieces], None]) -> None:
        store(layout.path, layout.assemble_shard([j.result() for j in jobs]))

    def _settle_when_stored(self, stored: list[Future], stats: Mapping[str, Future],
                            settle: Callable[[dict[str, Any], BaseException | None], None]) -> None:
        errors = [e for f in [*stored, *stats.values()] if (e := f.exception()) is not None]
        if not errors and self._failed is not None:  # committed shards stay a prefix of the submitted ones
            errors = [ShardError(f"not committed: an earlier shard failed ({self._failed})")]
        try:
            if errors:
                settle({}, errors[0])
                raise errors[0]
            settle({name: f.result() for name, f in stats.items()}, None)  # the commit itself may fail too
        except BaseException as e:
            self._failed = self._failed or e
            raise

    def close(self) -> None:
        """Wait for every shard in flight, then stop the pools."""
        self._commit.shutdown(wait=True)
        self._store.shutdown(wait=True)
        self._encode.shutdown(wait=True)
