"""The harvest's background writer: batches in, committed shards out, beside the model.

The model thread puts each batch's activations (already in the store dtype, on the host) into a
bounded queue and goes on with the next forward pass; this thread copies them into one reused
shard-sized buffer per hook and, at each shard's end, hands the shard to a
:class:`~actstore.StoreWriter` (compress, write, commit). A full queue blocks the model thread:
backpressure when storage is slower than the model. Errors surface in the model thread at its
next call.
"""

from __future__ import annotations

import queue
import threading
from collections import defaultdict

import numpy as np
import torch

import actstore
from actstore.dtypes import to_numpy

_END = object()


class BackgroundWriter:
    """Drains batches from a bounded queue, assembles shards and writes them with a StoreWriter,
    while the producer goes on with the next batches (backpressure: ``put_batch`` blocks when
    ``max_batches`` are waiting)."""

    def __init__(self, writer: actstore.StoreWriter, max_batches: int):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=max_batches)
        self.error: BaseException | None = None
        self.committed_tokens = 0
        self._buffers: dict[str, np.ndarray] = {}
        self._filled: dict[str, int] = defaultdict(int)
        self._thread = threading.Thread(target=self._run, name="actstore-harvest-writer", daemon=True)
        self._thread.start()

    def put_batch(self, shard: int, acts: dict[str, torch.Tensor]) -> None:
        self._raise_if_failed()
        self.queue.put(("batch", shard, acts))

    def end_shard(self, shard: int, tokens_N: np.ndarray, positions_N: np.ndarray) -> None:
        self._raise_if_failed()
        self.queue.put(("end", shard, (tokens_N, positions_N)))

    def close(self) -> None:
        self.queue.put(_END)
        self._thread.join()
        self._raise_if_failed()

    def close_quietly(self) -> None:
        """Stop the thread after an error elsewhere, without raising its own error."""
        self.queue.put(_END)  # the thread keeps draining after an error, so this never blocks for long
        self._thread.join()

    def _raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        while (item := self.queue.get()) is not _END:
            try:
                if self.error is None:
                    self._handle(item)
            except BaseException as e:  # surfaced in the main thread by the next put, end or close
                self.error = e
            finally:
                self.queue.task_done()
        self.queue.task_done()

    def _handle(self, item: tuple) -> None:
        kind, shard, payload = item
        if kind == "batch":
            for hook, t in payload.items():
                x = to_numpy(t)
                buf = self._buffers.get(hook)
                if buf is None or buf.dtype != x.dtype:
                    # one shard-sized buffer per hook, reused: no fresh half-GB arrays per shard
                    shard_tokens = self.writer.config.shard_tokens
                    buf = self._buffers[hook] = np.empty((shard_tokens, x.shape[1]), dtype=x.dtype)
                buf[self._filled[hook] : self._filled[hook] + len(x)] = x
                self._filled[hook] += len(x)
            return
        tokens_N, positions_N = payload
        acts = {hook: self._buffers[hook][:n] for hook, n in self._filled.items()}
        self._filled.clear()
        self.writer.write_shard(shard, tokens=tokens_N, positions=positions_N, acts=acts)
        self.committed_tokens += len(tokens_N)
