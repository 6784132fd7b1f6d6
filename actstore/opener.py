"""``open_store``: one entry point for reading (:class:`~actstore.reader.Store`) and for
creating, resuming or overwriting (:class:`~actstore.writer.StoreWriter`) a store by URL."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal, overload

from .config import StoreConfig
from .layout import read_root_attrs
from .reader import Store
from .remote import open_location
from .writer import StoreWriter


@overload
def open_store(
    url: str | os.PathLike, mode: Literal["r"] = "r", *, config: None = None,
    storage_options: Mapping[str, Any] | None = None, writer_id: int | str = 0,
) -> Store: ...


@overload
def open_store(
    url: str | os.PathLike, mode: Literal["a", "w"], *, config: StoreConfig,
    storage_options: Mapping[str, Any] | None = None, writer_id: int | str = 0,
) -> StoreWriter: ...


def open_store(
    url: str | os.PathLike,
    mode: str = "r",
    *,
    config: StoreConfig | None = None,
    storage_options: Mapping[str, Any] | None = None,
    writer_id: int | str = 0,
) -> Store | StoreWriter:
    """Open a store by URL.

    ``mode="r"`` returns a read-only :class:`Store`. ``mode="a"`` (create or resume) and
    ``mode="w"`` (overwrite) need ``config`` and return a :class:`~actstore.writer.StoreWriter`
    to use as a context manager.
    """
    if mode == "r":
        loc = open_location(url, storage_options, read_only=True)
        return Store(loc, read_root_attrs(loc))
    if mode in ("a", "w"):
        if config is None:
            raise ValueError(f"open_store(mode={mode!r}) needs the store's config")
        return StoreWriter(url, config, writer_id=writer_id, overwrite=(mode == "w"), storage_options=storage_options)
    raise ValueError(f"mode must be 'r', 'a' or 'w', got {mode!r}")
