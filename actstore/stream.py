"""Globally shuffled, resumable, rank-sharded batches from a store: ``actstore.stream(...)``.

    >>> for acts_BD in actstore.stream("runs/smol", "blocks.12.hook_resid_post", batch_size=4096):
    ...     loss = sae(acts_BD.cuda())

**Order.** Two levels, both pure functions of ``(sizes, seed, epoch, rank, world)``
(:mod:`actstore.shuffle`): a seeded permutation of the committed chunks per epoch, split into
disjoint token ranges per rank, then blocks of many chunks held in memory (``memory`` bytes for
two blocks: the one being served and the one being read) whose tokens are interleaved so each
batch draws from every chunk of the block. Every stored token (that passes the filters) is
served exactly once per epoch. Batches run on across block and epoch boundaries, so all are
full except perhaps the very last (dropped with ``drop_last=True``). A batch is a set: its rows
from one block come in store order (faster to read; split a batch into micro-batches only
after shuffling its rows). The order does not depend on the codec or on how chunks are read.

**Filters.** ``min_position=p`` drops tokens at positions below ``p`` in their context window
(position 0 is BOS when the store has ``prepend_bos``; the first few positions act as attention
sinks with outsized norms). ``drop_token_ids`` drops tokens by id; ``drop_special=True`` adds
the special-token ids the harvest recorded (``extra.special_token_ids``).

**Normalisation** (``normalize="expected_norm"``): hook ``h`` is multiplied by
``s_h = sqrt(D_h / E||x_h||^2)`` over the tokens the stream serves, so the streamed vectors have
``E||s x||^2 = D`` (Anthropic, "Circuits Updates, April 2024"; SAELens'
``normalize_activations="expected_average_only_in"``). Without filters ``E||x||^2`` comes from
the store's statistics (every stored token); with filters it is measured on the tokens they
keep, in up to :data:`NORM_SAMPLE_TOKENS` tokens spread over the store (all of a smaller store),
because the dropped tokens can dominate it: in SmolLM2-135M's middle layers BOS has 10^3-10^4
times the squared norm of other tokens, so all-token statistics would leave the served tokens at
1-15% of ``D``. ``Stream.scales`` holds
``s_h``. A trainer folds it back so the SAE takes raw activations: with encoder pre-activations
``(s x - b_dec) W_enc + b_enc`` and reconstruction ``x_hat = (f W_dec + b_dec) / s``, set
``W_enc <- s W_enc``, ``W_dec <- W_dec / s``, ``b_dec <- b_dec / s`` (``b_enc`` and any
threshold stay): pre-activations are unchanged and reconstructions come out in raw units.

**Prefetch.** A loader thread reads and decodes the next block (ranged reads, bounded
concurrency, retries; chunks decoded on all cores) while a planner thread cuts batches from the
current one and hands their gathers (and, on CPU, the dtype conversion and scaling) to a pool
of workers, one per core up to ``prefetch``; batches come out in order, ``prefetch`` ahead.
Uncompressed local chunks are not copied at all: their shard files are mapped whole, once
per stream (``mmap=True``, :mod:`actstore.mapped`), each chunk's checksum verified and its pages
faulted in the first time a block needs it, and batches are gathered straight from the page
cache; the hooks of a stacked batch are mapped together, so one gather fills the whole
``[B, H, D]``. A store that fits in half the machine's RAM stays mapped from epoch to epoch
(later epochs go straight to the gather); for a larger one each block's page-table entries are
dropped once it is served, so ``memory`` bounds the mapped working set as it bounds buffers.
On CUDA, batches are gathered into pinned memory and copied without blocking; dtype
conversion and scaling then run on the device.

**Resume.** ``state_dict()`` is the position after the last batch handed out;
``load_state_dict()`` on a stream made with the same arguments continues with exactly the
batches the original would have served.

**Follow.** ``follow=True`` streams from a store a harvest is still writing: the first epoch
is served in segments of consecutive shards (about one block per rank each), each as soon as
all its shards are committed, and the stream ends when the last segment has been served
(``follow_timeout`` seconds without a new commit raise :class:`FollowTimeoutError`).
Shape letters: B batch, D width, H hooks, T tokens in a block.
"""

from __future__ import annotations

import logging
import math
import operator
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, NamedTuple

import numpy as np
import torch

from .commits import ranges_to_shards, shards_to_ranges
from .devices import check_device
from .dtypes import numpy_dtype
from .errors import ActstoreError, EmptyStreamError
from .layout import POSITIONS, TOKENS, acts_path, scale_path
from .mapped import MappedArrays, fits, keeps_pages
from .mapping import unit_for
from .prefetch import BufferPool, OutputRing, Prefetcher
from .reader import Store, open_store
from .shuffle import Pieces, chunks_of_shards, interleave, rank_pieces, rng_for, split_blocks

log = logging.getLogger(__name__)

STATE_VERSION = 1
_UNIT_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}
_NO_INDEX = torch.empty(0, dtype=torch.int64)
_STACK = "<stacked hooks>"  # the source key of hooks gathered together (``Stream._combined``)
_BLOCK_OVERHEAD_BYTES = 32  # per token: order, index and filter arrays beside the activations
NORM_SAMPLE_TOKENS = 65536
"""Tokens (whole chunks, spread over the store) that ``normalize`` measures when filters are on."""


class EmptyStoreError(ActstoreError):
    """The store has no committed tokens to stream."""


class FollowTimeoutError(ActstoreError):
    """``follow=True`` waited longer than ``follow_timeout`` for the next shard."""


def parse_bytes(value: int | str) -> int:
    """``2147483648``, ``"2GiB"``, ``"512MB"``, ``"1.5G"`` → bytes."""
    if isinstance(value, int):
        return value
    units = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "KIB": 2**10, "M": 1e6, "MB": 1e6, "MIB": 2**20,
             "G": 1e9, "GB": 1e9, "GIB": 2**30, "T": 1e12, "TB": 1e12, "TIB": 2**40}
    text = str(value).strip().upper()
    number = text.rstrip("BKMGTI ")
    unit = text[len(number):].strip()
    try:
        return int(float(number) * units[unit])
    except (KeyError, ValueError):
        raise ValueError(f"cannot read {value!r} as a size; write e.g. '2GiB', '512MB' or a number of bytes") from None


@dataclass(frozen=True)
class StreamConfig:
    """What to stream and how; the arguments of :func:`stream`."""

    hooks: tuple[str, ...]
    """Hooks to serve, token-aligned."""
    batch_size: int
    """Tokens per batch."""
    seed: int = 0
    """Seed of the order; a new seed (or epoch) gives a new order."""
    epochs: int | None = 1
    """Passes over the store; None streams without end."""
    rank: int = 0
    """This process's rank among ``world_size`` (each gets a disjoint part of every epoch)."""
    world_size: int = 1
    """Number of ranks sharing the store."""
    min_position: int = 0
    """Drop tokens whose position in their context window is below this."""
    drop_token_ids: tuple[int, ...] = ()
    """Drop tokens with these ids."""
    drop_special: bool = False
    """Also drop the special tokens the harvest recorded (BOS, EOS...)."""
    normalize: Literal["none", "expected_norm"] = "none"
    """``expected_norm``: scale each hook to ``E||x||^2 = D`` (see the module docstring)."""
    dtype: str | None = "float32"
    """torch dtype of the batches (``float32``, ``bfloat16``...); None: as stored (fp8 gives float32)."""
    stack: bool = True
    """Several hooks: one ``[B, H, D]`` tensor (equal widths); False: a dict of ``[B, D_h]``."""
    memory: int = 2 << 30
    """Bytes for the two blocks in memory; more means better mixing (see ``actstore.shuffle``)."""
    prefetch: int = 4
    """Batches assembled ahead of the consumer."""
    drop_last: bool = False
    """Drop the final batch if it is short."""
    follow: bool = False
    """Stream while a harvest writes the store; end when it is complete."""
    poll_seconds: float = 1.0
    """How often ``follow`` looks for new commits."""
    follow_timeout: float | None = None
    """Seconds ``follow`` waits for a new commit before raising; None waits indefinitely."""
    device: str | None = None
    """Where batches are delivered (``cuda``, ``cuda:1``...); None keeps them on the CPU."""
    shards: tuple[int, ...] | None = None
    """Stream only these committed shards (e.g. all but a held-out few); None: all."""
    scales: Mapping[str, float] | None = None
    """With ``normalize``: these scales ``s_h`` instead of measuring them (a resumed run keeps
    the scales it started with, though the store has grown since)."""
    mmap: bool = True
    """Gather uncompressed local chunks straight from the page cache (files mapped into memory)
    instead of copying them into the block first; False always copies. Same batches either way."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hooks", tuple(self.hooks))
        object.__setattr__(self, "drop_token_ids", tuple(sorted({int(t) for t in self.drop_token_ids})))
        if self.shards is not None:
            object.__setattr__(self, "shards", tuple(sorted({int(s) for s in self.shards})))
            if self.follow:
                raise ValueError("shards= picks committed shards; it cannot be combined with follow=True")
        for name in ("batch_size", "rank", "world_size", "min_position", "prefetch"):
            object.__setattr__(self, name, _whole(getattr(self, name), name))
        if self.epochs is not None:
            object.__setattr__(self, "epochs", _whole(self.epochs, "epochs"))
        if not self.hooks:
            raise ValueError("stream needs at least one hook")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"hooks are repeated: {list(self.hooks)}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive or None (endless), got {self.epochs}")
        if self.world_size <= 0 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank {self.rank} of {self.world_size}")
        if self.min_position < 0:
            raise ValueError(f"min_position must be >= 0, got {self.min_position}")
        if self.normalize not in ("none", "expected_norm"):
            raise ValueError(f"normalize must be 'none' or 'expected_norm', got {self.normalize!r}")
        if self.dtype is not None and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"unknown torch dtype {self.dtype!r}; use e.g. 'float32' or 'bfloat16'")
        if self.memory <= 0 or self.prefetch <= 0 or self.poll_seconds <= 0:
            raise ValueError("memory, prefetch and poll_seconds must be positive")
        if self.follow_timeout is not None and self.follow_timeout <= 0:
            raise ValueError(f"follow_timeout must be positive or None, got {self.follow_timeout}")

    @property
    def filters(self) -> bool:
        return self.min_position > 0 or bool(self.drop_token_ids) or self.drop_special

    def describe_filters(self) -> str:
        """The filters that are on, as the arguments that set them (for error messages)."""
        parts = [f"min_position={self.min_position}"] if self.min_position > 0 else []
        if self.drop_token_ids:
            more = ", ..." if len(self.drop_token_ids) > 8 else ""
            parts.append(f"drop_token_ids=[{', '.join(map(str, self.drop_token_ids[:8]))}{more}]")
        if self.drop_special:
            parts.append("drop_special=True")
        return ", ".join(parts)


def _whole(value: Any, name: str) -> int:
    """``value`` as an int when it is a whole number of the integer kind, else a ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None


@dataclass(frozen=True)
class Cursor:
    """Where the stream stands: the next token is at ``offset`` in the output order of
    block ``block`` of pass (``epoch``, ``segment``)."""

    epoch: int = 0
    segment: int = 0
    block: int = 0
    offset: int = 0
    batches: int = 0
    """Batches handed out so far."""
    tokens: int = 0
    """Tokens handed out so far."""

    @property
    def block_key(self) -> tuple[int, int, int]:
        return self.epoch, self.segment, self.block


class IndexedBatch(NamedTuple):
    """A batch and where its tokens are in the store."""

    acts: torch.Tensor | dict[str, torch.Tensor]
    """As the plain iteration yields: ``[B, D]``, ``[B, H, D]`` or a dict of ``[B, D_h]``."""
    index_B: torch.Tensor
    """int64 token index of each row (``store.tokens(i, i + 1)`` is its token id)."""


@dataclass
class _Source:
    """One array's rows of a block as ``unit``-byte integers (a block buffer, or a view of
    mapped chunks: :meth:`actstore.mapping.FileSlots.rows_view`), and the source row of
    each token of the block's output order."""

    rows: torch.Tensor
    unit: int
    index_T: torch.Tensor
    per_token: int = 1
    """Rows per token: the hooks of a combined stacked source (``_STACK``), in hook order."""


@dataclass
class _Block:
    """A block ready to serve: ``order_T`` are block rows (``k * chunk_tokens + r`` for row
    ``r`` of piece ``k``, pieces sorted by chunk so row order is store order) in output order,
    each batch's share in row order (a batch is a set; reading in order is faster)."""

    key: tuple[int, int, int]  # epoch, segment, block
    buffer: dict[str, np.ndarray]
    order_T: np.ndarray
    chunk_K: np.ndarray
    sources: dict[str, _Source]


class _Copy(NamedTuple):
    """One gather: ``dest = rows[index]``."""

    rows: torch.Tensor
    index: torch.Tensor
    dest: torch.Tensor

    def run(self) -> None:
        torch.index_select(self.rows, 0, self.index, out=self.dest)


@dataclass
class _RawBatch:
    """A batch's rows in the stored dtype's bit pattern (once :meth:`gather` has run)."""

    arrays: dict[str, torch.Tensor]
    n: int
    cursor: Cursor
    index_B: torch.Tensor | None = None
    stacked: torch.Tensor | None = None
    """``[B, H, D]``, when the hooks were gathered straight into their slices of it."""
    copies: list[_Copy] = field(default_factory=list)
    """Gathers still to run into ``arrays``."""

    def gather(self) -> None:
        for c in self.copies:
            c.run()
        self.copies = []


@dataclass(frozen=True)
class _Plan:
    """Order parameters a resumed stream must share with the original."""

    shards: tuple[int, ...]
    """Committed shards each full epoch covers (the snapshot at creation)."""
    block_chunks: int
    """Chunks per block (from the memory budget)."""
    segment_shards: int
    """Shards per segment of a followed first epoch."""


class Stream:
    """An iterable of shuffled batches; see the module docstring. Make it with :func:`stream`."""

    def __init__(self, store: Store, cfg: StreamConfig, single_hook: bool = False):
        self.store = store
        self.cfg = cfg
        self._single = single_hook and len(cfg.hooks) == 1
        scfg = store.config
        for hook in cfg.hooks:
            store._check_hook(hook)
        widths = {h: scfg.width(h) for h in cfg.hooks}
        if cfg.stack and len(set(widths.values())) > 1:
            raise ValueError(
                f"hooks of different widths ({', '.join(f'{h}: {w}' for h, w in widths.items())}) cannot be "
                "stacked into one [B, H, D] tensor; pass stack=False for a dict of [B, D] tensors"
            )
        self.widths = widths
        self._device = check_device(cfg.device) if cfg.device else torch.device("cpu")
        if cfg.min_position >= scfg.context_size:
            raise EmptyStreamError(
                f"min_position={cfg.min_position} leaves no tokens: {store.url} holds windows of {scfg.context_size} "
                f"tokens (positions 0-{scfg.context_size - 1}); use a min_position below {scfg.context_size}"
            )
        self._ct = scfg.chunk_tokens
        self._cps = scfg.shard_tokens // scfg.chunk_tokens
        self._fp8 = scfg.dtype == "float8_e4m3fn"
        self._drop_ids = self._token_ids_to_drop()
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
        self.scales = self._scales(shards)
        n_tokens = scfg.tokens_in(shards)
        per_rank = n_tokens // cfg.world_size
        if cfg.batch_size > per_rank:
            raise ValueError(
                f"batch_size {cfg.batch_size} is larger than the {per_rank} tokens each of {cfg.world_size} rank(s) "
                f"gets from this store ({n_tokens} {'target' if cfg.follow else 'committed'} tokens); use a smaller batch"
            )
        n_chunks = math.ceil(n_tokens / self._ct)
        budget_chunks = cfg.memory // (2 * self._ct * self._bytes_per_token())
        block_chunks = int(max(1, min(budget_chunks, math.ceil(n_chunks / cfg.world_size) + 1)))
        if budget_chunks < 1:
            log.warning("memory=%d bytes holds less than one chunk per block; using one chunk per block", cfg.memory)
        segment_shards = max(1, (cfg.world_size * block_chunks) // self._cps)
        self._plan = _Plan(shards, block_chunks, segment_shards)
        self._cursor = Cursor()
        self._spare_buffers: list[dict[str, np.ndarray]] = []
        self._gathered = [p for p in self._array_paths() if p not in (POSITIONS, TOKENS)]
        self._mapped = {p for p in self._gathered if cfg.mmap and fits([store.array_reader(p)])}
        self._combined = (self._stacked and len(self._gathered) > 1 and set(self._gathered) <= self._mapped and not self._fp8
                          and fits([store.array_reader(p) for p in self._gathered]))
        """Whether a stacked batch's hooks are gathered together, from one mapping of all their chunks."""
        self._maps: dict[str, MappedArrays] = {}
        """Mapped arrays by path (``_STACK``: the hooks mapped together), kept from epoch to epoch."""

    # ---- description ----------------------------------------------------------------------
    @property
    def block_tokens(self) -> int:
        """Tokens per block: the span over which each batch's tokens are mixed."""
        return self._plan.block_chunks * self._ct

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
        self._plan = _Plan(shards, int(state["block_chunks"]), int(state["segment_shards"]))
        self._cursor = Cursor(**state["cursor"])

    def _identity(self) -> dict[str, Any]:
        c = self.cfg
        return {
            "hooks": list(c.hooks), "batch_size": c.batch_size, "seed": c.seed, "epochs": c.epochs,
            "min_position": c.min_position, "drop_token_ids": list(self._drop_ids), "follow": c.follow,
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
        start = self._cursor
        stop = threading.Event()
        spare, self._spare_buffers = self._spare_buffers, []  # block buffers of an earlier pass, not re-faulted
        pool: BufferPool[dict[str, np.ndarray]] = BufferPool(self._new_buffer, 2, stop, made=spare)
        retired: list[_Block] = []  # served blocks, dropped (their pages released, for large stores) by the loader
        blocks = Prefetcher(lambda: self._blocks(start, pool, stop, retired), 1, "actstore-stream-load", stop)
        on_cpu = self._device.type == "cpu"  # finish (convert, scale) in the workers; on CUDA, on the device
        total_threads = torch.get_num_threads()
        n_workers = max(1, min(total_threads, self.cfg.prefetch))
        workers = ThreadPoolExecutor(
            n_workers, "actstore-stream-gather",
            initializer=_limit_intra_op_threads, initargs=(max(1, total_threads // n_workers),),
        )
        ring = OutputRing(self.cfg.prefetch + n_workers + 4)  # the consumer's batches (workers share it)
        in_flight: list[Future] = []

        def job(raw: _RawBatch) -> tuple[_RawBatch, IndexedBatch | None]:
            raw.gather()
            return raw, (self._finish_cpu(raw, ring) if on_cpu else None)

        def drain() -> None:
            """Wait for every submitted gather (before their block is reused or dropped)."""
            wait(in_flight)
            in_flight.clear()

        def plan() -> Iterator[Future]:
            """The planner thread: cut batches (cheap), hand their gathers to the workers."""
            if not on_cpu:  # fresh pinned tensors (torch caches them, and knows when copies finish)
                raws = self._batches(start, blocks, pool, retired, self._alloc, drain, with_index, stacked=self._combined)
            elif self._direct:  # rows already are the output: gather straight into reused tensors
                raws = self._batches(start, blocks, pool, retired, ring.get, drain, with_index, stacked=self._stacked)
            else:  # gather into reused raw tensors, then convert into reused output tensors
                raw_ring = OutputRing(self.cfg.prefetch + n_workers + 4)
                raws = self._batches(start, blocks, pool, retired, raw_ring.get, drain, with_index, stacked=self._combined)
            for raw in raws:
                fut = workers.submit(job, raw)
                in_flight[:] = [f for f in in_flight if not f.done()] + [fut]
                yield fut

        batches = Prefetcher(plan, self.cfg.prefetch, "actstore-stream-plan", stop)
        try:
            for fut in batches:
                raw, done = fut.result()
                batch = done if done is not None else self._finish_on_device(raw)
                self._cursor = raw.cursor
                yield batch
        finally:
            batches.close()
            blocks.close()
            if not sys.is_finalizing():  # an abandoned iteration closed at interpreter exit: modules are half torn down
                workers.shutdown(wait=False, cancel_futures=True)
            if not (batches.alive or blocks.alive):
                self._spare_buffers = pool.buffers

    # ---- passes and blocks (loader thread) -------------------------------------------------
    def _passes(self, start: Cursor, stop: threading.Event) -> Iterator[tuple[int, int, list[Pieces]]]:
        """``(epoch, segment, blocks)`` from the cursor's pass on, waiting for commits when following."""
        c, scfg, plan = self.cfg, self.store.config, self._plan
        epoch = start.epoch
        while c.epochs is None or epoch < c.epochs:
            if c.follow and epoch == 0:
                segments = [
                    tuple(range(a, min(a + plan.segment_shards, scfg.n_shards)))
                    for a in range(0, scfg.n_shards, plan.segment_shards)
                ]
            else:
                segments = [plan.shards]
            first = start.segment if epoch == start.epoch else 0
            for segment in range(first, len(segments)):
                shards = segments[segment]
                if c.follow and epoch == 0:
                    self._wait_for(shards, stop)
                chunks = chunks_of_shards(shards, scfg.shard_tokens, self._ct, scfg.n_tokens_target)
                mine = rank_pieces(chunks, c.seed, (epoch, segment), c.rank, c.world_size)
                yield epoch, segment, split_blocks(mine, plan.block_chunks)
            epoch += 1

    def _wait_for(self, shards: Sequence[int], stop: threading.Event) -> None:
        waited_since = time.monotonic()
        seen = len(self.store.committed_shards)
        while not set(shards) <= set(self.store.committed_shards):
            if stop.wait(self.cfg.poll_seconds):
                return
            self.store.refresh()
            now_seen = len(self.store.committed_shards)
            if now_seen != seen:
                seen, waited_since = now_seen, time.monotonic()
            elif self.cfg.follow_timeout is not None and time.monotonic() - waited_since > self.cfg.follow_timeout:
                raise FollowTimeoutError(
                    f"no shard of {self.store.url} was committed in {self.cfg.follow_timeout:g} s while following it "
                    f"({seen} of {self.store.config.n_shards} shards committed); is the harvest still running?"
                )

    def _blocks(self, start: Cursor, pool: BufferPool, stop: threading.Event, retired: list[_Block]) -> Iterator[_Block]:
        io = ThreadPoolExecutor(max_workers=min(8, len(self._array_paths())), thread_name_prefix="actstore-stream-io")
        boundary = start.offset  # where the next batch starts, in the next block's output order
        try:
            for epoch, segment, blocks in self._passes(start, stop):
                first = start.block if (epoch, segment) == (start.epoch, start.segment) else 0
                for b in range(first, len(blocks)):
                    buf = pool.acquire()
                    self._release(retired)
                    retired.clear()
                    key = (epoch, segment, b)
                    try:
                        blk = self._load(buf, blocks[b], key, io, start.offset if key == start.block_key else 0, boundary)
                    except BaseException:
                        pool.release(buf)
                        raise
                    boundary = (boundary - len(blk.order_T)) % self.cfg.batch_size
                    yield blk
        finally:
            io.shutdown(wait=False)

    def _array_paths(self) -> list[str]:
        paths = [acts_path(h) for h in self.cfg.hooks]
        if self._fp8:
            paths += [scale_path(h) for h in self.cfg.hooks]
        if self.cfg.min_position > 0:
            paths.append(POSITIONS)
        if self._drop_ids:
            paths.append(TOKENS)
        return paths

    def _maps_for(self, keys: Sequence[str]) -> dict[str, MappedArrays]:
        """The mapped arrays of ``keys`` (paths, or ``_STACK``), made on first use."""
        for key in keys:
            if key not in self._maps:
                paths = self._gathered if key == _STACK else [key]
                self._maps[key] = MappedArrays([self.store.array_reader(p) for p in paths])
        return {k: self._maps[k] for k in keys}

    def _release(self, blocks: Sequence[_Block]) -> None:
        """Drop the page-table entries of served blocks' chunks, unless the mapped arrays fit
        in memory (then later epochs find them mapped: :func:`actstore.mapped.keeps_pages`)."""
        for m in self._maps.values():
            if not keeps_pages(m):
                for blk in blocks:
                    m.release([(int(g) // self._cps, int(g) % self._cps) for g in blk.chunk_K])

    def _new_buffer(self) -> dict[str, np.ndarray]:
        rows = self._plan.block_chunks * self._ct
        out = {}
        for path in self._array_paths():
            if path in self._mapped:
                continue
            layout = self.store.array_reader(path).layout
            out[path] = np.empty((rows, *layout.shape[1:]), dtype=layout.dtype)
        return out

    def _load(
        self, buf: dict[str, np.ndarray], pieces: Pieces, key: tuple[int, int, int], io: ThreadPoolExecutor,
        first: int, boundary: int,
    ) -> _Block:
        """Read (or map) a block and put its tokens in output order (:meth:`_order`)."""
        ct, cps = self._ct, self._cps
        pieces = pieces[np.argsort(pieces.chunk_K, kind="stable")]  # block rows in store order
        ids = [(int(g) // cps, int(g) % cps) for g in pieces.chunk_K]

        separate = [p for p in self._array_paths() if not (self._combined and p in self._gathered)]
        maps = self._maps_for([p for p in separate if p in self._mapped] + ([_STACK] if self._combined else []))

        def fetch(path: str) -> np.ndarray | None:
            if path in maps:  # every hook's chunks in one address range with _STACK: one gather per batch
                return maps[path].starts(ids)
            reader = self.store.array_reader(path)
            reader.read_chunks_into(ids, [buf[path][k * ct : (k + 1) * ct] for k in range(len(ids))])
            return None

        pending = {p: io.submit(fetch, p) for p in separate + ([_STACK] if self._combined else [])}
        # piece k sits in buffer rows k * ct + [lo_k, hi_k)
        counts_K = pieces.hi_K - pieces.lo_K
        first_K = np.arange(len(pieces)) * ct + pieces.lo_K
        offsets_K = np.cumsum(counts_K) - counts_K
        rows_T = np.repeat(first_K - offsets_K, counts_K) + np.arange(int(counts_K.sum()))
        if not self.cfg.filters:  # the order needs no data: work it out while the chunks are read
            order_T = self._order(rows_T, counts_K, key, first, boundary, len(pieces))
        fetched = {p: f.result() for p, f in pending.items()}  # re-raises failures
        if self.cfg.filters:
            keep_T = self._keep(len(rows_T), buf[POSITIONS][rows_T] if self.cfg.min_position > 0 else None,
                                buf[TOKENS][rows_T] if self._drop_ids else None)
            piece_T = np.repeat(np.arange(len(pieces)), counts_K)
            counts_K = np.bincount(piece_T[keep_T], minlength=len(pieces))
            order_T = self._order(rows_T[keep_T], counts_K, key, first, boundary, len(pieces))
        sources = {}
        if self._combined:  # token t, hook h -> the row of chunk (h, k_t) in the combined mapping
            starts, H, K = fetched[_STACK], len(self._gathered), len(ids)
            row_bytes = _row_bytes(*self._row_layout(self._gathered[0]))
            unit = unit_for(row_bytes, starts)
            k_T, r_T = np.divmod(order_T, ct)
            index_TH = starts[k_T[:, None] + np.arange(H) * K] // unit + (r_T * (row_bytes // unit))[:, None]
            sources[_STACK] = _Source(maps[_STACK].rows_view(row_bytes, unit), unit, torch.from_numpy(index_TH.reshape(-1)), H)
        for path in self._gathered if not self._combined else ():
            row_bytes = _row_bytes(*self._row_layout(path))
            starts = fetched[path]
            if starts is None:  # block buffer: rows are buffer rows
                unit = unit_for(row_bytes, np.zeros(1, dtype=np.int64))
                rows = torch.from_numpy(buf[path].reshape(len(buf[path]), -1).view(np.uint8)).view(_UNIT_INT[unit])
                index_T = order_T
            else:
                unit = unit_for(row_bytes, starts)
                rows = maps[path].rows_view(row_bytes, unit)
                k_T, r_T = np.divmod(order_T, ct)
                index_T = starts[k_T] // unit + r_T * (row_bytes // unit)
            sources[path] = _Source(rows, unit, torch.from_numpy(index_T))
        return _Block(key, buf, order_T, pieces.chunk_K, sources)

    def _order(
        self, rows_T: np.ndarray, counts_K: np.ndarray, key: tuple[int, int, int], first: int, boundary: int, n_pieces: int,
    ) -> np.ndarray:
        """A block's rows (``counts_K`` from each piece) in output order from ``first`` on, each
        batch's share (batches start at ``boundary + j * batch_size``) sorted into row order."""
        order_T = rows_T[interleave(counts_K, rng_for(self.cfg.seed, *key, self.cfg.rank))]
        n_rows = max(1, n_pieces * self._ct)
        batch_T = (np.arange(first, len(order_T)) - boundary) // self.cfg.batch_size
        key_T = (batch_T - batch_T[:1]) * n_rows + order_T[first:]
        if len(key_T) and (batch_T[-1] - batch_T[0] + 1) * n_rows <= 2**31:
            key_T = key_T.astype(np.int32)  # sorts faster
        order_T[first:] = np.sort(key_T) % n_rows
        return order_T

    # ---- batches (planner thread) ----------------------------------------------------------
    def _batches(
        self, start: Cursor, blocks: Prefetcher[_Block], pool: BufferPool, retired: list[_Block],
        alloc: Callable[..., torch.Tensor], drain: Callable[[], None], with_index: bool, stacked: bool = False,
    ) -> Iterator[_RawBatch]:
        """Cut the blocks' output into batches of raw rows, to be gathered (:meth:`_RawBatch.gather`)
        into tensors from ``alloc``, or with ``stacked`` into the slices of one ``[B, H, D]``
        tensor. When a block whose buffers are gathered from is served, the gathers of a batch
        still being filled run here and ``drain`` waits for those handed out, before the block
        goes to ``retired``; mapped chunks stay valid, so then nothing waits."""
        B, ct = self.cfg.batch_size, self._ct
        specs = {p: self._row_spec(p) for p in self._gathered}
        buffered = not set(self._gathered) <= self._mapped  # mapped chunks outlive their block: no waiting
        batches, tokens = start.batches, start.tokens
        out: dict[str, torch.Tensor] = {}
        copies: list[_Copy] = []
        whole: torch.Tensor | None = None
        index_B: torch.Tensor | None = None
        filled = 0
        epoch, epoch_tokens, whole_epoch = -1, 0, False  # tokens kept in the current epoch, and whether it began here
        for blk in blocks:
            e, s, b = blk.key
            off = start.offset if blk.key == start.block_key else 0
            n = len(blk.order_T)
            if e != epoch:
                if whole_epoch and not epoch_tokens:
                    raise self._filtered_out(epoch)
                epoch, epoch_tokens, whole_epoch = e, 0, (s, b, off) == (0, 0, 0)
            epoch_tokens += n
            while off < n:
                if filled == 0:
                    if stacked:
                        tail, dtype = specs[self._gathered[0]]
                        whole = alloc((B, len(self._gathered), *tail), dtype)
                        out = {p: whole[:, i] for i, p in enumerate(self._gathered)}
                    else:
                        out = {p: alloc((B, *tail), dtype) for p, (tail, dtype) in specs.items()}
                    index_B = alloc((B,), torch.int64) if with_index else None
                take = min(B - filled, n - off)
                for p, src in blk.sources.items():
                    target = whole if p == _STACK else out[p]
                    assert target is not None
                    h = src.per_token
                    dest = target[filled : filled + take].view(torch.uint8).view(take * h, -1).view(_UNIT_INT[src.unit])
                    copies.append(_Copy(src.rows, src.index_T[off * h : (off + take) * h], dest))
                if index_B is not None:
                    k_b, r_b = np.divmod(blk.order_T[off : off + take], ct)
                    index_B[filled : filled + take] = torch.from_numpy(blk.chunk_K[k_b] * ct + r_b)
                filled += take
                off += take
                if filled == B:
                    batches, tokens = batches + 1, tokens + B
                    cursor = Cursor(e, s, b, off, batches, tokens) if off < n else Cursor(e, s, b + 1, 0, batches, tokens)
                    yield _RawBatch(dict(out), B, cursor, index_B, whole, copies)
                    copies, filled = [], 0
            if buffered:  # gathers read this block's buffers: finish them (a batch that runs on into the next block: its rows from this one now)
                for c in copies:
                    c.run()
                copies = []
                drain()
            pool.release(blk.buffer)
            retired.append(blk)
            del blk
        if whole_epoch and not epoch_tokens:
            raise self._filtered_out(epoch)
        if filled and not self.cfg.drop_last:
            end = Cursor(self.cfg.epochs or 0, 0, 0, 0, batches + 1, tokens + filled)
            yield _RawBatch(
                {p: t[:filled] for p, t in out.items()}, filled, end, index_B[:filled] if index_B is not None else None,
                whole[:filled] if whole is not None else None, copies,
            )

    def _row_spec(self, path: str) -> tuple[tuple[int, ...], torch.dtype]:
        """Shape of one row of ``path`` and the integer dtype its bits are gathered as."""
        tail, dtype = self._row_layout(path)
        return tail, _UNIT_INT[dtype.itemsize]

    def _row_layout(self, path: str) -> tuple[tuple[int, ...], np.dtype]:
        layout = self.store.array_reader(path).layout
        return layout.shape[1:], layout.dtype

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, pin_memory=self._device.type == "cuda")

    @property
    def _direct(self) -> bool:
        """Whether gathered rows need no conversion or scaling to be the output."""
        return self._target_dtype == _TORCH_DTYPE[self.store.config.dtype] and not self._fp8 and not self.scales

    @property
    def _stacked(self) -> bool:
        """Whether batches are ``[B, H, D]`` tensors."""
        return self.cfg.stack and not self._single

    # ---- finishing: stored bits -> the consumer's dtype, scaled, stacked ---------------------
    @property
    def _target_dtype(self) -> torch.dtype:
        if self.cfg.dtype:
            return getattr(torch, self.cfg.dtype)
        return torch.float32 if self._fp8 else _TORCH_DTYPE[self.store.config.dtype]

    def _hook_values(self, arrays: dict[str, torch.Tensor], hook: str, dev: torch.device) -> torch.Tensor:
        """One hook's rows as values: dequantised (fp8) and scaled (normalize), float32 if either."""
        x = arrays[acts_path(hook)].to(dev, non_blocking=True).view(_TORCH_DTYPE[self.store.config.dtype])
        if self._fp8:
            x = x.float() * arrays[scale_path(hook)].to(dev, non_blocking=True).view(torch.float32)[:, None]
        if hook in self.scales:
            x = x.float() * self.scales[hook]
        return x

    def _assemble(self, parts: dict[str, torch.Tensor], index_B: torch.Tensor) -> IndexedBatch:
        if not self.cfg.stack:
            return IndexedBatch(parts, index_B)
        if self._single:
            return IndexedBatch(parts[self.cfg.hooks[0]], index_B)
        return IndexedBatch(torch.stack([parts[h] for h in self.cfg.hooks], dim=1), index_B)

    def _finish_on_device(self, raw: _RawBatch) -> IndexedBatch:
        """CUDA: copy the raw rows over (pinned, non-blocking), then convert there."""
        dev, target = self._device, self._target_dtype
        arrays = raw.arrays
        if raw.stacked is not None:  # one copy of the whole [B, H, D] block, not one per strided slice
            whole = raw.stacked.to(dev, non_blocking=True)
            arrays = {p: whole[:, i] for i, p in enumerate(self._gathered)}
        parts = {h: self._hook_values(arrays, h, dev).to(target) for h in self.cfg.hooks}
        index_B = raw.index_B.to(dev, non_blocking=True) if raw.index_B is not None else _NO_INDEX
        return self._assemble(parts, index_B)

    def _finish_cpu(self, raw: _RawBatch, ring: OutputRing) -> IndexedBatch:
        """CPU: write each hook, converted and scaled, straight into a reused output tensor
        (for a stacked batch, into its slice of the ``[B, H, D]`` tensor: no separate stack)."""
        target, n, hooks = self._target_dtype, raw.n, self.cfg.hooks
        if self._direct:
            stored = _TORCH_DTYPE[self.store.config.dtype]
            index_B = raw.index_B if raw.index_B is not None else _NO_INDEX
            if raw.stacked is not None:
                return IndexedBatch(raw.stacked.view(stored), index_B)
            return self._assemble({h: raw.arrays[acts_path(h)].view(stored) for h in hooks}, index_B)
        if self._stacked:
            stacked = ring.get((n, len(hooks), self.widths[hooks[0]]), target)
            dests = {h: stacked[:, i] for i, h in enumerate(hooks)}
        else:
            dests = {h: ring.get((n, self.widths[h]), target) for h in hooks}
        cpu = torch.device("cpu")
        for h, dest in dests.items():
            dest.copy_(self._hook_values(raw.arrays, h, cpu))
        index_B = _NO_INDEX
        if raw.index_B is not None:
            index_B = ring.get((n,), torch.int64)
            index_B.copy_(raw.index_B)
        if self._stacked:
            return IndexedBatch(stacked, index_B)
        return self._assemble(dests, index_B)

    # ---- options resolved against the store --------------------------------------------------
    def _token_ids_to_drop(self) -> tuple[int, ...]:
        ids = set(self.cfg.drop_token_ids)
        if self.cfg.drop_special:
            special = self.store.config.extra.get("special_token_ids")
            if special is None:
                raise ValueError(
                    f"store {self.store.url} does not record its special token ids (harvested by an older actstore); "
                    "pass drop_token_ids=[...] instead of drop_special"
                )
            ids |= {int(t) for t in special}
        return tuple(sorted(ids))

    def _scales(self, shards: Sequence[int]) -> dict[str, float]:
        if self.cfg.normalize == "none":
            return {}
        if self.cfg.scales is not None:
            missing = [h for h in self.cfg.hooks if h not in self.cfg.scales]
            if missing:
                raise ValueError(f"scales= gives no scale for {', '.join(missing)}")
            return {h: float(self.cfg.scales[h]) for h in self.cfg.hooks}
        if self.cfg.filters:  # the store's statistics count every token; measure the served ones
            mean_sq = self._served_mean_sq_norms(shards)
        else:
            mean_sq = {}
            for hook in self.cfg.hooks:
                stats = self.store.stats(hook)
                if stats.count and stats.sum_sq_norm > 0:
                    mean_sq[hook] = stats.sum_sq_norm / stats.count
        out = {}
        for hook in self.cfg.hooks:
            if mean_sq.get(hook, 0.0) <= 0:
                if self.cfg.follow:
                    raise ValueError("normalize='expected_norm' needs committed statistics; wait for the first shard before following")
                raise EmptyStoreError(f"store {self.store.url} has no statistics for {hook} to normalise by")
            out[hook] = math.sqrt(self.widths[hook] / mean_sq[hook])
        return out

    def _served_mean_sq_norms(self, shards: Sequence[int]) -> dict[str, float]:
        """``E||x||^2`` per hook over the tokens the filters keep, from up to
        :data:`NORM_SAMPLE_TOKENS` tokens in whole chunks spread evenly over the committed
        ``shards`` (all of them when the store is smaller): a function of the store alone."""
        scfg, ct = self.store.config, self._ct
        committed = sorted(set(shards) & set(self.store.committed_shards))
        chunks = chunks_of_shards(committed, scfg.shard_tokens, ct, scfg.n_tokens_target).chunk_K
        if len(chunks) > max(1, NORM_SAMPLE_TOKENS // ct):
            chunks = chunks[np.unique(np.linspace(0, len(chunks) - 1, max(1, NORM_SAMPLE_TOKENS // ct)).round().astype(int))]
        sums = dict.fromkeys(self.cfg.hooks, 0.0)
        kept = 0
        for c in chunks:
            a, b = int(c) * ct, min((int(c) + 1) * ct, scfg.n_tokens_target)
            keep = self._keep(b - a, self.store.positions(a, b) if self.cfg.min_position > 0 else None,
                              self.store.tokens(a, b) if self._drop_ids else None)
            kept += int(keep.sum())
            for hook in self.cfg.hooks:
                x = self.store.read(hook, a, b)[keep].astype(np.float64)
                sums[hook] += float(np.einsum("td,td->", x, x))
        if not kept:
            raise EmptyStreamError(
                f"the filters ({self.cfg.describe_filters()}) keep none of the {len(chunks) * ct:,} tokens sampled from "
                f"{self.store.url} to normalise by; loosen them"
            )
        return {h: v / kept for h, v in sums.items()}

    def _filtered_out(self, epoch: int) -> EmptyStreamError:
        """The error for an epoch in which the filters kept none of this rank's tokens (a stream
        without end would otherwise wait for a batch forever)."""
        c = self.cfg
        ranks = f" of rank {c.rank} of {c.world_size}" if c.world_size > 1 else ""
        return EmptyStreamError(
            f"the filters ({c.describe_filters()}) keep none of the {self.tokens_per_epoch:,} tokens{ranks} in epoch {epoch} "
            f"of {self.store.url}; loosen them"
        )

    def _keep(self, n: int, positions_T: np.ndarray | None, tokens_T: np.ndarray | None) -> np.ndarray:
        """Which of ``n`` tokens pass the filters (positions needed with ``min_position``, token
        ids with dropped ids)."""
        keep_T = np.ones(n, dtype=bool)
        if self.cfg.min_position > 0:
            keep_T &= positions_T >= self.cfg.min_position
        if self._drop_ids:
            keep_T &= ~np.isin(tokens_T, self._drop_ids)
        return keep_T

    def _bytes_per_token(self) -> int:
        per = sum(self.widths[h] * numpy_dtype(self.store.config.dtype).itemsize for h in self.cfg.hooks)
        if self._fp8:
            per += 4 * len(self.cfg.hooks)
        return per + _BLOCK_OVERHEAD_BYTES


def _row_bytes(tail: tuple[int, ...], dtype: np.dtype) -> int:
    """Bytes of one token's row, of shape ``tail``."""
    return math.prod(tail) * dtype.itemsize


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


__all__ = ["Cursor", "EmptyStoreError", "FollowTimeoutError", "IndexedBatch", "Stream", "StreamConfig", "stream"]
