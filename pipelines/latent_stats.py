"""Every latent's statistics and examples over a stream of token batches, on the device, in memory
that does not grow with the tokens (what ``actstore latents`` accumulates per SAE).

For each latent ``f`` of an SAE, over the counted tokens (those at positions >= ``min_position``
of their context window) that the caller feeds in store order:

- ``count[f]``: tokens where ``f`` fired (activation > 0); its frequency is ``count / tokens``;
- ``sum[f]`` (float64) and ``max[f]`` of its activations; the mean is over the tokens it fired on;
- ``hist[f, h]``: its activations in log-spaced bins (``bins_per_decade`` a decade from
  ``10**lo_exp`` to ``10**hi_exp``; smaller values fall in the first bin, larger in the last);
- ``top``: its ``top`` highest activations, ties to the earlier token: a streaming top-k, each
  batch's candidates merged with the kept ones (only values above a latent's current ``top``-th
  can enter, so most batches touch few latents);
- ``sample``: a uniform random sample of ``samples`` tokens it fired on, the bottom-k sketch of
  a hash of (token index, latent) (Cohen & Kaplan 2007, "Summarizing data using bottom-k
  sketches"): the same sample whatever the batch boundaries, so a resumed pass keeps it; the
  dashboard cuts it at its quartiles into lower-quantile examples.

A batch's latents come dense or, from a TopK SAE, as each token's ``k`` values and latents
(:class:`Latents`): the same entries, the dense matrix never made.

Each kept example carries the activations of its latent and the token ids on the ``before`` +
1 + ``after`` tokens around it, clipped to its context window, taken from the batch it came from
(batches hold whole context windows, so every context is in its batch).

Shape letters: B tokens in a batch, F latents, K examples kept per latent (``top`` or
``samples``), C context tokens, H histogram bins, M candidates, U latents touched.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

EMPTY_INDEX = -1
"""Token index of an unused example slot (and token id of a context position outside the window)."""
_HASH_MASK = (1 << 62) - 1


@dataclass(frozen=True)
class StatsConfig:
    """What is kept per latent."""

    top: int = 20
    """Top-activating examples."""
    samples: int = 24
    """Random activating examples (cut at quartiles for the dashboard's lower-quantile bands)."""
    before: int = 10
    """Context tokens kept before an example's token."""
    after: int = 5
    """Context tokens kept after it."""
    bins_per_decade: int = 8
    lo_exp: int = -3
    hi_exp: int = 3
    seed: int = 0
    """Seed of the sampling hash."""

    def __post_init__(self) -> None:
        for name in ("top", "samples", "before", "after"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name} must be >= 0, got {getattr(self, name)}")
        if self.top == 0:
            raise ValueError("--top must be at least 1")
        if self.lo_exp >= self.hi_exp or self.bins_per_decade <= 0:
            raise ValueError(f"bad histogram range 1e{self.lo_exp}..1e{self.hi_exp} at {self.bins_per_decade} bins a decade")

    @property
    def context(self) -> int:
        return self.before + 1 + self.after

    @property
    def bins(self) -> int:
        return (self.hi_exp - self.lo_exp) * self.bins_per_decade

    def edges(self) -> np.ndarray:
        """The ``bins + 1`` histogram edges."""
        return 10.0 ** np.linspace(self.lo_exp, self.hi_exp, self.bins + 1)


def sample_keys(index_M: torch.Tensor, latent_M: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A 62-bit hash of (global token index, latent), the same on every device: the sample keeps
    each latent's smallest keys. (SplitMix64's finaliser on 62 bits; int64 products wrap.)"""
    x = (index_M * 0x1E3779B97F4A7C15 + latent_M * 0x42B2AE3D27D4EB4F + seed) & _HASH_MASK
    x = x ^ (x >> 31)
    x = (x * 0x3F58476D1CE4E5B9) & _HASH_MASK
    x = x ^ (x >> 29)
    x = (x * 0x14D049BB133111EB) & _HASH_MASK
    return x ^ (x >> 32)


@dataclass
class Latents:
    """A batch's latents, zero on tokens that are not counted: dense ``[B, F]``, or, from a TopK
    SAE (:meth:`trainers.topk.TopKSAE.encode_sparse`), each token's ``k`` largest as values and
    latents ``[B, k]``, the same numbers without the dense matrix."""

    dense_BF: torch.Tensor | None = None
    vals_BK: torch.Tensor | None = None
    idx_BK: torch.Tensor | None = None
    """Latents of each row, ascending (so ``row * F + latent`` is sorted over the flattened batch)."""
    d_sae: int = 0
    _by_latent: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, repr=False)

    @classmethod
    def dense(cls, latents_BF: torch.Tensor, counted_B: torch.Tensor | None = None) -> Latents:
        latents_BF = latents_BF.float()
        if counted_B is not None:
            latents_BF[~counted_B] = 0.0
        return cls(dense_BF=latents_BF)

    @classmethod
    def sparse(cls, vals_BK: torch.Tensor, idx_BK: torch.Tensor, d_sae: int, counted_B: torch.Tensor | None = None) -> Latents:
        idx_BK, perm_BK = idx_BK.sort(dim=1)
        vals_BK = vals_BK.float().gather(1, perm_BK)
        if counted_B is not None:
            vals_BK[~counted_B] = 0.0
        return cls(vals_BK=vals_BK, idx_BK=idx_BK, d_sae=d_sae)

    @property
    def rows(self) -> int:
        return (self.dense_BF if self.dense_BF is not None else self.vals_BK).shape[0]  # type: ignore[union-attr]

    def fired(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every (row, latent, activation) with activation > 0, rows ascending."""
        if self.dense_BF is not None:
            row_M, latent_M = torch.nonzero(self.dense_BF > 0, as_tuple=True)
            return row_M, latent_M, self.dense_BF[row_M, latent_M]
        row_M, slot_M = torch.nonzero(self.vals_BK > 0, as_tuple=True)
        return row_M, self.idx_BK[row_M, slot_M], self.vals_BK[row_M, slot_M]

    def around(self, row_M: torch.Tensor, latent_M: torch.Tensor, before: int, after: int) -> torch.Tensor:
        """``[M, C]``: latent ``latent_M[m]``'s activation on rows ``row_M[m] - before ..
        row_M[m] + after`` (zero on rows outside the batch)."""
        C = before + 1 + after
        first_M = row_M - before
        if self.dense_BF is not None:
            pos_MC = first_M[:, None] + torch.arange(C, device=row_M.device)
            inside_MC = (pos_MC >= 0) & (pos_MC < self.rows)
            return torch.where(inside_MC, self.dense_BF[pos_MC.clamp(0, self.rows - 1), latent_M[:, None]], 0.0)
        # the batch's entries sorted by (latent, row): a latent's entries in rows first..first+C-1
        # are the (at most C) entries from the first at or after (latent, first), one search each
        if self._by_latent is None:
            key_E, order_E = (self.idx_BK * self.rows + torch.arange(self.rows, device=row_M.device)[:, None]).flatten().sort()
            self._by_latent = (key_E, self.vals_BK.flatten()[order_E])
        key_E, val_E = self._by_latent
        from_M = latent_M * self.rows + first_M.clamp(min=0)
        at_MC = (torch.searchsorted(key_E, from_M)[:, None] + torch.arange(C, device=row_M.device)).clamp(max=key_E.numel() - 1)
        offset_MC = key_E[at_MC] - (latent_M * self.rows + first_M)[:, None]  # the entry's row - first
        hit_MC = (offset_MC >= 0) & (offset_MC < C) & (key_E[at_MC] // self.rows == latent_M[:, None])
        out_MC = torch.zeros(row_M.shape[0], C + 1, device=row_M.device)  # column C takes the misses
        out_MC.scatter_(1, torch.where(hit_MC, offset_MC, C), torch.where(hit_MC, val_E[at_MC], 0.0))
        return out_MC[:, :C]


@dataclass
class Batch:
    """One batch of whole context windows, as the accumulator needs it (all on the device)."""

    latents: Latents
    """The SAE's latents, zero on tokens that are not counted."""
    index_B: torch.Tensor
    """Global token index in the store (int64)."""
    tokens_B: torch.Tensor
    """Token ids (int64)."""
    window_start_B: torch.Tensor
    """Batch-local index of the first token of each token's window."""
    window_end_B: torch.Tensor
    """Batch-local index one past the last token of each token's window (in this batch)."""
    counted: int
    """Tokens counted (positions >= min_position)."""

    @staticmethod
    def windows(positions_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(window_start_B, window_end_B)`` from the positions of a batch of whole windows."""
        n = positions_B.shape[0]
        is_start_B = positions_B == 0
        is_start_B[0] = True
        starts_W = torch.nonzero(is_start_B).flatten()
        ends_W = torch.cat([starts_W[1:], starts_W.new_tensor([n])])
        window_B = torch.cumsum(is_start_B.long(), 0) - 1
        return starts_W[window_B], ends_W[window_B]


KEY_BITS = 41
"""Bits of an example's rank key within its latent; the latent number takes the bits above."""
EMPTY_KEY = (1 << KEY_BITS) - 1
"""Rank key of an unused slot: after every real one."""


def activation_keys(act_M: torch.Tensor) -> torch.Tensor:
    """Rank keys of positive float32 activations, higher activations first: the bit pattern of a
    positive float grows with its value, so ``2**31 - bits`` orders them descending."""
    return (1 << 31) - act_M.float().view(torch.int32).long()


def hash_keys(index_M: torch.Tensor, latent_M: torch.Tensor, seed: int) -> torch.Tensor:
    """Rank keys of the random sample: the top 40 bits of :func:`sample_keys`."""
    return sample_keys(index_M, latent_M, seed) >> 22


class Examples:
    """Per latent, the ``K`` entries with the lowest rank key (ties to the earlier token), each
    with its context; unused slots hold :data:`EMPTY_KEY` and token index -1."""

    def __init__(self, d_sae: int, k: int, context: int, device: torch.device):
        if d_sae >= 1 << (63 - KEY_BITS):
            raise ValueError(f"d_sae {d_sae} is too wide for the latents pass (at most {(1 << (63 - KEY_BITS)) - 1})")
        self.k = k
        self.key_FK = torch.full((d_sae, k), EMPTY_KEY, dtype=torch.int64, device=device)
        self.act_FK = torch.zeros(d_sae, k, device=device)
        self.index_FK = torch.full((d_sae, k), EMPTY_INDEX, dtype=torch.int64, device=device)
        self.ctx_act_FKC = torch.zeros(d_sae, k, context, device=device)
        self.ctx_tok_FKC = torch.full((d_sae, k, context), EMPTY_INDEX, dtype=torch.int32, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"key": self.key_FK, "act": self.act_FK, "index": self.index_FK,
                "ctx_act": self.ctx_act_FKC, "ctx_tok": self.ctx_tok_FKC}

    def load(self, saved: dict[str, torch.Tensor]) -> None:
        for name, tensor in self.tensors().items():
            tensor.copy_(saved[name])

    def merge(self, batch: Batch, latent_M: torch.Tensor, row_M: torch.Tensor, act_M: torch.Tensor, key_M: torch.Tensor,
              context: tuple[int, int]) -> None:
        """Merge candidates (latent, batch row, activation, rank key; rows ascending) into the kept entries.
        Candidates come from tokens after every kept one, so one tying a kept key never wins:
        only keys below a latent's K-th enter."""
        if self.k == 0:
            return
        enters_M = key_M < self.key_FK[latent_M, -1]
        latent_M, row_M, act_M, key_M = latent_M[enters_M], row_M[enters_M], act_M[enters_M], key_M[enters_M]
        if latent_M.numel() == 0:
            return
        touched_U = torch.unique(latent_M)
        U, K = touched_U.numel(), self.k
        # every entry of the touched latents, kept ones first (token order is concatenation order,
        # so a stable sort of (latent, key) breaks ties to the earlier token)
        latent_E = torch.cat([touched_U.repeat_interleave(K), latent_M])
        key_E = torch.cat([self.key_FK[touched_U].flatten(), key_M])
        order = torch.sort((latent_E << KEY_BITS) | key_E, stable=True).indices
        latent_sorted = latent_E[order]
        rank = torch.arange(order.numel(), device=order.device) - torch.searchsorted(latent_sorted, latent_sorted)
        source_UK = order[rank < K].view(U, K)  # each touched latent has its K kept slots: exactly K survive
        from_kept_UK = source_UK < U * K
        kept_src = source_UK.clamp(max=U * K - 1)
        new_src = (source_UK - U * K).clamp(min=0)[~from_kept_UK]
        new_rows, new_latents = row_M[new_src], latent_M[new_src]
        ctx_act_NC, ctx_tok_NC = _contexts(batch, new_latents, new_rows, context)

        def pick(kept_FK: torch.Tensor, new_N: torch.Tensor) -> torch.Tensor:
            out = kept_FK[touched_U].flatten(0, 1)[kept_src]
            out[~from_kept_UK] = new_N
            return out

        self.key_FK[touched_U] = pick(self.key_FK, key_M[new_src])
        self.act_FK[touched_U] = pick(self.act_FK, act_M[new_src])
        self.index_FK[touched_U] = pick(self.index_FK, batch.index_B[new_rows])
        self.ctx_act_FKC[touched_U] = pick(self.ctx_act_FKC, ctx_act_NC)
        self.ctx_tok_FKC[touched_U] = pick(self.ctx_tok_FKC, ctx_tok_NC)


def _contexts(batch: Batch, latent_M: torch.Tensor, row_M: torch.Tensor, context: tuple[int, int]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent's activations and the token ids around each candidate, -1 outside its window."""
    before, after = context
    offsets_C = torch.arange(-before, after + 1, device=row_M.device)
    pos_MC = row_M[:, None] + offsets_C
    inside_MC = (pos_MC >= batch.window_start_B[row_M, None]) & (pos_MC < batch.window_end_B[row_M, None])
    pos_MC = pos_MC.clamp(0, batch.latents.rows - 1)
    act_MC = torch.where(inside_MC, batch.latents.around(row_M, latent_M, before, after), 0.0)
    tok_MC = torch.where(inside_MC, batch.tokens_B[pos_MC], EMPTY_INDEX).to(torch.int32)
    return act_MC, tok_MC


class LatentStats:
    """The accumulator of the module docstring for one SAE of ``d_sae`` latents."""

    def __init__(self, d_sae: int, cfg: StatsConfig, device: torch.device | str = "cpu"):
        device = torch.device(device)
        self.cfg, self.d_sae, self.device = cfg, d_sae, device
        self.tokens = 0
        self.count_F = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum_F = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max_F = torch.zeros(d_sae, device=device)
        self.hist_FH = torch.zeros(d_sae, cfg.bins, dtype=torch.int64, device=device)
        self.top = Examples(d_sae, cfg.top, cfg.context, device)
        self.sample = Examples(d_sae, cfg.samples, cfg.context, device)

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        """Fold one batch in (batches in store order, each once)."""
        cfg, F = self.cfg, self.d_sae
        self.tokens += batch.counted
        row_M, latent_M, act_M = batch.latents.fired()
        self.count_F += torch.bincount(latent_M, minlength=F)
        self.sum_F.index_add_(0, latent_M, act_M.double())
        self.max_F.scatter_reduce_(0, latent_M, act_M, reduce="amax")
        bin_M = ((torch.log10(act_M) - cfg.lo_exp) * cfg.bins_per_decade).floor().long().clamp(0, cfg.bins - 1)
        self.hist_FH.view(-1).add_(torch.bincount(latent_M * cfg.bins + bin_M, minlength=F * cfg.bins))
        context = (cfg.before, cfg.after)
        self.top.merge(batch, latent_M, row_M, act_M, activation_keys(act_M), context)
        self.sample.merge(batch, latent_M, row_M, act_M, hash_keys(batch.index_B[row_M], latent_M, cfg.seed), context)

    # ---- saving -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything, tensors on the CPU (for :mod:`trainers.checkpoint`)."""
        return {"tokens": self.tokens, "count": self.count_F.cpu(), "sum": self.sum_F.cpu(), "max": self.max_F.cpu(),
                "hist": self.hist_FH.cpu(), "top": {k: v.cpu() for k, v in self.top.tensors().items()},
                "sample": {k: v.cpu() for k, v in self.sample.tensors().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tokens = int(state["tokens"])
        for mine, name in ((self.count_F, "count"), (self.sum_F, "sum"), (self.max_F, "max"), (self.hist_FH, "hist")):
            mine.copy_(state[name])
        self.top.load(state["top"])
        self.sample.load(state["sample"])

    # ---- reading out --------------------------------------------------------------------------
    def records(self, start: int, stop: int, digits: int | None = None) -> list[dict[str, Any]]:
        """Latents ``start..stop-1`` as plain records (token ids, not text; see
        :func:`pipelines.dashboard.latent_record` for what the dashboard adds), the examples'
        activations rounded to ``digits`` significant digits if given."""
        sl = slice(start, stop)
        frequency_F, mean_F = self._rates(sl)
        columns = zip(self.count_F[sl].tolist(), frequency_F.tolist(), mean_F.tolist(), self.max_F[sl].tolist(),
                      self.hist_FH[sl].tolist(), _examples(self.top, sl, self.cfg.before, digits, order_by_act=False),
                      _examples(self.sample, sl, self.cfg.before, digits, order_by_act=True), strict=True)
        return [{"latent": f, "count": count, "frequency": frequency, "mean": mean, "max": max_, "histogram": hist,
                 "top": top, "sample": sample}
                for f, (count, frequency, mean, max_, hist, top, sample) in zip(range(start, stop), columns, strict=True)]

    def summary(self) -> dict[str, list[float]]:
        """Frequency, mean and max of every latent (the dashboard's index)."""
        frequency_F, mean_F = self._rates(slice(None))
        return {"frequency": frequency_F.tolist(), "mean": mean_F.tolist(), "max": self.max_F.tolist()}

    def _rates(self, sl: slice) -> tuple[torch.Tensor, torch.Tensor]:
        """Firing frequency over the counted tokens and mean activation when firing (0 for a dead
        latent), float64, of latents ``sl``."""
        count_F = self.count_F[sl].double()
        return count_F / max(self.tokens, 1), torch.where(count_F > 0, self.sum_F[sl] / count_F.clamp_min(1), 0.0)


def round_significant(x: torch.Tensor, digits: int) -> torch.Tensor:
    """``x`` (float64) rounded to ``digits`` significant digits, zeros kept."""
    x = x.double()
    scale = 10.0 ** (digits - 1 - torch.floor(torch.log10(x.abs().clamp_min(1e-300))))
    return torch.where(x == 0, 0.0, torch.round(x * scale) / scale)


def _examples(ex: Examples, sl: slice, before: int, digits: int | None, order_by_act: bool) -> list[list[dict[str, Any]]]:
    """Each latent's used slots as ``{token_index, activation, focus, ids, acts}``, the context
    trimmed to its window (``focus``: where the example's own token is in it); by activation
    (highest first) when ``order_by_act``."""
    index = ex.index_FK[sl].tolist()
    act, ctx_act = ex.act_FK[sl], ex.ctx_act_FKC[sl]
    if digits is not None:
        act, ctx_act = round_significant(act, digits), round_significant(ctx_act, digits)
    act, ctx_act = act.tolist(), ctx_act.tolist()
    ctx_tok = ex.ctx_tok_FKC[sl].tolist()
    out = []
    for f_index, f_act, f_ctx_act, f_ctx_tok in zip(index, act, ctx_act, ctx_tok, strict=True):
        rows = []
        for idx, a, c_act, c_tok in zip(f_index, f_act, f_ctx_act, f_ctx_tok, strict=True):
            if idx == EMPTY_INDEX:
                continue
            used = [j for j, t in enumerate(c_tok) if t != EMPTY_INDEX]
            lo, hi = used[0], used[-1] + 1
            rows.append({"token_index": idx, "activation": a, "focus": before - lo, "ids": c_tok[lo:hi],
                         "acts": c_act[lo:hi]})
        if order_by_act:
            rows.sort(key=lambda r: (-r["activation"], r["token_index"]))
        out.append(rows)
    return out
