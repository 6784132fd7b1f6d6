"""File ranges mapped back to back into one address range (actstore.mapping)."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

from actstore import mapping

pytestmark = pytest.mark.skipif(not mapping.AVAILABLE, reason="needs Linux")


@pytest.fixture
def files(tmp_path):
    rng = np.random.default_rng(0)
    out = {}
    for name, size in [("a", 3 * mapping.PAGE + 123), ("b", 2 * mapping.PAGE)]:
        data = rng.integers(0, 256, size, dtype=np.uint8)
        (tmp_path / name).write_bytes(data.tobytes())
        out[str(tmp_path / name)] = data
    return out


@pytest.mark.parametrize("populate", [True, False])
def test_ranges_read_back_from_one_buffer(files, populate):
    a, b = files
    ranges = [(a, 100, 4000), (a, 4100, 5000), (b, 8, 4096), (a, 3 * mapping.PAGE, 123)]
    m = mapping.MappedRanges(ranges, populate=populate)  # unpopulated pages fault in on first read
    buf = m.bytes_u8
    for (path, off, n), start in zip(ranges, m.starts, strict=True):
        np.testing.assert_array_equal(buf[start : start + n], files[path][off : off + n])
    assert m.starts[1] == m.starts[0] + 4000  # continuing ranges of one file share a mapping


def test_rows_view_gathers_rows_at_any_aligned_start(files):
    a, _ = files
    m = mapping.MappedRanges([(a, 12, 2000)])
    rows = m.rows_view(row_bytes=16, unit=4)
    starts = np.array([m.starts[0], m.starts[0] + 4, m.starts[0] + 1000])
    got = torch.index_select(rows, 0, torch.from_numpy(starts // 4)).numpy().view(np.uint8)
    want = np.stack([files[a][12 + s - m.starts[0] : 12 + s - m.starts[0] + 16] for s in starts])
    np.testing.assert_array_equal(got, want)
    assert mapping.unit_for(16, starts) == 4 and mapping.unit_for(6, starts) == 2 and mapping.unit_for(16, starts + 1) == 1


def test_short_or_missing_files_are_errors(files, tmp_path):
    a, _ = files
    with pytest.raises(EOFError, match="holds"):
        mapping.MappedRanges([(a, 3 * mapping.PAGE, 200)])
    with pytest.raises(FileNotFoundError):
        mapping.MappedRanges([(str(tmp_path / "gone"), 0, 10)])


def test_mapping_lives_as_long_as_a_view_of_it(files):
    a, _ = files
    m = mapping.MappedRanges([(a, 0, 64)])
    ref = weakref.ref(m)
    view = m.rows_view(8, 8)
    expected = files[a][:8].copy()
    del m
    gc.collect()
    assert ref() is not None
    np.testing.assert_array_equal(view[0].numpy().view(np.uint8), expected)
    del view
    gc.collect()
    assert ref() is None
