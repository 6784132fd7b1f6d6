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

import json
import logging
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import fsspec
from zarr.abc.store import Store as ZarrStore
from zarr.storage import FsspecStore, LocalStore

from .errors import StoreAccessError

log = logging.getLogger(__name__)
T = TypeVar("T")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


S3_POOL_CONNECTIONS = 128
"""Connections per S3 filesystem (botocore's default is 10): a writer has up to 16 objects in flight,
each a multipart upload of up to ``s3fs.max_concurrency`` (10) parts, and readers batch ranged reads."""
MULTIPART_PART_BYTES = 16 << 20
"""Part size of multipart uploads: shard objects of 32 MiB and more go up in parallel parts."""


def multipart_options(fs: fsspec.AbstractFileSystem) -> dict[str, Any]:
    """``pipe_file`` options that upload a large object in parallel parts, where the filesystem has them (s3fs)."""
    protocols = fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,)
    return {"chunksize": MULTIPART_PART_BYTES} if "s3" in protocols else {}


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

    def path(self, key: str) -> str:
        return f"{self.root}/{key}" if key else self.root

    def zarr_store(self) -> ZarrStore:
        if isinstance(self.fs, fsspec.implementations.local.LocalFileSystem):
            return LocalStore(self.root, read_only=self.read_only)
        return FsspecStore.from_url(self.url, storage_options=self.storage_options or None, read_only=self.read_only)

    def read_json(self, key: str) -> Any:
        raw = storage_call(lambda: self.fs.cat_file(self.path(key)), self.url)
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
    except (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError):
        raise
    except (OSError, TimeoutError, ConnectionError) as e:
        raise StoreAccessError(f"storage at {what} failed: {e}") from e

