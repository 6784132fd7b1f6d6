"""Storage access by URL: local paths, ``file://``, ``memory://``, ``s3://`` and any fsspec URL.

One :class:`Location` holds a synchronous fsspec filesystem (for our own small objects and
ranged reads) and the matching zarr store (for array metadata and shard writes).

S3 endpoint and credentials come from the environment (``AWS_ACCESS_KEY_ID``,
``AWS_SECRET_ACCESS_KEY``, ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``…)
or from ``storage_options`` (``actstore --storage-option key=value`` for every command:
:func:`use_storage_options`); they live only in memory and are never written to a store or a log.

Transient failures are retried by the backend, not here. For S3, botocore retries each request
(server errors, throttling, dropped connections: 5 attempts in its default mode; ``AWS_RETRY_MODE``
and ``AWS_MAX_ATTEMPTS``, or ``storage_options={"config_kwargs": {"retries": {...}}}``, change
that) and s3fs retries each call, body reads included (a connection cut mid-object; its
``retries``, 5), with backoff. The options reach both filesystems a :class:`Location` uses (its
own and zarr's). A loop of our own on top multiplied them: against a server answering 500, one
read made 20 requests over 42 s before it failed, 5 over 7 s without it. What still fails
reaches the caller as one :class:`StoreAccessError` (:func:`storage_call`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import fsspec
import fsspec.asyn
from fsspec.asyn import AsyncFileSystem
from zarr.abc.store import Store as ZarrStore
from zarr.storage import FsspecStore, LocalStore

from .errors import StoreAccessError

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


S3_POOL_CONNECTIONS = 128
"""Connections per S3 filesystem (botocore's default is 10): a writer has up to 16 objects in flight,
each a multipart upload of up to ``s3fs.max_concurrency`` (10) parts, and readers batch ranged reads
(as many in flight as the pool holds: :attr:`Location.max_requests`)."""
OBJECT_STORE_REQUESTS = 64
"""Ranged reads in flight per batch on object stores other than S3 (whose pool size is known)."""
MULTIPART_PART_BYTES = 16 << 20
"""Part size of multipart uploads: shard objects of 32 MiB and more go up in parallel parts."""


def _is_s3(fs: fsspec.AbstractFileSystem) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,))


def multipart_options(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    """``pipe_file`` options that upload a large object in parallel parts, where the filesystem has them (s3fs)."""
    return {"chunksize": MULTIPART_PART_BYTES} if _is_s3(fs) else {}


def _s3_options_from_env(storage_options: Mapping[str, Any]) -> dict[str, Any]:
    opts = dict(storage_options)
    config = dict(opts.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", S3_POOL_CONNECTIONS)
    opts["config_kwargs"] = config
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint and "endpoint_url" not in opts and "endpoint_url" not in opts.get("client_kwargs", {}):
        opts["endpoint_url"] = endpoint
    return opts


@dataclass
class Location:
    """A store's root: the URL the user gave, a sync filesystem, the path in it, a zarr store."""

    url: str
    fs: fsspec.AbstractFileSystem
    root: str
    storage_options: dict[str, Any] = field(default_factory=dict, repr=False)
    read_only: bool = True
    _slots: tuple[asyncio.AbstractEventLoop, asyncio.Semaphore] | None = field(default=None, init=False, repr=False, compare=False)
    """Requests in flight of :func:`cat_ranges_into` (:attr:`max_requests` of them)."""

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def zarr_store(self) -> ZarrStore:
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            return LocalStore(self.root, read_only=self.read_only)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=self.read_only)

    @property
    def remote(self) -> bool:
        """Whether reads go over the network (each request then waits a round trip)."""
        return isinstance(self.fs, AsyncFileSystem)

    @property
    def max_requests(self) -> int:
        """Requests a reader keeps in flight at once (where round trips are overlapped, :attr:`remote`):
        on S3 as many as the connection pool holds (``max_pool_connections``), so that no request
        waits for a connection and none holds one idle."""
        if _is_s3(self.fs):
            return int((self.storage_options.get("config_kwargs") or {}).get("max_pool_connections", S3_POOL_CONNECTIONS))
        return OBJECT_STORE_REQUESTS

    def read_json(self, key: str) -> Any:
        # one GET: s3fs otherwise asks for the size first (a HEAD, one more round trip) to split large objects
        opts = {"max_concurrency": 1} if _is_s3(self.fs) else {}
        raw = storage_call(lambda: self.fs.cat_file(self.path(key), **opts), self.url)
        return json.loads(raw)

    def write_bytes_atomic(self, key: str, data: bytes) -> None:
        """Write a whole object so readers see the old or the new bytes, never a mix."""
        target = self.path(key)
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            tmp = Path(f"{target}.{uuid.uuid4().hex}.partial")
            tmp.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.write_bytes(data)
                os.replace(tmp, target)
            except BaseException:  # a full disk: no partial file left behind
                tmp.unlink(missing_ok=True)
                raise
            return
        # object stores and memory: a single put is atomic
        try:
            storage_call(lambda: self.fs.pipe_file(target, data), self.url)
        except (FileNotFoundError, PermissionError) as e:
            raise StoreAccessError(
                f"cannot write to {self.url} ({type(e).__name__}: {e}); check that the bucket exists "
                "and that your credentials may write there"
            ) from e

    def rm_tree(self) -> None:
        if self.fs.exists(self.root):
            self.fs.rm(self.root, recursive=True)


_DEFAULT_OPTIONS: dict[str, Any] = {}


def use_storage_options(options: Mapping[str, Any]) -> None:
    """Options every remote store this process opens gets (under its own ``storage_options``):
    what ``actstore --storage-option key=value`` sets for whichever command follows. Kept in
    memory only, like credentials from the environment."""
    _DEFAULT_OPTIONS.clear()
    _DEFAULT_OPTIONS.update(options)


def parse_storage_options(pairs: Sequence[str]) -> dict[str, Any]:
    """``["anon=true", "endpoint_url=http://...", 'client_kwargs={"region_name": "eu-west-1"}']``
    as a dict: values that parse as JSON are taken as JSON, others as text."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--storage-option {pair!r} is not key=value; e.g. --storage-option anon=true")
        try:
            out[key.strip()] = json.loads(raw)
        except ValueError:
            out[key.strip()] = raw
    return out


def open_location(url: str | os.PathLike, storage_options: Mapping[str, Any] | None = None, read_only: bool = True) -> Location:
    """Resolve ``url`` (local path or fsspec URL) into a :class:`Location`."""
    url = os.fspath(url) if isinstance(url, os.PathLike) else url
    if not isinstance(url, str) or not url.strip():
        raise ValueError(f"a store needs a path or URL (a folder, s3://bucket/prefix...), got {url!r}")
    opts = {**_DEFAULT_OPTIONS, **(storage_options or {})}
    if is_local(url):
        path = url[len("file://"):] if url.startswith("file://") else url
        root = str(Path(path).expanduser().resolve())
        return Location(url=root, fs=fsspec.filesystem("file"), root=root, read_only=read_only)
    if url.startswith(("s3://", "s3a://")):
        opts = _s3_options_from_env(opts)
    try:
        fs, root = fsspec.core.url_to_fs(url, **opts)
    except (ImportError, ValueError) as e:
        raise StoreAccessError(f"cannot open {url}: {e}") from e
    return Location(url=url.rstrip("/"), fs=fs, root=root.rstrip("/"), storage_options=opts, read_only=read_only)


def storage_call(fn: Callable[[], T], what: str) -> T:
    """Run the storage call ``fn`` once (the backend has retried what is transient, see the
    module docstring); a failure other than a missing object or a permission error (raised as
    they are) becomes one :class:`StoreAccessError` naming ``what``."""
    try:
        return fn()
    except BaseException as e:
        raise_storage_error(e, what)


def raise_storage_error(e: BaseException, what: str) -> NoReturn:
    """Raise ``e`` as :func:`storage_call` reports a failure of storage at ``what``."""
    if isinstance(e, OSError | TimeoutError | ConnectionError) and not isinstance(
        e, FileNotFoundError | PermissionError | IsADirectoryError | NotADirectoryError
    ):
        raise StoreAccessError(f"storage at {what} failed: {e}") from e
    raise e


Jobs = Callable[[int, bytes], Sequence[Callable[[], None]]]


def cat_ranges_into(loc: Location, paths: Sequence[str], starts: Sequence[int], ends: Sequence[int | None], handle: Jobs,
                    pool: Executor) -> list[BaseException | None]:
    """Read byte ranges ``[start, end)`` of objects and hand each to ``handle(i, blob)`` as soon as
    it arrives; the jobs it returns (decoding its parts) run on ``pool`` (in the calling thread,
    one read after another, where reads are not remote: local files, memory). Over the network
    (:attr:`Location.remote`) the location's reads share :attr:`Location.max_requests` slots
    (whichever batch asked first goes first), each held until the range's jobs are done: the
    bytes held at once are those of the ranges in flight, not of the whole batch. Returns each
    range's first failure (None if none); a failure does not stop the other reads, and nothing
    is still running on return."""
    if not loc.remote:
        blobs = storage_call(lambda: loc.fs.cat_ranges(list(paths), list(starts), list(ends), on_error="return"), loc.url)
        errors: list[BaseException | None] = []
        for i, blob in enumerate(blobs):
            try:
                if isinstance(blob, BaseException):
                    raise blob
                for job in handle(i, blob):
                    job()
            except Exception as e:
                errors.append(e)
            else:
                errors.append(None)
        return errors

    async def run_all() -> list[Any]:
        loop = asyncio.get_running_loop()
        if loc._slots is None or loc._slots[0] is not loop:  # a semaphore belongs to one event loop (a fork gets a new one)
            loc._slots = loop, asyncio.Semaphore(loc.max_requests)
        slots = loc._slots[1]

        async def one(i: int) -> None:
            async with slots:
                blob = await loc.fs._cat_file(paths[i], start=starts[i], end=ends[i])
                done = await asyncio.gather(*(loop.run_in_executor(pool, job) for job in handle(i, blob)), return_exceptions=True)
            failed = next((r for r in done if isinstance(r, BaseException)), None)
            if failed is not None:
                raise failed

        return await asyncio.gather(*(one(i) for i in range(len(paths))), return_exceptions=True)

    done = storage_call(lambda: fsspec.asyn.sync(loc.fs.loop, run_all), loc.url)
    return [r if isinstance(r, BaseException) else None for r in done]
