"""The store's configuration: what a store holds and how it is laid out on storage.

A :class:`StoreConfig` is written into the root attribute ``"actstore"`` of every store
(format version 1, see ``docs/FORMAT.md``). Two configs are the *same store* when their
identity fields agree (:meth:`StoreConfig.identity`); a writer resumes such a store and refuses
any other one unless told to overwrite it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any, Literal

from .dtypes import STORE_DTYPES, StoreDType, itemsize

FORMAT_VERSION = 1

Codec = Literal["zstd", "none"]
CODECS: tuple[str, ...] = ("zstd", "none")

#: Inner chunks of at least this many bytes per hook: object stores favour large ranged reads.
MIN_CHUNK_BYTES = 1 << 20
#: Default inner chunks per shard: with >= 1 MiB chunks, shards of 16 MiB and up per hook.
DEFAULT_CHUNKS_PER_SHARD = 16

_HOOK_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*$")


@dataclass(frozen=True)
class ModelInfo:
    """The model whose activations a store holds."""

    name: str
    """Alias, HF id or local path the activations came from."""
    d_model: int
    """Residual stream width."""
    n_layers: int
    """Number of transformer blocks."""
    revision: str | None = None
    """HF revision (branch, tag or commit), when known."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("model name is empty")
        if self.d_model <= 0 or self.n_layers <= 0:
            raise ValueError(f"model d_model and n_layers must be positive, got {self.d_model}, {self.n_layers}")


@dataclass(frozen=True)
class DatasetInfo:
    """The text the activations were computed on."""

    name: str
    """Dataset name, path or glob (e.g. ``builtin:python-docs``)."""
    split: str | None = None
    """Dataset split, for hub datasets."""
    text_column: str | None = None
    """Column holding the text, for tabular datasets."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("dataset name is empty")


@dataclass(frozen=True)
class StoreConfig:
    """Everything that defines a store's content and layout (format version 1)."""

    model: ModelInfo
    """The model the activations come from."""
    dataset: DatasetInfo
    """The text they were computed on."""
    hooks: tuple[str, ...]
    """Hook names, the TransformerLens way (``blocks.{L}.hook_resid_post``); one array each."""
    n_tokens_target: int
    """Tokens the store is sized for; the last shard may be shorter than ``shard_tokens``."""
    context_size: int
    """Tokens per context window."""
    prepend_bos: bool = True
    """Whether position 0 of each context window holds the BOS token."""
    dtype: StoreDType = "bfloat16"
    """Storage dtype of the activations; ``float8_e4m3fn`` adds a per-token float32 scale."""
    codec: Codec = "zstd"
    """``zstd``: byte-shuffled zstd (blosc); ``none``: raw bytes."""
    codec_level: int = 1
    """zstd compression level (1 is fast and already near the best ratio on activations)."""
    checksums: bool = True
    """CRC32C on every inner chunk, so corruption is reported instead of returned."""
    chunk_tokens: int = 0
    """Tokens per inner chunk (the unit of reading); 0 picks the smallest power of two giving >= 1 MiB."""
    shard_tokens: int = 0
    """Tokens per shard (the unit of writing, commit and resume); 0 picks 16 chunks."""
    seed: int = 0
    """Seed of the pipeline that produced the tokens (for exact resume)."""
    hook_dims: Mapping[str, int] = field(default_factory=dict)
    """Width of each hook; hooks not named here have width ``model.d_model``."""
    extra: Mapping[str, Any] = field(default_factory=dict)
    """Producer settings that also identify the content (JSON values), e.g. packing options."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hooks", tuple(self.hooks))
        object.__setattr__(self, "hook_dims", dict(self.hook_dims))
        object.__setattr__(self, "extra", dict(self.extra))
        if not self.hooks:
            raise ValueError("a store needs at least one hook")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"hooks are repeated: {list(self.hooks)}")
        for hook in self.hooks:
            if not _HOOK_RE.match(hook) or hook.startswith("__"):
                raise ValueError(f"invalid hook name {hook!r}; use names like 'blocks.3.hook_resid_post'")
        unknown = set(self.hook_dims) - set(self.hooks)
        if unknown:
            raise ValueError(f"hook_dims names hooks that are not stored: {sorted(unknown)}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
        if self.codec not in CODECS:
            raise ValueError(f"unknown codec {self.codec!r}; choose one of {', '.join(CODECS)}")
        if not 1 <= self.codec_level <= 22:
            raise ValueError(f"codec_level must be in 1..22, got {self.codec_level}")
        if self.n_tokens_target <= 0:
            raise ValueError(f"n_tokens_target must be positive, got {self.n_tokens_target}")
        if self.context_size <= 0:
            raise ValueError(f"context_size must be positive, got {self.context_size}")
        if self.chunk_tokens < 0 or self.shard_tokens < 0:
            raise ValueError("chunk_tokens and shard_tokens must be positive (or 0 for the default)")
        if self.chunk_tokens == 0:
            object.__setattr__(self, "chunk_tokens", default_chunk_tokens(self.max_width, self.dtype))
        if self.shard_tokens == 0:
            object.__setattr__(self, "shard_tokens", self.chunk_tokens * DEFAULT_CHUNKS_PER_SHARD)
        if self.shard_tokens % self.chunk_tokens:
            raise ValueError(
                f"shard_tokens ({self.shard_tokens}) must be a multiple of chunk_tokens ({self.chunk_tokens})"
            )

    # ---- derived layout -------------------------------------------------------------------
    def width(self, hook: str) -> int:
        """Width of ``hook``'s activation vectors."""
        return int(self.hook_dims.get(hook, self.model.d_model))

    @property
    def max_width(self) -> int:
        return max(self.width(h) for h in self.hooks)

    @property
    def n_shards(self) -> int:
        return math.ceil(self.n_tokens_target / self.shard_tokens)

    def tokens_in(self, shards: Iterable[int]) -> int:
        """Tokens held by ``shards``."""
        return sum(b - a for a, b in map(self.shard_range, shards))

    def shard_range(self, shard: int) -> tuple[int, int]:
        """Token range ``[start, stop)`` of ``shard``; the last one may be short."""
        if not 0 <= shard < self.n_shards:
            raise IndexError(f"shard {shard} out of range 0..{self.n_shards - 1}")
        start = shard * self.shard_tokens
        return start, min(start + self.shard_tokens, self.n_tokens_target)

    # ---- serialisation --------------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        """The JSON object stored as root attribute ``"actstore"`` (without the commit summary)."""
        out = asdict(self)
        out["hooks"] = list(self.hooks)
        out["format_version"] = FORMAT_VERSION
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StoreConfig:
        """Parse a root attribute written by :meth:`to_json` (unknown keys are ignored)."""
        names = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in names}
        kwargs["model"] = ModelInfo(**data["model"])
        kwargs["dataset"] = DatasetInfo(**data["dataset"])
        return cls(**kwargs)

    def identity(self) -> dict[str, Any]:
        """The fields that must agree for a writer to continue a store."""
        return self.to_json()

    def differences(self, other: StoreConfig, ignore: Iterable[str] = ()) -> list[str]:
        """Human-readable ``key: ours != theirs`` for every identity field that differs (fields
        named in ``ignore`` aside, e.g. ``n_tokens_target``, the one a writer may change)."""
        return differences(self.identity(), other.identity(), ignore)

    def with_(self, **changes: Any) -> StoreConfig:
        """A copy with ``changes``; chunk and shard sizes stay as resolved unless changed too."""
        return replace(self, **changes)


def default_chunk_tokens(width: int, dtype: str) -> int:
    """Smallest power of two of tokens whose chunk of the widest hook is at least 1 MiB."""
    per_token = max(1, width * itemsize(dtype))
    return 1 << max(0, math.ceil(math.log2(MIN_CHUNK_BYTES / per_token)))


def differences(ours: Mapping[str, Any], theirs: Mapping[str, Any], ignore: Iterable[str] = ()) -> list[str]:
    """``key: ours != theirs`` for every place two nested JSON-like objects differ (nested keys
    joined with dots, tuples equal to lists), in key order; a key on one side only is one entry
    (``(absent)`` on the other), not one per leaf under it; keys in ``ignore`` (dotted) are skipped."""
    out: list[str] = []
    _diff(ours, theirs, "", set(ignore), out)
    return out


def _diff(a: Any, b: Any, key: str, skip: set[str], out: list[str]) -> None:
    if key in skip:
        return
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for k in sorted(set(a) | set(b), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in a or k not in b:
                if sub not in skip:
                    out.append(f"{sub}: {_brief(a, k)} != {_brief(b, k)}")
            else:
                _diff(a[k], b[k], sub, skip, out)
    elif _plain(a) != _plain(b):
        out.append(f"{key}: {a!r} != {b!r}")


def _brief(d: Mapping[str, Any], k: Any) -> str:
    if k not in d:
        return "(absent)"
    return "{...}" if isinstance(d[k], Mapping) else repr(d[k])


def _plain(v: Any) -> Any:
    return [_plain(x) for x in v] if isinstance(v, list | tuple) else v
