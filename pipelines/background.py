"""The harvest's hand-off thread: sealed host shards in, shards submitted to the store, beside the model.

The model thread fills host shard buffers (:class:`pipelines.transfer.ShardRing`) and hands each
full one here without waiting for its copies. This thread waits for the buffer's copies (a CUDA
event), checks that its values are finite, and submits it (with its statistics, where they were
summed on the device) to the
:class:`~actstore.StoreWriter`, which compresses, stores and commits several shards at once
(:mod:`actstore.inflight`); a buffer goes back to the ring once its shard is committed. The
ring's size bounds memory and applies backpressure: the model waits for a free buffer when
storage is slower than it. An error here (a non-finite shard, a failed write) surfaces in the
model thread at its next hand-off, or at :meth:`ShardHandoff.close`.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future

import numpy as np

import actstore
from actstore.dtypes import to_numpy
from pipelines.transfer import HostShard, ShardRing

_END = object()


class ShardHandoff:
    """Submits sealed shard buffers to ``writer`` in a thread, and returns them to ``ring`` once committed."""

    def __init__(self, writer: actstore.StoreWriter, ring: ShardRing, context_size: int):
        self.writer, self.ring, self.context_size = writer, ring, context_size
        self.queue: queue.Queue = queue.Queue()  # bounded by the ring: never more buffers than it holds
        self.error: BaseException | None = None
        self.committed_tokens = 0
        self._futures: list[Future] = []
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="actstore-harvest-handoff", daemon=True)
        self._thread.start()

    def put(self, buf: HostShard) -> None:
        self._raise_if_failed()
        self.queue.put(buf)

    def close(self) -> None:
        """Wait until every shard handed over is committed; raise the first error."""
        self.close_quietly()
        self._raise_if_failed()

    def close_quietly(self) -> None:
        """Submit what was handed over and wait for it, without raising (after an error elsewhere)."""
        self.queue.put(_END)
        self._thread.join()
        for f in self._futures:
            f.exception()  # waits; errors were recorded by the callback

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _fail(self, e: BaseException) -> None:
        with self._lock:
            if self.error is None:
                self.error = e

    def _run(self) -> None:
        while (buf := self.queue.get()) is not _END:
            if self.error is not None:
                self.ring.release(buf)
                continue
            try:
                buf.wait()
                n, T = buf.n_tokens, self.context_size
                fut = self.writer.submit_shard(
                    buf.shard, tokens=buf.tokens_N[:n], positions=np.tile(np.arange(T, dtype=np.int32), n // T),
                    acts={h: to_numpy(t) for h, t in buf.view().items()}, stats=buf.stats(),
                )
            except BaseException as e:
                self._fail(e)
                self.ring.release(buf)
                continue
            self._futures.append(fut)
            fut.add_done_callback(lambda f, b=buf: self._done(f, b))

    def _done(self, fut: Future, buf: HostShard) -> None:
        n = buf.n_tokens
        self.ring.release(buf)  # from here on the model thread may refill it
        if (e := fut.exception()) is not None:
            self._fail(e)
        else:
            with self._lock:
                self.committed_tokens += n
