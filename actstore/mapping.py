"""Whole files mapped at fixed slots of one reserved address range (Linux), so one gather
reads rows straight from the page cache of many shard files, epoch after epoch.

The shuffled stream gathers each batch from a block of chunks spread over many shard files.
Copying the chunks into a block buffer first and gathering from there costs two passes over
memory where a plain sequential read costs one. For uncompressed local stores the rows can
instead be gathered from the page cache directly: :class:`FileSlots` reserves one range of
address space with a fixed-size slot per file and maps each file whole (``mmap`` with
``MAP_FIXED``) into its slot the first time it is needed, so every byte of every file has one
offset in a single buffer. An overlapping strided view of that buffer (:meth:`FileSlots.rows_view`:
row ``i`` starts at element ``i``) lets one ``index_select`` copy rows from any chunk of any file.

Mappings stay for the life of the object (as ``numpy.memmap`` or the memory-mapped Arrow files
of Hugging Face ``datasets`` do), so a chunk's page-table entries, once made, serve every later
epoch: :meth:`FileSlots.populate` makes them ahead of the gather (``MADV_POPULATE_READ``, which
also reads pages that are not cached), and :meth:`FileSlots.release` drops them again (the pages
stay in the page cache) where the caller streams more than memory holds. The kernel reclaims
mapped file pages under memory pressure as it does any page cache. The reservation is unmapped
when the object and the last tensor viewing it are gone. Files are checked against their slot and
callers check byte ranges against :meth:`FileSlots.size` (reading past the end of a mapped file
would kill the process).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import sys
import threading
import weakref

import numpy as np
import torch

PAGE = mmap.PAGESIZE
_PROT_NONE, _PROT_READ = 0, 1
_MAP_SHARED, _MAP_PRIVATE, _MAP_FIXED, _MAP_ANONYMOUS, _MAP_NORESERVE = 0x01, 0x02, 0x10, 0x20, 0x4000
_MADV_DONTNEED, _MADV_POPULATE_READ = 4, 22
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
    libc.madvise.restype = ctypes.c_int
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


_LIBC = _libc()
AVAILABLE = _LIBC is not None
"""Whether this platform can map files at fixed slots (Linux)."""


def round_up(n: int) -> int:
    """``n`` rounded up to whole pages."""
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


class FileSlots:
    """``n_slots`` slots of ``slot_bytes`` (whole pages) in one reserved address range; a file
    mapped read-only into slot ``i`` starts at byte ``i * slot_bytes`` of :attr:`bytes_u8`."""

    def __init__(self, n_slots: int, slot_bytes: int):
        if not AVAILABLE:
            raise OSError("mapping files at fixed slots needs Linux")
        self.slot_bytes = round_up(max(1, slot_bytes))
        self.nbytes = self.slot_bytes * max(1, n_slots)
        self.address = _mmap(None, self.nbytes, _PROT_NONE, _MAP_PRIVATE | _MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        self._finalizer = weakref.finalize(self, _unmap, self.address, self.nbytes)
        self._sizes: dict[int, int] = {}
        self._lock = threading.Lock()
        self._populate_works = True

    def map(self, slot: int, path: str) -> int:
        """Map ``path`` whole into ``slot`` (once; later calls return at once) and return its size
        in bytes. Raises ``FileNotFoundError`` for a missing file and ``EOFError`` for one larger
        than a slot."""
        with self._lock:
            if slot in self._sizes:
                return self._sizes[slot]
            fd = os.open(path, os.O_RDONLY)
            try:
                size = os.fstat(fd).st_size
                if size > self.slot_bytes:
                    raise EOFError(f"{path} holds {size} bytes, more than the {self.slot_bytes} its layout allows")
                if size:
                    _mmap(self.address + slot * self.slot_bytes, round_up(size), _PROT_READ, _MAP_SHARED | _MAP_FIXED, fd, 0)
            finally:
                os.close(fd)
            self._sizes[slot] = size
            return size

    def size(self, slot: int) -> int | None:
        """Bytes of the file mapped in ``slot``; None before it is mapped."""
        return self._sizes.get(slot)

    def _advise(self, start: int, nbytes: int, advice: int, outward: bool) -> int:
        assert _LIBC is not None
        lo = start - start % PAGE if outward else round_up(start)
        hi = round_up(start + nbytes) if outward else (start + nbytes) - (start + nbytes) % PAGE
        if hi <= lo:
            return 0
        return _LIBC.madvise(self.address + lo, hi - lo, advice)

    def populate(self, start: int, nbytes: int) -> None:
        """Fault in the pages of mapped bytes ``[start, start + nbytes)`` now (reading them from
        disk if they are not cached), so a later gather finds them; a no-op on kernels before
        5.14, where the gather faults them in itself."""
        if self._populate_works and self._advise(start, nbytes, _MADV_POPULATE_READ, outward=True) != 0:
            self._populate_works = False

    def release(self, start: int, nbytes: int) -> None:
        """Drop the page-table entries of the whole pages inside ``[start, start + nbytes)``;
        the data stays in the page cache and a later read faults it back in."""
        self._advise(start, nbytes, _MADV_DONTNEED, outward=False)

    @property
    def bytes_u8(self) -> np.ndarray:
        """The whole address range as bytes (only mapped file bytes are readable); the mapping
        lives while any array or tensor viewing it does."""
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


__all__ = ["AVAILABLE", "PAGE", "FileSlots", "round_up", "unit_for"]
