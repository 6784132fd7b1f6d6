"""Block loading: a block of the plan (:mod:`actstore.stream.plan`) read into memory, or mapped,
and its tokens put in output order, ready to be gathered into batches.

A loader thread reads and decodes the next block (ranged reads, bounded concurrency; chunks
decoded on all cores) while the current one is served.

**Remote stores.** Each request waits a round trip (20 ms or more to an S3 region), so a remote
block's reads go out while the previous block's still arrive (two blocks read at once at most:
the two buffers ``memory`` pays for), and a thread fetches the shard indexes of the coming
blocks ahead of them; requests in flight are as many as the store's connections
(:attr:`actstore.remote.Location.max_requests`), each decoded as it arrives.

**Local stores.** Uncompressed local chunks are not copied
at all: their shard files are mapped whole, once per stream (``mmap=True``,
:mod:`actstore.mapped`), each chunk's checksum verified and its pages faulted in the first time a
block needs it, and batches are gathered straight from the page cache; the hooks of a stacked
batch are mapped together, so one gather fills the whole ``[B, H, D]``. A store that fits in half
the machine's RAM stays mapped from epoch to epoch (later epochs go straight to the gather); for a
larger one each block's page-table entries are dropped once it is served, so ``memory`` bounds
the mapped working set as it bounds buffers.

**Follow.** While following a harvest, a segment's blocks are loaded once all its shards are
committed (``follow_timeout`` seconds without a new commit raise :class:`FollowTimeoutError`).
Shape letters: H hooks, K pieces, T tokens in a block.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np
import torch

from ..config import StoreConfig
from ..dtypes import numpy_dtype
from ..errors import FollowTimeoutError
from ..layout import POSITIONS, TOKENS, acts_path, scale_path
from ..mapped import MappedArrays, fits, keeps_pages
from ..mapping import unit_for
from ..prefetch import BufferPool
from ..reader import Store
from ..shardio import ShardedArrayReader
from .config import Filters, StreamConfig
from .plan import Cursor, Pieces, Plan, block_order, passes

STACK = "<stacked hooks>"
"""The source key of hooks gathered together (:attr:`StreamArrays.combined`)."""
UNIT_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
"""The integer dtype rows of each byte unit are gathered as."""
_BLOCK_OVERHEAD_BYTES = 32  # per token: order, index and filter arrays beside the activations


@dataclass(frozen=True)
class StreamArrays:
    """The arrays a stream reads, and how each is read."""

    paths: tuple[str, ...]
    """Every array read: the hooks' activations, their fp8 scales, and positions or token ids
    when filters need them."""
    gathered: tuple[str, ...]
    """The arrays whose rows go into batches (activations and scales)."""
    mapped: frozenset[str]
    """Gathered arrays read straight from mapped shard files (uncompressed, local, ``mmap``)."""
    combined: bool
    """Whether a stacked batch's hooks are gathered together, from one mapping of all their chunks."""

    @classmethod
    def resolve(cls, store: Store, cfg: StreamConfig, filters: Filters, stacked: bool) -> StreamArrays:
        scfg = store.config
        fp8 = scfg.dtype == "float8_e4m3fn"
        paths = [acts_path(h) for h in cfg.hooks]
        if fp8:
            paths += [scale_path(h) for h in cfg.hooks]
        if filters.needs_positions:
            paths.append(POSITIONS)
        if filters.needs_tokens:
            paths.append(TOKENS)
        gathered = tuple(p for p in paths if p not in (POSITIONS, TOKENS))
        if store.loc.remote and len(paths) > 1:  # each array's metadata is a round trip: overlap them
            with ThreadPoolExecutor(len(paths), thread_name_prefix="actstore-open") as pool:
                list(pool.map(store.array_reader, paths))
        mapped = frozenset(p for p in gathered if cfg.mmap and fits([store.array_reader(p)]))
        combined = (stacked and len(gathered) > 1 and set(gathered) <= mapped and not fp8
                    and fits([store.array_reader(p) for p in gathered]))
        return cls(tuple(paths), gathered, mapped, combined)


def bytes_per_token(store_cfg: StoreConfig, hooks: Sequence[str]) -> int:
    """Block memory per token: the hooks' rows (and fp8 scales), plus the order and index arrays."""
    per = sum(store_cfg.width(h) * numpy_dtype(store_cfg.dtype).itemsize for h in hooks)
    if store_cfg.dtype == "float8_e4m3fn":
        per += 4 * len(hooks)
    return per + _BLOCK_OVERHEAD_BYTES


@dataclass
class Source:
    """One array's rows of a block as ``unit``-byte integers (a block buffer, or a view of
    mapped chunks: :meth:`actstore.mapping.FileSlots.rows_view`), and the source row of
    each token of the block's output order."""

    rows: torch.Tensor
    unit: int
    index_T: torch.Tensor
    per_token: int = 1
    """Rows per token: the hooks of a combined stacked source (:data:`STACK`), in hook order."""


@dataclass
class _Loading:
    """A block being read: its buffer, its pieces sorted by chunk, its mapped arrays and the reads under way."""

    buf: dict[str, np.ndarray]
    pieces: Pieces
    maps: dict[str, MappedArrays]
    pending: dict[str, Future]


@dataclass
class Block:
    """A block ready to serve: ``order_T`` are block rows (``k * chunk_tokens + r`` for row
    ``r`` of piece ``k``, pieces sorted by chunk so row order is store order) in output order,
    each batch's share in row order (a batch is a set; reading in order is faster)."""

    key: tuple[int, int, int]  # epoch, segment, block
    buffer: dict[str, np.ndarray]
    order_T: np.ndarray
    chunk_K: np.ndarray
    sources: dict[str, Source]


def row_layout(store: Store, path: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape of one token's row of array ``path``, and its dtype."""
    layout = store.array_reader(path).layout
    return layout.shape[1:], layout.dtype


def row_bytes(store: Store, path: str) -> int:
    tail, dtype = row_layout(store, path)
    return math.prod(tail) * dtype.itemsize


class BlockLoader:
    """Reads (or maps) the blocks of a plan for one stream; mapped arrays are kept from epoch to epoch."""

    def __init__(self, store: Store, cfg: StreamConfig, filters: Filters, arrays: StreamArrays):
        self.store, self.cfg, self.filters, self.arrays = store, cfg, filters, arrays
        self._ct = store.config.chunk_tokens
        self._cps = store.config.shard_tokens // self._ct
        self._maps: dict[str, MappedArrays] = {}
        """Mapped arrays by path (:data:`STACK`: the hooks mapped together)."""

    def new_buffer(self, plan: Plan) -> dict[str, np.ndarray]:
        """Block buffers of the arrays that are copied, not mapped."""
        rows = plan.block_chunks * self._ct
        out = {}
        for path in self.arrays.paths:
            if path not in self.arrays.mapped:
                tail, dtype = row_layout(self.store, path)
                out[path] = np.empty((rows, *tail), dtype=dtype)
        return out

    def blocks(self, plan: Plan, start: Cursor, pool: BufferPool, stop: threading.Event, retired: list[Block]) -> Iterator[Block]:
        """The blocks from the cursor's on, each in a buffer from ``pool``; the pages of the
        ``retired`` (served) blocks are released before the next is read."""
        c = self.cfg
        remote = [r for r in map(self.store.array_reader, self.arrays.paths) if r.remote]
        # remote: the next block's reads go out while this one's arrive, so its round trip is not
        # waited for (two blocks read at once at most: the pool's two buffers bound them)
        depth = 2 if remote else 1
        io = ThreadPoolExecutor(max_workers=min(8, len(self.arrays.paths)) * depth, thread_name_prefix="actstore-stream-io")
        ahead = ThreadPoolExecutor(1, thread_name_prefix="actstore-stream-index") if remote else None
        loading: deque[tuple[_Loading, tuple[int, int, int], int]] = deque()  # started, not handed out, oldest first
        boundary = start.offset  # where the next batch starts, in the next block's output order

        def hand_out(keep: int) -> Iterator[Block]:
            """The oldest blocks being read, finished, until ``keep`` are left."""
            nonlocal boundary
            while len(loading) > keep:
                ld, key, first = loading.popleft()
                try:
                    blk = self._finish(ld, key, first, boundary)
                except BaseException:
                    pool.release(ld.buf)
                    raise
                boundary = (boundary - len(blk.order_T)) % c.batch_size
                yield blk

        try:
            for p in passes(plan, self.store.config, c.seed, c.epochs, c.rank, c.world_size, c.follow, start):
                if c.follow and p.epoch == 0:
                    yield from hand_out(0)
                    self._wait_for(p.shards, stop)
                first = start.block if (p.epoch, p.segment) == (start.epoch, start.segment) else 0
                if ahead is not None:
                    ahead.submit(self._fetch_indexes, remote, p.blocks[first:], stop)
                for b in range(first, len(p.blocks)):
                    buf = pool.acquire()
                    self.release(retired)
                    retired.clear()
                    key = (p.epoch, p.segment, b)
                    try:
                        loading.append((self._start(buf, p.blocks[b], io), key, start.offset if key == start.block_key else 0))
                    except BaseException:
                        pool.release(buf)
                        raise
                    yield from hand_out(depth - 1)
            yield from hand_out(0)
        finally:  # reads still under way write into buffers a later iteration may reuse: wait for them
            wait([f for ld, _, _ in loading for f in ld.pending.values() if not f.cancel()])
            io.shutdown(wait=False)
            if ahead is not None:
                ahead.shutdown(wait=False, cancel_futures=True)

    def _fetch_indexes(self, readers: Sequence[ShardedArrayReader], blocks: Sequence[Pieces], stop: threading.Event) -> None:
        """Fetch the shard indexes of remote arrays block by block, ahead of the loads: a block
        whose indexes were not cached would wait one more round trip before its chunks are asked
        for. The first block's are shared with its load (one fetch, :meth:`ShardedArrayReader.shard_indexes`);
        a failure is left for the load to report."""
        for pieces in blocks:
            shards = np.unique(pieces.chunk_K // self._cps).tolist()
            for reader in readers:
                if stop.is_set():
                    return
                try:
                    reader.shard_indexes(shards)
                except Exception:
                    return

    def release(self, blocks: Sequence[Block]) -> None:
        """Drop the page-table entries of served blocks' chunks, unless the mapped arrays fit
        in memory (then later epochs find them mapped: :func:`actstore.mapped.keeps_pages`)."""
        for m in self._maps.values():
            if not keeps_pages(m):
                for blk in blocks:
                    m.release([(int(g) // self._cps, int(g) % self._cps) for g in blk.chunk_K])

    def _wait_for(self, shards: Sequence[int], stop: threading.Event) -> None:
        store, c = self.store, self.cfg
        waited_since = time.monotonic()
        seen = len(store.committed_shards)
        while not set(shards) <= set(store.committed_shards):
            if stop.wait(c.poll_seconds):
                return
            store.refresh()
            now_seen = len(store.committed_shards)
            if now_seen != seen:
                seen, waited_since = now_seen, time.monotonic()
            elif c.follow_timeout is not None and time.monotonic() - waited_since > c.follow_timeout:
                raise FollowTimeoutError(
                    f"no shard of {store.url} was committed in {c.follow_timeout:g} s while following it "
                    f"({seen} of {store.config.n_shards} shards committed); is the harvest still running?"
                )

    def _maps_for(self, keys: Sequence[str]) -> dict[str, MappedArrays]:
        """The mapped arrays of ``keys`` (paths, or :data:`STACK`), made on first use."""
        for key in keys:
            if key not in self._maps:
                paths = self.arrays.gathered if key == STACK else [key]
                self._maps[key] = MappedArrays([self.store.array_reader(p) for p in paths])
        return {k: self._maps[k] for k in keys}

    def _start(self, buf: dict[str, np.ndarray], pieces: Pieces, io: ThreadPoolExecutor) -> _Loading:
        """Start reading (or mapping) a block's chunks on the ``io`` threads."""
        ct, cps, arrays = self._ct, self._cps, self.arrays
        pieces = pieces[np.argsort(pieces.chunk_K, kind="stable")]  # block rows in store order
        ids = [(int(g) // cps, int(g) % cps) for g in pieces.chunk_K]

        separate = [p for p in arrays.paths if not (arrays.combined and p in arrays.gathered)]
        maps = self._maps_for([p for p in separate if p in arrays.mapped] + ([STACK] if arrays.combined else []))

        def fetch(path: str) -> np.ndarray | None:
            if path in maps:  # every hook's chunks in one address range with STACK: one gather per batch
                return maps[path].starts(ids)
            reader = self.store.array_reader(path)
            reader.read_chunks_into(ids, [buf[path][k * ct : (k + 1) * ct] for k in range(len(ids))])
            return None

        return _Loading(buf, pieces, maps, {p: io.submit(fetch, p) for p in separate + ([STACK] if arrays.combined else [])})

    def _finish(self, loading: _Loading, key: tuple[int, int, int], first: int, boundary: int) -> Block:
        """Wait for a block's chunks and put its tokens in output order (:func:`~actstore.stream.plan.block_order`)."""
        ct, filters, buf, pieces = self._ct, self.filters, loading.buf, loading.pieces

        def order(rows_T: np.ndarray, counts_K: np.ndarray) -> np.ndarray:
            c = self.cfg
            return block_order(rows_T, counts_K, len(pieces) * ct, c.seed, key, c.rank, first, boundary, c.batch_size)

        # piece k sits in buffer rows k * ct + [lo_k, hi_k)
        counts_K = pieces.hi_K - pieces.lo_K
        first_K = np.arange(len(pieces)) * ct + pieces.lo_K
        offsets_K = np.cumsum(counts_K) - counts_K
        rows_T = np.repeat(first_K - offsets_K, counts_K) + np.arange(int(counts_K.sum()))
        if not filters.on:  # the order needs no data: work it out while the chunks are read
            order_T = order(rows_T, counts_K)
        fetched = {p: f.result() for p, f in loading.pending.items()}  # re-raises failures
        if filters.on:
            keep_T = filters.keep(len(rows_T), buf[POSITIONS][rows_T] if filters.needs_positions else None,
                                  buf[TOKENS][rows_T] if filters.needs_tokens else None)
            piece_T = np.repeat(np.arange(len(pieces)), counts_K)
            counts_K = np.bincount(piece_T[keep_T], minlength=len(pieces))
            order_T = order(rows_T[keep_T], counts_K)
        return Block(key, buf, order_T, pieces.chunk_K, self._sources(fetched, loading.maps, buf, order_T, len(pieces)))

    def _sources(
        self, fetched: dict[str, np.ndarray | None], maps: dict[str, MappedArrays], buf: dict[str, np.ndarray],
        order_T: np.ndarray, n_chunks: int,
    ) -> dict[str, Source]:
        """Where each gathered array's row of each output token is."""
        ct, arrays = self._ct, self.arrays
        sources = {}
        if arrays.combined:  # token t, hook h -> the row of chunk (h, k_t) in the combined mapping
            starts, H = fetched[STACK], len(arrays.gathered)
            size = row_bytes(self.store, arrays.gathered[0])
            unit = unit_for(size, starts)
            k_T, r_T = np.divmod(order_T, ct)
            index_TH = starts[k_T[:, None] + np.arange(H) * n_chunks] // unit + (r_T * (size // unit))[:, None]
            sources[STACK] = Source(maps[STACK].rows_view(size, unit), unit, torch.from_numpy(index_TH.reshape(-1)), H)
            return sources
        for path in arrays.gathered:
            size = row_bytes(self.store, path)
            starts = fetched[path]
            if starts is None:  # block buffer: rows are buffer rows
                unit = unit_for(size, np.zeros(1, dtype=np.int64))
                rows = torch.from_numpy(buf[path].reshape(len(buf[path]), -1).view(np.uint8)).view(UNIT_INT[unit])
                index_T = order_T
            else:
                unit = unit_for(size, starts)
                rows = maps[path].rows_view(size, unit)
                k_T, r_T = np.divmod(order_T, ct)
                index_T = starts[k_T] // unit + r_T * (size // unit)
            sources[path] = Source(rows, unit, torch.from_numpy(index_T))
        return sources
