"""Reading inner chunks of sharded zarr v3 arrays directly, with cached shard indexes.

zarr-python re-reads a shard's index for every partial read of that shard. Readers of a store
(``Store.read``, the shuffled stream) read many small token ranges spread over many shards, so
here each shard index (``n_chunks`` pairs of uint64 offset and length, then a CRC32C, at the
end of the shard object; zarr v3 sharding spec) is fetched once with a suffix range request and
cached. Chunks are then fetched with ranged reads, batched through ``fs.cat_ranges`` so remote
filesystems run them concurrently, and decoded: checksum, then blosc, then raw little-endian bytes.

Only the codec chains actstore writes are accepted (``actstore.layout``); zarr-python itself is
the reference implementation this module is tested against.
Shape letters: N tokens, D width.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import crc32c
import numcodecs
import numpy as np

from .dtypes import numpy_dtype
from .errors import CorruptChunkError, MissingChunkError, StoreFormatError
from .layout import shard_key
from .remote import Location, call_with_retries

_EMPTY = np.uint64(2**64 - 1)  # index entry of an absent chunk
_BLOSC = numcodecs.Blosc()


@dataclass(frozen=True)
class ArrayLayout:
    """What the fast path needs to know of one token-major sharded array."""

    path: str
    shape: tuple[int, ...]
    dtype: np.dtype
    shard_tokens: int
    chunk_tokens: int
    blosc: bool
    crc: bool

    @property
    def chunks_per_shard(self) -> int:
        return self.shard_tokens // self.chunk_tokens

    @property
    def chunk_shape(self) -> tuple[int, ...]:
        return (self.chunk_tokens, *self.shape[1:])

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
        return cls(path, shape, dtype, shard_shape[0], inner[0], "blosc" in names, "crc32c" in names)


class ShardedArrayReader:
    """Read token ranges of one array through cached shard indexes."""

    def __init__(self, loc: Location, layout: ArrayLayout, index_cache_size: int = 8192):
        self.loc = loc
        self.layout = layout
        self._index_cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = index_cache_size
        self._lock = threading.Lock()

    # ---- shard indexes --------------------------------------------------------------------
    def _shard_path(self, shard: int) -> str:
        return self.loc.path(shard_key(self.layout.path, shard, len(self.layout.shape)))

    def _parse_index(self, shard: int, raw: bytes) -> np.ndarray:
        n = self.layout.chunks_per_shard
        body, stored = raw[: n * 16], raw[n * 16 :]
        if len(raw) != n * 16 + 4 or crc32c.crc32c(body) != int.from_bytes(stored, "little"):
            raise CorruptChunkError(f"{self.layout.path} shard {shard}: shard index checksum mismatch (data is damaged)")
        return np.frombuffer(body, dtype="<u8").reshape(n, 2)

    def shard_indexes(self, shards: Sequence[int]) -> dict[int, np.ndarray]:
        """Indexes of ``shards``, fetching the uncached ones in one batch of suffix reads."""
        with self._lock:
            out = {s: self._index_cache[s] for s in shards if s in self._index_cache}
        missing = sorted(set(shards) - set(out))
        if missing:
            size = self.layout.chunks_per_shard * 16 + 4
            paths = [self._shard_path(s) for s in missing]
            blobs = self._cat_ranges(paths, [-size] * len(paths), [None] * len(paths), missing)
            with self._lock:
                for s, raw in zip(missing, blobs, strict=True):
                    index = self._parse_index(s, raw)
                    out[s] = index
                    self._index_cache[s] = index
                    while len(self._index_cache) > self._cache_size:
                        self._index_cache.popitem(last=False)
        return out

    def _cat_ranges(self, paths: list[str], starts: list, ends: list, shards: Sequence[int]) -> list[bytes]:
        try:
            blobs = call_with_retries(
                lambda: self.loc.fs.cat_ranges(paths, starts, ends, on_error="return"), self.loc.url
            )
        except FileNotFoundError as e:
            raise MissingChunkError(f"{self.layout.path}: shard object missing ({e})") from e
        for shard, blob in zip(shards, blobs, strict=True):
            if isinstance(blob, FileNotFoundError):
                raise MissingChunkError(f"{self.layout.path} shard {shard}: shard object is missing")
            if isinstance(blob, Exception):
                raise blob
        return blobs

    # ---- chunks ---------------------------------------------------------------------------
    def read_chunks(self, chunks: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Decoded inner chunks ``(shard, chunk_in_shard)``, each of full chunk shape."""
        indexes = self.shard_indexes(sorted({s for s, _ in chunks}))
        paths, starts, ends = [], [], []
        for shard, c in chunks:
            offset, nbytes = indexes[shard][c]
            if offset == _EMPTY and nbytes == _EMPTY:
                raise MissingChunkError(f"{self.layout.path} shard {shard} chunk {c} is absent")
            paths.append(self._shard_path(shard))
            starts.append(int(offset))
            ends.append(int(offset + nbytes))
        blobs = self._cat_ranges(paths, starts, ends, [s for s, _ in chunks])
        return [self._decode(raw, shard, c) for raw, (shard, c) in zip(blobs, chunks, strict=True)]

    def _decode(self, raw: bytes, shard: int, c: int) -> np.ndarray:
        where = f"{self.layout.path} shard {shard} chunk {c}"
        if self.layout.crc:
            body, stored = raw[:-4], raw[-4:]
            if crc32c.crc32c(body) != int.from_bytes(stored, "little"):
                raise CorruptChunkError(f"{where}: checksum mismatch (data is damaged)")
            raw = body
        if self.layout.blosc:
            try:
                raw = _BLOSC.decode(raw)
            except (RuntimeError, ValueError) as e:
                raise CorruptChunkError(f"{where}: cannot decompress ({e})") from e
        n_items = int(np.prod(self.layout.chunk_shape))
        if len(raw) != n_items * self.layout.dtype.itemsize:
            raise CorruptChunkError(f"{where}: decoded to {len(raw)} bytes, expected {n_items * self.layout.dtype.itemsize}")
        return np.frombuffer(raw, dtype=self.layout.dtype.newbyteorder("<")).reshape(self.layout.chunk_shape)

    def read(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` (the caller checks they are committed)."""
        ct, cps = self.layout.chunk_tokens, self.layout.chunks_per_shard
        first, last = start // ct, (stop - 1) // ct
        ids = [(g // cps, g % cps) for g in range(first, last + 1)]
        parts = self.read_chunks(ids) if stop > start else []
        if not parts:
            return np.empty((0, *self.layout.shape[1:]), dtype=self.layout.dtype)
        out = np.concatenate(parts) if len(parts) > 1 else parts[0]
        offset = first * ct
        return out[start - offset : stop - offset]
