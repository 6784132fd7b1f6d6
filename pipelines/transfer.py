"""From the model's device to host shard buffers, while the model runs the next batch.

A harvest's forward pass leaves each hook's activations on the device, already in the store's
dtype (:class:`pipelines.capture.ActivationCapture` casts them as they are recorded). A plain
``.cpu()`` per hook would make the model wait for every copy, into fresh pageable memory. Here:

- the host side is a ring of ``depth`` shard buffers (one ``[shard_tokens, D]`` tensor per hook,
  page-locked on CUDA so copies run by DMA), reused for the whole harvest; :meth:`ShardRing.take`
  blocks while all are in use: backpressure when storage is slower than the model, and a bound on
  host memory of ``depth`` shards;
- each batch's rows are copied into the buffers of the shards they belong to (a batch may span
  several shards) with ``non_blocking=True`` on a side CUDA stream that first waits for the
  forward pass; the activations are marked as used by that stream (``record_stream``) so the
  allocator does not hand their memory to the next forward pass before the copy is done. The
  model thread goes straight on to the next batch: its forward pass overlaps these copies;
- a full buffer is sealed: one CUDA event recorded on the side stream after its last copy, which
  the writer thread waits on before reading the buffer (:meth:`HostShard.wait`);
- every batch is checked for non-finite values on the device (one ``isfinite().all()`` per hook,
  no synchronisation); the flags travel with the buffer and :meth:`HostShard.wait` raises
  :class:`NonFiniteActivationsError` before anything of the shard is stored, so an overflow
  (float16 Gemma-2, a broken checkpoint) stops the harvest instead of poisoning the statistics.

- with ``device_stats`` (a GPU harvest), each shard's statistics (:mod:`actstore.stats`: sums of
  the stored values, of their squared norms and of their norms, float32 per token, float64 totals)
  are added up on the device as the rows are copied, and handed to the writer with the shard:
  on the host they cost about as much CPU time as a third of the compression.

On a CPU the same code runs without pinning, streams or events (copies are synchronous).
Shape letters: N tokens, D width, H hooks.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

import actstore
from actstore.prefetch import BufferPool
from actstore.stats import RunningStats


class NonFiniteActivationsError(actstore.ActstoreError):
    """The model produced inf or NaN activations (a user-fixable setting: one line, exit 2)."""


@dataclass
class HostShard:
    """One host buffer being filled with a shard's activations and tokens."""

    acts: dict[str, torch.Tensor]
    """``{hook: [shard_tokens, D]}`` on the host."""
    tokens_N: np.ndarray
    """``[shard_tokens]`` token ids."""
    finite_H: torch.Tensor
    """Per hook: all values so far finite (on the model's device)."""
    finite_host_H: torch.Tensor
    sums_HX: torch.Tensor | None = None
    """With device statistics: per hook ``[sum_D..., sum_sq_norm, sum_norm]`` float64 on the device."""
    sums_host_HX: torch.Tensor | None = None
    shard: int = -1
    n_tokens: int = 0
    """The shard's length (its last shard may be short)."""
    filled: int = 0
    event: torch.cuda.Event | None = field(default=None, repr=False)

    def wait(self) -> None:
        """Block until the buffer's copies are done; raise if any value of the shard is not finite."""
        if self.event is not None:
            self.event.synchronize()
        bad = [h for h, ok in zip(self.acts, self.finite_host_H.tolist(), strict=True) if not ok]
        if bad:
            raise NonFiniteActivationsError(
                f"the model produced inf or NaN activations at {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} "
                f"in shard {self.shard} (nothing of it was stored); float16 overflows for many models: "
                "rerun with --model-dtype bfloat16 or float32"
            )

    def stats(self) -> dict[str, RunningStats] | None:
        """The shard's statistics added up on the device (after :meth:`wait`), or None without them."""
        if self.sums_host_HX is None:
            return None
        sums = self.sums_host_HX.numpy()
        return {h: RunningStats(self.n_tokens, sums[i, :-2].copy(), float(sums[i, -2]), float(sums[i, -1]))
                for i, h in enumerate(self.acts)}

    def view(self) -> dict[str, torch.Tensor]:
        """``{hook: [n_tokens, D]}``: the shard's rows."""
        return {h: t[: self.n_tokens] for h, t in self.acts.items()}


class ShardRing:
    """``depth`` reusable host shard buffers and the copies into them (see the module docstring)."""

    def __init__(self, hooks: Sequence[str], widths: Mapping[str, int], dtype: torch.dtype, shard_tokens: int,
                 device: torch.device, depth: int, device_stats: bool = False):
        if depth < 1:
            raise ValueError("the ring needs at least one buffer")
        if device_stats and len(set(widths.values())) != 1:
            raise ValueError("device statistics need hooks of one width")
        self.device_stats = device_stats
        self.hooks, self.widths, self.dtype = tuple(hooks), dict(widths), dtype
        self.shard_tokens, self.device, self.depth = shard_tokens, device, depth
        self.cuda = device.type == "cuda"
        self.side = torch.cuda.Stream(device) if self.cuda else None
        self._pool = BufferPool(self._new_buffer, depth, stop=threading.Event())

    def _new_buffer(self) -> HostShard:
        pin, H = self.cuda, len(self.hooks)
        acts = {h: torch.empty((self.shard_tokens, self.widths[h]), dtype=self.dtype, pin_memory=pin) for h in self.hooks}
        buf = HostShard(acts, np.empty(self.shard_tokens, np.int64), torch.ones(H, dtype=torch.bool, device=self.device),
                        torch.ones(H, dtype=torch.bool, pin_memory=pin))
        if self.device_stats:
            X = self.widths[self.hooks[0]] + 2
            buf.sums_HX = torch.zeros((H, X), dtype=torch.float64, device=self.device)
            buf.sums_host_HX = torch.zeros((H, X), dtype=torch.float64, pin_memory=pin)
        return buf

    def take(self, shard: int, n_tokens: int) -> HostShard:
        """A free buffer for ``shard`` of ``n_tokens`` tokens (blocks while all ``depth`` are in use)."""
        buf = self._pool.acquire()
        buf.shard, buf.n_tokens, buf.filled, buf.event = shard, n_tokens, 0, None
        buf.finite_H.fill_(True)
        if buf.sums_HX is not None:
            buf.sums_HX.zero_()
        return buf

    def release(self, buf: HostShard) -> None:
        """Give a buffer back once its contents are stored."""
        self._pool.release(buf)

    def batch_finite(self, acts_ND: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Per hook, whether the batch's values are all finite: ``[H]`` bool on the device, no sync."""
        return torch.stack([torch.isfinite(acts_ND[h]).all() for h in self.hooks])

    def copy_in(self, buf: HostShard, acts_ND: Mapping[str, torch.Tensor], finite_H: torch.Tensor, rows: slice,
                tokens_N: np.ndarray) -> None:
        """Append rows ``rows`` of a batch (``acts_ND[hook]``, on the device) and their token ids."""
        n = rows.stop - rows.start
        if buf.filled + n > buf.n_tokens:
            raise ValueError(f"shard {buf.shard}: {buf.filled + n} rows for {buf.n_tokens} tokens")
        dst = slice(buf.filled, buf.filled + n)
        if self.side is None:
            for h in self.hooks:
                buf.acts[h][dst].copy_(acts_ND[h][rows])
            buf.finite_H &= finite_H
            self._add_stats(buf, acts_ND, rows)
        else:
            self.side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side):
                for h in self.hooks:
                    x = acts_ND[h]
                    buf.acts[h][dst].copy_(x[rows], non_blocking=True)
                    x.record_stream(self.side)  # its memory stays the copy's until the side stream is past it
                buf.finite_H &= finite_H
                finite_H.record_stream(self.side)
                self._add_stats(buf, acts_ND, rows)
        buf.tokens_N[dst] = tokens_N
        buf.filled += n

    def _add_stats(self, buf: HostShard, acts_ND: Mapping[str, torch.Tensor], rows: slice) -> None:
        """Add the rows' sums to the buffer's (the values as stored: already in the store dtype)."""
        if buf.sums_HX is None:
            return
        for i, h in enumerate(self.hooks):
            x_ND = acts_ND[h][rows].float()
            sq_N = (x_ND * x_ND).sum(dim=1)
            buf.sums_HX[i, :-2] += x_ND.sum(dim=0, dtype=torch.float64)
            buf.sums_HX[i, -2] += sq_N.sum(dtype=torch.float64)
            buf.sums_HX[i, -1] += sq_N.sqrt().sum(dtype=torch.float64)

    def seal(self, buf: HostShard) -> None:
        """Mark ``buf`` complete: the writer's :meth:`HostShard.wait` returns once its copies are done."""
        if self.side is None:
            buf.finite_host_H.copy_(buf.finite_H)
            if buf.sums_HX is not None:
                buf.sums_host_HX.copy_(buf.sums_HX)
            return
        with torch.cuda.stream(self.side):
            buf.finite_host_H.copy_(buf.finite_H, non_blocking=True)
            if buf.sums_HX is not None:
                buf.sums_host_HX.copy_(buf.sums_HX, non_blocking=True)
            buf.event = torch.cuda.Event()
            buf.event.record(self.side)
