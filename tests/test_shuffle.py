"""Invariants of the pure order functions (actstore.stream.plan), on sizes alone: no store involved."""

from __future__ import annotations

import numpy as np
import pytest

from actstore.stream.plan import (
    chunks_of_shards,
    ideal_same_context_rate,
    interleave,
    rank_pieces,
    rng_for,
    same_context_rate,
    split_blocks,
)


def tokens_of(pieces, chunk_tokens):
    return np.concatenate([np.arange(c * chunk_tokens + lo, c * chunk_tokens + hi) for c, lo, hi in zip(pieces.chunk_K, pieces.lo_K, pieces.hi_K, strict=True)])


def test_chunks_of_shards_cover_committed_tokens_only():
    p = chunks_of_shards([2, 0], shard_tokens=256, chunk_tokens=64, n_tokens=600)
    assert p.chunk_K.tolist() == [0, 1, 2, 3, 8, 9]
    assert p.hi_K.tolist() == [64, 64, 64, 64, 64, 600 - 9 * 64]
    assert sorted(tokens_of(p, 64).tolist()) == list(range(256)) + list(range(512, 600))


@pytest.mark.parametrize("world", [1, 2, 3, 7])
def test_ranks_are_disjoint_cover_everything_and_balanced(world):
    chunks = chunks_of_shards(range(5), shard_tokens=256, chunk_tokens=64, n_tokens=1200)
    parts = [tokens_of(rank_pieces(chunks, 3, (0, 0), r, world), 64) for r in range(world)]
    everything = np.concatenate(parts)
    assert len(everything) == len(set(everything.tolist())) == 1200
    assert max(map(len, parts)) - min(map(len, parts)) <= 1


def test_orders_are_pure_functions_of_seed_and_pass():
    chunks = chunks_of_shards(range(8), 256, 64, 2048)
    a = rank_pieces(chunks, 5, (1, 0), 0, 2)
    b = rank_pieces(chunks, 5, (1, 0), 0, 2)
    assert np.array_equal(a.chunk_K, b.chunk_K) and np.array_equal(a.lo_K, b.lo_K)
    assert not np.array_equal(a.chunk_K, rank_pieces(chunks, 6, (1, 0), 0, 2).chunk_K)  # new seed
    assert not np.array_equal(a.chunk_K, rank_pieces(chunks, 5, (2, 0), 0, 2).chunk_K)  # new epoch


def test_blocks_keep_order_and_size():
    chunks = chunks_of_shards(range(4), 256, 64, 1000)
    mine = rank_pieces(chunks, 0, (0, 0), 0, 1)
    blocks = split_blocks(mine, 5)
    assert [len(b) for b in blocks] == [4, 4, 4, 4]
    assert np.array_equal(np.concatenate([b.chunk_K for b in blocks]), mine.chunk_K)


def test_interleave_is_a_permutation_spread_evenly():
    counts = np.array([100, 100, 100, 100, 37, 0, 63])
    order = interleave(counts, rng_for(0, 1))
    assert sorted(order.tolist()) == list(range(counts.sum()))
    offsets = np.cumsum(counts) - counts
    piece = np.searchsorted(offsets, order, side="right") - 1
    # any window of 50 output tokens holds each full piece's share (50 * 100 / 500 = 10) +- 1
    for start in range(0, 450, 25):
        share = np.bincount(piece[start : start + 50], minlength=len(counts))[:4]
        assert np.all(np.abs(share - 10) <= 1), share
    # within a piece, rows come in a random (not sorted) order
    assert not np.array_equal(np.sort(order[piece == 0]), order[piece == 0])


def test_interleave_puts_each_piece_at_most_once_per_batch_when_the_block_has_enough_pieces():
    counts = np.full(256, 64)
    order = interleave(counts, rng_for(1, 2))
    piece = order // 64
    for start in range(0, len(order), 128):  # batches of 128 <= 256 pieces
        assert np.bincount(piece[start : start + 128]).max() <= 1


def test_same_context_rate_matches_hand_counts():
    assert same_context_rate([np.array([1, 1, 2, 3]), np.array([4, 4, 4])]) == pytest.approx((1 + 3) / (6 + 3))
    contexts = np.repeat(np.arange(10), 4)  # 10 contexts of 4 tokens
    assert ideal_same_context_rate(contexts) == pytest.approx(10 * 4 * 3 / (40 * 39))


@pytest.mark.parametrize("k, n", [(1, 5), (7, 64), (130, 1024)])
def test_equal_pieces_fast_path_matches_the_general_sort(k, n, monkeypatch):
    from actstore.stream import plan as shuffle

    fast = interleave(np.full(k, n), rng_for(9, k))
    monkeypatch.setattr(shuffle.np, "all", lambda _: False)  # force the general path
    assert np.array_equal(fast, interleave(np.full(k, n), rng_for(9, k)))


@pytest.mark.parametrize("world, follow", [(1, False), (3, False), (2, True)])
def test_passes_cover_every_token_once_per_epoch_and_resume_where_they_stopped(world, follow):
    """The whole plan is a function of its inputs: every pass of every rank, from the start or
    from a cursor, without touching a store."""
    from actstore.stream.plan import Cursor, make_plan, passes
    from tests.helpers import make_config

    cfg = make_config()  # 1000 tokens, shards of 256, chunks of 64
    plan, starved = make_plan(range(cfg.n_shards), cfg, memory=2 * 3 * 64 * 100, bytes_per_token=100, world=world)
    assert (plan.block_chunks, starved) == (3, False)

    def run(rank, start=None):
        start = start or Cursor()
        return list(passes(plan, cfg, seed=4, epochs=2, rank=rank, world=world, follow=follow, start=start))

    for epoch in range(2):
        served = [tokens_of(blk, cfg.chunk_tokens) for r in range(world) for p in run(r) if p.epoch == epoch for blk in p.blocks]
        assert sorted(np.concatenate(served).tolist()) == list(range(cfg.n_tokens_target))
    full = run(world - 1)
    assert [(p.epoch, p.segment) for p in full] == [(p.epoch, p.segment) for p in run(world - 1)]  # pure: same again
    last = full[-1]
    tail = run(world - 1, Cursor(epoch=last.epoch, segment=last.segment, block=1))
    assert len(tail) == 1 and all(
        np.array_equal(a.chunk_K, b.chunk_K) and np.array_equal(a.lo_K, b.lo_K) for a, b in zip(tail[0].blocks, last.blocks, strict=True)
    )
