"""Finishing a batch: stored bits to the consumer's dtype, dequantised (fp8), scaled (normalize)
and stacked, on the CPU or on the device.

On the CPU each hook is written, converted and scaled, straight into a reused output tensor (for
a stacked batch, into its slice of the ``[B, H, D]`` tensor: no separate stack); rows that need
no conversion are the output as gathered. On CUDA, batches are gathered into pinned memory and
copied without blocking; dtype conversion and scaling then run on the device.
Shape letters: B batch, H hooks, D width.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import torch

from ..layout import acts_path, scale_path
from ..prefetch import OutputRing
from .batches import RawBatch

TORCH_DTYPE = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32, "float8_e4m3fn": torch.float8_e4m3fn}
_NO_INDEX = torch.empty(0, dtype=torch.int64)


class IndexedBatch(NamedTuple):
    """A batch and where its tokens are in the store."""

    acts: torch.Tensor | dict[str, torch.Tensor]
    """As the plain iteration yields: ``[B, D]``, ``[B, H, D]`` or a dict of ``[B, D_h]``."""
    index_B: torch.Tensor
    """int64 token index of each row (``store.tokens(i, i + 1)`` is its token id)."""


class Finisher:
    """Turns gathered :class:`~actstore.stream.batches.RawBatch` es into what the consumer gets."""

    def __init__(
        self, hooks: tuple[str, ...], widths: Mapping[str, int], stored_dtype: str, dtype: str | None, stack: bool,
        single: bool, scales: Mapping[str, float], gathered: tuple[str, ...], device: torch.device,
    ):
        self.hooks, self.widths, self.scales, self.gathered, self.device = hooks, widths, scales, gathered, device
        self.stack = stack
        self.single = single
        self._stored = TORCH_DTYPE[stored_dtype]
        self._fp8 = stored_dtype == "float8_e4m3fn"
        if dtype:
            self.target = getattr(torch, dtype)
        else:
            self.target = torch.float32 if self._fp8 else self._stored

    @property
    def stacked(self) -> bool:
        """Whether batches are ``[B, H, D]`` tensors."""
        return self.stack and not self.single

    @property
    def direct(self) -> bool:
        """Whether gathered rows need no conversion or scaling to be the output."""
        return self.target == self._stored and not self._fp8 and not self.scales

    def on_device(self, raw: RawBatch) -> IndexedBatch:
        """CUDA: copy the raw rows over (pinned, non-blocking), then convert there."""
        dev = self.device
        arrays = raw.arrays
        if raw.stacked is not None:  # one copy of the whole [B, H, D] block, not one per strided slice
            whole = raw.stacked.to(dev, non_blocking=True)
            arrays = {p: whole[:, i] for i, p in enumerate(self.gathered)}
        parts = {h: self._hook_values(arrays, h, dev).to(self.target) for h in self.hooks}
        index_B = raw.index_B.to(dev, non_blocking=True) if raw.index_B is not None else _NO_INDEX
        return self._assemble(parts, index_B)

    def on_cpu(self, raw: RawBatch, ring: OutputRing) -> IndexedBatch:
        """CPU: convert and scale each hook into a reused output tensor from ``ring``."""
        n, hooks = raw.n, self.hooks
        if self.direct:
            index_B = raw.index_B if raw.index_B is not None else _NO_INDEX
            if raw.stacked is not None:
                return IndexedBatch(raw.stacked.view(self._stored), index_B)
            return self._assemble({h: raw.arrays[acts_path(h)].view(self._stored) for h in hooks}, index_B)
        if self.stacked:
            stacked = ring.get((n, len(hooks), self.widths[hooks[0]]), self.target)
            dests = {h: stacked[:, i] for i, h in enumerate(hooks)}
        else:
            dests = {h: ring.get((n, self.widths[h]), self.target) for h in hooks}
        cpu = torch.device("cpu")
        for h, dest in dests.items():
            dest.copy_(self._hook_values(raw.arrays, h, cpu))
        index_B = _NO_INDEX
        if raw.index_B is not None:
            index_B = ring.get((n,), torch.int64)
            index_B.copy_(raw.index_B)
        if self.stacked:
            return IndexedBatch(stacked, index_B)
        return self._assemble(dests, index_B)

    def _hook_values(self, arrays: dict[str, torch.Tensor], hook: str, dev: torch.device) -> torch.Tensor:
        """One hook's rows as values: dequantised (fp8) and scaled (normalize), float32 if either."""
        x = arrays[acts_path(hook)].to(dev, non_blocking=True).view(self._stored)
        if self._fp8:
            x = x.float() * arrays[scale_path(hook)].to(dev, non_blocking=True).view(torch.float32)[:, None]
        if hook in self.scales:
            x = x.float() * self.scales[hook]
        return x

    def _assemble(self, parts: dict[str, torch.Tensor], index_B: torch.Tensor) -> IndexedBatch:
        if not self.stack:
            return IndexedBatch(parts, index_B)
        if self.single:
            return IndexedBatch(parts[self.hooks[0]], index_B)
        return IndexedBatch(torch.stack([parts[h] for h in self.hooks], dim=1), index_B)
