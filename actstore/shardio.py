"""Sharded zarr v3 arrays, read and written directly: cached shard indexes, parallel chunk codecs.

zarr-python re-reads a shard's index for every partial read of that shard. Readers of a store
(``Store.read``, the shuffled stream) read many small token ranges spread over many shards, so
here each shard index (``n_chunks`` pairs of uint64 offset and length, then a CRC32C, at the
end of the shard object; zarr v3 sharding spec) is fetched once with a suffix range request and
cached. Chunks are then fetched with ranged reads, concurrent on object stores (as many in flight as
the connection pool holds), each decoded as it arrives: checksum, then blosc, then raw little-endian bytes.

Writing mirrors it: each inner chunk is encoded on its own (so a thread pool spreads them over
cores), then a shard is assembled as chunks in C order followed by its index, and stored as one
object: the same bytes zarr-python's sharding codec writes, without its extra copies.

Only the codec chains actstore writes are accepted (``actstore.layout``); zarr-python itself is
the reference implementation this module is tested against.
Shape letters: N tokens, D width.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import crc32c
import numcodecs
import numpy as np
from fsspec.implementations.local import LocalFileSystem

from . import mapping
from .dtypes import numpy_dtype
from .errors import CorruptChunkError, MissingChunkError, StoreFormatError
from .layout import shard_key
from .remote import Location, cat_ranges_into, raise_storage_error

_EMPTY = np.uint64(2**64 - 1)  # index entry of an absent chunk
_BLOSC = numcodecs.Blosc()
_SHUFFLES = {"noshuffle": numcodecs.Blosc.NOSHUFFLE, "shuffle": numcodecs.Blosc.SHUFFLE, "bitshuffle": numcodecs.Blosc.BITSHUFFLE}


@functools.cache
def _blosc_encoder_cached(cname: str, clevel: int, shuffle: str, blocksize: int) -> numcodecs.Blosc:
    return numcodecs.Blosc(cname=cname, clevel=clevel, shuffle=_SHUFFLES[shuffle], blocksize=blocksize)


@functools.cache
def decode_pool() -> ThreadPoolExecutor:
    """Threads that check and decode chunks (crc32c and blosc release the GIL): one per core."""
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 2, thread_name_prefix="actstore-decode")


def _blosc_nbytes(raw: memoryview) -> int:
    """Decompressed size from a blosc frame header (bytes 4..8), checked before decoding into a buffer."""
    if len(raw) < 16:
        raise ValueError("frame shorter than a blosc header")
    return int.from_bytes(raw[4:8], "little")


def _blosc_encoder(conf: dict[str, Any]) -> numcodecs.Blosc:
    return _blosc_encoder_cached(conf["cname"], int(conf["clevel"]), conf["shuffle"], int(conf.get("blocksize", 0)))


@dataclass(frozen=True)
class ArrayLayout:
    """What the fast path needs to know of one token-major sharded array."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    shard_tokens: int
    chunk_tokens: int
    blosc: dict[str, Any] | None
    """The blosc codec's configuration, or None for uncompressed chunks."""
    crc: bool

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_tokens // self.chunk_tokens

    @property
    def n_chunks(self) -> int:
        """Inner chunks of the whole array (the last may be partly beyond its end)."""
        return -(-self.shape[0] // self.chunk_tokens)

    @property
    def n_shards(self) -> int:
        """Shard objects of the whole array."""
        return -(-self.shape[0] // self.shard_tokens)

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.chunk_tokens, *self.shape[1:])

    @property
    def chunk_bytes(self) -> int:
        """Bytes of one decoded inner chunk."""
        return self.dtype.itemsize * math.prod(self.chunk_shape)

    @property
    def crc_len(self) -> int:
        """Bytes of the checksum after each stored chunk."""
        return 4 if self.crc else 0

    @classmethod
    def from_zarr_json(cls, path: str, doc: dict[str, Any]) -> ArrayLayout:
        """Parse and check an array's ``zarr.json`` against the layout actstore writes."""
        try:
            shape = tuple(doc["shape"])
            dtype = numpy_dtype(doc["data_type"])
            shard_shape = doc["chunk_grid"]["configuration"]["chunk_shape"]
            (sharding,) = doc["codecs"]
            if sharding["name"] != "sharding_indexed":
                raise ValueError("not sharded")
            conf = sharding["configuration"]
            inner = conf["chunk_shape"]
            names = [c["name"] for c in conf["codecs"]]
            blosc = next((c["configuration"] for c in conf["codecs"] if c["name"] == "blosc"), None)
            index_names = [c["name"] for c in conf["index_codecs"]]
        except (KeyError, TypeError, ValueError) as e:
            raise StoreFormatError(f"array {path} does not have actstore's layout: {e}") from e
        if (
            names[0] != "bytes"
            or set(names[1:]) - {"blosc", "crc32c"}
            or conf.get("index_location", "end") != "end"
            or index_names != ["bytes", "crc32c"]
            or list(shard_shape[1:]) != list(shape[1:])
            or list(inner[1:]) != list(shape[1:])
            or shard_shape[0] % inner[0]
        ):
            raise StoreFormatError(f"array {path} uses codecs {names} or chunks actstore does not write")
        return cls(path, shape, dtype, shard_shape[0], inner[0], blosc, "crc32c" in names)

    # ---- encoding (the writer's side) ---------------------------------------------------
    def encode_chunk(self, shard_data: np.ndarray, c: int) -> list[memoryview | bytes] | None:
        """Inner chunk ``c`` of a shard's data, encoded as byte pieces (no needless copies),
        or None if the chunk lies past the array's end.

        A chunk that the array's end cuts is padded with the fill value (0), as zarr does.
        """
        first = c * self.chunk_tokens
        if first >= len(shard_data):
            return None
        part = shard_data[first : first + self.chunk_tokens]
        if len(part) < self.chunk_tokens:
            pad = np.zeros((self.chunk_tokens - len(part), *part.shape[1:]), dtype=part.dtype)
            part = np.concatenate([part, pad])
        # typed as unsigned ints of the item size so blosc byte-shuffles with the right typesize
        raw = np.ascontiguousarray(part).view(f"<u{self.dtype.itemsize}")
        body = memoryview(_blosc_encoder(self.blosc).encode(raw) if self.blosc is not None else raw).cast("B")
        if not self.crc:
            return [body]
        return [body, crc32c.crc32c(body).to_bytes(4, "little")]

    def assemble_shard(self, chunks: Sequence[list[memoryview | bytes] | None]) -> list[memoryview | bytes]:
        """The shard object as byte pieces: chunks in C order, then the index (offset and
        length of each chunk) and its CRC32C."""
        index = np.full((self.chunks_per_shard, 2), _EMPTY, dtype="<u8")
        pieces: list[memoryview | bytes] = []
        offset = 0
        for c, chunk in enumerate(chunks):
            if chunk is not None:
                size = sum(len(p) for p in chunk)
                index[c] = (offset, size)
                offset += size
                pieces.extend(chunk)
        index_bytes = index.tobytes()
        return [*pieces, index_bytes, crc32c.crc32c(index_bytes).to_bytes(4, "little")]


class ShardedArrayReader:
    """Read token ranges of one array through cached shard indexes."""

    def __init__(self, loc: Location, layout: ArrayLayout, index_cache_size: int | None = None):
        self.loc = loc
        self.layout = layout
        self._index_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        # default: every shard's index (16 bytes a chunk: ~6 MB for a 100M-token Gemma-2-2B store), each fetched once
        self._cache_size = index_cache_size or max(1, layout.n_shards)
        self._pending: dict[int, Future] = {}  # shard -> the fetch of its index under way
        self._lock = threading.Lock()
        self.remote = loc.remote  # each read waits a round trip: batched, overlapped, as many as there are connections
        self._local = isinstance(loc.fs, LocalFileSystem) and hasattr(os, "preadv")
        self.verified = np.zeros(layout.n_chunks, dtype=bool)
        """Chunks whose checksums a mapped read has checked (committed chunks do not change)."""

    # ---- shard indexes --------------------------------------------------------------------
    def shard_path(self, shard: int) -> str:
        """Local path or URL of a shard object."""
        return self.loc.path(shard_key(self.layout.path, shard, len(self.layout.shape)))

    def _parse_index(self, shard: int, raw: bytes) -> np.ndarray:
        n = self.layout.chunks_per_shard
        body, stored = raw[: n * 16], raw[n * 16 :]
        if len(raw) != n * 16 + 4 or crc32c.crc32c(body) != int.from_bytes(stored, "little"):
            raise CorruptChunkError(f"{self.layout.path} shard {shard}: shard index checksum mismatch (data is damaged)")
        return np.frombuffer(body, dtype="<u8").reshape(n, 2)

    def shard_indexes(self, shards: Sequence[int]) -> dict[int, np.ndarray]:
        """Indexes of ``shards``, fetching the uncached ones in one batch of suffix reads (an
        index another thread is fetching already is waited for, not fetched twice)."""
        with self._lock:
            out = {s: self._index_cache[s] for s in shards if s in self._index_cache}
            waits = {s: self._pending[s] for s in shards if s not in out and s in self._pending}
            missing = sorted(set(shards) - set(out) - set(waits))
            mine: Future = Future()
            for s in missing:
                self._pending[s] = mine
        if missing:
            got: dict[int, np.ndarray] = {}
            try:
                size = self.layout.chunks_per_shard * 16 + 4

                def parse(k: int, raw: bytes) -> list:
                    return [lambda: got.__setitem__(missing[k], self._parse_index(missing[k], raw))]

                errors = cat_ranges_into(self.loc, [self.shard_path(s) for s in missing], [-size] * len(missing),
                                         [None] * len(missing), parse, decode_pool())
                self._raise_first(missing, errors)
            except BaseException as e:
                mine.set_exception(e)
                raise
            finally:
                with self._lock:
                    for s in missing:
                        del self._pending[s]
                    self._index_cache.update(got)
                    while len(self._index_cache) > self._cache_size:
                        self._index_cache.popitem(last=False)
            mine.set_result(got)
            out.update(got)
        for s, fut in waits.items():
            out[s] = fut.result()[s]
        return out

    def _raise_first(self, shards: Sequence[int], errors: Sequence[BaseException | None]) -> None:
        """Raise the first of the ``errors`` of reads from ``shards`` (None: no error), as a reader reports it."""
        for shard, err in zip(shards, errors, strict=True):
            if isinstance(err, FileNotFoundError):
                raise MissingChunkError(f"{self.layout.path} shard {shard}: shard object is missing") from err
            if err is not None:
                raise_storage_error(err, self.loc.url)

    # ---- chunks ---------------------------------------------------------------------------
    def _ranges(self, chunks: Sequence[tuple[int, int]]) -> tuple[list[tuple[int, int, int]], list[list[int]]]:
        """``(shard, start, end)`` of each chunk, and the runs of chunks (positions in ``chunks``)
        adjacent in one object: a run is one ranged read (one large read, not many small ones)."""
        indexes = self.shard_indexes(sorted({s for s, _ in chunks}))
        spans = []
        for shard, c in chunks:
            offset, nbytes = indexes[shard][c]
            if offset == _EMPTY and nbytes == _EMPTY:
                raise MissingChunkError(f"{self.layout.path} shard {shard} chunk {c} is absent")
            spans.append((shard, int(offset), int(offset + nbytes)))
        groups: list[list[int]] = []
        for i in sorted(range(len(spans)), key=lambda i: spans[i]):
            if groups and spans[groups[-1][-1]][0] == spans[i][0] and spans[groups[-1][-1]][2] == spans[i][1]:
                groups[-1].append(i)
            else:
                groups.append([i])
        return spans, groups

    def check_crc(self, shard: int, c: int, body: memoryview | np.ndarray, stored: bytes | bytearray | memoryview | np.ndarray) -> None:
        """Raise :class:`CorruptChunkError` unless the 4 little-endian bytes ``stored`` are the
        CRC32C of chunk ``c`` of ``shard``'s bytes ``body``."""
        if crc32c.crc32c(body) != int.from_bytes(stored, "little"):
            raise CorruptChunkError(f"{self.layout.path} shard {shard} chunk {c}: checksum mismatch (data is damaged)")

    def _decode_into(self, raw: memoryview, shard: int, c: int, out: np.ndarray) -> None:
        """Decode one chunk into ``out`` (a contiguous array of the chunk's shape)."""
        where = f"{self.layout.path} shard {shard} chunk {c}"
        if self.layout.crc:
            body, stored = raw[:-4], raw[-4:]
            self.check_crc(shard, c, body, stored)
            raw = body
        target = out.view(np.uint8).reshape(-1)
        if self.layout.blosc is not None:
            try:
                if _blosc_nbytes(raw) != target.nbytes:
                    raise ValueError(f"holds {_blosc_nbytes(raw)} bytes, expected {target.nbytes}")
                _BLOSC.decode(raw, out=target)
            except (RuntimeError, ValueError) as e:
                raise CorruptChunkError(f"{where}: cannot decompress ({e})") from e
        else:
            if len(raw) != target.nbytes:
                raise CorruptChunkError(f"{where}: holds {len(raw)} bytes, expected {target.nbytes}")
            target[:] = np.frombuffer(raw, dtype=np.uint8)

    def read_chunks_into(self, chunks: Sequence[tuple[int, int]], outs: Sequence[np.ndarray]) -> None:
        """Decode inner chunks ``(shard, chunk_in_shard)`` into ``outs`` (contiguous arrays of the
        chunk's shape and byte size, any dtype view): ranged reads (concurrent on object stores),
        each decoded on all cores as soon as it arrives (:func:`~actstore.remote.cat_ranges_into`).
        Local files take :meth:`_read_local_into` instead."""
        if self._local:
            self._read_local_into(chunks, outs)
            return
        spans, groups = self._ranges(chunks)

        def jobs(k: int, blob: bytes) -> list:
            view, base = memoryview(blob), spans[groups[k][0]][1]
            return [functools.partial(self._decode_into, view[spans[i][1] - base : spans[i][2] - base], *chunks[i], outs[i])
                    for i in groups[k]]

        shards = [spans[g[0]][0] for g in groups]
        errors = cat_ranges_into(self.loc, [self.shard_path(s) for s in shards], [spans[g[0]][1] for g in groups],
                                 [spans[g[-1]][2] for g in groups], jobs, decode_pool())
        self._raise_first(shards, errors)

    def _read_local_into(self, chunks: Sequence[tuple[int, int]], outs: Sequence[np.ndarray]) -> None:
        """Local fast path: each chunk is read with ``pread`` on a pool thread, an uncompressed
        one straight into ``outs`` (its checksum then verified in place), a compressed one into
        a scratch buffer and decoded from there. Same checks and errors as the generic path."""
        indexes = self.shard_indexes(sorted({s for s, _ in chunks}))
        crc_len = self.layout.crc_len

        def read_one(i: int) -> None:
            shard, c = chunks[i]
            offset, nbytes = (int(v) for v in indexes[shard][c])
            where = f"{self.layout.path} shard {shard} chunk {c}"
            if offset == int(_EMPTY) and nbytes == int(_EMPTY):
                raise MissingChunkError(f"{where} is absent")
            try:
                fd = os.open(self.shard_path(shard), os.O_RDONLY)
            except FileNotFoundError as e:
                raise MissingChunkError(f"{self.layout.path} shard {shard}: shard object is missing") from e
            try:
                target = outs[i].view(np.uint8).reshape(-1)
                if self.layout.blosc is None and nbytes == target.nbytes + crc_len:
                    stored = bytearray(crc_len)
                    got = os.preadv(fd, [target, stored] if crc_len else [target], offset)
                    if got != nbytes:
                        raise CorruptChunkError(f"{where}: shard object is truncated")
                    if crc_len:
                        self.check_crc(shard, c, target, stored)
                    return
                raw = os.pread(fd, nbytes, offset)
            finally:
                os.close(fd)
            if len(raw) != nbytes:
                raise CorruptChunkError(f"{where}: shard object is truncated")
            self._decode_into(memoryview(raw), shard, c, outs[i])

        if len(chunks) == 1:
            read_one(0)
        else:
            list(decode_pool().map(read_one, range(len(chunks))))

    @property
    def mappable(self) -> bool:
        """Whether :class:`actstore.mapped.MappedArrays` can serve this array (local,
        uncompressed, Linux)."""
        return self._local and self.layout.blosc is None and mapping.AVAILABLE

    @property
    def max_shard_bytes(self) -> int:
        """The most bytes an uncompressed shard object of this array can hold."""
        n = self.layout.chunks_per_shard
        return n * (self.layout.chunk_bytes + self.layout.crc_len) + n * 16 + 4

    def chunk_spans(self, chunks: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
        """``(offset, nbytes)`` of each inner chunk ``(shard, chunk_in_shard)`` in its shard
        object (checksum included), checked against the shard index as a read would."""
        indexes = self.shard_indexes(sorted({s for s, _ in chunks}))
        chunk_bytes, crc_len = self.layout.chunk_bytes, self.layout.crc_len
        spans = []
        for shard, c in chunks:
            offset, nbytes = (int(v) for v in indexes[shard][c])
            where = f"{self.layout.path} shard {shard} chunk {c}"
            if offset == int(_EMPTY) and nbytes == int(_EMPTY):
                raise MissingChunkError(f"{where} is absent")
            if nbytes != chunk_bytes + crc_len:
                raise CorruptChunkError(f"{where}: holds {nbytes - crc_len} bytes, expected {chunk_bytes}")
            spans.append((offset, nbytes))
        return spans

    def read_chunks(self, chunks: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Decoded inner chunks ``(shard, chunk_in_shard)``, each of full chunk shape."""
        outs = [np.empty(self.layout.chunk_shape, dtype=self.layout.dtype) for _ in chunks]
        self.read_chunks_into(chunks, outs)
        return outs

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` (the caller checks they are committed)."""
        if stop <= start:
            return np.empty((0, *self.layout.shape[1:]), dtype=self.layout.dtype)
        ct, cps = self.layout.chunk_tokens, self.layout.chunks_per_shard
        first, last = start // ct, (stop - 1) // ct
        ids = [(g // cps, g % cps) for g in range(first, last + 1)]
        out = np.empty((len(ids) * ct, *self.layout.shape[1:]), dtype=self.layout.dtype)
        self.read_chunks_into(ids, [out[i * ct : (i + 1) * ct] for i in range(len(ids))])
        offset = first * ct
        return out[start - offset : stop - offset]
