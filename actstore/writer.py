"""Writing a store: whole shards, data first, the commit record last.

A :class:`StoreWriter` is a context manager. On entry it creates the store (with a random
``store_id``), or re-opens one made with the same :class:`~actstore.config.StoreConfig` (any
difference is refused unless ``overwrite=True``) and learns which shards are committed. The
token target is the one setting a re-opened store may change: a lower one (never below the
committed shards) finishes the store with what is there, a higher one extends it; a committed
short last shard that the new target lengthens is taken back out of its writer's record (its
statistics subtracted) to be written again at its new length. ``submit_shard`` encodes the
shard's inner chunks on a thread pool and stores one object per array (:mod:`actstore.shardio`;
zarr creates the arrays' metadata), then atomically rewrites this writer's commit record
(:mod:`actstore.commits`), several shards at once (:mod:`actstore.inflight`). Several writers, one per rank, own disjoint shards of one store
(``pending_shards(rank, world_size)``); a crashed writer is resumed by running it again.
On every exit (an error included, as far as the storage still takes writes) the root
attributes get a summary of all commits (``n_tokens``, statistics), so plain zarr readers see
what is committed.
Shape letters: N tokens, D width.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np
import torch
import zarr
from fsspec.implementations.local import LocalFileSystem
from zarr.errors import ContainsArrayError, ContainsGroupError

from .commits import CommitRecord, load_records, merge_records, write_record
from .config import StoreConfig
from .dtypes import encode_acts, fp8_dequantize, int32_column, to_numpy, zarr_dtype
from .errors import (
    ConfigMismatchError,
    FormatVersionError,
    NotAnActstoreError,
    ShardError,
    StoreNotFoundError,
    storage_errors,
)
from .inflight import ShardPipeline
from .layout import (
    COMMITS,
    POSITIONS,
    ROOT_ATTR,
    STORE_ID,
    TOKENS,
    acts_path,
    array_specs,
    group_doc,
    inner_codecs,
    read_root_attrs,
    scale_path,
    shard_key,
)
from .reader import Store
from .remote import Location, multipart_options, open_location, storage_call
from .shardio import ArrayLayout
from .stats import RunningStats

log = logging.getLogger(__name__)

ArrayLike = np.ndarray | torch.Tensor

class StoreWriter:
    """Create or resume a store and write whole shards to it: ``io_threads`` compress, ``store_threads``
    store objects (default: 4 on a local disk, 16 on object storage), up to ``max_in_flight`` shards at once."""

    def __init__(
        self,
        url: str,
        config: StoreConfig,
        *,
        writer_id: int | str = 0,
        overwrite: bool = False,
        storage_options: Mapping[str, Any] | None = None,
        io_threads: int = 8,
        store_threads: int | None = None,
        max_in_flight: int = 2,
    ):
        self.url = url
        self.config = config
        self.writer_id = str(writer_id)
        self.overwrite = overwrite
        self.storage_options = dict(storage_options or {})
        self.io_threads = io_threads
        self.store_threads = store_threads
        self.max_in_flight = max_in_flight
        self.loc: Location | None = None
        self._layouts: dict[str, ArrayLayout] = {}
        self._record = CommitRecord(self.writer_id)
        self._committed: set[int] = set()
        self._pipeline: ShardPipeline | None = None
        self._in_flight: set[int] = set()
        self.store_id: str | None = None
        """The store's random id (None for a store made before ids: it stays without one)."""

    # ---- lifecycle ------------------------------------------------------------------------
    def __enter__(self) -> StoreWriter:
        self.open()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def open(self) -> StoreWriter:
        with storage_errors(self.url):
            return self._open()

    def _open(self) -> StoreWriter:
        loc = open_location(self.url, self.storage_options, read_only=False)
        self.loc = loc
        if self.overwrite:
            self._remove_existing_store()
        try:
            attrs = read_root_attrs(loc)
        except StoreNotFoundError:
            attrs = None
        except NotAnActstoreError as e:
            raise NotAnActstoreError(
                f"{loc.url} already holds data that is not an actstore store; "
                "choose another path (or overwrite it explicitly)"
            ) from e
        if attrs is None:
            if loc.fs.exists(loc.root) and loc.fs.ls(loc.root):
                raise NotAnActstoreError(
                    f"{loc.url} holds files but no actstore store; choose an empty or new location for the store"
                )
            self.store_id = uuid.uuid4().hex
            self._write_root(n_tokens=0, state_stats={}, n_shards_committed=0)
        else:
            existing = Store(loc, attrs)
            self.store_id = existing.id
            diffs = existing.config.differences(self.config, ignore=("n_tokens_target",))
            if diffs:
                raise ConfigMismatchError(
                    f"the store at {loc.url} was made with another configuration ({'; '.join(diffs[:4])}"
                    f"{'; ...' if len(diffs) > 4 else ''}); rerun with the same settings to resume, "
                    "or overwrite it (overwrite=True / --overwrite), or pick another path"
                )
            if existing.n_tokens_target != self.config.n_tokens_target:
                self._retarget(existing)
        self._create_arrays()
        records = load_records(loc)
        self._committed = set(merge_records(records).shards)
        own = [r for r in records if r.writer_id == self.writer_id]
        if own:
            self._record = own[0]
        store_threads = self.store_threads or (4 if isinstance(loc.fs, LocalFileSystem) else 16)
        self._pipeline = ShardPipeline(self.io_threads, store_threads, self.max_in_flight)
        log.info("store %s: %d of %d shards committed", loc.url, len(self._committed), self.config.n_shards)
        return self

    def _remove_existing_store(self) -> None:
        """Delete the store at the URL, refusing to delete anything that is not a store."""
        loc = self._loc
        try:
            read_root_attrs(loc)
        except StoreNotFoundError:
            if loc.fs.exists(loc.root) and loc.fs.ls(loc.root):
                raise NotAnActstoreError(
                    f"{loc.url} holds files but no actstore store; refusing to overwrite it, pick another path"
                ) from None
        except NotAnActstoreError as e:
            raise NotAnActstoreError(f"{e}; refusing to overwrite it, pick another path") from None
        except FormatVersionError:
            pass  # a store from a newer actstore: still ours to replace when asked
        log.info("overwriting the store at %s", loc.url)
        loc.rm_tree()

    def close(self, consolidate: bool = True) -> None:
        if self._pipeline is not None:
            self._pipeline.close()  # every shard in flight committed (or failed) first
            self._pipeline = None
        if consolidate and self.loc is not None:
            self.consolidate()

    def abort(self) -> None:
        """Close after a failure elsewhere: the root summary still gets what is committed, as far
        as the storage takes the write (a full disk may refuse it; the commit records stay the
        truth, and the next clean close writes the summary)."""
        try:
            self.close()
        except Exception as e:  # never hide the failure that brought us here
            log.warning("could not refresh the summary of %s: %s", self.url, e)

    def consolidate(self) -> None:
        """Write the summary of all writers' commits into the root attributes."""
        with storage_errors(self.url):
            state = merge_records(load_records(self._loc))
            self._write_root(n_tokens=self.config.tokens_in(state.shards), state_stats=state.stats, n_shards_committed=len(state.shards))

    def _retarget(self, existing: Store) -> None:
        """Move the token target to ``self.config``'s (see the module docstring)."""
        old, new = existing.config, self.config.n_tokens_target
        committed = existing.committed_shards
        end = max((old.shard_range(s)[1] for s in committed), default=0)
        if new < end:
            raise ConfigMismatchError(
                f"the store at {existing.url} already holds committed tokens up to {end:,}; a target of {new:,} tokens "
                f"would cut them off: ask for at least {end:,} tokens, or overwrite it (overwrite=True / --overwrite)"
            )
        last = old.n_shards - 1
        lo, hi = old.shard_range(last)
        if new > hi and hi - lo < old.shard_tokens and last in committed:
            self._uncommit(existing, last)
        log.info("store %s: token target %d -> %d", existing.url, old.n_tokens_target, new)
        self.consolidate()

    def _uncommit(self, existing: Store, shard: int) -> None:
        """Take ``shard`` out of the record that commits it, with its statistics (recomputed from
        its stored values, as the commit computed them)."""
        a, b = existing.config.shard_range(shard)
        stats = {hook: RunningStats.of(existing.read(hook, a, b)) for hook in existing.hooks}
        for record in load_records(self._loc):
            if shard in record.shards:
                kept = {hook: s.minus(stats[hook]) for hook, s in record.stats.items()}
                write_record(self._loc, CommitRecord(record.writer_id, record.shards - {shard}, kept))
                log.info("store %s: shard %d uncommitted, to be written again at its new length", existing.url, shard)

    # ---- shards ---------------------------------------------------------------------------
    @property
    def committed_shards(self) -> set[int]:
        """Shards committed by any writer (as of opening) or by this one since."""
        return set(self._committed)

    def pending_shards(self, rank: int = 0, world_size: int = 1) -> list[int]:
        """Uncommitted shards owned by ``rank``: shard ``s`` belongs to rank ``s % world_size``."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        return [s for s in range(rank, self.config.n_shards, world_size) if s not in self._committed]

    def shard_range(self, shard: int) -> tuple[int, int]:
        return self.config.shard_range(shard)

    def write_shard(self, shard: int, *, tokens: ArrayLike, positions: ArrayLike, acts: Mapping[str, ArrayLike]) -> None:
        """Store every array's data for ``shard``, then commit it (:meth:`submit_shard`, waited for)."""
        self.submit_shard(shard, tokens=tokens, positions=positions, acts=acts).result()

    def submit_shard(self, shard: int, *, tokens: ArrayLike, positions: ArrayLike, acts: Mapping[str, ArrayLike],
                     stats: Mapping[str, RunningStats] | None = None) -> Future[None]:
        """Start storing ``shard``; the future is done once it is committed.

        ``tokens`` and ``positions`` are ``[N]`` integers and ``acts[hook]`` is ``[N, D]`` for
        every hook of the store, where ``N`` is the shard's length (``shard_range``); they are
        checked here (a :class:`ShardError` at once) and must stay unchanged until the future is
        done. Up to ``max_in_flight`` shards are stored concurrently and committed in submission
        order (:mod:`actstore.inflight`); this call blocks while that many are in flight. A write
        that fails leaves the shard uncommitted and its objects removed (on a full disk, that
        makes room for the summary the writer's close still writes). ``stats``: each hook's
        statistics of the values as stored, where the caller has them (a GPU harvest sums them
        on the device); else computed here.
        """
        if self._pipeline is None:
            raise RuntimeError("StoreWriter is not open; use it as a context manager")
        if not 0 <= shard < self.config.n_shards:
            raise ShardError(f"shard {shard} is outside 0..{self.config.n_shards - 1}")
        if shard in self._committed or shard in self._in_flight:
            raise ShardError(f"shard {shard} is already committed; write only pending_shards()")
        start, stop = self.config.shard_range(shard)
        n = stop - start
        regions = {TOKENS: int32_column(tokens, n, "tokens"), POSITIONS: int32_column(positions, n, "positions")}
        missing, extra = set(self.config.hooks) - set(acts), set(acts) - set(self.config.hooks)
        if missing or extra or (stats is not None and set(stats) != set(acts)):
            raise ShardError(f"shard {shard}: acts (and stats) must cover exactly the store's hooks (missing {sorted(missing)}, "
                             f"unknown {sorted(extra)})")
        stats_jobs: dict[str, Callable[[], RunningStats]] = {}
        for hook in self.config.hooks:
            x = to_numpy(acts[hook])
            width = self.config.width(hook)
            if x.shape != (n, width) or x.dtype.kind not in "fV":
                raise ShardError(f"shard {shard}: acts[{hook!r}] must be a float [{n}, {width}] array, got {x.dtype} {list(x.shape)}")
            stored, scale = encode_acts(x, self.config.dtype)
            regions[acts_path(hook)] = stored
            if scale is not None:
                regions[scale_path(hook)] = scale
            if stats is not None:
                stats_jobs[hook] = lambda given=stats[hook]: given
            elif scale is not None:
                stats_jobs[hook] = lambda q=stored, s=scale: RunningStats.of(fp8_dequantize(q, s))
            else:
                stats_jobs[hook] = lambda q=stored: RunningStats.of(q)

        def store(path: str, pieces: list[memoryview | bytes]) -> None:
            with storage_errors(self.url):
                self._put_shard(path, shard, pieces)

        def settle(shard_stats: dict[str, RunningStats], error: BaseException | None) -> None:
            try:  # in flight until committed or cleaned up: never submitted twice meanwhile
                if error is not None:
                    raise error
                with storage_errors(self.url):
                    self._commit(shard, shard_stats)
            except BaseException:
                if shard not in self._committed:
                    self._remove_shard_objects(shard)
                raise
            finally:
                self._in_flight.discard(shard)

        self._in_flight.add(shard)
        try:
            return self._pipeline.submit(regions, self._layouts, stats_jobs, store, settle)
        except BaseException:
            self._in_flight.discard(shard)
            raise

    def _remove_shard_objects(self, shard: int) -> None:
        """Delete ``shard``'s objects, best effort (uncommitted: no reader sees them)."""
        for path, layout in self._layouts.items():
            key = self._loc.path(shard_key(path, shard, len(layout.shape)))
            try:
                if self._loc.fs.exists(key):
                    self._loc.fs.rm_file(key)
            except OSError as e:
                log.warning("could not remove the uncommitted %s: %s", key, e)

    def _put_shard(self, path: str, shard: int, pieces: list[memoryview | bytes]) -> None:
        """Store one shard object (visible to readers only once committed)."""
        key = self._loc.path(shard_key(path, shard, len(self._layouts[path].shape)))
        if isinstance(self._loc.fs, LocalFileSystem):
            os.makedirs(os.path.dirname(key), exist_ok=True)
            with open(key, "wb") as f:
                f.writelines(pieces)
        else:
            blob = b"".join(pieces)
            storage_call(lambda: self._loc.fs.pipe_file(key, blob, **multipart_options(self._loc.fs)), self._loc.url)

    def _commit(self, shard: int, shard_stats: dict[str, RunningStats]) -> None:
        record = self._record.with_shard(shard, shard_stats)
        write_record(self._loc, record)
        self._record = record
        self._committed.add(shard)

    # ---- creation -------------------------------------------------------------------------
    @property
    def _loc(self) -> Location:
        if self.loc is None:
            raise RuntimeError("StoreWriter is not open")
        return self.loc

    def _write_root(self, n_tokens: int, state_stats: dict[str, RunningStats], n_shards_committed: int) -> None:
        attrs = self.config.to_json()
        attrs["n_tokens"] = n_tokens
        attrs["n_shards_committed"] = n_shards_committed
        attrs["stats"] = {hook: s.summary() for hook, s in state_stats.items()}
        if self.store_id is not None:
            attrs[STORE_ID] = self.store_id
        self._loc.write_bytes_atomic("zarr.json", json.dumps(group_doc({ROOT_ATTR: attrs}), indent=2).encode())

    def _create_arrays(self) -> None:
        cfg = self.config
        root = zarr.open_group(self._loc.zarr_store(), mode="r+")
        for name in ("acts", COMMITS) + (("scales",) if cfg.dtype == "float8_e4m3fn" else ()):
            try:
                root.require_group(name)
            except ContainsArrayError as e:
                raise ConfigMismatchError(f"{self._loc.url}/{name} is an array, not a group; overwrite the store") from e
        for spec in array_specs(cfg):
            try:
                arr = root.create_array(
                    spec.path,
                    shape=(cfg.n_tokens_target, *spec.shape_tail),
                    dtype=zarr_dtype(spec.dtype),
                    shards=(cfg.shard_tokens, *spec.shape_tail),
                    chunks=(cfg.chunk_tokens, *spec.shape_tail),
                    compressors=inner_codecs(cfg, spec.dtype),
                    fill_value=0,
                    config={"write_empty_chunks": True},
                )
            except (ContainsArrayError, ContainsGroupError):
                arr = root[spec.path]  # made by an earlier run or by another rank
                if not isinstance(arr, zarr.Array) or arr.shape[1:] != spec.shape_tail:
                    raise ConfigMismatchError(f"{self._loc.url}/{spec.path} exists with another shape; overwrite the store") from None
                if arr.shape[0] != cfg.n_tokens_target:  # a new token target (_retarget): shards past it go
                    arr.resize((cfg.n_tokens_target, *spec.shape_tail))
            self._layouts[spec.path] = ArrayLayout.from_zarr_json(spec.path, arr.metadata.to_dict())

