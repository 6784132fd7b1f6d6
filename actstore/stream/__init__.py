"""Globally shuffled, resumable, rank-sharded batches from a store: ``actstore.stream(...)``.

    >>> for acts_BD in actstore.stream("runs/smol", "blocks.12.hook_resid_post", batch_size=4096):
    ...     loss = sae(acts_BD.cuda())

Every stored token (that passes the filters) is served exactly once per epoch, in an order
that is a pure function of ``(sizes, seed, epoch, rank, world)``; it does not depend on the
codec or on how chunks are read. A batch is a set: its rows from one block come in store order
(faster to read; split a batch into micro-batches only after shuffling its rows).

One job a module:

- :mod:`~actstore.stream.config`: the arguments (:class:`StreamConfig`) and the filters;
- :mod:`~actstore.stream.plan`: the pure, seeded order (chunks per rank, blocks, interleave)
  and its quality measure;
- :mod:`~actstore.stream.blocks`: reading or mapping a block, waiting for commits (``follow``);
- :mod:`~actstore.stream.batches`: cutting blocks into batches of raw rows;
- :mod:`~actstore.stream.finish`: dtype, fp8 scales, normalisation and stacking, CPU or device;
- :mod:`~actstore.stream.normalize`: the ``expected_norm`` scales;
- :mod:`~actstore.stream.iterate`: :class:`Stream` (threads, resume) and :func:`stream`.

**Follow.** ``follow=True`` streams from a store a harvest is still writing: the first epoch
is served in segments of consecutive shards (about one block per rank each), each as soon as
all its shards are committed, and the stream ends when the last segment has been served.
Shape letters: B batch, D width, H hooks, T tokens in a block.
"""

from ..errors import EmptyStoreError, EmptyStreamError, FollowTimeoutError
from .config import Filters, StreamConfig
from .finish import IndexedBatch
from .iterate import Stream, stream
from .normalize import NORM_SAMPLE_TOKENS
from .plan import Cursor, Plan

__all__ = [
    "NORM_SAMPLE_TOKENS",
    "Cursor",
    "EmptyStoreError",
    "EmptyStreamError",
    "Filters",
    "FollowTimeoutError",
    "IndexedBatch",
    "Plan",
    "Stream",
    "StreamConfig",
    "stream",
]
