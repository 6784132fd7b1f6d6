"""Background stages for the stream: run an iterator in a thread, ahead of its consumer.

``Prefetcher(make_iter, depth)`` runs ``make_iter()`` in a daemon thread and hands its items
through a queue of ``depth`` slots, so the producer works while the consumer is busy (reads,
decoding and gathers release the GIL). An exception in the producer is raised in the consumer
at the point it would have received the next item; :meth:`Prefetcher.close` stops the producer
at its next hand-off, so abandoning an iteration leaves no thread behind.

``BufferPool`` lends out a fixed set of reusable buffers: a producer that holds them all waits
until the consumer gives one back, which bounds memory without reallocating (and re-faulting)
large arrays for every block.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
_POLL_S = 0.1


class Stopped(Exception):
    """Raised inside a producer when its consumer has gone away."""


class _Done:
    pass


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class Prefetcher(Generic[T]):
    """Iterate ``make_iter()`` in a background thread, at most ``depth`` items ahead."""

    def __init__(self, make_iter: Callable[[], Iterator[T]], depth: int, name: str, stop: threading.Event | None = None):
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self.stop = stop or threading.Event()
        self._thread = threading.Thread(target=self._run, args=(make_iter,), name=name, daemon=True)
        self._thread.start()

    def _put(self, item: object) -> None:
        while not self.stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_S)
                return
            except queue.Full:
                continue
        raise Stopped

    def _run(self, make_iter: Callable[[], Iterator[T]]) -> None:
        try:
            for item in make_iter():
                self._put(item)
            self._put(_Done())
        except Stopped:
            pass
        except BaseException as e:  # handed to the consumer, which re-raises it
            try:
                self._put(_Failure(e))
            except Stopped:
                pass

    def __iter__(self) -> Iterator[T]:
        while True:
            try:
                item = self._queue.get(timeout=_POLL_S)
            except queue.Empty:
                if self.stop.is_set():  # closed (by our consumer's consumer, when stages are chained)
                    raise Stopped from None
                continue
            if isinstance(item, _Done):
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self, timeout: float = 5.0) -> None:
        self.stop.set()
        self._thread.join(timeout)


class BufferPool(Generic[T]):
    """A fixed set of buffers, lent out and given back; ``acquire`` waits for a free one."""

    def __init__(self, make: Callable[[], T], n: int, stop: threading.Event):
        self._make = make
        self._free: queue.Queue = queue.Queue()
        self._made = 0
        self._n = n
        self._stop = stop
        self._lock = threading.Lock()

    def acquire(self) -> T:
        with self._lock:
            if self._free.empty() and self._made < self._n:
                self._made += 1
                return self._make()
        while not self._stop.is_set():
            try:
                return self._free.get(timeout=_POLL_S)
            except queue.Empty:
                continue
        raise Stopped

    def release(self, buf: T) -> None:
        self._free.put(buf)
