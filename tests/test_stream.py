"""The shuffled stream on memory, local and S3 (moto on loopback) stores: one shared suite.

Every batch is checked against the values that went into the store (float32 stores, so the
comparison is exact), through the store index the stream reports for each row.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import numpy as np
import pytest
import torch

import actstore
from actstore import CorruptChunkError, EmptyStoreError, FollowTimeoutError, MissingChunkError
from actstore.layout import acts_path, shard_key
from actstore.mapping import FileSlots
from actstore.remote import open_location
from actstore.shardio import ShardedArrayReader
from actstore.stream.plan import ideal_same_context_rate, same_context_rate
from tests.helpers import make_config, make_data, write_shards

HOOK = "blocks.0.hook_resid_post"


def build(url, shards=None, **changes):
    """A float32 store (1000 tokens, chunks of 64, shards of 256 unless changed); returns (cfg, data)."""
    cfg = make_config(**{"dtype": "float32", **changes})
    data = make_data(cfg)
    with actstore.open_store(url, "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards) if shards is None else shards)
    return cfg, data


def as_numpy(acts):
    """A batch (tensor or dict of tensors) as numpy; bfloat16 widened exactly to float32."""
    if isinstance(acts, dict):
        return {k: as_numpy(v) for k, v in acts.items()}
    return (acts.float() if acts.dtype == torch.bfloat16 else acts).numpy()


def drain(s):
    """All (acts, index) of a stream as numpy."""
    return [(as_numpy(b.acts), b.index_B.numpy()) for b in s.indexed()]


def small(cfg, chunks):
    """A memory budget giving blocks of ``chunks`` chunks of one float32 hook."""
    return 2 * chunks * cfg.chunk_tokens * (cfg.width(HOOK) * 4 + 32)


class StreamSuite:
    STORE: dict = {}  # store settings of this variant

    @pytest.fixture
    def url(self, unique):
        raise NotImplementedError

    def build(self, url, shards=None, **changes):
        return build(url, shards, **{**self.STORE, **changes})

    def test_every_token_once_per_epoch_with_the_stored_values(self, url):
        cfg, data = self.build(url)
        s = actstore.stream(url, HOOK, batch_size=48, seed=1, epochs=2, memory=small(cfg, 3))
        batches = drain(s)
        assert all(len(i) == 48 for _, i in batches[:-1]) and len(np.concatenate([i for _, i in batches])) == 2000
        index = np.concatenate([i for _, i in batches])
        first, second = index[:1000], index[1000:]
        assert sorted(first.tolist()) == sorted(second.tolist()) == list(range(1000))
        assert not np.array_equal(first, second)  # each epoch its own order
        for acts, idx in batches:
            np.testing.assert_array_equal(acts, data[HOOK][idx])

    def test_ranks_are_disjoint_and_cover_the_store(self, url):
        cfg, _ = self.build(url)
        parts = [np.concatenate([i for _, i in drain(actstore.stream(url, HOOK, 32, seed=4, rank=r, world_size=3))]) for r in range(3)]
        together = np.concatenate(parts)
        assert len(together) == 1000 and sorted(together.tolist()) == list(range(1000))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1

    def test_same_arguments_same_batches_new_seed_new_order(self, url):
        cfg, _ = self.build(url)
        a = [i for _, i in drain(actstore.stream(url, HOOK, 64, seed=7, memory=small(cfg, 4)))]
        b = [i for _, i in drain(actstore.stream(url, HOOK, 64, seed=7, memory=small(cfg, 4)))]
        c = [i for _, i in drain(actstore.stream(url, HOOK, 64, seed=8, memory=small(cfg, 4)))]
        assert sum(map(len, a)) == sum(map(len, c)) == 1000  # one epoch: every token served
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not np.array_equal(np.concatenate(a), np.concatenate(c))

    @pytest.mark.parametrize("cut", [1, 4, 5, 13, 25])  # mid-block, block ends, inside epoch 2
    def test_resumed_stream_yields_exactly_the_remaining_batches(self, url, cut):
        cfg, _ = self.build(url)
        args = dict(hooks=HOOK, batch_size=64, seed=3, epochs=2, memory=small(cfg, 4))
        full = drain(actstore.stream(url, **args))
        assert sum(len(i) for _, i in full) == 2000  # two epochs of 1000 tokens
        s = actstore.stream(url, **args)
        it = s.indexed()
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(s.state_dict()))  # survives a JSON checkpoint
        it.close()
        resumed = actstore.stream(url, **args)
        resumed.load_state_dict(state)
        rest = drain(resumed)
        assert len(rest) == len(full) - cut
        for (a, i), (b, j) in zip(full[cut:], rest, strict=True):
            np.testing.assert_array_equal(i, j)
            np.testing.assert_array_equal(a, b)

    def test_follow_streams_shards_as_they_commit_and_ends_with_the_harvest(self, url):
        cfg = make_config(**{"dtype": "float32", **self.STORE})
        data = make_data(cfg)
        written = {}

        def harvest():
            with actstore.open_store(url, "a", config=cfg) as w:
                for shard in range(cfg.n_shards):
                    time.sleep(0.4)
                    write_shards(w, cfg, data, [shard])
                    written[shard] = time.monotonic()

        with actstore.open_store(url, "w", config=cfg):
            pass  # an empty store, as a harvest creates it
        writer = threading.Thread(target=harvest)
        writer.start()
        try:
            s = actstore.stream(url, HOOK, 32, seed=2, follow=True, poll_seconds=0.02, memory=small(cfg, 4), follow_timeout=30)
            got, first_batch_at = [], None
            for b in s.indexed():
                first_batch_at = first_batch_at or time.monotonic()
                np.testing.assert_array_equal(b.acts.numpy(), data[HOOK][b.index_B.numpy()])
                got.append(b.index_B.numpy())
        finally:
            writer.join()
        assert sorted(np.concatenate(got).tolist()) == list(range(1000))
        assert first_batch_at < written[cfg.n_shards - 1]  # served before the harvest finished

    def test_shuffle_quality_within_twice_ideal(self, url):
        """Same-context pairs per batch over the ideal uniform shuffle's rate, on a store whose
        positions give each token's context: blocks of >= batch-size chunks reach it with an
        eighth of the store in memory; a few-chunk mixing buffer (SAELens-like) does not."""
        cfg, data = self.build(url, n_tokens_target=16384, context_size=64, hook_dims={h: 4 for h in make_config().hooks},
                          chunk_tokens=64, shard_tokens=1024)
        contexts = np.arange(16384) - data["positions"]

        def ratio(chunks):
            s = actstore.stream(url, HOOK, batch_size=128, seed=0, memory=2 * chunks * 64 * (4 * 4 + 32))
            assert s.block_tokens == chunks * 64
            batches = [contexts[i] for _, i in drain(s)]
            assert sum(map(len, batches)) == 16384  # the whole store served
            return same_context_rate(batches) / ideal_same_context_rate(contexts)

        good = ratio(128)  # 1/2 of the store per block
        assert good <= 2.0, good
        assert ratio(4) > 10  # the metric does see a small buffer

    def test_corrupt_or_missing_chunk_is_an_error_not_zeros(self, url):
        cfg, _ = self.build(url)
        loc = open_location(url)
        path = loc.path(shard_key(acts_path(HOOK), 1, 2))
        blob = bytearray(loc.fs.cat_file(path))
        blob[100] ^= 0x01
        loc.fs.pipe_file(path, bytes(blob))
        with pytest.raises(CorruptChunkError):
            list(actstore.stream(url, HOOK, 64))
        loc.fs.rm(path)
        with pytest.raises(MissingChunkError):
            list(actstore.stream(url, HOOK, 64))


class TestMemoryStream(StreamSuite):
    @pytest.fixture
    def url(self, unique):
        return f"memory://stream-{unique}"


class TestLocalStream(StreamSuite):
    @pytest.fixture
    def url(self, tmp_path, unique):
        return str(tmp_path / f"stream-{unique}")


class TestLocalMappedStream(StreamSuite):
    """Uncompressed local chunks: gathered straight from the mapped files."""

    STORE = {"codec": "none"}

    @pytest.fixture
    def url(self, tmp_path, unique):
        return str(tmp_path / f"stream-{unique}")

    def test_chunks_are_mapped_not_copied(self, url):
        self.build(url)
        assert actstore.stream(url, HOOK, 64).arrays.mapped == {acts_path(HOOK)}
        assert actstore.stream(url, HOOK, 64, mmap=False).arrays.mapped == set()


class TestS3Stream(StreamSuite):
    @pytest.fixture
    def url(self, s3_server, unique):
        return f"s3://actstore-test/stream-{unique}"


# ---- options and bad input (local stores) ---------------------------------------------------
@pytest.fixture
def url(tmp_path, unique):
    return str(tmp_path / f"stream-{unique}")


def test_filters_drop_early_positions_and_chosen_tokens(url):
    cfg, data = build(url, extra={"special_token_ids": [7, 11]})
    data_tokens = data["tokens"]
    banned = np.unique(data_tokens[:50])[:3].tolist()
    index = np.concatenate([i for _, i in drain(actstore.stream(url, HOOK, 16, min_position=2, drop_token_ids=banned))])
    expected = [i for i in range(1000) if data["positions"][i] >= 2 and data_tokens[i] not in banned]
    assert sorted(index.tolist()) == expected
    s = actstore.stream(url, HOOK, 16, drop_special=True, drop_token_ids=[5])
    assert s.filters.drop_ids == (5, 7, 11)


def test_drop_special_needs_recorded_ids(url):
    build(url)
    with pytest.raises(ValueError, match="drop_token_ids"):
        actstore.stream(url, HOOK, 16, drop_special=True)


def test_expected_norm_scaling_uses_the_store_statistics(url):
    cfg, data = build(url)
    x = data[HOOK]
    scale = np.sqrt(x.shape[1] / np.mean(np.sum(x.astype(np.float64) ** 2, axis=1)))
    s = actstore.stream(url, HOOK, 100, normalize="expected_norm")
    assert s.scales[HOOK] == pytest.approx(scale, rel=1e-6)
    acts = np.concatenate([a for a, _ in drain(s)])
    assert len(acts) == 1000
    assert np.mean(np.sum(acts.astype(np.float64) ** 2, axis=1)) == pytest.approx(x.shape[1], rel=1e-5)


def test_expected_norm_with_filters_measures_the_served_tokens(tmp_path, monkeypatch):
    """BOS with 1000x the squared norm (as in real middle layers) must not shrink the served
    tokens: with ``min_position=1`` they come out at E||x||^2 = D, exactly for a store the
    sample covers, closely from a sample of a bigger one."""
    cfg = make_config(dtype="float32")
    data = make_data(cfg)
    bos = data["positions"] == 0
    for hook in cfg.hooks:
        data[hook][bos] *= np.sqrt(1000.0)
    url = str(tmp_path / "s")
    with actstore.open_store(url, "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards))
    hooks = list(cfg.hooks)[:2]
    s = actstore.stream(url, hooks, 100, normalize="expected_norm", min_position=1, stack=True)
    acts = np.concatenate([a for a, _ in drain(s)]).astype(np.float64)
    assert len(acts) == int((~bos).sum())
    for i in range(len(hooks)):
        assert np.mean(np.sum(acts[:, i] ** 2, axis=1)) == pytest.approx(cfg.model.d_model, rel=1e-6)
    monkeypatch.setattr(sys.modules["actstore.stream.normalize"], "NORM_SAMPLE_TOKENS", 256)  # 4 of the 16 chunks
    sampled = actstore.stream(url, hooks[0], 100, normalize="expected_norm", min_position=1)
    assert sampled.scales[hooks[0]] == pytest.approx(s.scales[hooks[0]], rel=0.05)
    assert sampled.scales[hooks[0]] != s.scales[hooks[0]]
    unfiltered = actstore.stream(url, hooks[0], 100, normalize="expected_norm")  # store statistics, BOS included
    assert unfiltered.scales[hooks[0]] < 0.2 * s.scales[hooks[0]]


def test_several_hooks_stacked_dict_and_stored_dtypes(url):
    cfg, data = build(url, dtype="bfloat16")
    hooks = list(cfg.hooks)
    stacked = next(actstore.stream(url, hooks, 64, dtype=None).indexed())
    assert stacked.acts.shape == (64, 3, 48) and stacked.acts.dtype == torch.bfloat16
    for h, hook in enumerate(hooks):
        ref = torch.from_numpy(data[hook][stacked.index_B.numpy()]).to(torch.bfloat16)
        assert torch.equal(stacked.acts[:, h], ref)
    as_dict = next(iter(actstore.stream(url, hooks[:2], 64, stack=False)))
    assert set(as_dict) == set(hooks[:2]) and as_dict[hooks[0]].dtype == torch.float32
    one = next(iter(actstore.stream(url, [hooks[0]], 64)))
    assert one.shape == (64, 1, 48)  # a list of hooks always stacks; one name gives [B, D]


def test_fp8_store_streams_dequantized_values(url):
    cfg, data = build(url, dtype="float8_e4m3fn")
    b = next(actstore.stream(url, HOOK, 64).indexed())
    store = actstore.open_store(url)
    ref = np.stack([store.read(HOOK, i, i + 1)[0] for i in b.index_B.tolist()])
    np.testing.assert_array_equal(b.acts.numpy(), ref)


def test_endless_stream_serves_full_batches_epoch_after_epoch(url):
    cfg, _ = build(url)
    s = actstore.stream(url, HOOK, 96, epochs=None, memory=small(cfg, 4))
    it = s.indexed()
    index = np.concatenate([next(it).index_B.numpy() for _ in range(40)])  # 3840 tokens, 3.84 epochs
    for e in range(3):
        assert sorted(index[e * 1000 : (e + 1) * 1000].tolist()) == list(range(1000))
    assert s.cursor.epoch == 3 and s.cursor.batches == 40


def test_partial_store_streams_committed_shards_and_state_checks_arguments(url):
    cfg, _ = build(url, shards=[0, 2])
    s = actstore.stream(url, HOOK, 64, drop_last=True)
    index = np.concatenate([i for _, i in drain(s)])
    assert len(index) == 512 - 512 % 64 and set(index.tolist()) <= set(range(256)) | set(range(512, 768))
    other = actstore.stream(url, HOOK, 64, seed=1, drop_last=True)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(s.state_dict())


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(hooks="blocks.9.hook_resid_post", batch_size=8), KeyError, "not in this store"),
        (dict(hooks=["blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"], batch_size=8), ValueError, "stack=False"),
        (dict(hooks=HOOK, batch_size=5000), ValueError, "larger than"),
        (dict(hooks=HOOK, batch_size=600, world_size=2), ValueError, "larger than"),
        (dict(hooks=HOOK, batch_size=0), ValueError, "positive"),
        (dict(hooks=HOOK, batch_size=8, memory="lots"), ValueError, "2GiB"),
    ],
)
def test_bad_arguments_are_clear_errors(url, kwargs, error, match):
    build(url, hook_dims={"blocks.1.hook_mlp_out": 32})
    with pytest.raises(error, match=match):
        actstore.stream(url, **kwargs)


def test_nothing_committed_is_an_error_and_follow_times_out(url):
    cfg = make_config(dtype="float32")
    with actstore.open_store(url, "w", config=cfg):
        pass
    with pytest.raises(EmptyStoreError, match="follow=True"):
        actstore.stream(url, HOOK, 8)
    s = actstore.stream(url, HOOK, 8, follow=True, poll_seconds=0.02, follow_timeout=0.2)
    with pytest.raises(FollowTimeoutError, match="harvest still running"):
        next(iter(s))


def test_kept_batches_and_views_are_never_overwritten(url):
    """Output tensors are reused only once the consumer has let go of them (and of any view)."""
    cfg, data = build(url)
    kept = []
    for b in actstore.stream(url, HOOK, 32, epochs=3, prefetch=1, dtype=None).indexed():
        kept.append((b.acts[:, :5], b.index_B))  # views of the batch, the batch itself dropped
    assert sum(len(idx) for _, idx in kept) == 3000  # three epochs of 1000 tokens
    for acts, idx in kept:
        np.testing.assert_array_equal(acts.numpy(), data[HOOK][idx.numpy(), :5])


@pytest.mark.parametrize(
    "store, options",
    [
        (dict(dtype="float32"), dict(hooks=HOOK, min_position=2, drop_token_ids=[3, 4])),
        (dict(dtype="bfloat16"), dict(hooks=list(make_config().hooks), dtype=None)),  # all hooks in one gather
        (dict(dtype="bfloat16"), dict(hooks=list(make_config().hooks), normalize="expected_norm")),  # ... then scaled
        (dict(dtype="float8_e4m3fn"), dict(hooks=list(make_config().hooks)[:2], stack=False)),  # scales mapped too
    ],
)
def test_mapped_read_and_compressed_stores_give_the_same_batches(tmp_path, monkeypatch, store, options):
    """The order is a function of sizes and seed only: mapping or copying the chunks (keeping
    the mapped pages or not), and the codec, change nothing in what is served."""
    cfg, data = build(str(tmp_path / "none"), codec="none", **store)
    build(str(tmp_path / "zstd"), codec="zstd", **store)
    args = dict(batch_size=48, seed=5, epochs=2, memory=small(cfg, 3), **options)
    mapped = actstore.stream(str(tmp_path / "none"), **args)
    assert mapped.arrays.mapped
    assert mapped.arrays.combined == (isinstance(options["hooks"], list) and "stack" not in options and store["dtype"] == "bfloat16")
    runs = [drain(mapped), drain(actstore.stream(str(tmp_path / "none"), mmap=False, **args)),
            drain(actstore.stream(str(tmp_path / "zstd"), **args))]
    with monkeypatch.context() as m:  # a store "larger than memory": each block's pages released once served
        m.setattr(actstore.mapped, "physical_memory_bytes", lambda: 1)
        runs.append(drain(actstore.stream(str(tmp_path / "none"), **args)))
    kept = np.ones(cfg.n_tokens_target, dtype=bool)  # the tokens the filters let through
    if "min_position" in options:
        kept &= data["positions"] >= options["min_position"]
    if "drop_token_ids" in options:
        kept &= ~np.isin(data["tokens"], options["drop_token_ids"])
    assert sum(len(i) for _, i in runs[0]) == 2 * kept.sum()  # two epochs of them
    for other in runs[1:]:
        assert len(other) == len(runs[0])
        for (a, i), (b, j) in zip(runs[0], other, strict=True):
            np.testing.assert_array_equal(i, j)
            for key in a if isinstance(a, dict) else [None]:
                np.testing.assert_array_equal(*(x[key] if key else x for x in (a, b)))
    if store["dtype"] == "float32":
        for acts, idx in runs[0]:
            np.testing.assert_array_equal(acts, data[HOOK][idx])


def test_rows_of_a_batch_come_in_store_order(url):
    """A batch is a set: its rows from one block are read in store order."""
    cfg, _ = build(url)
    batches = [i for _, i in drain(actstore.stream(url, HOOK, 40, seed=2, epochs=2))]  # one block per epoch
    assert len(batches) == 50 and all(np.all(np.diff(i) > 0) for i in batches)


def test_mapped_chunks_are_checked_and_paged_in_once_for_every_epoch(tmp_path, monkeypatch):
    """A store that fits in memory stays mapped: later epochs (and later iterations of the same
    stream) go straight to the gather; a larger one pages each block in again."""
    cfg, data = build(str(tmp_path / "s"), codec="none")
    checked = []  # a chunk's first use checks its CRC (which pages it in); later uses only page it in again
    check_crc, populate = ShardedArrayReader.check_crc, FileSlots.populate
    cps = cfg.shard_tokens // cfg.chunk_tokens
    monkeypatch.setattr(ShardedArrayReader, "check_crc",
                        lambda self, shard, c, *a: (checked.append(shard * cps + c), check_crc(self, shard, c, *a)))
    monkeypatch.setattr(FileSlots, "populate", lambda self, *a: (checked.append(-1), populate(self, *a)))
    s = actstore.stream(str(tmp_path / "s"), HOOK, 40, epochs=3, memory=small(cfg, 4))
    n_chunks = -(-cfg.n_tokens_target // cfg.chunk_tokens)
    served = drain(s)
    assert sum(len(i) for _, i in served) == 3000  # three epochs of 1000 tokens
    assert sorted(checked) == list(range(n_chunks))  # 3 epochs of 4 blocks, each chunk checked once
    for acts, idx in served:
        np.testing.assert_array_equal(acts, data[HOOK][idx])
    checked.clear()
    monkeypatch.setattr(actstore.mapped, "physical_memory_bytes", lambda: 1)
    drain(actstore.stream(str(tmp_path / "s"), HOOK, 40, epochs=3, memory=small(cfg, 4)))
    assert len(checked) == 3 * n_chunks  # released after each block: paged in again every epoch
