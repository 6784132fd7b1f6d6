"""Normalisation (``normalize="expected_norm"``): the scale ``s_h`` of each hook.

Hook ``h`` is multiplied by ``s_h = sqrt(D_h / E||x_h||^2)`` over the tokens the stream serves,
so the streamed vectors have ``E||s x||^2 = D`` (Anthropic, "Circuits Updates, April 2024";
SAELens' ``normalize_activations="expected_average_only_in"``). Without filters ``E||x||^2``
comes from the store's statistics (every stored token); with filters it is measured on the
tokens they keep, in up to :data:`NORM_SAMPLE_TOKENS` tokens spread over the store (all of a
smaller store), because the dropped tokens can dominate it: in SmolLM2-135M's middle layers BOS
has 10^3-10^4 times the squared norm of other tokens, so all-token statistics would leave the
served tokens at 1-15% of ``D``.

A trainer folds ``s`` back so the SAE takes raw activations: with encoder pre-activations
``(s x - b_dec) W_enc + b_enc`` and reconstruction ``x_hat = (f W_dec + b_dec) / s``, set
``W_enc <- s W_enc``, ``W_dec <- W_dec / s``, ``b_dec <- b_dec / s`` (``b_enc`` and any
threshold stay): pre-activations are unchanged and reconstructions come out in raw units.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import EmptyStoreError, EmptyStreamError
from ..reader import Store
from .config import Filters, StreamConfig
from .plan import chunks_of_shards

NORM_SAMPLE_TOKENS = 65536
"""Tokens (whole chunks, spread over the store) that ``normalize`` measures when filters are on."""


def stream_scales(
    store: Store, cfg: StreamConfig, filters: Filters, widths: Mapping[str, int], shards: Sequence[int],
) -> dict[str, float]:
    """``{hook: s_h}`` for ``normalize="expected_norm"`` (given ``scales=`` or measured); empty
    without normalisation."""
    if cfg.normalize == "none":
        return {}
    if cfg.scales is not None:
        missing = [h for h in cfg.hooks if h not in cfg.scales]
        if missing:
            raise ValueError(f"scales= gives no scale for {', '.join(missing)}")
        return {h: float(cfg.scales[h]) for h in cfg.hooks}
    if filters.on:  # the store's statistics count every token; measure the served ones
        mean_sq = served_mean_sq_norms(store, cfg, filters, shards)
    else:
        mean_sq = {}
        for hook in cfg.hooks:
            stats = store.stats(hook)
            if stats.count and stats.sum_sq_norm > 0:
                mean_sq[hook] = stats.sum_sq_norm / stats.count
    out = {}
    for hook in cfg.hooks:
        if mean_sq.get(hook, 0.0) <= 0:
            if cfg.follow:
                raise ValueError("normalize='expected_norm' needs committed statistics; wait for the first shard before following")
            raise EmptyStoreError(f"store {store.url} has no statistics for {hook} to normalise by")
        out[hook] = math.sqrt(widths[hook] / mean_sq[hook])
    return out


def served_mean_sq_norms(store: Store, cfg: StreamConfig, filters: Filters, shards: Sequence[int]) -> dict[str, float]:
    """``E||x||^2`` per hook over the tokens the filters keep, from up to
    :data:`NORM_SAMPLE_TOKENS` tokens in whole chunks spread evenly over the committed
    ``shards`` (all of them when the store is smaller): a function of the store alone."""
    scfg = store.config
    ct = scfg.chunk_tokens
    committed = sorted(set(shards) & set(store.committed_shards))
    chunks = chunks_of_shards(committed, scfg.shard_tokens, ct, scfg.n_tokens_target).chunk_K
    if len(chunks) > max(1, NORM_SAMPLE_TOKENS // ct):
        chunks = chunks[np.unique(np.linspace(0, len(chunks) - 1, max(1, NORM_SAMPLE_TOKENS // ct)).round().astype(int))]
    sums = dict.fromkeys(cfg.hooks, 0.0)
    kept = 0
    for c in chunks:
        a, b = int(c) * ct, min((int(c) + 1) * ct, scfg.n_tokens_target)
        keep = filters.keep(b - a, store.positions(a, b) if filters.needs_positions else None,
                            store.tokens(a, b) if filters.needs_tokens else None)
        kept += int(keep.sum())
        for hook in cfg.hooks:
            x = store.read(hook, a, b)[keep].astype(np.float64)
            sums[hook] += float(np.einsum("td,td->", x, x))
    if not kept:
        raise EmptyStreamError(
            f"the filters ({cfg.describe_filters()}) keep none of the {len(chunks) * ct:,} tokens sampled from "
            f"{store.url} to normalise by; loosen them"
        )
    return {h: v / kept for h, v in sums.items()}
