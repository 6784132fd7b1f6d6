"""The stream's reusable output tensors (``actstore.prefetch.OutputRing``, ``empty_huge``)."""

from __future__ import annotations

import gc

import pytest
import torch

from actstore.prefetch import OutputRing, empty_huge

BIG = (1024, 1024)  # 4 MiB of float32: above the huge-page size
SMALL = (16, 8)


@pytest.mark.parametrize("shape", [BIG, SMALL])
def test_ring_reuses_a_tensor_only_once_nothing_refers_to_it(shape):
    ring = OutputRing(2)
    a = ring.get(shape, torch.float32)
    a.fill_(1.0)
    a_address, view = a.data_ptr(), a[1:]
    del a
    b = ring.get(shape, torch.float32)  # a's memory is still seen through ``view``
    assert b.data_ptr() != a_address
    b.fill_(2.0)
    assert torch.all(view == 1.0)
    address = b.data_ptr()
    del b
    c = ring.get(shape, torch.float32)  # b was dropped: its memory comes back
    assert c.data_ptr() == address
    d = ring.get(shape, torch.float32)  # ring full and both held: a fresh tensor
    assert d.data_ptr() not in (address, a_address)
    assert d.shape == shape and d.dtype == torch.float32


def test_empty_huge_is_a_writable_tensor_that_keeps_its_memory_alive():
    t = empty_huge((3, 1 << 20), torch.bfloat16)
    assert t.shape == (3, 1 << 20) and t.dtype == torch.bfloat16 and t.is_contiguous()
    view = t[2, 10:20]
    t.fill_(1.5)
    del t
    gc.collect()
    assert torch.all(view == 1.5)
    small = empty_huge((4,), torch.int64)
    small.copy_(torch.arange(4))
    assert small.tolist() == [0, 1, 2, 3]
