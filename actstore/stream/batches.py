"""Batch assembly: the served blocks' output cut into batches of raw rows, and the gathers that
fill them.

Batches run on across block and epoch boundaries, so all are full except perhaps the very last
(dropped with ``drop_last=True``). Rows are gathered in the stored dtype's bit pattern (as
integers of the row's byte unit) into tensors the caller provides: reused ones on the CPU,
fresh pinned ones for a device (:mod:`actstore.stream.finish` converts them).
Shape letters: B batch, H hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch

from ..prefetch import BufferPool
from ..reader import Store
from .blocks import STACK, UNIT_INT, Block, StreamArrays, row_layout
from .plan import Cursor


class Copy(NamedTuple):
    """One gather: ``dest = rows[index]``."""

    rows: torch.Tensor
    index: torch.Tensor
    dest: torch.Tensor

    def run(self) -> None:
        torch.index_select(self.rows, 0, self.index, out=self.dest)


@dataclass
class RawBatch:
    """A batch's rows in the stored dtype's bit pattern (once :meth:`gather` has run)."""

    arrays: dict[str, torch.Tensor]
    n: int
    cursor: Cursor
    index_B: torch.Tensor | None = None
    stacked: torch.Tensor | None = None
    """``[B, H, D]``, when the hooks were gathered straight into their slices of it."""
    copies: list[Copy] = field(default_factory=list)
    """Gathers still to run into ``arrays``."""

    def gather(self) -> None:
        for c in self.copies:
            c.run()
        self.copies = []


Alloc = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


class BatchCutter:
    """Cuts the served blocks of one stream into :class:`RawBatch` es.

    ``filtered_out(epoch)`` is the error raised when the filters kept none of an epoch's tokens
    (a stream without end would otherwise wait for a batch forever)."""

    def __init__(
        self, store: Store, arrays: StreamArrays, batch_size: int, drop_last: bool, epochs: int | None,
        filtered_out: Callable[[int], Exception],
    ):
        self.arrays, self.batch_size, self.drop_last, self.epochs = arrays, batch_size, drop_last, epochs
        self.filtered_out = filtered_out
        self._ct = store.config.chunk_tokens
        self._specs = {}
        for p in arrays.gathered:
            tail, dtype = row_layout(store, p)
            self._specs[p] = (tail, UNIT_INT[dtype.itemsize])

    def cut(
        self, start: Cursor, blocks: Iterable[Block], pool: BufferPool, retired: list[Block], alloc: Alloc,
        drain: Callable[[], None], with_index: bool, stacked: bool = False,
    ) -> Iterator[RawBatch]:
        """Batches of raw rows from ``start`` on, to be gathered (:meth:`RawBatch.gather`) into
        tensors from ``alloc``, or with ``stacked`` into the slices of one ``[B, H, D]`` tensor.
        When a block whose buffers are gathered from is served, the gathers of a batch still
        being filled run here and ``drain`` waits for those handed out, before the block goes to
        ``retired``; mapped chunks stay valid, so then nothing waits."""
        B, ct, gathered, specs = self.batch_size, self._ct, self.arrays.gathered, self._specs
        buffered = not set(gathered) <= self.arrays.mapped  # mapped chunks outlive their block: no waiting
        batches, tokens = start.batches, start.tokens
        out: dict[str, torch.Tensor] = {}
        copies: list[Copy] = []
        whole: torch.Tensor | None = None
        index_B: torch.Tensor | None = None
        filled = 0
        epoch, epoch_tokens, whole_epoch = -1, 0, False  # tokens kept in the current epoch, and whether it began here
        for blk in blocks:
            e, s, b = blk.key
            off = start.offset if blk.key == start.block_key else 0
            n = len(blk.order_T)
            if e != epoch:
                if whole_epoch and not epoch_tokens:
                    raise self.filtered_out(epoch)
                epoch, epoch_tokens, whole_epoch = e, 0, (s, b, off) == (0, 0, 0)
            epoch_tokens += n
            while off < n:
                if filled == 0:
                    if stacked:
                        tail, dtype = specs[gathered[0]]
                        whole = alloc((B, len(gathered), *tail), dtype)
                        out = {p: whole[:, i] for i, p in enumerate(gathered)}
                    else:
                        out = {p: alloc((B, *tail), dtype) for p, (tail, dtype) in specs.items()}
                    index_B = alloc((B,), torch.int64) if with_index else None
                take = min(B - filled, n - off)
                for p, src in blk.sources.items():
                    target = whole if p == STACK else out[p]
                    assert target is not None
                    h = src.per_token
                    dest = target[filled : filled + take].view(torch.uint8).view(take * h, -1).view(UNIT_INT[src.unit])
                    copies.append(Copy(src.rows, src.index_T[off * h : (off + take) * h], dest))
                if index_B is not None:
                    k_b, r_b = np.divmod(blk.order_T[off : off + take], ct)
                    index_B[filled : filled + take] = torch.from_numpy(blk.chunk_K[k_b] * ct + r_b)
                filled += take
                off += take
                if filled == B:
                    batches, tokens = batches + 1, tokens + B
                    cursor = Cursor(e, s, b, off, batches, tokens) if off < n else Cursor(e, s, b + 1, 0, batches, tokens)
                    yield RawBatch(dict(out), B, cursor, index_B, whole, copies)
                    copies, filled = [], 0
            if buffered:  # gathers read this block's buffers: finish them (a batch that runs on into the next block: its rows from this one now)
                for c in copies:
                    c.run()
                copies = []
                drain()
            pool.release(blk.buffer)
            retired.append(blk)
            del blk
        if whole_epoch and not epoch_tokens:
            raise self.filtered_out(epoch)
        if filled and not self.drop_last:
            end = Cursor(self.epochs or 0, 0, 0, 0, batches + 1, tokens + filled)
            yield RawBatch(
                {p: t[:filled] for p, t in out.items()}, filled, end, index_B[:filled] if index_B is not None else None,
                whole[:filled] if whole is not None else None, copies,
            )
