"""Shards in flight, end to end on the CPU: the batch plan, the pipelined writer and the host ring.

- :func:`pipelines.batches.plan_batches` against a brute-force reference (window ``w`` of a
  span goes to batch ``w // B`` at offset ``w - span.first``) over many random span sets;
- :class:`actstore.writer.StoreWriter` with several shards in flight (``submit_shard``) stores
  the same bytes, commits and statistics as one shard at a time, commits in submission order
  whatever order the objects finish in, never holds more than ``max_in_flight`` shards, and a
  failed store fails its shard and those in flight behind it (uncommitted, objects removed);
- :class:`pipelines.transfer.ShardRing` on the CPU: rows land at their offsets with their tokens,
  ``take`` blocks while every buffer is lent, and non-finite batches are caught per shard.

Two regressions found while writing these: a shard being committed could be submitted again (and
its statistics counted twice), and a failed commit left the shard's objects behind.
"""

from __future__ import annotations

import errno
import itertools
import json
import random
import threading
import time

import numpy as np
import pytest
import torch

import actstore
from actstore.errors import StoreAccessError
from actstore.layout import POSITIONS, TOKENS, acts_path, array_specs, shard_key
from actstore.writer import StoreWriter
from pipelines.batches import Span, plan_batches
from pipelines.transfer import NonFiniteActivationsError, ShardRing
from tests.helpers import HOOKS, folder_bytes, make_config, make_data


# ---- plan_batches -----------------------------------------------------------------------------
def reference_plan(spans: list[Span], batch_size: int) -> set[tuple[int, int, int, int]]:
    """``(batch, window, shard, offset in shard)`` for every window of every span."""
    return {(w // batch_size, w, s.shard, w - s.first) for s in spans for w in range(s.first, s.stop)}


def random_spans(rng: random.Random, n_windows: int) -> list[Span]:
    """Shards of random sizes (some empty, some tiny, some large) tiling ``[0, n_windows)``,
    a random subset of them kept, in shuffled order."""
    spans, first, shard = [], 0, 0
    while first < n_windows:
        size = rng.choice([0, 1, 1, 2, 3, rng.randint(1, 12), rng.randint(10, 40)])
        stop = min(first + size, n_windows)
        spans.append(Span(shard, first, stop))
        first, shard = stop, shard + 1
    kept = [s for s in spans if rng.random() < rng.choice([0.3, 0.7, 1.0])]
    rng.shuffle(kept)
    return kept


def test_plan_batches_matches_brute_force_reference():
    rng = random.Random(1234)
    n_cases = 0
    for _ in range(3000):
        batch_size = rng.randint(1, 7)
        n_windows = rng.randint(1, 80)
        spans = random_spans(rng, n_windows)
        plan = list(plan_batches(spans, n_windows, batch_size))
        got = set()
        for batch in plan:
            g = batch.index
            assert batch.first == g * batch_size
            assert batch.size == min(batch_size, n_windows - g * batch_size) > 0
            assert batch.segments, f"batch {g} holds no pending window"
            for seg in batch.segments:
                assert 0 <= seg.lo < seg.hi <= batch.size
            assert all(a.hi <= b.lo for a, b in itertools.pairwise(batch.segments)), batch.segments
            for seg in batch.segments:
                for i in range(seg.lo, seg.hi):
                    row = (g, batch.first + i, seg.shard, seg.offset + i - seg.lo)
                    assert row not in got
                    got.add(row)
        indices = [b.index for b in plan]
        assert indices == sorted(set(indices)), indices  # increasing, no duplicates
        want = reference_plan(spans, batch_size)
        assert got == want, (spans, n_windows, batch_size)
        assert set(indices) == {g for g, *_ in want}  # exactly the batches holding a pending window
        n_cases += bool(spans)
    assert n_cases > 1000


def test_plan_batches_simple_case_by_hand():
    # windows 0..9, B=4: batches [0,4) [4,8) [8,10); shard 1 = windows 3..6, shard 3 = window 9
    plan = list(plan_batches([Span(3, 9, 10), Span(1, 3, 7)], n_windows=10, batch_size=4))
    assert [(b.index, b.first, b.size) for b in plan] == [(0, 0, 4), (1, 4, 4), (2, 8, 2)]
    assert [(s.shard, s.lo, s.hi, s.offset) for s in plan[0].segments] == [(1, 3, 4, 0)]
    assert [(s.shard, s.lo, s.hi, s.offset) for s in plan[1].segments] == [(1, 0, 3, 1)]
    assert [(s.shard, s.lo, s.hi, s.offset) for s in plan[2].segments] == [(3, 1, 2, 0)]
    with pytest.raises(ValueError):
        list(plan_batches([Span(0, 0, 3)], 3, 0))


# ---- StoreWriter with shards in flight ----------------------------------------------------------
def shard_inputs(cfg, data, s):
    a, b = cfg.shard_range(s)
    return dict(tokens=data["tokens"][a:b], positions=data["positions"][a:b], acts={h: data[h][a:b] for h in cfg.hooks})


def root_attrs(url) -> dict:
    attrs = dict(actstore.open_store(str(url)).attrs)
    attrs.pop("store_id", None)
    return attrs


def test_shards_in_flight_store_the_same_as_one_at_a_time(tmp_path):
    cfg = make_config()
    data = make_data(cfg)
    order = [3, 0, 2, 1]  # shard 3 is the short last one
    with StoreWriter(str(tmp_path / "serial"), cfg, max_in_flight=1) as w:
        for s in order:
            w.write_shard(s, **shard_inputs(cfg, data, s))
            assert s in w.committed_shards
    with StoreWriter(str(tmp_path / "inflight"), cfg, io_threads=2, store_threads=4, max_in_flight=3) as w:
        futures = [w.submit_shard(s, **shard_inputs(cfg, data, s)) for s in order]
        assert [f.result(timeout=30) for f in futures] == [None] * 4
        assert w.committed_shards == {0, 1, 2, 3}

    serial, inflight = folder_bytes(tmp_path / "serial"), folder_bytes(tmp_path / "inflight")
    serial.pop("zarr.json"), inflight.pop("zarr.json")  # the root holds each store's random id
    assert serial == inflight  # every shard object, array metadata and commit record byte-identical
    assert any("/c/3/" in k for k in serial)
    a, b = root_attrs(tmp_path / "serial"), root_attrs(tmp_path / "inflight")
    assert a == b and a["n_tokens"] == 1000 and a["n_shards_committed"] == 4
    assert a["stats"][HOOKS[0]]["count"] == 1000
    store = actstore.open_store(str(tmp_path / "inflight"))
    assert store.committed_shards == [0, 1, 2, 3] and store.is_complete
    np.testing.assert_array_equal(store.tokens(), data["tokens"])


def test_commits_follow_submission_order_when_an_earlier_shard_stores_slower(tmp_path):
    cfg = make_config()
    data = make_data(cfg)
    others_stored, commits, seen_at_release = threading.Event(), [], []
    stored = {s: 0 for s in range(4)}
    lock = threading.Lock()
    with StoreWriter(str(tmp_path / "s"), cfg, io_threads=2, store_threads=16, max_in_flight=4) as w:
        put, commit = w._put_shard, w._commit

        def slow_first_put(path, shard, pieces):
            if shard == 2:  # submitted first: its objects wait until every later shard's are stored
                assert others_stored.wait(10)
                with lock:
                    seen_at_release.append(list(commits))
            put(path, shard, pieces)
            with lock:
                stored[shard] += 1
                if all(stored[s] == len(array_specs(cfg)) for s in (0, 1, 3)):
                    others_stored.set()

        def recorded_commit(shard, stats):
            commit(shard, stats)
            commits.append(shard)

        w._put_shard, w._commit = slow_first_put, recorded_commit
        futures = [w.submit_shard(s, **shard_inputs(cfg, data, s)) for s in [2, 0, 3, 1]]
        for f in futures:
            f.result(timeout=30)
    assert seen_at_release and all(c == [] for c in seen_at_release)  # shards 0, 1, 3 stored, none committed
    assert commits == [2, 0, 3, 1]
    assert actstore.open_store(str(tmp_path / "s")).committed_shards == [0, 1, 2, 3]


@pytest.mark.parametrize("max_in_flight", [1, 3])
def test_at_most_max_in_flight_shards_between_submission_and_commit(tmp_path, max_in_flight):
    cfg = make_config(n_tokens_target=2048, shard_tokens=256)  # 8 shards
    data = make_data(cfg)
    lock, in_flight, peak, full = threading.Lock(), set(), [0], threading.Event()
    with StoreWriter(str(tmp_path / "s"), cfg, io_threads=2, store_threads=16, max_in_flight=max_in_flight) as w:
        put, commit = w._put_shard, w._commit

        def tracked_put(path, shard, pieces):
            with lock:
                in_flight.add(shard)
                peak[0] = max(peak[0], len(in_flight))
                if len(in_flight) >= max_in_flight:
                    full.set()
            full.wait(5)  # hold the first shards' objects until the bound is reached
            time.sleep(0.01)
            put(path, shard, pieces)

        def tracked_commit(shard, stats):
            commit(shard, stats)
            with lock:
                in_flight.discard(shard)

        w._put_shard, w._commit = tracked_put, tracked_commit
        futures = []
        for s in range(cfg.n_shards):
            futures.append(w.submit_shard(s, **shard_inputs(cfg, data, s)))
            if s >= max_in_flight:  # submission blocked until a slot freed: an earlier shard committed
                assert futures[s - max_in_flight].done()
        for f in futures:
            f.result(timeout=30)
    assert full.is_set() and peak[0] == max_in_flight
    assert not in_flight
    assert actstore.open_store(str(tmp_path / "s")).is_complete


def test_a_failed_store_fails_its_shard_and_every_later_one_leaving_no_objects(tmp_path):
    """Committed shards stay a prefix of the submitted ones (as when they were written one at a
    time): shards in flight behind a failed one are not committed, and their objects go too."""
    cfg = make_config()
    data = make_data(cfg)
    url = str(tmp_path / "s")
    bad_path, stored_of_1, rest_of_1 = acts_path(HOOKS[2]), [], threading.Event()
    with StoreWriter(url, cfg, io_threads=2, store_threads=4, max_in_flight=3) as w:
        put = w._put_shard

        def failing_put(path, shard, pieces):
            if shard == 1 and path == bad_path:
                assert rest_of_1.wait(10)  # the shard's other objects reach the disk first
                raise OSError(errno.ENOSPC, "No space left on device", path)
            put(path, shard, pieces)
            if shard == 1:
                stored_of_1.append(path)
                if len(stored_of_1) == len(array_specs(cfg)) - 1:
                    rest_of_1.set()

        w._put_shard = failing_put
        futures = [w.submit_shard(s, **shard_inputs(cfg, data, s)) for s in range(4)]
        with pytest.raises(StoreAccessError, match="No space left on device"):
            futures[1].result(timeout=30)
        for s in (2, 3):
            with pytest.raises(actstore.ShardError, match="not committed: an earlier shard failed .*No space left on device"):
                futures[s].result(timeout=30)
        assert futures[0].result(timeout=30) is None
        assert w.committed_shards == {0}
        assert w.pending_shards() == [1, 2, 3]
    assert {TOKENS, POSITIONS, acts_path(HOOKS[0])} <= set(stored_of_1)  # written, then removed
    for spec in array_specs(cfg):
        ndim = 1 + len(spec.shape_tail)
        for shard in (1, 2, 3):
            assert not (tmp_path / "s" / shard_key(spec.path, shard, ndim)).exists(), (spec.path, shard)
        assert (tmp_path / "s" / shard_key(spec.path, 0, ndim)).exists(), spec.path
    store = actstore.open_store(url)
    assert store.committed_shards == [0]
    assert store.attrs["n_tokens"] == 256 and store.attrs["n_shards_committed"] == 1
    assert store.stats(HOOKS[0]).count == 256
    np.testing.assert_array_equal(store.tokens(0, 256), data["tokens"][0:256])
    record = json.loads((tmp_path / "s" / "commits" / "writer-0" / "zarr.json").read_text())
    assert record["attributes"]["actstore_commit"]["shard_ranges"] == [[0, 1]]
    with StoreWriter(url, cfg) as w:  # a resume finds shards 1-3 still to write
        assert w.pending_shards() == [1, 2, 3]


def test_a_shard_being_committed_cannot_be_submitted_again(tmp_path):
    """While a shard's commit record is being written (one PUT on object storage), a second
    ``submit_shard`` of that shard must be refused like any committed or in-flight one; accepted,
    it stores the shard's objects again and commits its statistics twice."""
    cfg = make_config()
    data = make_data(cfg)
    url = str(tmp_path / "s")
    committing, go = threading.Event(), threading.Event()
    with StoreWriter(url, cfg) as w:
        commit = w._commit

        def slow_commit(shard, stats):  # a slow commit PUT
            committing.set()
            go.wait(10)
            commit(shard, stats)

        w._commit = slow_commit
        first = w.submit_shard(0, **shard_inputs(cfg, data, 0))
        assert committing.wait(10)
        duplicate = None
        try:
            with pytest.raises(actstore.ShardError, match="shard 0"):
                duplicate = w.submit_shard(0, **shard_inputs(cfg, data, 0))
        finally:
            go.set()
            first.result(timeout=30)
            if duplicate is not None:
                duplicate.result(timeout=30)
    store = actstore.open_store(url)
    assert store.committed_shards == [0]
    assert store.stats(HOOKS[0]).count == 256  # not 512: shard 0 counted once


def test_a_failed_commit_removes_the_shards_objects(tmp_path):
    """``submit_shard``'s docstring: a write that fails leaves the shard uncommitted and its objects
    removed (on a full disk, that makes room). A commit record refused by a full disk must too."""
    cfg = make_config()
    data = make_data(cfg)
    url = str(tmp_path / "s")
    with StoreWriter(url, cfg) as w:
        commit = w._commit

        def full_disk_commit(shard, stats):
            if shard == 1:
                raise OSError(errno.ENOSPC, "No space left on device")
            commit(shard, stats)

        w._commit = full_disk_commit
        futures = [w.submit_shard(s, **shard_inputs(cfg, data, s)) for s in range(3)]
        with pytest.raises(StoreAccessError, match="No space left on device"):
            futures[1].result(timeout=30)
        with pytest.raises(actstore.ShardError, match="not committed: an earlier shard failed"):
            futures[2].result(timeout=30)
        futures[0].result(timeout=30)
    assert actstore.open_store(url).committed_shards == [0]
    left = [(spec.path, shard) for spec in array_specs(cfg) for shard in (1, 2)
            if (tmp_path / "s" / shard_key(spec.path, shard, 1 + len(spec.shape_tail))).exists()]
    assert left == []


# ---- ShardRing on the CPU ----------------------------------------------------------------------
WIDTHS = {"a": 4, "b": 6}


def make_ring(depth=2, shard_tokens=10, dtype=torch.bfloat16):
    return ShardRing(list(WIDTHS), WIDTHS, dtype, shard_tokens, torch.device("cpu"), depth)


def batch(n, seed, dtype=torch.bfloat16):
    gen = torch.Generator().manual_seed(seed)
    return {h: torch.randn(n, d, generator=gen).to(dtype) for h, d in WIDTHS.items()}


def test_rows_from_two_batches_land_at_their_offsets_with_their_tokens():
    ring = make_ring()
    buf = ring.take(shard=3, n_tokens=7)  # a short shard: 7 of 10 rows
    x1, x2 = batch(5, 0), batch(6, 1)
    t1, t2 = np.arange(100, 105), np.arange(200, 206)
    ring.copy_in(buf, x1, ring.batch_finite(x1), slice(2, 5), t1[2:5])
    ring.copy_in(buf, x2, ring.batch_finite(x2), slice(0, 4), t2[0:4])
    assert buf.filled == 7
    with pytest.raises(ValueError, match="8 rows for 7 tokens"):
        ring.copy_in(buf, x2, ring.batch_finite(x2), slice(4, 5), t2[4:5])
    ring.seal(buf)
    buf.wait()
    view = buf.view()
    for h, d in WIDTHS.items():
        want = np.concatenate([x1[h][2:5].float().numpy(), x2[h][0:4].float().numpy()])
        assert view[h].shape == (7, d) and view[h].dtype == torch.bfloat16
        np.testing.assert_array_equal(view[h].float().numpy(), want)
    np.testing.assert_array_equal(buf.tokens_N[:7], np.concatenate([t1[2:5], t2[0:4]]))
    assert buf.shard == 3 and buf.n_tokens == 7


def test_take_blocks_while_every_buffer_is_lent():
    ring = make_ring(depth=2)
    first, second = ring.take(0, 10), ring.take(1, 10)
    assert first is not second
    got, taken = [], threading.Event()

    def third():
        got.append(ring.take(2, 10))
        taken.set()

    t = threading.Thread(target=third, daemon=True)
    t.start()
    assert not taken.wait(0.3)  # both buffers lent: take waits
    ring.release(first)
    assert taken.wait(5)
    t.join(5)
    assert got[0] is first and got[0].shard == 2 and got[0].filled == 0


def test_non_finite_batch_fails_its_shard_and_a_reused_buffer_starts_clean():
    ring = make_ring(depth=1)
    clean = batch(10, 0)
    bad = batch(10, 1)
    bad["b"][3, 2] = float("nan")
    assert ring.batch_finite(bad).tolist() == [True, False]

    buf = ring.take(shard=5, n_tokens=10)
    ring.copy_in(buf, clean, ring.batch_finite(clean), slice(0, 4), np.arange(4))
    ring.copy_in(buf, bad, ring.batch_finite(bad), slice(4, 10), np.arange(6))
    ring.seal(buf)
    with pytest.raises(NonFiniteActivationsError, match=r"inf or NaN activations at b in shard 5") as e:
        buf.wait()
    assert "at a" not in str(e.value)
    ring.release(buf)

    reused = ring.take(shard=6, n_tokens=10)  # the one buffer again, its flags fresh
    assert reused is buf
    ring.copy_in(reused, clean, ring.batch_finite(clean), slice(0, 10), np.arange(10))
    ring.seal(reused)
    reused.wait()  # passes
    np.testing.assert_array_equal(reused.view()["a"].float().numpy(), clean["a"].float().numpy())
    ring.release(reused)

    inf = batch(10, 2)
    inf["a"][0, 0] = float("inf")
    again = ring.take(shard=7, n_tokens=10)
    ring.copy_in(again, inf, ring.batch_finite(inf), slice(0, 10), np.arange(10))
    ring.seal(again)
    with pytest.raises(NonFiniteActivationsError, match=r"at a in shard 7"):
        again.wait()


def test_large_shard_objects_go_to_s3_as_parallel_multipart_uploads(s3_server, unique):
    import s3fs

    from actstore.remote import MULTIPART_PART_BYTES, open_location

    cfg = make_config(hooks=("big",), model=actstore.ModelInfo("wide", 8192, 1), n_tokens_target=2560, shard_tokens=2560,
                      chunk_tokens=256, context_size=256, dtype="float32", codec="none")
    data = make_data(cfg)
    url = f"s3://actstore-test/multipart-{unique}"
    assert open_location(url, read_only=False).storage_options["config_kwargs"]["max_pool_connections"] == 128
    with StoreWriter(url, cfg) as w:
        w.submit_shard(0, tokens=data["tokens"], positions=data["positions"], acts={"big": data["big"]}).result()
    fs = s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True)
    key = f"actstore-test/multipart-{unique}/{shard_key(acts_path('big'), 0, 2)}"
    size = fs.info(key)["size"]
    assert size > 2 * MULTIPART_PART_BYTES  # 80 MiB of float32
    assert fs.info(key)["ETag"].strip('"').endswith(f"-{-(-size // MULTIPART_PART_BYTES)}")  # a multipart ETag: md5-<parts>
    np.testing.assert_array_equal(actstore.open_store(url).read("big", 0, 2560), data["big"])


def test_device_statistics_match_the_writer_s_own_and_are_stored_as_given(tmp_path):
    from actstore.dtypes import to_numpy
    from actstore.stats import RunningStats

    widths = {"blocks.0.hook_resid_post": 48, "blocks.1.hook_resid_post": 48}
    ring = ShardRing(list(widths), widths, torch.bfloat16, 256, torch.device("cpu"), 1, device_stats=True)
    gen = torch.Generator().manual_seed(0)
    for reuse in range(2):  # the second shard reuses the buffer: its sums start from zero
        buf = ring.take(shard=reuse, n_tokens=200)
        for lo, hi in ((0, 120), (120, 200)):
            x = {h: (3 * torch.randn(hi - lo, d, generator=gen) + 1).to(torch.bfloat16) for h, d in widths.items()}
            ring.copy_in(buf, x, ring.batch_finite(x), slice(0, hi - lo), np.arange(lo, hi))
        ring.seal(buf)
        buf.wait()
        for h, got in buf.stats().items():
            want = RunningStats.of(to_numpy(buf.view()[h]))
            assert got.count == want.count == 200
            np.testing.assert_allclose(got.sum_D, want.sum_D, rtol=1e-5, atol=1e-3)
            assert got.sum_sq_norm == pytest.approx(want.sum_sq_norm, rel=1e-6)
            assert got.sum_norm == pytest.approx(want.sum_norm, rel=1e-6)
        ring.release(buf)

    cfg = make_config(hooks=tuple(widths), n_tokens_target=200, shard_tokens=256, chunk_tokens=64, codec="none")
    given = {h: RunningStats(200, np.full(48, 7.0), 11.0, 13.0) for h in widths}
    data = {h: to_numpy(t) for h, t in buf.view().items()}
    with StoreWriter(str(tmp_path / "s"), cfg) as w:
        with pytest.raises(actstore.ShardError, match="acts \\(and stats\\) must cover exactly the store's hooks"):
            w.submit_shard(0, tokens=np.arange(200), positions=np.arange(200) % 16, acts=data, stats={})
        w.submit_shard(0, tokens=np.arange(200), positions=np.arange(200) % 16, acts=data, stats=given).result()
    stats = actstore.open_store(str(tmp_path / "s")).stats("blocks.0.hook_resid_post")
    assert stats.count == 200 and stats.sum_sq_norm == 11.0 and np.all(stats.sum_D == 7.0)
