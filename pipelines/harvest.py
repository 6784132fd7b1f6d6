"""``actstore harvest``: run a causal LM over text and store its activations, crash-safe.

The loop, per rank (``torchrun`` sets ``RANK``/``WORLD_SIZE``; one process is rank 0 of 1):

1. read the model's config and tokenizer (:func:`pipelines.models.model_spec`, seconds), open
   or create the store, then load the weights: a store made with other settings, or a token
   target below what it has committed, is refused before the minute a large model takes to
   load; rank 0 creates the store and the others wait at a barrier, then each learns which
   shards are already committed;
2. stream packed windows (:mod:`pipelines.text`); shard ``s`` holds windows
   ``[s * W, (s + 1) * W)`` with ``W = shard_tokens / context_size``, and rank ``r`` of ``R``
   owns shards with ``s % R == r``, so a rank skips windows of shards it does not own or that
   are committed;
3. run the model with early exit (:mod:`pipelines.capture`) batch by batch; each batch's
   activations go into a bounded queue that a background thread (:mod:`pipelines.background`) drains: it converts to the
   store dtype, assembles the shard, compresses and writes it, then commits. The queue bounds
   memory and applies backpressure when storage is slower than the model. Each batch's
   activations are dropped before the next forward pass and shards are assembled in reused
   buffers: on a CPU, fresh half-gigabyte allocations per batch cost more than the writing.

A killed harvest restarts from its last commit: shards are pure functions of (text, seed,
model, batch size), and a batch never spans two shards, so re-running the same command yields a
store bit-identical to an uninterrupted run. ``--tokens`` is the one setting a rerun may change
(:class:`actstore.StoreWriter`): lower (down to the committed shards) to finish a store whose
text ran out, higher to extend one. Every way out (done, an error, Ctrl-C, the text running
out) leaves the root summary up to date, so plain zarr readers see what is committed.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

import actstore
from actstore.config import DEFAULT_CHUNKS_PER_SHARD, default_chunk_tokens
from actstore.dtypes import STORE_DTYPES, StoreDType
from pipelines.background import BackgroundWriter
from pipelines.capture import SITES, ActivationCapture, hook_name
from pipelines.models import LoadedModel, ModelDType, ModelSpec, load_weights, model_spec
from pipelines.runtime import Ranks, join_ranks, progress_bar
from pipelines.text import DatasetError, TextConfig, local_files, token_windows

log = logging.getLogger(__name__)


class DataExhaustedError(actstore.ActstoreError):
    """The dataset ran out before the store's target token count."""


@dataclass(frozen=True)
class HarvestConfig:
    """One harvest: which model, which activations, which text, which store."""

    model: str
    """Alias (``gemma-2-2b``, ``smollm2-135m``...), local folder or HF id."""
    out: str
    """Store URL: a local path, ``s3://bucket/prefix`` or any fsspec URL."""
    layers: tuple[int, ...]
    """Blocks to capture."""
    sites: tuple[str, ...] = ("resid_post",)
    """Hook sites per layer: resid_pre, attn_out, mlp_out, resid_post."""
    text: TextConfig = TextConfig()
    """Text source and packing."""
    tokens: int = 1_000_000
    """Target token count (rounded up to whole context windows)."""
    batch_size: int = 8
    """Windows per forward pass."""
    dtype: StoreDType = "bfloat16"
    """Storage dtype."""
    codec: Literal["zstd", "none"] = "zstd"
    """Chunk compression."""
    chunk_tokens: int = 0
    """Tokens per inner chunk (0: at least 1 MiB per chunk)."""
    shard_tokens: int = 0
    """Tokens per shard (0: 16 chunks, rounded up to whole context windows)."""
    revision: str | None = None
    """HF revision of the model."""
    model_dtype: ModelDType = "auto"
    """Model compute dtype; auto is bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:N."""
    overwrite: bool = False
    """Replace an existing store made with another configuration."""
    queue_batches: int = 4
    """Batches in flight between the model and the background writer."""
    writer_threads: int = 0
    """Threads compressing and writing shards (0: one per core)."""
    progress: bool = True
    """Show a progress bar."""

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("no layers to capture; pass --layers, e.g. 0-25 or 3,7,11")
        if min(self.layers) < 0:
            raise ValueError(f"layer {min(self.layers)} is negative")
        unknown = [s for s in self.sites if s not in SITES]
        if unknown or not self.sites:
            raise ValueError(f"unknown site {', '.join(unknown) or '(none)'}; choose from {', '.join(SITES)}")
        if self.tokens <= 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")
        if self.dtype not in STORE_DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; choose one of {', '.join(STORE_DTYPES)}")
        if self.queue_batches < 1:
            raise ValueError("queue_batches must be at least 1")

    @property
    def hooks(self) -> tuple[str, ...]:
        return tuple(hook_name(layer, site) for layer in sorted(set(self.layers)) for site in self.sites)


@dataclass(frozen=True)
class HarvestResult:
    url: str
    tokens_written: int
    """Tokens this rank wrote in this run (0 when everything was already committed)."""
    loop_seconds: float
    """Wall time from the first forward pass to the last commit."""
    flush_seconds: float
    """Of which: waiting for the last shard's write after the last forward pass."""
    store_tokens: int
    """Tokens committed in the store after the run (as seen by this rank)."""

    @property
    def tokens_per_s(self) -> float:
        return self.tokens_written / self.loop_seconds if self.loop_seconds > 0 else 0.0

    @property
    def steady_tokens_per_s(self) -> float:
        """Throughput without the final flush, which a long harvest amortises over many shards."""
        busy = self.loop_seconds - self.flush_seconds
        return self.tokens_written / busy if busy > 0 else 0.0


# ---- the store ----------------------------------------------------------------------------
def store_config(cfg: HarvestConfig, lm: ModelSpec) -> actstore.StoreConfig:
    """The store's configuration; shards hold whole context windows."""
    T = cfg.text.context_size
    chunk = cfg.chunk_tokens or default_chunk_tokens(lm.d_model, cfg.dtype)
    if cfg.shard_tokens:
        shard = cfg.shard_tokens
        if shard % T or shard % chunk:
            raise ValueError(f"--shard-tokens {shard} must be a multiple of --context-size ({T}) and of the chunk size ({chunk})")
    else:
        unit = math.lcm(T, chunk)
        shard = unit * math.ceil(chunk * DEFAULT_CHUNKS_PER_SHARD / unit)
    n_tokens = T * math.ceil(cfg.tokens / T)
    return actstore.StoreConfig(
        model=actstore.ModelInfo(lm.name, lm.d_model, lm.n_layers, revision=cfg.revision),
        dataset=dataset_info(cfg.text),
        hooks=cfg.hooks,
        n_tokens_target=n_tokens,
        context_size=T,
        prepend_bos=cfg.text.prepend_bos,
        dtype=cfg.dtype,
        codec=cfg.codec,
        chunk_tokens=chunk,
        shard_tokens=shard,
        seed=cfg.text.seed,
        # what else changes the stored numbers: a resume must use the same
        # (special_token_ids: what `actstore.stream(..., drop_special=True)` drops)
        extra={"model_dtype": str(lm.dtype).removeprefix("torch."), "batch_size": cfg.batch_size,
               "shuffle_buffer": cfg.text.shuffle_buffer,
               "special_token_ids": sorted(int(t) for t in lm.tokenizer.all_special_ids)},
    )


def dataset_info(text: TextConfig) -> actstore.DatasetInfo:
    """What the store records of the text: split and column only where they mean something."""
    if text.dataset.startswith("builtin:"):
        return actstore.DatasetInfo(text.dataset, split=text.split)
    files = local_files(text.dataset)
    if files is not None:
        tabular = any(f.suffix != ".txt" for f in files)
        return actstore.DatasetInfo(text.dataset, text_column=text.text_column if tabular else None)
    return actstore.DatasetInfo(text.dataset, split=text.split, text_column=text.text_column)


def shard_windows(
    windows: Iterator[np.ndarray], shards: list[int], window_range: Callable[[int], tuple[int, int]]
) -> Iterator[tuple[int, np.ndarray]]:
    """``(shard, windows [W, T])`` for each of ``shards`` in ascending order, skipping the windows of
    other shards. ``window_range(s)`` is shard ``s``'s half-open range of window indices; a shard
    the stream cannot fill comes out short, for the caller to report."""
    ranges = [(s, *window_range(s)) for s in sorted(shards)]
    if not ranges:
        return
    k, rows = 0, []
    for w, window in enumerate(windows):
        shard, lo, hi = ranges[k]
        if w < lo:
            continue
        rows.append(window)
        if w + 1 == hi:
            yield shard, np.stack(rows)
            k, rows = k + 1, []
            if k == len(ranges):
                return
    if rows or k < len(ranges):
        shard = ranges[k][0]
        yield shard, np.stack(rows) if rows else np.empty((0, 0), dtype=np.int64)


# ---- the harvest ----------------------------------------------------------------------------
def harvest(
    cfg: HarvestConfig, storage_options: dict[str, Any] | None = None, model: LoadedModel | None = None
) -> HarvestResult:
    """Run the harvest described by ``cfg``; safe to re-run after a crash (it resumes).

    ``model`` reuses an already loaded model (it must be ``cfg.model`` loaded the same way).
    """
    spec = model.spec if model is not None else model_spec(cfg.model, revision=cfg.revision, model_dtype=cfg.model_dtype,
                                                           device=cfg.device)
    if max(cfg.layers) >= spec.n_layers:
        raise ValueError(
            f"layer {max(cfg.layers)} is past the model's depth: {cfg.model} has {spec.n_layers} layers (0-{spec.n_layers - 1})"
        )
    store_cfg = store_config(cfg, spec)
    windows = token_windows(cfg.text, spec.tokenizer)
    first = next(windows, None)
    if first is None:
        raise DatasetError(f"dataset {cfg.text.dataset!r} yielded no tokens (is it empty?)")
    windows = itertools.chain([first], windows)
    with join_ranks(spec.device) as ranks:
        return _harvest_rank(cfg, spec, store_cfg, windows, ranks, storage_options, model)


def _harvest_rank(cfg: HarvestConfig, spec: ModelSpec, store_cfg: actstore.StoreConfig, windows: Iterator[np.ndarray],
                  ranks: Ranks, storage_options: dict[str, Any] | None, model: LoadedModel | None) -> HarvestResult:
    """This rank's part of :func:`harvest`: open the store, then harvest the shards it owns."""
    writer = actstore.StoreWriter(cfg.out, store_cfg, writer_id=ranks.rank, overwrite=cfg.overwrite and ranks.rank == 0,
                                  storage_options=storage_options, io_threads=cfg.writer_threads or os.cpu_count() or 2)
    if ranks.rank == 0:
        writer.open()
    ranks.barrier()
    if ranks.rank != 0:
        writer.open()
    T = store_cfg.context_size
    pending = writer.pending_shards(ranks.rank, ranks.world_size)
    todo = store_cfg.tokens_in(pending)
    log.info("rank %d: %d shards (%d tokens) to harvest", ranks.rank, len(pending), todo)
    if not pending:  # finished (or finished now, by a lower target): no weights to load
        return _finish(cfg, writer, ranks, storage_options, HarvestResult(cfg.out, 0, 0.0, 0.0, 0))

    bg: BackgroundWriter | None = None
    done, t0, flush_s = 0, None, 0.0
    try:
        lm = model or load_weights(replace(spec, device=ranks.device))  # under torchrun: this rank's GPU
        bg = BackgroundWriter(writer, cfg.queue_batches)
        with (
            ActivationCapture(lm.model, cfg.hooks, dtype=capture_dtype(cfg.dtype)) as cap,
            progress_bar(cfg.progress and ranks.main, "[bold]harvest", todo, show_rate=True) as advance,
        ):
            def window_range(shard: int) -> tuple[int, int]:
                a, b = store_cfg.shard_range(shard)
                return a // T, b // T

            for shard, windows_WT in shard_windows(windows, pending, window_range):
                a, b = store_cfg.shard_range(shard)
                if len(windows_WT) * T != b - a:
                    held = a + len(windows_WT) * T
                    raise DataExhaustedError(
                        f"dataset {cfg.text.dataset!r} ran out after {held:,} tokens, short of --tokens "
                        f"{store_cfg.n_tokens_target:,}; rerun with --tokens {held} to finish the store with the text "
                        "there is, or add text (committed shards are kept)"
                    )
                t0 = t0 or time.perf_counter()
                for first_w in range(0, len(windows_WT), cfg.batch_size):
                    ids_BT = torch.from_numpy(windows_WT[first_w : first_w + cfg.batch_size]).to(lm.device)
                    acts = {h: x.cpu() for h, x in cap.run(ids_BT).items()}
                    bg.put_batch(shard, acts)
                    del acts  # not alive during the next forward pass
                    done += ids_BT.numel()
                    advance(done)
                positions = np.tile(np.arange(T, dtype=np.int32), len(windows_WT))
                bg.end_shard(shard, windows_WT.reshape(-1), positions)
        t_flush = time.perf_counter()
        bg.close()
        flush_s = time.perf_counter() - t_flush
    except BaseException:  # an error, Ctrl-C, the text running out: keep what is committed, visible to any reader
        if bg is not None:
            bg.close_quietly()
        writer.abort()
        raise
    loop_s = time.perf_counter() - t0 if t0 else 0.0
    return _finish(cfg, writer, ranks, storage_options, HarvestResult(cfg.out, bg.committed_tokens, loop_s, flush_s, 0))


def _finish(cfg: HarvestConfig, writer: actstore.StoreWriter, ranks: Ranks, storage_options: dict[str, Any] | None,
            result: HarvestResult) -> HarvestResult:
    """Every rank done, rank 0 writes the root summary; the result with the store's URL and tokens."""
    ranks.barrier()
    writer.close(consolidate=ranks.rank == 0)
    store = actstore.open_store(cfg.out, storage_options=storage_options)
    return replace(result, url=store.url, store_tokens=store.n_tokens)


def capture_dtype(dtype: str) -> torch.dtype:
    """The torch dtype activations are cast to as they are captured, on the model's device.

    torch's casts round to nearest even, as the store's own conversion does, so the stored bits
    do not depend on where the cast happens; fp8 stays float32 here and is quantised by the
    writer (per-token scales).
    """
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
