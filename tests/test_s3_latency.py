"""Streaming from S3 with a region's latency: every request to the loopback server (moto) waits
20 ms in a proxy (``benchmarks/s3proxy.py``) before it is answered.

The batches are exactly those of the same store on local disk (also with filters, and resumed),
every shard index is fetched once though the loader asks for the next blocks' early, and the
reads overlap: several requests in flight at once, those of two blocks among them.
"""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

import actstore
from actstore.layout import acts_path
from benchmarks.s3proxy import S3Proxy
from tests.helpers import make_config, make_data, write_shards

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
DELAY = 0.02


def chunks_memory(cfg: actstore.StoreConfig, chunks: int, hooks: int) -> int:
    """A memory budget giving blocks of ``chunks`` chunks of ``hooks`` float32 hooks."""
    return 2 * chunks * cfg.chunk_tokens * (hooks * cfg.width(HOOKS[0]) * 4 + 32)


@pytest.fixture(params=["zstd", "none"])
def stores(request, s3_server, tmp_path, unique):
    """The same float32 store (4 shards of 4 chunks) on local disk and on S3; yields (cfg, local url, S3 url)."""
    cfg = make_config(dtype="float32", codec=request.param)
    data = make_data(cfg)
    urls = str(tmp_path / "local"), f"s3://actstore-test/latency-{unique}"
    for url in urls:
        with actstore.open_store(url, "w", config=cfg) as w:
            write_shards(w, cfg, data, range(cfg.n_shards))
    return cfg, *urls


@pytest.fixture
def proxy(s3_server):
    with S3Proxy(s3_server, delay=DELAY) as p:
        yield p


def through(proxy: S3Proxy, url: str) -> actstore.Store:
    return actstore.open_store(url, storage_options={"endpoint_url": proxy.url, "skip_instance_cache": True})


def batches(s) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(b.acts.numpy(), b.index_B.numpy()) for b in s.indexed()]


def assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for (acts, index), (acts_ref, index_ref) in zip(got, want, strict=True):
        np.testing.assert_array_equal(index, index_ref)
        np.testing.assert_array_equal(acts, acts_ref)


def test_batches_through_the_latency_are_the_local_stores(stores, proxy):
    cfg, local, s3 = stores
    kw = dict(batch_size=96, seed=3, epochs=2, memory=chunks_memory(cfg, 3, len(HOOKS)))
    store = through(proxy, s3)
    proxy.log = []
    got = batches(actstore.stream(store, HOOKS, **kw))
    assert_same(got, batches(actstore.stream(local, HOOKS, **kw)))
    assert proxy.max_in_flight > 1
    # indexes were asked for ahead of the blocks, and by the blocks' loads: each fetched once all the same
    suffixes = Counter(line.split()[2] for line in proxy.log if "bytes=-" in line)
    assert len(suffixes) == len(HOOKS) * cfg.n_shards and set(suffixes.values()) == {1}

    # filters (the order then waits for each block's data) and a resumed stream
    kw.update(min_position=2, drop_token_ids=[int(t) for t in range(0, 50_000, 7)])
    want = batches(actstore.stream(local, HOOKS, **kw))
    assert_same(batches(actstore.stream(through(proxy, s3), HOOKS, **kw)), want)
    first = actstore.stream(through(proxy, s3), HOOKS, **kw)
    it = first.indexed()
    head = [(b.acts.numpy().copy(), b.index_B.numpy().copy()) for b in itertools.islice(it, 5)]
    state = first.state_dict()
    it.close()
    resumed = actstore.stream(through(proxy, s3), HOOKS, **kw)
    resumed.load_state_dict(state)
    assert_same(head + batches(resumed), want)


def test_the_next_blocks_reads_go_out_while_this_ones_arrive(stores, proxy):
    """Blocks of one chunk of one hook: each is one ranged read, so requests in flight together
    (indexes already cached) are reads of two blocks at once, the next one's round trip overlapped."""
    cfg, _, s3 = stores
    store = through(proxy, s3)
    store.array_reader(acts_path(HOOKS[0])).shard_indexes(range(cfg.n_shards))
    proxy.reset_counts()
    s = actstore.stream(store, HOOKS[0], batch_size=64, epochs=2, memory=chunks_memory(cfg, 1, 1))
    assert s.block_tokens == cfg.chunk_tokens
    n = sum(len(b) for b in s)
    assert n == 2 * cfg.n_tokens_target
    assert proxy.requests == 2 * -(-cfg.n_tokens_target // cfg.chunk_tokens)  # one read a block, nothing else
    assert proxy.max_in_flight >= 2
