"""Named exceptions of the store library.

Every failure a user can cause or meet (a wrong path, a store from a newer actstore, a
damaged chunk) has its own class, so callers can react to it and the CLI can turn it into one
line and exit code 2. Messages name the problem and, where there is one, the fix.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

MACHINE_ERRNOS = {
    errno.ENOSPC: "free some space, then run it again: it resumes (committed work is kept)",
    errno.EDQUOT: "free some of your quota, then run it again: it resumes (committed work is kept)",
    errno.EROFS: "choose a writable location",
    errno.EACCES: "choose a location you may use",
    errno.EPERM: "choose a location you may use",
    errno.ENOTDIR: "a path that should be a folder is a file",
    errno.EISDIR: "a path that should be a file is a folder",
    errno.ENAMETOOLONG: "use a shorter path",
}
"""errno values that are the machine's answer (a full disk, a read-only folder), not a fault of
actstore's, with what to do about them."""


def machine_error(e: OSError) -> str | None:
    """``what the machine said (the file); what to do`` for such an error, else None."""
    if e.errno not in MACHINE_ERRNOS:
        return None
    where = f" ({e.filename})" if e.filename else ""
    return f"{e.strerror}{where}; {MACHINE_ERRNOS[e.errno]}"


class ActstoreError(Exception):
    """Base class of every error actstore raises on purpose."""


class StoreNotFoundError(ActstoreError):
    """No store (no zarr group) exists at the URL."""


class NotAnActstoreError(ActstoreError):
    """A zarr group exists at the URL, but it has no actstore attributes."""


class FormatVersionError(ActstoreError):
    """The store was written by a newer actstore, in a format this version cannot read."""


class StoreFormatError(ActstoreError):
    """The store's metadata is malformed or uses a layout actstore does not write."""


class CorruptChunkError(ActstoreError):
    """A stored chunk or shard index failed its checksum, or could not be decoded."""


class MissingChunkError(ActstoreError):
    """A chunk that a committed shard must hold is absent."""


class ConfigMismatchError(ActstoreError):
    """A store exists at the URL with a different configuration than the one asked for."""


class UncommittedRangeError(ActstoreError):
    """A read touched tokens of a shard that is not committed yet."""


class ShardError(ActstoreError):
    """A shard write was malformed: wrong shard number, shapes, hooks, or already committed."""


class StoreAccessError(ActstoreError):
    """The storage backend could not be reached (bad endpoint, bucket or credentials)."""


class EmptyStreamError(ActstoreError):
    """A stream's filters or range leave no tokens to serve."""


class EmptyStoreError(ActstoreError):
    """The store has no committed tokens to stream."""


class FollowTimeoutError(ActstoreError):
    """``follow=True`` waited longer than ``follow_timeout`` for the next shard."""


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A full disk, a read-only file system or a missing permission as one
    :class:`~actstore.errors.StoreAccessError` line saying what to do, not a traceback."""
    try:
        yield
    except OSError as e:
        what = machine_error(e)
        if what is None:
            raise
        raise StoreAccessError(f"cannot write the store at {url}: {what}") from e
