"""The stream itself: :func:`stream` and :class:`Stream`, a thin iterator that runs the plan
(:mod:`~actstore.stream.plan`), the block loader (:mod:`~actstore.stream.blocks`), batch
assembly (:mod:`~actstore.stream.batches`) and finishing (:mod:`~actstore.stream.finish`) on
threads, and saves and restores its position.

**Prefetch.** A loader thread reads the next block while a planner thread cuts batches from the
current one and hands their gathers (and, on CPU, the dtype conversion and scaling) to a pool
of workers, one per core up to ``prefetch``; batches come out in order, ``prefetch`` ahead.

**Resume.** ``state_dict()`` is the position after the last batch handed out;
``load_state_dict()`` on a stream made with the same arguments continues with exactly the
batches the original would have served.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from ..commits import ranges_to_shards, shards_to_ranges
from ..devices import check_device, rank_cpus
from ..errors import EmptyStoreError, EmptyStreamError
from ..opener import open_store
from ..prefetch import BufferPool, OutputRing, Prefetcher
from ..reader import Store
from ..units import parse_bytes
from .batches import BatchCutter, RawBatch
from .blocks import Block, BlockLoader, StreamArrays, bytes_per_token
from .config import Filters, StreamConfig
from .finish import Finisher, IndexedBatch
from .normalize import stream_scales
from .plan import Cursor, Plan, make_plan

log = logging.getLogger(__name__)

STATE_VERSION = 1


class Stream:
    """An iterable of shuffled batches; see :mod:`actstore.stream`. Make it with :func:`stream`."""

    def __init__(self, store: Store, cfg: StreamConfig, single_hook: bool = False):
        self.store = store
        self.cfg = cfg
        single = single_hook and len(cfg.hooks) == 1
        scfg = store.config
        for hook in cfg.hooks:
            store.check_hook(hook)
        widths = {h: scfg.width(h) for h in cfg.hooks}
        if cfg.stack and len(set(widths.values())) > 1:
            raise ValueError(
                f"hooks of different widths ({', '.join(f'{h}: {w}' for h, w in widths.items())}) cannot be "
                "stacked into one [B, H, D] tensor; pass stack=False for a dict of [B, D] tensors"
            )
        self.widths = widths
        device = check_device(cfg.device) if cfg.device else torch.device("cpu")
        if cfg.min_position >= scfg.context_size:
            raise EmptyStreamError(
                f"min_position={cfg.min_position} leaves no tokens: {store.url} holds windows of {scfg.context_size} "
                f"tokens (positions 0-{scfg.context_size - 1}); use a min_position below {scfg.context_size}"
            )
        self.filters = Filters.resolve(cfg, scfg, store.url)
        """The filters resolved against the store (``drop_ids`` includes the special tokens)."""
        if not cfg.follow:
            shards = tuple(store.committed_shards)
            if cfg.shards is not None:
                missing = sorted(set(cfg.shards) - set(shards))
                if missing:
                    raise ValueError(f"shards {missing[:8]} are not committed in {store.url} ({len(shards)} committed)")
                shards = cfg.shards
            if not shards:
                raise EmptyStoreError(
                    f"store {store.url} has no committed tokens yet; wait for the harvest to commit a shard, "
                    "or pass follow=True to stream while it writes"
                )
        else:
            shards = tuple(range(scfg.n_shards))
        self.scales = stream_scales(store, cfg, self.filters, widths, shards)
        """``{hook: s_h}`` with ``normalize="expected_norm"`` (:mod:`actstore.stream.normalize`)."""
        n_tokens = scfg.tokens_in(shards)
        per_rank = n_tokens // cfg.world_size
        if cfg.batch_size > per_rank:
            raise ValueError(
                f"batch_size {cfg.batch_size} is larger than the {per_rank} tokens each of {cfg.world_size} rank(s) "
                f"gets from this store ({n_tokens} {'target' if cfg.follow else 'committed'} tokens); use a smaller batch"
            )
        self._plan, starved = make_plan(shards, scfg, cfg.memory, bytes_per_token(scfg, cfg.hooks), cfg.world_size)
        if starved:
            log.warning("memory=%d bytes holds less than one chunk per block; using one chunk per block", cfg.memory)
        self._cursor = Cursor()
        self._spare_buffers: list[dict[str, np.ndarray]] = []
        stacked = cfg.stack and not single
        self.arrays = StreamArrays.resolve(store, cfg, self.filters, stacked)
        """The arrays read, and which are mapped rather than copied."""
        self._loader = BlockLoader(store, cfg, self.filters, self.arrays)
        self._cutter = BatchCutter(store, self.arrays, cfg.batch_size, cfg.drop_last, cfg.epochs, self._filtered_out)
        self._finisher = Finisher(cfg.hooks, widths, scfg.dtype, cfg.dtype, cfg.stack, single, self.scales,
                                  self.arrays.gathered, device)

    # ---- description ----------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The order's parameters (shards of a full epoch, chunks per block...)."""
        return self._plan

    @property
    def block_tokens(self) -> int:
        """Tokens per block: the span over which each batch's tokens are mixed."""
        return self._plan.block_chunks * self.store.config.chunk_tokens

    @property
    def tokens_per_epoch(self) -> int:
        """Tokens this rank is given per epoch, before filters."""
        total = self.store.config.tokens_in(self._plan.shards)
        return (self.cfg.rank + 1) * total // self.cfg.world_size - self.cfg.rank * total // self.cfg.world_size

    @property
    def cursor(self) -> Cursor:
        return self._cursor

    # ---- resume ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position after the last batch handed out (and the order's parameters)."""
        c = self.cfg
        return {
            "version": STATE_VERSION,
            "store": self.store.url,
            "identity": self._identity(),
            "shard_ranges": shards_to_ranges(set(self._plan.shards)),
            "block_chunks": self._plan.block_chunks,
            "segment_shards": self._plan.segment_shards,
            "cursor": asdict(self._cursor),
            "rank": c.rank,
            "world_size": c.world_size,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from ``state`` (from :meth:`state_dict` of a stream with the same arguments)."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"stream state version {state.get('version')!r} is not {STATE_VERSION}; it comes from another actstore")
        theirs, ours = state["identity"], self._identity()
        diff = [f"{k}: {theirs.get(k)!r} != {ours[k]!r}" for k in ours if theirs.get(k) != ours[k]]
        if state["rank"] != self.cfg.rank or state["world_size"] != self.cfg.world_size:
            diff.append(f"rank/world_size: {state['rank']}/{state['world_size']} != {self.cfg.rank}/{self.cfg.world_size}")
        if diff:
            raise ValueError("stream state was saved by a stream with other arguments (" + "; ".join(diff) + ")")
        shards = tuple(sorted(ranges_to_shards(state["shard_ranges"])))
        missing = set(shards) - set(self.store.refresh().committed_shards) if not self.cfg.follow else set()
        if missing:
            raise ValueError(f"stream state covers shards {sorted(missing)[:8]} that are not committed in {self.store.url}")
        self._plan = Plan(shards, int(state["block_chunks"]), int(state["segment_shards"]))
        self._cursor = Cursor(**state["cursor"])

    def _identity(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "hooks": list(c.hooks), "batch_size": c.batch_size, "seed": c.seed, "epochs": c.epochs,
            "min_position": c.min_position, "drop_token_ids": list(self.filters.drop_ids), "follow": c.follow,
            "drop_last": c.drop_last,
        }

    # ---- iteration ------------------------------------------------------------------------
    def __iter__(self) -> Iterator[torch.Tensor | dict[str, torch.Tensor]]:
        for batch in self._iterate(with_index=False):
            yield batch.acts

    def indexed(self) -> Iterator[IndexedBatch]:
        """Batches with the store index of every token (for looking tokens up, or checking order)."""
        yield from self._iterate(with_index=True)

    def _iterate(self, with_index: bool) -> Iterator[IndexedBatch]:
        start, plan, finisher = self._cursor, self._plan, self._finisher
        stop = threading.Event()
        spare, self._spare_buffers = self._spare_buffers, []  # block buffers of an earlier pass, not re-faulted
        pool: BufferPool[dict[str, np.ndarray]] = BufferPool(lambda: self._loader.new_buffer(plan), 2, stop, made=spare)
        retired: list[Block] = []  # served blocks, dropped (their pages released, for large stores) by the loader
        blocks = Prefetcher(lambda: self._loader.blocks(plan, start, pool, stop, retired), 1, "actstore-stream-load", stop)
        on_cpu = finisher.device.type == "cpu"  # finish (convert, scale) in the workers; on CUDA, on the device
        total_threads = rank_cpus()  # not torch's threads: torchrun sets OMP_NUM_THREADS=1 on every rank
        n_workers = max(1, min(total_threads, self.cfg.prefetch))
        workers = ThreadPoolExecutor(
            n_workers, "actstore-stream-gather",
            initializer=_limit_intra_op_threads, initargs=(max(1, total_threads // n_workers),),
        )
        ring = OutputRing(self.cfg.prefetch + n_workers + 4)  # the consumer's batches (workers share it)
        in_flight: list[Future] = []

        def job(raw: RawBatch) -> tuple[RawBatch, IndexedBatch | None]:
            raw.gather()
            return raw, (finisher.on_cpu(raw, ring) if on_cpu else None)

        def drain() -> None:
            """Wait for every submitted gather (before their block is reused or dropped)."""
            wait(in_flight)
            in_flight.clear()

        def alloc_pinned(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
            return torch.empty(shape, dtype=dtype, pin_memory=finisher.device.type == "cuda")

        def cut() -> Iterator[Future]:
            """The planner thread: cut batches (cheap), hand their gathers to the workers."""
            combined = self.arrays.combined
            if not on_cpu:  # fresh pinned tensors (torch caches them, and knows when copies finish)
                raws = self._cutter.cut(start, blocks, pool, retired, alloc_pinned, drain, with_index, stacked=combined)
            elif finisher.direct:  # rows already are the output: gather straight into reused tensors
                raws = self._cutter.cut(start, blocks, pool, retired, ring.get, drain, with_index, stacked=finisher.stacked)
            else:  # gather into reused raw tensors, then convert into reused output tensors
                raw_ring = OutputRing(self.cfg.prefetch + n_workers + 4)
                raws = self._cutter.cut(start, blocks, pool, retired, raw_ring.get, drain, with_index, stacked=combined)
            for raw in raws:
                fut = workers.submit(job, raw)
                in_flight[:] = [f for f in in_flight if not f.done()] + [fut]
                yield fut

        batches = Prefetcher(cut, self.cfg.prefetch, "actstore-stream-plan", stop)
        try:
            for fut in batches:
                raw, done = fut.result()
                batch = done if done is not None else finisher.on_device(raw)
                self._cursor = raw.cursor
                yield batch
        finally:
            batches.close()
            blocks.close()
            if not sys.is_finalizing():  # an abandoned iteration closed at interpreter exit: modules are half torn down
                workers.shutdown(wait=False, cancel_futures=True)
            if not (batches.alive or blocks.alive):
                self._spare_buffers = pool.buffers

    def _filtered_out(self, epoch: int) -> EmptyStreamError:
        """The error for an epoch in which the filters kept none of this rank's tokens (a stream
        without end would otherwise wait for a batch forever)."""
        c = self.cfg
        ranks = f" of rank {c.rank} of {c.world_size}" if c.world_size > 1 else ""
        return EmptyStreamError(
            f"the filters ({c.describe_filters()}) keep none of the {self.tokens_per_epoch:,} tokens{ranks} in epoch {epoch} "
            f"of {self.store.url}; loosen them"
        )


def _limit_intra_op_threads(n: int) -> None:
    """Use ``n`` threads for torch ops run by the calling thread, where that setting is
    per-thread (the OpenMP backend); elsewhere it would change the caller's, so leave it."""
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        torch.set_num_threads(n)


def _default_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def stream(
    store: Store | str,
    hooks: str | Sequence[str],
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int | None = 1,
    rank: int | None = None,
    world_size: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    memory: int | str = "2GiB",
    **options: Any,
) -> Stream:
    """Shuffled batches of ``hooks`` from a store (an open :class:`Store` or a URL).

    ``hooks`` as one name gives ``[B, D]`` tensors; as a list, ``[B, H, D]`` (or a dict with
    ``stack=False``). ``rank``/``world_size`` default to torch.distributed's when it is
    initialised. Other options: the fields of :class:`StreamConfig`.
    """
    if isinstance(store, str | os.PathLike):
        store = open_store(store, storage_options=storage_options)
    elif not isinstance(store, Store):
        raise ValueError(f"stream reads a store: give an open Store or its path or URL, got {store!r}")
    if rank is None or world_size is None:
        auto_rank, auto_world = _default_rank_world()
        rank = auto_rank if rank is None else rank
        world_size = auto_world if world_size is None else world_size
    single = isinstance(hooks, str)
    cfg = StreamConfig(
        hooks=(hooks,) if single else tuple(hooks), batch_size=batch_size, seed=seed, epochs=epochs,
        rank=rank, world_size=world_size, memory=parse_bytes(memory), **options,
    )
    return Stream(store, cfg, single_hook=single)
