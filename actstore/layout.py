"""Where each piece of a store lives, and the zarr codec chain of each array.

Layout of a format-1 store (a zarr v3 group)::

    zarr.json                 root group; attribute "actstore" = StoreConfig + commit summary
    tokens/                   int32 [N]     token id at each stored position
    positions/                int32 [N]     position of that token in its context window
    acts/<hook>/              [N, D] dtype  one array per hook
    scales/<hook>/            float32 [N]   per-token fp8 scale (dtype float8_e4m3fn only)
    commits/writer-<id>/      group whose attributes are that writer's commit record

The root attribute (:data:`ROOT_ATTR`) is read by :func:`read_root_attrs`, for readers and
writers alike.

Every array is sharded along tokens with the same shard and inner-chunk sizes, so a shard is
one object per array. Inner chunks are encoded ``bytes -> blosc(zstd, byte-shuffle, 1 MiB
blocks) -> crc32c``,
all standard zarr v3 codecs that tensorstore also reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from zarr.codecs import BloscCodec, Crc32cCodec

from .config import FORMAT_VERSION, StoreConfig
from .dtypes import itemsize
from .errors import (
    FormatVersionError,
    NotAnActstoreError,
    StoreAccessError,
    StoreFormatError,
    StoreNotFoundError,
)
from .remote import Location

#: Blosc block size. Blosc's default at low levels is tens of KiB, which costs zstd most of the
#: gain of byte-shuffling: on SmolLM2 bf16 activations 1.26x with the default, 1.43x with 1 MiB
#: blocks, at the same speed (benchmarks/bench_store.py).
BLOSC_BLOCK_BYTES = 1 << 20

TOKENS = "tokens"
POSITIONS = "positions"
ACTS = "acts"
SCALES = "scales"
COMMITS = "commits"


def acts_path(hook: str) -> str:
    return f"{ACTS}/{hook}"


def scale_path(hook: str) -> str:
    return f"{SCALES}/{hook}"


def commit_path(writer_id: int | str) -> str:
    return f"{COMMITS}/writer-{writer_id}"


@dataclass(frozen=True)
class ArraySpec:
    """One token-major array of the store."""

    path: str
    dtype: str
    """Store dtype name (``int32`` for tokens and positions)."""
    width: int | None
    """Second dimension, or None for 1-D arrays."""

    @property
    def shape_tail(self) -> tuple[int, ...]:
        return () if self.width is None else (self.width,)


def array_specs(cfg: StoreConfig) -> list[ArraySpec]:
    """All arrays of a store, tokens and positions first."""
    specs = [ArraySpec(TOKENS, "int32", None), ArraySpec(POSITIONS, "int32", None)]
    for hook in cfg.hooks:
        specs.append(ArraySpec(acts_path(hook), cfg.dtype, cfg.width(hook)))
        if cfg.dtype == "float8_e4m3fn":
            specs.append(ArraySpec(scale_path(hook), "float32", None))
    return specs


def inner_codecs(cfg: StoreConfig, dtype: str) -> list[object]:
    """The bytes-to-bytes codecs of each inner chunk: compression, then the checksum."""
    size = itemsize(dtype)
    codecs: list[object] = []
    if cfg.codec == "zstd":
        shuffle = "shuffle" if size > 1 else "noshuffle"
        codecs.append(
            BloscCodec(cname="zstd", clevel=cfg.codec_level, shuffle=shuffle, typesize=size, blocksize=BLOSC_BLOCK_BYTES)
        )
    if cfg.checksums:
        codecs.append(Crc32cCodec())
    return codecs


def group_doc(attributes: dict) -> dict:
    """The ``zarr.json`` document of a zarr v3 group with ``attributes``."""
    return {"zarr_format": 3, "node_type": "group", "attributes": attributes}


def shard_key(path: str, shard: int, ndim: int) -> str:
    """Storage key of shard ``shard`` of a token-major array (zarr v3 default chunk keys)."""
    return f"{path}/c/{shard}" + "/0" * (ndim - 1)


# ---- root attributes --------------------------------------------------------------------
ROOT_ATTR = "actstore"
STORE_ID = "store_id"
"""Root-attribute key of the random id a store gets at creation (kept by resumes and extensions,
new with ``--overwrite``): tells two stores at one URL apart."""


def read_root_attrs(loc: Location) -> dict[str, Any]:
    """The root ``"actstore"`` attribute, checked for presence and format version."""
    try:
        doc = loc.read_json("zarr.json")
    except FileNotFoundError as e:
        raise StoreNotFoundError(f"no store at {loc.url}: the path holds no zarr.json") from e
    except StoreAccessError:
        raise
    except (ValueError, UnicodeDecodeError) as e:
        raise NotAnActstoreError(f"{loc.url}/zarr.json is not valid JSON, so this is not an actstore store") from e
    except Exception as e:  # credentials, DNS, endpoint: the backend's own exception types
        raise StoreAccessError(f"cannot read {loc.url}: {type(e).__name__}: {e}") from e
    attrs = doc.get("attributes", {}).get(ROOT_ATTR) if isinstance(doc, dict) else None
    if doc.get("zarr_format") != 3 or doc.get("node_type") != "group" or not isinstance(attrs, dict):
        raise NotAnActstoreError(
            f"{loc.url} is a zarr node but not an actstore store (no '{ROOT_ATTR}' attribute on a v3 group)"
        )
    version = attrs.get("format_version")
    if not isinstance(version, int):
        raise StoreFormatError(f"{loc.url}: format_version is missing or not an integer")
    if version > FORMAT_VERSION:
        raise FormatVersionError(
            f"{loc.url} has store format_version {version}, newer than this actstore reads "
            f"({FORMAT_VERSION}); upgrade actstore (pip install -U actstore)"
        )
    return attrs
