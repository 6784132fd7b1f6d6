"""actstore: activation stores for sparse-autoencoder research.

A store is a zarr v3 group (local path, ``s3://`` or any fsspec URL) holding the tokens,
their positions and residual-stream activations at many hooks, written shard by shard with a
commit protocol so harvests are crash-safe and resumable. See ``docs/FORMAT.md``.

    >>> import actstore
    >>> store = actstore.open_store("runs/smol")
    >>> acts = store.read("blocks.12.hook_resid_post", 0, 4096)   # [4096, 576] bfloat16
    >>> for acts_BD in actstore.stream(store, "blocks.12.hook_resid_post", batch_size=4096, seed=0):
    ...     ...                                                       # shuffled, float32 [4096, 576]
"""

from . import dtypes  # noqa: F401  (registers zarr data types before any array is opened)
from .config import FORMAT_VERSION, DatasetInfo, ModelInfo, StoreConfig
from .errors import (
    ActstoreError,
    ConfigMismatchError,
    CorruptChunkError,
    EmptyStoreError,
    EmptyStreamError,
    FollowTimeoutError,
    FormatVersionError,
    MissingChunkError,
    NotAnActstoreError,
    ShardError,
    StoreAccessError,
    StoreFormatError,
    StoreNotFoundError,
    UncommittedRangeError,
)
from .opener import open_store
from .reader import Store
from .stats import RunningStats
from .stream import Cursor, IndexedBatch, Stream, StreamConfig, stream
from .writer import StoreWriter

__all__ = [
    "FORMAT_VERSION",
    "ActstoreError",
    "ConfigMismatchError",
    "Cursor",
    "CorruptChunkError",
    "DatasetInfo",
    "EmptyStoreError",
    "EmptyStreamError",
    "FollowTimeoutError",
    "FormatVersionError",
    "MissingChunkError",
    "IndexedBatch",
    "ModelInfo",
    "NotAnActstoreError",
    "RunningStats",
    "ShardError",
    "Store",
    "StoreAccessError",
    "StoreConfig",
    "StoreFormatError",
    "StoreNotFoundError",
    "StoreWriter",
    "Stream",
    "StreamConfig",
    "UncommittedRangeError",
    "open_store",
    "stream",
]
