"""File byte ranges mapped back to back into one address range (Linux), so one gather reads
rows straight from the page cache of many shard files.

The shuffled stream gathers each batch from a block of chunks spread over many shard files.
Copying the chunks into a block buffer first and gathering from there costs two passes over
memory where a plain sequential read costs one. For uncompressed local stores the rows can
instead be gathered from the page cache directly: a :class:`MappedRanges` reserves one range
of address space and maps each file range (``mmap`` with ``MAP_FIXED``) at the next page
boundary in it, so every mapped chunk has an offset in a single buffer. An overlapping strided
view of that buffer (:meth:`MappedRanges.rows_view`: row ``i`` starts at element ``i``) then
lets one ``index_select`` copy rows from any mapped chunk, in any file.

Mappings are made with ``MAP_POPULATE`` (unless ``populate=False``: the caller reads every
byte right away, e.g. to verify checksums on several threads), so the thread that maps a block
also faults its pages in (reading them from disk if they are not cached) before the gather
needs them. The address
range is unmapped when the last tensor viewing it is freed. Files are checked to be long
enough before mapping (reading past the end of a mapped file would kill the process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import weakref
from collections.abc import Sequence

import numpy as np
import torch

PAGE = mmap.PAGESIZE
_PROT_NONE, _PROT_READ = 0, 1
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_MAP_FAILED = ctypes.c_void_p(-1).value
_UNIT_DTYPES = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.uint8}


def _libc() -> ctypes.CDLL | None:
    if sys.platform != "linux":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


_LIBC = _libc()
AVAILABLE = _LIBC is not None
"""Whether this platform can map file ranges back to back (Linux)."""


def _round_up(n: int) -> int:
    return -(-n // PAGE) * PAGE


def _mmap(addr: int | None, length: int, prot: int, flags: int, fd: int, offset: int) -> int:
    assert _LIBC is not None
    got = _LIBC.mmap(addr, length, prot, flags, fd, offset)
    if got is None or got == _MAP_FAILED:
        err = ctypes.get_errno()
        raise OSError(err, f"mmap failed: {os.strerror(err)}")
    return got


def _unmap(addr: int, length: int) -> None:
    assert _LIBC is not None
    _LIBC.munmap(addr, length)


class MappedRanges:
    """Byte ranges ``(path, offset, nbytes)`` of files, mapped read-only into one address range.

    ``starts[i]`` is where range ``i`` begins in :attr:`bytes_u8`. Ranges that continue each
    other in the same file share one mapping. Raises ``FileNotFoundError`` for a missing file
    and ``EOFError`` (naming the file) for one shorter than a range needs.
    """

    def __init__(self, ranges: Sequence[tuple[str, int, int]], populate: bool = True):
        if not AVAILABLE:
            raise OSError("mapping file ranges into one address range needs Linux")
        # runs of ranges that continue each other in one file: one mapping each
        runs: list[list[int]] = []
        for i, (path, off, _) in enumerate(ranges):
            if runs:
                p, o, m = ranges[runs[-1][-1]]
                if p == path and o + m == off:
                    runs[-1].append(i)
                    continue
            runs.append([i])
        plans = []  # (path, file offset aligned down, length, slot start)
        slot = 0
        self.starts = np.zeros(len(ranges), dtype=np.int64)
        for run in runs:
            path, first, _ = ranges[run[0]]
            _, last_off, last_n = ranges[run[-1]]
            aligned = first - first % PAGE
            length = _round_up(last_off + last_n - aligned)
            for i in run:
                self.starts[i] = slot + ranges[i][1] - aligned
            plans.append((path, aligned, last_off + last_n, length, slot))
            slot += length
        self.nbytes = max(slot, PAGE)
        self.address = _mmap(None, self.nbytes, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        self._finalizer = weakref.finalize(self, _unmap, self.address, self.nbytes)
        try:
            for path, aligned, end, length, at in plans:
                fd = os.open(path, os.O_RDONLY)
                try:
                    size = os.fstat(fd).st_size
                    if size < end:
                        raise EOFError(f"{path} holds {size} bytes, a chunk needs {end}")
                    flags = _MAP_SHARED | _MAP_FIXED | (_MAP_POPULATE if populate else 0)
                    _mmap(self.address + at, length, _PROT_READ, flags, fd, aligned)
                finally:
                    os.close(fd)
        except BaseException:
            self._finalizer()
            raise

    @property
    def bytes_u8(self) -> np.ndarray:
        """The whole address range as bytes (pages between ranges are not readable); the
        mapping lives while any array or tensor viewing it does."""
        buffer = (ctypes.c_uint8 * self.nbytes).from_address(self.address)
        buffer._owner = self  # type: ignore[attr-defined]
        return np.ctypeslib.as_array(buffer)

    def rows_view(self, row_bytes: int, unit: int) -> torch.Tensor:
        """``[n, row_bytes / unit]`` overlapping view in ``unit``-byte integers whose row ``i``
        starts at byte ``i * unit``: rows at any ``unit``-aligned start, for ``index_select``."""
        flat = torch.from_numpy(self.bytes_u8).view(_UNIT_DTYPES[unit])
        width = row_bytes // unit
        return torch.as_strided(flat, (flat.numel() - width + 1, width), (1, 1))


def unit_for(row_bytes: int, starts: np.ndarray) -> int:
    """Largest of 8, 4, 2, 1 bytes dividing the row size and every start."""
    g = int(np.gcd.reduce(np.append(starts, row_bytes).astype(np.int64)))
    return next(u for u in (8, 4, 2, 1) if g % u == 0)


__all__ = ["AVAILABLE", "PAGE", "MappedRanges", "unit_for"]
