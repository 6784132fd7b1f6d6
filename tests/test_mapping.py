"""Files mapped at fixed slots of one address range (actstore.mapping), and store arrays mapped
for the stream's gathers (actstore.mapped)."""

from __future__ import annotations

import gc
import os
import weakref

import numpy as np
import pytest
import torch

import actstore
from actstore import CorruptChunkError, MissingChunkError, mapped, mapping
from actstore.layout import acts_path
from tests.helpers import make_config, make_data, write_shards

pytestmark = pytest.mark.skipif(not mapping.AVAILABLE, reason="needs Linux")
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    for name, size in [("a", 3 * mapping.PAGE + 123), ("b", 2 * mapping.PAGE)]:
        data = rng.integers(0, 256, size, dtype=np.uint8)
        (tmp_path / name).write_bytes(data.tobytes())
        out[str(tmp_path / name)] = data
    return out


def test_files_read_back_from_their_slots(files):
    a, b = files
    slots = mapping.FileSlots(3, 4 * mapping.PAGE)
    assert slots.map(2, a) == len(files[a]) and slots.map(0, b) == len(files[b])
    assert slots.map(2, a) == len(files[a]) and slots.size(1) is None  # mapping again is a no-op
    buf = slots.bytes_u8
    np.testing.assert_array_equal(buf[2 * slots.slot_bytes : 2 * slots.slot_bytes + len(files[a])], files[a])
    np.testing.assert_array_equal(buf[: len(files[b])], files[b])
    slots.populate(100, 5000)
    slots.release(0, 2 * mapping.PAGE)  # page-table entries dropped: the data reads back the same
    np.testing.assert_array_equal(buf[: len(files[b])], files[b])


def test_rows_view_gathers_rows_at_any_aligned_start(files):
    a, _ = files
    slots = mapping.FileSlots(1, 4 * mapping.PAGE)
    slots.map(0, a)
    rows = slots.rows_view(row_bytes=16, unit=4)
    starts = np.array([12, 16, 1012, 3 * mapping.PAGE + 100])
    got = torch.index_select(rows, 0, torch.from_numpy(starts // 4)).numpy().view(np.uint8)
    np.testing.assert_array_equal(got, np.stack([files[a][s : s + 16] for s in starts]))
    assert mapping.unit_for(16, starts) == 4 and mapping.unit_for(6, starts) == 2 and mapping.unit_for(16, starts + 1) == 1


def test_oversized_or_missing_files_are_errors(files, tmp_path):
    a, _ = files
    with pytest.raises(EOFError, match="more than"):
        mapping.FileSlots(2, mapping.PAGE).map(0, a)
    with pytest.raises(FileNotFoundError):
        mapping.FileSlots(2, mapping.PAGE).map(0, str(tmp_path / "gone"))


def test_mapping_lives_as_long_as_a_view_of_it(files):
    a, _ = files
    slots = mapping.FileSlots(1, 4 * mapping.PAGE)
    slots.map(0, a)
    ref = weakref.ref(slots)
    view = slots.rows_view(8, 8)
    expected = files[a][:8].copy()
    del slots
    gc.collect()
    assert ref() is not None
    np.testing.assert_array_equal(view[0].numpy().view(np.uint8), expected)
    del view
    gc.collect()
    assert ref() is None


# ---- store arrays ------------------------------------------------------------------------------
@pytest.fixture
def store(tmp_path):
    cfg = make_config(dtype="float32", codec="none", hooks=HOOKS)
    data = make_data(cfg)
    url = str(tmp_path / "store")
    with actstore.open_store(url, "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards))
    return url, cfg, data


def _chunk_rows(arrays: mapped.MappedArrays, starts: np.ndarray, n: int, a: int, i: int, width: int) -> np.ndarray:
    """Chunk ``i`` of array ``a`` (``n`` chunks asked for) read back from the mapped range."""
    nbytes = arrays.readers[a].layout.chunk_bytes
    raw = arrays.slots.bytes_u8[starts[a * n + i] : starts[a * n + i] + nbytes]
    return raw.view(np.float32).reshape(-1, width)


def test_mapped_arrays_hold_every_hook_chunk_in_one_range(store):
    url, cfg, data = store
    s = actstore.open_store(url)
    readers = [s.array_reader(acts_path(h)) for h in HOOKS]
    assert mapped.fits(readers)
    arrays = mapped.MappedArrays(readers)
    cps, ct = cfg.shard_tokens // cfg.chunk_tokens, cfg.chunk_tokens
    chunks = [(3, 1), (0, 0), (1, 3)]  # any order, any shards; (3, 1) is in the short last shard
    starts = arrays.starts(chunks)
    for a, hook in enumerate(HOOKS):
        for i, (shard, c) in enumerate(chunks):
            g = shard * cps + c
            want = data[hook][g * ct : (g + 1) * ct]
            np.testing.assert_array_equal(_chunk_rows(arrays, starts, len(chunks), a, i, cfg.width(hook))[: len(want)], want)
        assert readers[a].verified[[3 * cps + 1, 0, cps + 3]].all()
    arrays.release(chunks)  # the next call pages them in again, same places, same data
    np.testing.assert_array_equal(arrays.starts(chunks), starts)
    assert mapped.keeps_pages(arrays) and not mapped.keeps_pages(arrays, fraction=arrays.nbytes / mapped.physical_memory_bytes() / 2)


def test_mapped_arrays_raise_the_read_errors(store):
    url, cfg, _ = store
    s = actstore.open_store(url)
    reader = s.array_reader(acts_path(HOOKS[0]))
    path = reader.shard_path(1)
    orig = open(path, "rb").read()
    blob = bytearray(orig)
    blob[100] ^= 0x01
    open(path, "wb").write(bytes(blob))
    arrays = mapped.MappedArrays([reader])
    assert arrays.starts([(0, 0)]) is not None
    with pytest.raises(CorruptChunkError, match="checksum"):
        arrays.starts([(1, 0)])
    index = blob[-(reader.layout.chunks_per_shard * 16 + 4) :]
    open(path, "wb").write(bytes(blob[:200]) + bytes(index))  # the index still points past the end
    with pytest.raises(CorruptChunkError, match="truncated"):
        mapped.MappedArrays([actstore.open_store(url).array_reader(acts_path(HOOKS[0]))]).starts([(1, 2)])
    pad = bytes(mapping.round_up(reader.max_shard_bytes) + 1 - len(orig))
    open(path, "wb").write(orig[: -len(index)] + pad + bytes(index))  # chunks and index intact, but too long
    with pytest.raises(CorruptChunkError, match="more than"):
        mapped.MappedArrays([actstore.open_store(url).array_reader(acts_path(HOOKS[0]))]).starts([(1, 2)])
    fresh = actstore.open_store(url).array_reader(acts_path(HOOKS[0]))
    fresh.shard_indexes([2])  # index cached, then the shard object goes
    os.remove(fresh.shard_path(2))
    with pytest.raises(MissingChunkError, match="missing"):
        mapped.MappedArrays([fresh]).starts([(2, 0)])
