"""Uncompressed local arrays gathered straight from the page cache: their shard files mapped
whole, once, at fixed slots of one address range (:class:`actstore.mapping.FileSlots`).

Slot ``a * n_shards + s`` holds shard ``s`` of array ``a``; a slot is as large as the largest
shard the array's layout allows (:attr:`ShardedArrayReader.max_shard_bytes`), so a chunk's
start in the range is known as soon as its shard index is, and several arrays (the hooks of a
stacked batch) share one range: one gather reads rows of all of them. :meth:`MappedArrays.starts`
maps the shard files a block needs, checks each chunk against its shard index and the file's
size, verifies each chunk's CRC32C the first time the store's reader meets it (which reads, and so
faults in, every page) or else faults its pages in, on the decode threads, the first time this
object serves it; later epochs find the pages mapped and go straight to the gather. Errors are those of a read:
:class:`MissingChunkError` for an absent chunk or shard object, :class:`CorruptChunkError` for a
checksum mismatch or a truncated or oversized shard object.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from . import mapping
from .errors import CorruptChunkError, MissingChunkError
from .shardio import ShardedArrayReader, decode_pool

MAX_RESERVED_BYTES = 1 << 46
"""Largest address range :class:`MappedArrays` reserves (64 TiB of the 128 TiB a 64-bit Linux
process has); larger stores are read by copying instead (:func:`fits`)."""


def reserved_bytes(readers: Sequence[ShardedArrayReader]) -> int:
    """Address space that mapping every shard of ``readers`` takes."""
    return sum(r.layout.n_shards * mapping.round_up(r.max_shard_bytes) for r in readers)


def fits(readers: Sequence[ShardedArrayReader]) -> bool:
    """Whether ``readers`` can be mapped together: mappable, and within :data:`MAX_RESERVED_BYTES`."""
    return all(r.mappable for r in readers) and reserved_bytes(readers) <= MAX_RESERVED_BYTES


class MappedArrays:
    """Arrays with the same token layout, every shard file mapped into one range on first use."""

    def __init__(self, readers: Sequence[ShardedArrayReader]):
        self.readers = list(readers)
        first = self.readers[0].layout
        if any(r.layout.shard_tokens != first.shard_tokens or r.layout.chunk_tokens != first.chunk_tokens for r in readers):
            raise ValueError("arrays mapped together must share their shard and chunk sizes")
        self.n_shards = first.n_shards
        self.slots = mapping.FileSlots(len(self.readers) * self.n_shards, max(r.max_shard_bytes for r in readers))
        n_chunks = first.n_chunks
        self._ready = np.zeros((len(self.readers), n_chunks), dtype=bool)  # checked and paged in here
        self._start = np.zeros((len(self.readers), n_chunks), dtype=np.int64)  # where each ready chunk is

    @property
    def nbytes(self) -> int:
        """Bytes of all the arrays' chunks (what mapping the whole store brings in)."""
        return sum(r.layout.chunk_bytes * r.layout.n_chunks for r in self.readers)

    def starts(self, chunks: Sequence[tuple[int, int]]) -> np.ndarray:
        """Byte offsets in :meth:`rows_view`'s range of the data of inner chunks ``(shard,
        chunk_in_shard)``: ``starts[a * len(chunks) + i]`` for chunk ``i`` of array ``a``. Maps,
        checks and pages in what is new (see the module docstring)."""
        n = len(chunks)
        starts = np.empty(len(self.readers) * n, dtype=np.int64)
        todo: list[tuple[int, int, int]] = []  # (array, chunk number, start)
        for a, reader in enumerate(self.readers):
            cps = reader.layout.chunks_per_shard
            spans = reader.chunk_spans(chunks)
            for i, ((shard, c), (offset, nbytes)) in enumerate(zip(chunks, spans, strict=True)):
                slot = a * self.n_shards + shard
                size = self.slots.size(slot)
                if size is None:
                    size = self._map(reader, a, shard)
                if offset + nbytes > size:
                    raise CorruptChunkError(f"{reader.layout.path} shard {shard}: shard object is truncated "
                                            f"({size} bytes, chunk {c} ends at {offset + nbytes})")
                starts[a * n + i] = slot * self.slots.slot_bytes + offset
                if not self._ready[a, shard * cps + c]:
                    todo.append((a, shard * cps + c, int(starts[a * n + i])))
        if todo:
            list(decode_pool().map(self._check, todo))
        return starts

    def _map(self, reader: ShardedArrayReader, a: int, shard: int) -> int:
        path = reader.shard_path(shard)
        try:
            return self.slots.map(a * self.n_shards + shard, path)
        except FileNotFoundError as e:
            raise MissingChunkError(f"{reader.layout.path} shard {shard}: shard object is missing ({path})") from e
        except EOFError as e:
            raise CorruptChunkError(f"{reader.layout.path} shard {shard}: {e}") from e

    def _check(self, job: tuple[int, int, int]) -> None:
        a, chunk, start = job
        reader = self.readers[a]
        self._start[a, chunk] = start
        n = reader.layout.chunk_bytes
        if not reader.layout.crc or reader.verified[chunk]:
            self.slots.populate(start, n + reader.layout.crc_len)
        else:  # the checksum pass reads every page: that faults them in (a little faster than populating first)
            region = self.slots.bytes_u8
            reader.check_crc(*divmod(chunk, reader.layout.chunks_per_shard), region[start : start + n], region[start + n : start + n + 4])
            reader.verified[chunk] = True
        self._ready[a, chunk] = True

    def release(self, chunks: Sequence[tuple[int, int]]) -> None:
        """Drop the page-table entries of these chunks (the data stays cached); the next
        :meth:`starts` that needs them pages them in again."""
        for a, reader in enumerate(self.readers):
            cps, n = reader.layout.chunks_per_shard, reader.layout.chunk_bytes + reader.layout.crc_len
            for shard, c in chunks:
                chunk = shard * cps + c
                if self._ready[a, chunk]:
                    self._ready[a, chunk] = False
                    self.slots.release(int(self._start[a, chunk]), n)

    def rows_view(self, row_bytes: int, unit: int) -> torch.Tensor:
        """See :meth:`actstore.mapping.FileSlots.rows_view`."""
        return self.slots.rows_view(row_bytes, unit)


def physical_memory_bytes() -> int:
    """RAM of this machine (a large fallback where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return 1 << 40


def keeps_pages(arrays: MappedArrays, fraction: float = 0.5) -> bool:
    """Whether to keep a store's pages mapped from epoch to epoch: when all of it fits in
    ``fraction`` of RAM, so that its pages can stay cached. Otherwise each block's pages are
    released once served (page tables of a store larger than memory would only grow)."""
    return arrays.nbytes <= fraction * physical_memory_bytes()


__all__ = ["MAX_RESERVED_BYTES", "MappedArrays", "fits", "keeps_pages", "physical_memory_bytes", "reserved_bytes"]
