"""The store library against memory, local and S3 (moto on loopback) backends: one shared suite.

Every read is checked against zarr-python reading the same arrays (the reference), and
against the values that went in.
"""

from __future__ import annotations

import json
import threading

import ml_dtypes
import numpy as np
import pytest
import torch

import actstore
import actstore.writer as writer_mod
from actstore import (
    ConfigMismatchError,
    CorruptChunkError,
    FormatVersionError,
    MissingChunkError,
    NotAnActstoreError,
    ShardError,
    StoreNotFoundError,
    UncommittedRangeError,
)
from actstore.dtypes import encode_acts, fp8_dequantize
from actstore.layout import acts_path, array_specs, shard_key
from actstore.remote import open_location
from benchmarks.s3proxy import S3Proxy
from tests.helpers import free_port, make_config, make_data, write_shards


def stored_values(cfg, x):
    """What the store should return for float32 input ``x``: rounded to the store dtype."""
    q, scale = encode_acts(x, cfg.dtype)
    return fp8_dequantize(q, scale) if scale is not None else q


def write_all(url, cfg, data, **kw):
    with actstore.open_store(url, "a", config=cfg, **kw) as w:
        write_shards(w, cfg, data, w.pending_shards())


class StoreSuite:
    """Behaviour every backend must show. Subclasses provide ``url``."""

    @pytest.fixture
    def url(self, unique):
        raise NotImplementedError

    # ---- round trips ----------------------------------------------------------------------
    @pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float8_e4m3fn"])
    def test_roundtrip_each_dtype(self, url, dtype):
        cfg = make_config(dtype=dtype)
        data = make_data(cfg)
        write_all(url, cfg, data)
        store = actstore.open_store(url)
        assert store.n_tokens == 1000 and store.is_complete
        assert store.hooks == cfg.hooks
        np.testing.assert_array_equal(store.tokens(), data["tokens"])
        np.testing.assert_array_equal(store.positions(), data["positions"])
        for hook in cfg.hooks:
            got = store.read(hook)
            want = stored_values(cfg, data[hook])
            assert got.dtype == (np.float32 if dtype == "float8_e4m3fn" else want.dtype)
            np.testing.assert_array_equal(got.astype(np.float32), want.astype(np.float32))

    @pytest.mark.parametrize("codec", ["zstd", "none"])
    def test_fast_reader_matches_zarr_reference(self, url, codec):
        cfg = make_config(codec=codec)
        write_all(url, cfg, make_data(cfg))
        store = actstore.open_store(url)
        hook = cfg.hooks[1]
        ref = store.zarr_array(acts_path(hook))
        assert ref.dtype == np.dtype(ml_dtypes.bfloat16)
        for start, stop in [(0, 1000), (0, 1), (63, 65), (255, 257), (300, 999), (999, 1000), (512, 512)]:
            got = store.read(hook, start, stop)
            want = ref[start:stop]
            assert got.shape == (stop - start, 48)
            np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))

    def test_torch_bf16_input_stores_same_bits_as_numpy(self, url):
        cfg = make_config(hooks=("blocks.0.hook_resid_post",), n_tokens_target=256)
        data = make_data(cfg)
        with actstore.open_store(url, "a", config=cfg) as w:
            t = torch.from_numpy(data["blocks.0.hook_resid_post"]).to(torch.bfloat16)
            w.write_shard(0, tokens=torch.from_numpy(data["tokens"]), positions=data["positions"],
                          acts={"blocks.0.hook_resid_post": t})
        got = actstore.open_store(url).read("blocks.0.hook_resid_post")
        np.testing.assert_array_equal(got.view(np.int16), t.view(torch.int16).numpy())

    # ---- statistics -----------------------------------------------------------------------
    def test_stats_match_numpy_over_stored_values(self, url):
        cfg = make_config()
        data = make_data(cfg)
        write_all(url, cfg, data)
        store = actstore.open_store(url)
        for hook in cfg.hooks:
            x = stored_values(cfg, data[hook]).astype(np.float64)
            s = store.stats(hook)
            assert s.count == 1000
            np.testing.assert_allclose(s.mean_D, x.mean(0), rtol=1e-6, atol=1e-6)
            np.testing.assert_allclose(s.mean_sq_norm, (x**2).sum(1).mean(), rtol=1e-6)
            np.testing.assert_allclose(s.mean_norm, np.linalg.norm(x, axis=1).mean(), rtol=1e-6)
        root = json.loads(open_location(url).fs.cat_file(open_location(url).path("zarr.json")))
        assert root["attributes"]["actstore"]["n_tokens"] == 1000
        assert root["attributes"]["actstore"]["stats"][cfg.hooks[0]]["count"] == 1000

    # ---- commits, resume, writers ---------------------------------------------------------
    def test_only_committed_shards_are_visible(self, url):
        cfg = make_config()
        data = make_data(cfg)
        with actstore.open_store(url, "a", config=cfg) as w:
            write_shards(w, cfg, data, [0, 2])
        store = actstore.open_store(url)
        assert store.committed_shards == [0, 2] and store.n_tokens == 512
        np.testing.assert_array_equal(store.tokens(512, 768), data["tokens"][512:768])
        with pytest.raises(UncommittedRangeError):
            store.read(cfg.hooks[0], 200, 300)
        assert store.stats(cfg.hooks[0]).count == 512

    def test_refresh_sees_shards_committed_after_opening(self, url):
        cfg = make_config()
        data = make_data(cfg)
        with actstore.open_store(url, "a", config=cfg) as w:
            write_shards(w, cfg, data, [0])
            store = actstore.open_store(url)
            write_shards(w, cfg, data, [1])
            assert store.committed_shards == [0]
            assert store.refresh().committed_shards == [0, 1]
            np.testing.assert_array_equal(store.tokens(256, 512), data["tokens"][256:512])

    def test_interrupted_commit_is_invisible_and_resume_is_bit_identical(self, url, monkeypatch):
        cfg = make_config()
        data = make_data(cfg)
        real_write_record = writer_mod.write_record

        class Crash(Exception):
            pass

        def crash_on_shard_2(loc, record):
            if 2 in record.shards:
                raise Crash("stopped after shard 2's data, before its commit")
            real_write_record(loc, record)

        monkeypatch.setattr(writer_mod, "write_record", crash_on_shard_2)
        # a kill at that moment runs no clean-up: shard 2's objects stay behind
        monkeypatch.setattr(writer_mod.StoreWriter, "_remove_shard_objects", lambda self, shard: None)
        with pytest.raises(Crash), actstore.open_store(url, "a", config=cfg) as w:
            write_shards(w, cfg, data, w.pending_shards())
        monkeypatch.setattr(writer_mod, "write_record", real_write_record)

        loc = open_location(url)
        assert loc.fs.exists(loc.path(shard_key(acts_path(cfg.hooks[0]), 2, 2))), "shard 2's data was written"
        store = actstore.open_store(url)
        assert store.committed_shards == [0, 1]
        with pytest.raises(UncommittedRangeError):
            store.tokens(512, 600)

        with actstore.open_store(url, "a", config=cfg) as w:
            assert w.pending_shards() == [2, 3]
            write_shards(w, cfg, data, w.pending_shards())

        ref_url = url + "-reference"
        write_all(ref_url, cfg, data)
        resumed, reference = actstore.open_store(url), actstore.open_store(ref_url)
        assert resumed.n_tokens == reference.n_tokens == 1000
        ref_loc = open_location(ref_url)
        for spec in array_specs(cfg):
            a = resumed.zarr_array(spec.path)[:]
            b = reference.zarr_array(spec.path)[:]
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), spec.path
            for shard in range(cfg.n_shards):
                key = shard_key(spec.path, shard, 1 + (spec.width is not None))
                assert loc.fs.cat_file(loc.path(key)) == ref_loc.fs.cat_file(ref_loc.path(key)), key
        for hook in cfg.hooks:
            np.testing.assert_array_equal(resumed.stats(hook).sum_D, reference.stats(hook).sum_D)

    def test_writers_own_disjoint_shards(self, url):
        cfg = make_config(n_tokens_target=2000)
        data = make_data(cfg)
        world = 3
        with actstore.open_store(url, "a", config=cfg, writer_id=0):
            pass  # the store is created once (rank 0) before the others start
        errors = []

        def rank_main(rank):
            try:
                with actstore.open_store(url, "a", config=cfg, writer_id=rank) as w:
                    write_shards(w, cfg, data, w.pending_shards(rank, world))
            except Exception as e:  # surfaced by the assertion below
                errors.append(e)

        threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors
        store = actstore.open_store(url)
        assert store.is_complete and store.n_tokens == 2000
        np.testing.assert_array_equal(store.tokens(), data["tokens"])
        x = stored_values(cfg, data[cfg.hooks[2]]).astype(np.float64)
        np.testing.assert_allclose(store.stats(cfg.hooks[2]).mean_D, x.mean(0), rtol=1e-6, atol=1e-6)

    def test_same_config_resumes_other_config_refused_and_data_kept(self, url):
        cfg = make_config()
        data = make_data(cfg)
        with actstore.open_store(url, "a", config=cfg) as w:
            write_shards(w, cfg, data, [0])
        with actstore.open_store(url, "a", config=cfg) as w:
            assert w.pending_shards() == [1, 2, 3]
            with pytest.raises(ShardError, match="already committed"):
                write_shards(w, cfg, data, [0])
        with pytest.raises(ConfigMismatchError, match="dtype"):
            actstore.open_store(url, "a", config=cfg.with_(dtype="float32")).open()
        store = actstore.open_store(url)
        assert store.config == cfg and store.n_tokens == 256
        np.testing.assert_array_equal(store.tokens(0, 256), data["tokens"][:256])
        # explicit overwrite replaces it
        other = cfg.with_(dtype="float32")
        with actstore.open_store(url, "w", config=other) as w:
            assert w.pending_shards() == [0, 1, 2, 3]
            write_shards(w, other, data, [0])
        store = actstore.open_store(url)
        assert store.config.dtype == "float32" and store.committed_shards == [0]

    def test_store_id_is_kept_by_resumes_and_new_with_overwrite(self, url):
        cfg = make_config()
        with actstore.open_store(url, "a", config=cfg) as w:
            write_shards(w, cfg, make_data(cfg), [0])
        first = actstore.open_store(url).id
        assert isinstance(first, str) and len(first) == 32
        with actstore.open_store(url, "a", config=cfg.with_(n_tokens_target=1200)) as w:
            assert w.store_id == first
        assert actstore.open_store(url).id == first and actstore.open_store(url).summary()["store_id"] == first
        with actstore.open_store(url, "w", config=cfg):
            pass
        assert actstore.open_store(url).id not in (None, first)

    def test_a_lower_target_finishes_the_store_with_what_is_committed(self, url):
        cfg = make_config()  # 1000 tokens, shards of 256: 0-2 full, 3 short
        data = make_data(cfg)
        with actstore.open_store(url, "a", config=cfg) as w:
            write_shards(w, cfg, data, [0, 1])
        with pytest.raises(ConfigMismatchError, match="up to 512; a target of 500 tokens would cut them off"):
            actstore.open_store(url, "a", config=cfg.with_(n_tokens_target=500)).open()
        lower = cfg.with_(n_tokens_target=512)
        with actstore.open_store(url, "a", config=lower) as w:
            assert w.pending_shards() == []
        store = actstore.open_store(url)
        assert store.is_complete and store.n_tokens == 512 and store.config == lower
        assert store.attrs["n_tokens"] == 512
        assert store.zarr_array(acts_path(cfg.hooks[0])).shape == (512, 48)
        np.testing.assert_array_equal(store.zarr_array("tokens")[:], data["tokens"][:512])

    def test_a_higher_target_extends_the_store_as_one_run_would(self, url, unique):
        cfg = make_config(n_tokens_target=640)  # shards 0, 1 full; 2 short (128 tokens)
        big = cfg.with_(n_tokens_target=1000)
        data = make_data(big)
        with actstore.open_store(url, "a", config=cfg) as w:
            write_shards(w, cfg, data, [0, 1, 2])
        with actstore.open_store(url, "a", config=big) as w:
            assert w.pending_shards() == [2, 3]  # the short shard is written again at its new length
            assert actstore.open_store(url).n_tokens == 512 and actstore.open_store(url).attrs["n_tokens"] == 512
            write_shards(w, big, data, [2, 3])
        ref_url = url.rstrip("/") + "-reference"
        write_all(ref_url, big, data)
        a, b = actstore.open_store(url), actstore.open_store(ref_url)
        assert a.config == b.config and a.is_complete
        for spec in array_specs(big):
            assert a.zarr_array(spec.path)[:].tobytes() == b.zarr_array(spec.path)[:].tobytes(), spec.path
        for hook in big.hooks:
            sa, sb = a.stats(hook), b.stats(hook)
            assert sa.count == sb.count == 1000
            np.testing.assert_allclose(sa.sum_D, sb.sum_D, rtol=1e-12, atol=1e-9)
            assert sa.sum_sq_norm == pytest.approx(sb.sum_sq_norm, rel=1e-12)

    def test_an_error_inside_the_writer_still_writes_the_summary(self, url):
        cfg = make_config()
        with pytest.raises(RuntimeError, match="boom"):
            with actstore.open_store(url, "a", config=cfg) as w:
                write_shards(w, cfg, make_data(cfg), [0, 1])
                raise RuntimeError("boom")
        store = actstore.open_store(url)
        assert store.attrs["n_tokens"] == 512 and store.attrs["n_shards_committed"] == 2

    @pytest.mark.parametrize("mode, message", [("a", "holds files but no actstore store"), ("w", "refusing to overwrite")])
    def test_a_folder_of_other_files_is_neither_written_into_nor_overwritten(self, url, mode, message):
        loc = open_location(url)
        loc.fs.makedirs(loc.root, exist_ok=True)
        loc.fs.pipe_file(loc.path("thesis.tex"), b"precious")
        with pytest.raises(NotAnActstoreError, match=message):
            actstore.open_store(url, mode, config=make_config()).open()
        assert loc.fs.ls(loc.root, detail=False) == [loc.path("thesis.tex")]
        assert loc.fs.cat_file(loc.path("thesis.tex")) == b"precious"

    def test_bad_shard_writes_are_refused(self, url):
        cfg = make_config()
        data = make_data(cfg)
        with actstore.open_store(url, "a", config=cfg) as w:
            with pytest.raises(ShardError, match="outside"):
                w.write_shard(9, tokens=data["tokens"][:10], positions=data["positions"][:10], acts={})
            with pytest.raises(ShardError, match="exactly the store's hooks"):
                w.write_shard(0, tokens=data["tokens"][:256], positions=data["positions"][:256], acts={})
            with pytest.raises(ShardError, match=r"\[256, 48\]"):
                w.write_shard(0, tokens=data["tokens"][:256], positions=data["positions"][:256],
                              acts={h: data[h][:255] for h in cfg.hooks})
        assert actstore.open_store(url).n_tokens == 0

    # ---- errors ---------------------------------------------------------------------------
    def test_flipped_byte_is_corruption_not_data(self, url):
        cfg = make_config()
        write_all(url, cfg, make_data(cfg))
        loc = open_location(url)
        path = loc.path(shard_key(acts_path(cfg.hooks[0]), 1, 2))
        blob = bytearray(loc.fs.cat_file(path))
        blob[100] ^= 0x01  # inside the first inner chunk
        loc.fs.pipe_file(path, bytes(blob))
        store = actstore.open_store(url)
        with pytest.raises(CorruptChunkError, match="checksum"):
            store.read(cfg.hooks[0], 256, 300)
        np.testing.assert_array_equal(store.read(cfg.hooks[1], 256, 300).shape, (44, 48))
        blob[-2] ^= 0x01  # inside the shard index
        loc.fs.pipe_file(path, bytes(blob))
        with pytest.raises(CorruptChunkError, match="index"):
            actstore.open_store(url).read(cfg.hooks[0], 256, 300)

    def test_missing_shard_object_is_an_error(self, url):
        cfg = make_config()
        write_all(url, cfg, make_data(cfg))
        loc = open_location(url)
        loc.fs.rm(loc.path(shard_key(acts_path(cfg.hooks[0]), 3, 2)))
        with pytest.raises(MissingChunkError):
            actstore.open_store(url).read(cfg.hooks[0], 800, 900)

    def test_missing_store_non_actstore_group_and_newer_format(self, url):
        with pytest.raises(StoreNotFoundError):
            actstore.open_store(url)
        loc = open_location(url)
        loc.fs.makedirs(loc.root, exist_ok=True)
        loc.fs.pipe_file(loc.path("zarr.json"), json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}).encode())
        with pytest.raises(NotAnActstoreError):
            actstore.open_store(url)
        with pytest.raises(NotAnActstoreError, match="not an actstore store"):
            actstore.open_store(url, "a", config=make_config()).open()
        cfg = make_config()
        write_all(url + "-v", cfg, make_data(cfg))
        vloc = open_location(url + "-v")
        doc = json.loads(vloc.fs.cat_file(vloc.path("zarr.json")))
        doc["attributes"]["actstore"]["format_version"] = 2
        vloc.fs.pipe_file(vloc.path("zarr.json"), json.dumps(doc).encode())
        with pytest.raises(FormatVersionError, match="upgrade"):
            actstore.open_store(url + "-v")

    def test_summary_describes_store(self, url):
        cfg = make_config()
        write_all(url, cfg, make_data(cfg))
        s = actstore.open_store(url).summary()
        assert s["n_tokens"] == 1000 and s["shards_committed"] == 4 and s["dtype"] == "bfloat16"
        assert s["acts_bytes_raw"] == 1000 * 3 * 48 * 2
        assert 0 < s["acts_bytes_stored"] < s["bytes_on_disk"]
        assert s["compression_ratio"] == pytest.approx(s["acts_bytes_raw"] / s["acts_bytes_stored"])
        assert set(s["hooks"]) == set(cfg.hooks) and s["hooks"][cfg.hooks[0]]["mean_norm"] > 0


class TestMemoryStore(StoreSuite):
    @pytest.fixture
    def url(self, unique):
        return f"memory://actstore-{unique}"


class TestLocalStore(StoreSuite):
    @pytest.fixture
    def url(self, tmp_path, unique):
        return str(tmp_path / f"store-{unique}")


class TestFileUrlStore(StoreSuite):
    """``file://`` URLs resolve to the same local backend."""

    @pytest.fixture
    def url(self, tmp_path, unique):
        return f"file://{tmp_path}/store-{unique}"

    # the local suite already covers the rest; keep one round trip and one error here
    test_fast_reader_matches_zarr_reference = None
    test_writers_own_disjoint_shards = None
    test_interrupted_commit_is_invisible_and_resume_is_bit_identical = None
    test_stats_match_numpy_over_stored_values = None
    test_torch_bf16_input_stores_same_bits_as_numpy = None
    test_bad_shard_writes_are_refused = None


class TestS3Store(StoreSuite):
    @pytest.fixture
    def url(self, s3_server, unique):
        return f"s3://actstore-test/store-{unique}"

    def test_credentials_from_storage_options_never_reach_the_store(self, url, s3_server):
        secret = "sEcReT-key-material-123"
        opts = {"key": "testing", "secret": secret, "endpoint_url": s3_server}
        cfg = make_config()
        write_all(url, cfg, make_data(cfg), storage_options=opts)
        assert actstore.open_store(url, storage_options=opts).n_tokens == 1000
        loc = open_location(url)
        blobs = [loc.fs.cat_file(p) for p in loc.fs.find(loc.root)]
        assert blobs and not any(secret.encode() in b or s3_server.encode() in b for b in blobs)

    def test_missing_bucket_is_a_named_error(self, s3_server, unique):
        with pytest.raises(actstore.StoreAccessError, match="bucket"):
            actstore.open_store(f"s3://no-such-bucket-{unique}/x", "a", config=make_config()).open()

    def test_unreachable_endpoint_is_a_named_error(self, s3_server, monkeypatch):
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{free_port()}")
        with pytest.raises(actstore.StoreAccessError, match="cannot read"):
            actstore.open_store("s3://actstore-test/unreachable", storage_options={"skip_instance_cache": True})

    def test_server_errors_are_retried_by_s3fs_alone_and_a_lasting_one_is_one_error(self, url, s3_server):
        """actstore adds no retry loop (``actstore.remote``): botocore and s3fs retry a server
        answering 500 on their own, and a server that keeps failing is one ``StoreAccessError``
        after a few requests (20 with a loop of our own on top)."""
        cfg = make_config()
        data = make_data(cfg)
        write_all(url, cfg, data)
        with S3Proxy(s3_server) as proxy:
            opts = {"endpoint_url": proxy.url, "skip_instance_cache": True}
            proxy.failures = 3
            store = actstore.open_store(url, storage_options=opts)
            np.testing.assert_array_equal(store.tokens(), data["tokens"])
            np.testing.assert_array_equal(store.read(cfg.hooks[0]), stored_values(cfg, data[cfg.hooks[0]]))
            assert proxy.failures == 0 and proxy.requests > 3
            proxy.failures, proxy.requests = 10**6, 0
            with pytest.raises(actstore.StoreAccessError) as err:
                actstore.open_store(url, storage_options=opts)
            assert "\n" not in str(err.value) and "internal" in str(err.value).lower()  # S3's message, or a HEAD's reason
            assert proxy.requests <= 10

