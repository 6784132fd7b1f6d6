"""The stream's order: pure, seeded plans of which rows of which chunks each batch serves.

Every function here is a function of its arguments alone (store sizes, seed, epoch, rank, world,
cursor): no I/O, no clocks, so a resumed or re-sharded stream reproduces the order exactly.

A stream visits a store in *passes*: one per epoch, or, while following a harvest that is still
writing, one per *segment* (a fixed run of consecutive shards) of the first epoch. Each pass is
ordered in two levels:

1. **Chunks.** The pass's inner chunks (the unit of reading, about 1 MiB per hook) are put in a
   seeded random order. Read in that order, they form one sequence of tokens; rank ``r`` of
   ``w`` takes the tokens ``[r n / w, (r + 1) n / w)`` of it, so ranks are disjoint, cover the
   pass, and differ in size by at most one token. A chunk cut by a rank boundary becomes a
   *piece* (a token sub-range of a chunk).
2. **Blocks.** A rank's pieces are cut, in order, into *blocks* of even size that fit the memory
   budget (``memory`` bytes for two blocks: the one being served and the one being read). A
   block is read whole, then its tokens are interleaved (:func:`interleave`): each piece's
   tokens are put in random order and spread evenly over the block's output, piece ``i`` at
   the slots ``(j + u_i) / n_i`` for ``j = 0..n_i - 1`` and a random phase ``u_i``. Any ``B``
   consecutive output tokens then hold about ``B n_i / T`` tokens of piece ``i`` (``T`` the
   block's tokens) with almost no spread, and at most one when a block holds ``B`` or more
   pieces: the batches see as many different contexts as the block holds.

Batches run on across block and epoch boundaries. A batch is a set: its rows from one block
come in store order (:func:`block_order`; faster to read).

Shuffle quality (:func:`same_context_rate`): the fraction of token pairs within a batch that
come from the same context window, over the same fraction for an ideal uniform shuffle of the
whole pass, ``sum_c s_c (s_c - 1) / (N (N - 1))`` for contexts of ``s_c`` tokens
(:func:`ideal_same_context_rate`). A mixing buffer of ``P`` chunks drawn uniformly gives about
``1 / P`` per pair; the interleave gives about ``(B / P - 1) / (B - 1)`` and nearly zero once
``P >= B``.
Shape letters: K pieces, T tokens in a block.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from ..config import StoreConfig

_STREAM_SALT = 0x5EED_AC75  # keeps stream orders apart from other uses of the same user seed


def rng_for(seed: int, *key: int) -> np.random.Generator:
    """An independent generator for one step of one pass (``key``: pass, block, rank...)."""
    return np.random.default_rng([_STREAM_SALT, seed, *key])


@dataclass(frozen=True)
class Pieces:
    """Token sub-ranges of inner chunks, in reading order: chunk ``chunk_K[k]``, tokens
    ``[lo_K[k], hi_K[k])`` counted from the chunk's first token."""

    chunk_K: np.ndarray
    lo_K: np.ndarray
    hi_K: np.ndarray

    def __len__(self) -> int:
        return len(self.chunk_K)

    @property
    def n_tokens(self) -> int:
        return int((self.hi_K - self.lo_K).sum())

    def __getitem__(self, sl: slice | np.ndarray) -> Pieces:
        return Pieces(self.chunk_K[sl], self.lo_K[sl], self.hi_K[sl])


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


@dataclass(frozen=True)
class Plan:
    """Order parameters a resumed stream must share with the original."""

    shards: tuple[int, ...]
    """Committed shards each full epoch covers (the snapshot at creation)."""
    block_chunks: int
    """Chunks per block (from the memory budget)."""
    segment_shards: int
    """Shards per segment of a followed first epoch."""


@dataclass(frozen=True)
class Pass:
    """One pass's blocks for one rank: epoch ``epoch``, segment ``segment`` (0 unless following)."""

    epoch: int
    segment: int
    shards: tuple[int, ...]
    blocks: list[Pieces]


def make_plan(shards: Sequence[int], store_cfg: StoreConfig, memory: int, bytes_per_token: int, world: int) -> tuple[Plan, bool]:
    """The plan for streaming ``shards`` with ``memory`` bytes for two blocks, and whether the
    budget held less than one chunk per block (then blocks are one chunk)."""
    ct = store_cfg.chunk_tokens
    n_chunks = math.ceil(store_cfg.tokens_in(shards) / ct)
    budget_chunks = memory // (2 * ct * bytes_per_token)
    block_chunks = int(max(1, min(budget_chunks, math.ceil(n_chunks / world) + 1)))
    segment_shards = max(1, (world * block_chunks) // (store_cfg.shard_tokens // ct))
    return Plan(tuple(shards), block_chunks, segment_shards), budget_chunks < 1


def passes(
    plan: Plan, store_cfg: StoreConfig, seed: int, epochs: int | None, rank: int, world: int, follow: bool, start: Cursor,
) -> Iterator[Pass]:
    """The passes from the cursor's on: every epoch covers ``plan.shards``, except a followed
    first epoch, which goes segment by segment over all of the store's shards."""
    epoch = start.epoch
    while epochs is None or epoch < epochs:
        if follow and epoch == 0:
            n, step = store_cfg.n_shards, plan.segment_shards
            segments = [tuple(range(a, min(a + step, n))) for a in range(0, n, step)]
        else:
            segments = [plan.shards]
        first = start.segment if epoch == start.epoch else 0
        for segment in range(first, len(segments)):
            shards = segments[segment]
            chunks = chunks_of_shards(shards, store_cfg.shard_tokens, store_cfg.chunk_tokens, store_cfg.n_tokens_target)
            mine = rank_pieces(chunks, seed, (epoch, segment), rank, world)
            yield Pass(epoch, segment, shards, split_blocks(mine, plan.block_chunks))
        epoch += 1


def chunks_of_shards(
    shards: Iterable[int], shard_tokens: int, chunk_tokens: int, n_tokens: int
) -> Pieces:
    """Every inner chunk of ``shards`` (sorted), whole; the store's last chunk may be short."""
    cps = shard_tokens // chunk_tokens
    ids = [s * cps + c for s in sorted(shards) for c in range(cps) if (s * cps + c) * chunk_tokens < n_tokens]
    chunk_K = np.asarray(ids, dtype=np.int64)
    hi_K = np.minimum(chunk_tokens, n_tokens - chunk_K * chunk_tokens)
    return Pieces(chunk_K, np.zeros_like(chunk_K), hi_K)


def rank_pieces(chunks: Pieces, seed: int, pass_key: Sequence[int], rank: int, world: int) -> Pieces:
    """Level 1: the chunks in seeded order, then this rank's share of their tokens."""
    perm = rng_for(seed, *pass_key).permutation(len(chunks))
    ordered = Pieces(chunks.chunk_K[perm], chunks.lo_K[perm], chunks.hi_K[perm])
    ends_K = np.cumsum(ordered.hi_K - ordered.lo_K)
    starts_K = ends_K - (ordered.hi_K - ordered.lo_K)
    total = int(ends_K[-1]) if len(ends_K) else 0
    a, b = rank * total // world, (rank + 1) * total // world
    keep = (ends_K > a) & (starts_K < b)
    lo_K = ordered.lo_K[keep] + np.maximum(0, a - starts_K[keep])
    hi_K = ordered.hi_K[keep] - np.maximum(0, ends_K[keep] - b)
    return Pieces(ordered.chunk_K[keep], lo_K, hi_K)


def split_blocks(pieces: Pieces, max_pieces: int) -> list[Pieces]:
    """Level 2's unit: the fewest consecutive runs of at most ``max_pieces`` pieces (one chunk
    each), of sizes differing by at most one (even blocks keep reading and serving in step)."""
    n_blocks = -(-len(pieces) // max_pieces)
    bounds = [i * len(pieces) // n_blocks for i in range(n_blocks + 1)]
    return [pieces[a:b] for a, b in zip(bounds, bounds[1:], strict=False)]


def interleave(counts_K: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Output order of a block's tokens: piece ``k`` owns rows ``[off_k, off_k + counts_K[k])``
    (offsets = exclusive cumulative sum); returns those row numbers, each once, each piece's
    rows in random order and spread evenly over the output (see the module docstring)."""
    counts_K = np.asarray(counts_K, dtype=np.int64)
    T = int(counts_K.sum())
    if T == 0:
        return np.zeros(0, dtype=np.int64)
    noise_T = rng.random(T)  # each piece's rows go to its slots in the order of these keys
    phase_K = rng.random(len(counts_K))
    n = int(counts_K[0])
    if np.all(counts_K == n):  # the common case: whole chunks of one size
        return _interleave_equal(noise_T.reshape(-1, n), phase_K)
    piece_T = np.repeat(np.arange(len(counts_K)), counts_K)
    offsets_K = np.cumsum(counts_K) - counts_K
    slot_T = np.arange(T) - offsets_K[piece_T]  # 0..n_k - 1 within each piece
    order_T = np.lexsort((noise_T, piece_T))  # rows grouped by piece, random within each
    key_T = (slot_T + phase_K[piece_T]) / counts_K[piece_T]
    return order_T[np.argsort(key_T, kind="stable")]


def _interleave_equal(noise_KN: np.ndarray, phase_K: np.ndarray) -> np.ndarray:
    """:func:`interleave` when every piece has ``N`` tokens, without the global sort: the keys
    ``(j + u_k) / N`` order by slot ``j`` first, then by phase, so the output is the pieces in
    phase order, slot by slot (the same order, tested against the general path)."""
    K, N = noise_KN.shape
    rows_KN = np.argsort(noise_KN, axis=1) + (np.arange(K) * N)[:, None]
    return np.ascontiguousarray(rows_KN[np.argsort(phase_K, kind="stable")].T).reshape(-1)


def block_order(
    rows_T: np.ndarray, counts_K: np.ndarray, n_rows: int, seed: int, key: tuple[int, int, int], rank: int,
    first: int, boundary: int, batch_size: int,
) -> np.ndarray:
    """A block's rows ``rows_T`` (``counts_K`` from each piece, of ``n_rows`` block rows) in
    output order (:func:`interleave`, seeded by the block's ``key`` and the rank) from ``first``
    on, each batch's share (batches start at ``boundary + j * batch_size``) sorted into row order."""
    order_T = rows_T[interleave(counts_K, rng_for(seed, *key, rank))]
    n_rows = max(1, n_rows)
    batch_T = (np.arange(first, len(order_T)) - boundary) // batch_size
    key_T = (batch_T - batch_T[:1]) * n_rows + order_T[first:]
    if len(key_T) and (batch_T[-1] - batch_T[0] + 1) * n_rows <= 2**31:
        key_T = key_T.astype(np.int32)  # sorts faster
    order_T[first:] = np.sort(key_T) % n_rows
    return order_T


# ---- shuffle quality -----------------------------------------------------------------------
def same_context_rate(context_batches: Iterable[np.ndarray]) -> float:
    """Fraction of token pairs inside the same batch that share a context window."""
    same = pairs = 0
    for ctx_B in context_batches:
        _, sizes = np.unique(np.asarray(ctx_B), return_counts=True)
        same += int((sizes * (sizes - 1) // 2).sum())
        pairs += len(ctx_B) * (len(ctx_B) - 1) // 2
    return same / pairs if pairs else 0.0


def ideal_same_context_rate(contexts_N: np.ndarray) -> float:
    """The same fraction for a uniform random shuffle: ``sum_c s_c (s_c - 1) / (N (N - 1))``."""
    _, sizes = np.unique(np.asarray(contexts_N), return_counts=True)
    n = int(sizes.sum())
    return float((sizes * (sizes - 1)).sum()) / (n * (n - 1)) if n > 1 else 0.0
