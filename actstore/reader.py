"""Reading a store: configuration, committed shards, statistics, and any hook's token range.

``open_store(url)`` (:mod:`actstore.opener`) reads the root attributes and every writer's
commit record; only committed shards are readable. Array data goes through :mod:`actstore.shardio` (cached shard
indexes, ranged reads); ``Store.zarr_array`` gives the plain zarr-python view of any array.
Shape letters: N tokens, D width.
"""

from __future__ import annotations

import logging
import re
from functools import cached_property
from typing import Any

import numpy as np
import zarr

from . import dtypes  # noqa: F401  (registers the zarr data types)
from .commits import CommitState, load_records, merge_records
from .config import StoreConfig
from .dtypes import fp8_dequantize, itemsize
from .errors import StoreFormatError, UncommittedRangeError
from .layout import ACTS, POSITIONS, ROOT_ATTR, STORE_ID, TOKENS, acts_path, scale_path
from .remote import Location
from .shardio import ArrayLayout, ShardedArrayReader
from .stats import RunningStats

log = logging.getLogger(__name__)

class Store:
    """A read-only view of a store. Cheap to create; call :meth:`refresh` to see new commits."""

    def __init__(self, loc: Location, attrs: dict[str, Any]):
        self.loc = loc
        self.attrs = attrs
        try:
            self.config = StoreConfig.from_json(attrs)
        except (KeyError, TypeError, ValueError) as e:
            raise StoreFormatError(f"{loc.url}: the '{ROOT_ATTR}' attribute is malformed: {e}") from e
        self._readers: dict[str, ShardedArrayReader] = {}
        self._state: CommitState = merge_records(load_records(loc))

    # ---- description ----------------------------------------------------------------------
    @property
    def url(self) -> str:
        return self.loc.url

    @property
    def hooks(self) -> tuple[str, ...]:
        return self.config.hooks

    @property
    def id(self) -> str | None:
        """The random id written when the store was created (None for stores made before ids)."""
        value = self.attrs.get(STORE_ID)
        return value if isinstance(value, str) else None

    @property
    def committed_shards(self) -> list[int]:
        return sorted(self._state.shards)

    @property
    def n_tokens(self) -> int:
        """Tokens in committed shards."""
        return self.config.tokens_in(self._state.shards)

    @property
    def n_tokens_target(self) -> int:
        return self.config.n_tokens_target

    @property
    def is_complete(self) -> bool:
        return len(self._state.shards) == self.config.n_shards

    def refresh(self) -> Store:
        """Re-read the commit records (shards committed since opening become readable)."""
        self._state = merge_records(load_records(self.loc))
        return self

    def stats(self, hook: str) -> RunningStats:
        """Running statistics of ``hook`` over all committed tokens."""
        self.check_hook(hook)
        return self._state.stats.get(hook, RunningStats.zeros(self.config.width(hook)))

    # ---- data -----------------------------------------------------------------------------
    def read(self, hook: str, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Activations ``[stop - start, D]`` of ``hook``: stored dtype, or float32 for fp8 stores."""
        self.check_hook(hook)
        start, stop = self._check_range(start, stop)
        values = self.array_reader(acts_path(hook)).read(start, stop)
        if self.config.dtype == "float8_e4m3fn":
            return fp8_dequantize(values, self.array_reader(scale_path(hook)).read(start, stop))
        return values

    def tokens(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        start, stop = self._check_range(start, stop)
        return self.array_reader(TOKENS).read(start, stop)

    def positions(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        start, stop = self._check_range(start, stop)
        return self.array_reader(POSITIONS).read(start, stop)

    def zarr_array(self, path: str) -> zarr.Array:
        """zarr-python's own view of an array (``tokens``, ``acts/<hook>``…), all shards included."""
        return zarr.open_array(self.loc.zarr_store(), path=path, mode="r")

    def array_reader(self, path: str) -> ShardedArrayReader:
        """The chunk-level reader of array ``path`` (``tokens``, ``acts/<hook>``...), made once."""
        if path not in self._readers:
            try:
                doc = self.loc.read_json(f"{path}/zarr.json")
            except FileNotFoundError as e:
                raise StoreFormatError(f"{self.url}: array {path} is missing") from e
            self._readers[path] = ShardedArrayReader(self.loc, ArrayLayout.from_zarr_json(path, doc))
        return self._readers[path]

    def check_hook(self, hook: str) -> None:
        """A KeyError naming the store's hooks unless ``hook`` is one of them."""
        if hook not in self.config.hooks:
            raise KeyError(f"hook {hook!r} is not in this store; it has: {', '.join(self.config.hooks)}")

    def _check_range(self, start: int, stop: int | None) -> tuple[int, int]:
        stop = self.config.n_tokens_target if stop is None else stop
        if not 0 <= start <= stop <= self.config.n_tokens_target:
            raise IndexError(f"token range [{start}, {stop}) is outside [0, {self.config.n_tokens_target})")
        if stop > start:
            st = self.config.shard_tokens
            missing = [s for s in range(start // st, (stop - 1) // st + 1) if s not in self._state.shards]
            if missing:
                raise UncommittedRangeError(
                    f"token range [{start}, {stop}) touches uncommitted shards {missing[:8]}"
                    f"{'...' if len(missing) > 8 else ''}; committed: {self.n_tokens} tokens"
                )
        return start, stop

    # ---- sizes ----------------------------------------------------------------------------
    @cached_property
    def _object_sizes(self) -> dict[str, int]:
        self.loc.fs.invalidate_cache(self.loc.root)
        return {p: int(info["size"]) for p, info in self.loc.fs.find(self.loc.root, detail=True).items()}

    def summary(self) -> dict[str, Any]:
        """Everything ``actstore info`` shows, as plain JSON values."""
        cfg = self.config
        committed = self._state.shards
        acts_prefix = self.loc.path(ACTS) + "/"
        shard_re = re.compile(r"/c/(\d+)(?:/0)?$")
        acts_stored = 0
        for path, size in self._object_sizes.items():
            m = shard_re.search(path)
            if path.startswith(acts_prefix) and m and int(m.group(1)) in committed:
                acts_stored += size
        n = self.n_tokens
        acts_raw = n * sum(cfg.width(h) * itemsize(cfg.dtype) for h in cfg.hooks)
        hooks = {}
        for hook in cfg.hooks:
            s = self.stats(hook)
            hooks[hook] = {"width": cfg.width(hook), **s.summary()}
        return {
            "url": self.url,
            "store_id": self.id,
            "format_version": self.attrs["format_version"],
            "model": dict(self.attrs["model"]),
            "dataset": dict(self.attrs["dataset"]),
            "context_size": cfg.context_size,
            "prepend_bos": cfg.prepend_bos,
            "dtype": cfg.dtype,
            "codec": cfg.codec if cfg.codec == "none" else f"{cfg.codec}-{cfg.codec_level} byte-shuffled",
            "checksums": cfg.checksums,
            "n_tokens": n,
            "n_tokens_target": cfg.n_tokens_target,
            "shards_committed": len(committed),
            "n_shards": cfg.n_shards,
            "shard_tokens": cfg.shard_tokens,
            "chunk_tokens": cfg.chunk_tokens,
            "bytes_on_disk": sum(self._object_sizes.values()),
            "acts_bytes_raw": acts_raw,
            "acts_bytes_stored": acts_stored,
            "compression_ratio": (acts_raw / acts_stored) if acts_stored else None,
            "hooks": hooks,
        }
