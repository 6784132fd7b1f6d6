"""The direct shard encoder and reader against zarr-python's sharding codec (the reference)."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import actstore
from actstore.layout import array_specs, inner_codecs, shard_key
from actstore.remote import open_location
from actstore.shardio import ArrayLayout
from tests.helpers import make_config, make_data, write_shards


@pytest.mark.parametrize("dtype", ["bfloat16", "float32", "float8_e4m3fn"])
@pytest.mark.parametrize("codec", ["zstd", "none"])
@pytest.mark.parametrize("n_tokens", [1000, 800])  # 800: the last shard has chunks past the end
def test_shards_are_byte_identical_to_zarr_writes(tmp_path, dtype, codec, n_tokens):
    cfg = make_config(dtype=dtype, codec=codec, n_tokens_target=n_tokens)
    data = make_data(cfg)
    url = str(tmp_path / "ours")
    with actstore.open_store(url, "a", config=cfg) as w:
        write_shards(w, cfg, data, w.pending_shards())
    ours = open_location(url)
    ref_root = zarr.open_group(str(tmp_path / "ref"), mode="w")
    for spec in array_specs(cfg):
        mine = actstore.open_store(url).zarr_array(spec.path)
        ref = ref_root.create_array(
            spec.path.replace("/", "_"), shape=mine.shape, dtype=mine.metadata.data_type,
            shards=mine.metadata.chunk_grid.chunk_shape, chunks=mine.chunks,
            compressors=inner_codecs(cfg, spec.dtype), fill_value=0, config={"write_empty_chunks": True},
        )
        ref[:] = mine[:]
        for shard in range(cfg.n_shards):
            ndim = len(mine.shape)
            got = ours.fs.cat_file(ours.path(shard_key(spec.path, shard, ndim)))
            want = (tmp_path / "ref" / shard_key(spec.path.replace("/", "_"), shard, ndim)).read_bytes()
            assert got == want, (spec.path, shard)


def test_layout_rejects_codecs_actstore_does_not_write():
    doc = {
        "shape": [10, 4], "data_type": "float32",
        "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [10, 4]}},
        "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
    }
    with pytest.raises(actstore.StoreFormatError, match="layout"):
        ArrayLayout.from_zarr_json("x", doc)


def test_reader_merges_adjacent_chunks_into_one_ranged_read(unique, monkeypatch):
    cfg = make_config()
    data = make_data(cfg)
    url = f"memory://shardio-{unique}"  # the generic path of remote stores (local files take pread)
    with actstore.open_store(url, "a", config=cfg) as w:
        write_shards(w, cfg, data, w.pending_shards())
    store = actstore.open_store(url)
    hook = cfg.hooks[0]
    reader = store.array_reader(f"acts/{hook}")
    reader.shard_indexes(range(cfg.n_shards))  # index reads are cached from here on
    calls = []  # ranges per cat_ranges call
    real = reader.loc.fs.cat_ranges

    def counting(paths, starts, ends, **kw):
        calls.append(len(paths))
        return real(paths, starts, ends, **kw)

    monkeypatch.setattr(reader.loc.fs, "cat_ranges", counting)
    got = store.read(hook, 0, 1000)
    assert calls == [4], "one call, one range per shard: 16 chunks merged into 4 reads"
    assert np.array_equal(got.view(np.uint16), store.zarr_array(f"acts/{hook}")[:].view(np.uint16))
    # scattered chunks are separate ranges, still one batched call
    calls.clear()
    chunks = reader.read_chunks([(3, 1), (0, 2), (0, 0)])
    assert calls == [3]
    calls.clear()
    reader.read_chunks([(1, 2), (1, 3), (1, 1)])  # adjacent once sorted
    assert calls == [1]
    ref = store.zarr_array(f"acts/{hook}")
    for (shard, c), arr in zip([(3, 1), (0, 2), (0, 0)], chunks, strict=True):
        a = shard * 256 + c * 64
        np.testing.assert_array_equal(arr.view(np.uint16), ref[a : a + 64].view(np.uint16))


@pytest.mark.parametrize("codec, checksums", [("none", True), ("none", False), ("zstd", True), ("zstd", False)])
def test_local_pread_path_matches_the_generic_path(tmp_path, unique, monkeypatch, codec, checksums):
    """The same shards read from local files (pread, no fsspec read) and from an in-memory store
    (fsspec's ranged reads, as for S3) give the same chunks."""
    cfg = make_config(codec=codec, checksums=checksums)
    data = make_data(cfg)
    readers = []
    for url in (str(tmp_path / "s"), f"memory://pread-{unique}"):
        with actstore.open_store(url, "a", config=cfg) as w:
            write_shards(w, cfg, data, w.pending_shards())
        readers.append(actstore.open_store(url).array_reader(f"acts/{cfg.hooks[1]}"))
    chunks = [(s, c) for s in range(cfg.n_shards) for c in range(4) if (s * 4 + c) * 64 < 1000][::-1]
    assert len(chunks) == 16
    got = []
    for reader in readers:
        reader.shard_indexes(range(cfg.n_shards))  # index reads are cached from here on
        calls = []
        real = reader.loc.fs.cat_ranges

        def counting(*args, real=real, calls=calls, **kw):
            calls.append(1)
            return real(*args, **kw)

        monkeypatch.setattr(reader.loc.fs, "cat_ranges", counting)
        got.append((reader.read_chunks(chunks), len(calls)))
    (fast, fast_calls), (generic, generic_calls) = got
    assert fast_calls == 0 and generic_calls == 1, "local files take pread, other stores one batched fsspec read"
    for a, b in zip(fast, generic, strict=True):
        assert a.tobytes() == b.tobytes()
