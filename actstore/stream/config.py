"""What a stream serves and how: :class:`StreamConfig` (the arguments of ``actstore.stream``)
and :class:`Filters` (which tokens are served).

**Filters.** ``min_position=p`` drops tokens at positions below ``p`` in their context window
(position 0 is BOS when the store has ``prepend_bos``; the first few positions act as attention
sinks with outsized norms). ``drop_token_ids`` drops tokens by id; ``drop_special=True`` adds
the special-token ids the harvest recorded (``extra.special_token_ids``).
Shape letters: T tokens.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from ..config import StoreConfig


@dataclass(frozen=True)
class StreamConfig:
    """What to stream and how; the arguments of :func:`actstore.stream`."""

    hooks: tuple[str, ...]
    """Hooks to serve, token-aligned."""
    batch_size: int
    """Tokens per batch."""
    seed: int = 0
    """Seed of the order; a new seed (or epoch) gives a new order."""
    epochs: int | None = 1
    """Passes over the store; None streams without end."""
    rank: int = 0
    """This process's rank among ``world_size`` (each gets a disjoint part of every epoch)."""
    world_size: int = 1
    """Number of ranks sharing the store."""
    min_position: int = 0
    """Drop tokens whose position in their context window is below this."""
    drop_token_ids: tuple[int, ...] = ()
    """Drop tokens with these ids."""
    drop_special: bool = False
    """Also drop the special tokens the harvest recorded (BOS, EOS...)."""
    normalize: Literal["none", "expected_norm"] = "none"
    """``expected_norm``: scale each hook to ``E||x||^2 = D`` (see :mod:`actstore.stream.normalize`)."""
    dtype: str | None = "float32"
    """torch dtype of the batches (``float32``, ``bfloat16``...); None: as stored (fp8 gives float32)."""
    stack: bool = True
    """Several hooks: one ``[B, H, D]`` tensor (equal widths); False: a dict of ``[B, D_h]``."""
    memory: int = 2 << 30
    """Bytes for the two blocks in memory; more means better mixing (see :mod:`actstore.stream.plan`)."""
    prefetch: int = 4
    """Batches assembled ahead of the consumer."""
    drop_last: bool = False
    """Drop the final batch if it is short."""
    follow: bool = False
    """Stream while a harvest writes the store; end when it is complete."""
    poll_seconds: float = 1.0
    """How often ``follow`` looks for new commits."""
    follow_timeout: float | None = None
    """Seconds ``follow`` waits for a new commit before raising; None waits indefinitely."""
    device: str | None = None
    """Where batches are delivered (``cuda``, ``cuda:1``...); None keeps them on the CPU."""
    shards: tuple[int, ...] | None = None
    """Stream only these committed shards (e.g. all but a held-out few); None: all."""
    scales: Mapping[str, float] | None = None
    """With ``normalize``: these scales ``s_h`` instead of measuring them (a resumed run keeps
    the scales it started with, though the store has grown since)."""
    mmap: bool = True
    """Gather uncompressed local chunks straight from the page cache (files mapped into memory)
    instead of copying them into the block first; False always copies. Same batches either way."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "hooks", tuple(self.hooks))
        object.__setattr__(self, "drop_token_ids", tuple(sorted({int(t) for t in self.drop_token_ids})))
        if self.shards is not None:
            object.__setattr__(self, "shards", tuple(sorted({int(s) for s in self.shards})))
            if self.follow:
                raise ValueError("shards= picks committed shards; it cannot be combined with follow=True")
        for name in ("batch_size", "rank", "world_size", "min_position", "prefetch"):
            object.__setattr__(self, name, _whole(getattr(self, name), name))
        if self.epochs is not None:
            object.__setattr__(self, "epochs", _whole(self.epochs, "epochs"))
        if not self.hooks:
            raise ValueError("stream needs at least one hook")
        if len(set(self.hooks)) != len(self.hooks):
            raise ValueError(f"hooks are repeated: {list(self.hooks)}")
        if self.batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {self.batch_size}")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"epochs must be positive or None (endless), got {self.epochs}")
        if self.world_size <= 0 or not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in 0..world_size-1, got rank {self.rank} of {self.world_size}")
        if self.min_position < 0:
            raise ValueError(f"min_position must be >= 0, got {self.min_position}")
        if self.normalize not in ("none", "expected_norm"):
            raise ValueError(f"normalize must be 'none' or 'expected_norm', got {self.normalize!r}")
        if self.dtype is not None and not isinstance(getattr(torch, self.dtype, None), torch.dtype):
            raise ValueError(f"unknown torch dtype {self.dtype!r}; use e.g. 'float32' or 'bfloat16'")
        if self.memory <= 0 or self.prefetch <= 0 or self.poll_seconds <= 0:
            raise ValueError("memory, prefetch and poll_seconds must be positive")
        if self.follow_timeout is not None and self.follow_timeout <= 0:
            raise ValueError(f"follow_timeout must be positive or None, got {self.follow_timeout}")

    @property
    def filters(self) -> bool:
        return self.min_position > 0 or bool(self.drop_token_ids) or self.drop_special

    def describe_filters(self) -> str:
        """The filters that are on, as the arguments that set them (for error messages)."""
        parts = [f"min_position={self.min_position}"] if self.min_position > 0 else []
        if self.drop_token_ids:
            more = ", ..." if len(self.drop_token_ids) > 8 else ""
            parts.append(f"drop_token_ids=[{', '.join(map(str, self.drop_token_ids[:8]))}{more}]")
        if self.drop_special:
            parts.append("drop_special=True")
        return ", ".join(parts)


def _whole(value: Any, name: str) -> int:
    """``value`` as an int when it is a whole number of the integer kind, else a ValueError."""
    if isinstance(value, bool):
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None


@dataclass(frozen=True)
class Filters:
    """The filters of a stream resolved against its store: which tokens are served."""

    min_position: int
    drop_ids: tuple[int, ...]
    """Token ids dropped: ``drop_token_ids`` plus, with ``drop_special``, the store's special ids."""
    on: bool
    """Whether filters were asked for (then the order waits for the data, and normalisation
    measures the served tokens instead of reading the store's statistics)."""

    @classmethod
    def resolve(cls, cfg: StreamConfig, store_cfg: StoreConfig, url: str) -> Filters:
        ids = set(cfg.drop_token_ids)
        if cfg.drop_special:
            special = store_cfg.extra.get("special_token_ids")
            if special is None:
                raise ValueError(
                    f"store {url} does not record its special token ids (harvested by an older actstore); "
                    "pass drop_token_ids=[...] instead of drop_special"
                )
            ids |= {int(t) for t in special}
        return cls(cfg.min_position, tuple(sorted(ids)), cfg.filters)

    @property
    def needs_positions(self) -> bool:
        return self.min_position > 0

    @property
    def needs_tokens(self) -> bool:
        return bool(self.drop_ids)

    def keep(self, n: int, positions_T: np.ndarray | None, tokens_T: np.ndarray | None) -> np.ndarray:
        """Which of ``n`` tokens pass (``positions_T`` given when :attr:`needs_positions`,
        ``tokens_T`` when :attr:`needs_tokens`)."""
        keep_T = np.ones(n, dtype=bool)
        if self.min_position > 0:
            keep_T &= positions_T >= self.min_position
        if self.drop_ids:
            keep_T &= ~np.isin(tokens_T, self.drop_ids)
        return keep_T
