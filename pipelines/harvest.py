"""``actstore harvest``: run a causal LM over text and store its activations, crash-safe.

The loop, per rank (``torchrun`` sets ``RANK``/``WORLD_SIZE``; one process is rank 0 of 1):

1. read the model's config and tokenizer (:func:`pipelines.models.model_spec`, seconds), open
   or create the store, then load the weights: a store made with other settings, or a token
   target below what it has committed, is refused before the minute a large model takes to
   load; rank 0 creates the store and the others wait at a barrier, then each learns which
   shards are already committed. Shard ``s`` holds windows ``[s * W, (s + 1) * W)`` with
   ``W = shard_tokens / context_size`` (by default about 64 MiB per hook); rank ``r`` of ``R``
   owns shards with ``s % R == r``;
2. stream packed windows (:mod:`pipelines.text`, tokenized in batches in a background thread)
   and run the model under ``torch.inference_mode`` with early exit (:mod:`pipelines.capture`)
   on fixed batches of ``--batch-size`` windows, independent of shards
   (:mod:`pipelines.batches`): only the batches holding windows of this rank's pending shards;
3. copy each batch's rows, already in the store dtype, into host shard buffers without waiting
   (:mod:`pipelines.transfer`: pinned buffers, a side CUDA stream, an event per shard), so the
   next forward pass overlaps the copies; a full buffer goes to a hand-off thread
   (:mod:`pipelines.background`) that checks its values are finite and submits it to the
   :class:`~actstore.StoreWriter`, which compresses, stores and commits several shards at once
   (:mod:`actstore.inflight`). Host memory is bounded by ``shards_in_flight + 2`` shards; a
   full ring makes the model wait (backpressure).

A killed harvest restarts from its last commit: shards are pure functions of (text, seed,
model, batch size), and every window is computed in the same batch whatever runs it, so
re-running the same command yields a store bit-identical to an uninterrupted run. ``--tokens``
is the one setting a rerun may change (:class:`actstore.StoreWriter`): lower (down to the
committed shards) to finish a store whose text ran out, higher to extend one. Every way out
(done, an error, Ctrl-C, the text running out) commits the shards already handed over and
leaves the root summary up to date, so plain zarr readers see what is committed.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np
import torch

import actstore
from actstore.config import default_chunk_tokens
from actstore.devices import rank_cpus
from actstore.dtypes import STORE_DTYPES, StoreDType, itemsize
from actstore.errors import ActstoreError
from actstore.layout import read_root_attrs
from actstore.prefetch import Prefetcher
from actstore.remote import open_location
from pipelines.background import ShardHandoff
from pipelines.batches import Batch, Span, plan_batches
from pipelines.capture import SITES, ActivationCapture, hook_name
from pipelines.models import LoadedModel, ModelDType, ModelSpec, load_weights, model_spec
from pipelines.runtime import Ranks, join_ranks, progress_bar
from pipelines.text import PREFETCH_DEPTH, DatasetError, TextConfig, local_files, token_windows
from pipelines.transfer import HostShard, ShardRing

log = logging.getLogger(__name__)

SHARD_BYTES = 64 << 20
"""Default shard size per hook (``--shard-tokens 0``)."""


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
    """Hook sites per layer: resid_pre, attn_out, mlp_in, mlp_out, resid_post (:mod:`pipelines.capture`)."""
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
    """Tokens per shard (0: an existing store's, else about 64 MiB per hook in whole context windows)."""
    revision: str | None = None
    """HF revision of the model."""
    model_dtype: ModelDType = "auto"
    """Model compute dtype; auto is bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else float32."""
    device: str = "auto"
    """auto (CUDA when present), cpu, cuda, cuda:N."""
    overwrite: bool = False
    """Replace an existing store made with another configuration."""
    shards_in_flight: int = 0
    """Shards compressed and stored at once (0: :func:`auto_shards_in_flight`); host memory holds
    ``shards_in_flight + 2`` shards."""
    writer_threads: int = 0
    """Threads compressing shards (0: the cores this rank may use, :func:`pipelines.runtime.rank_cpus`)."""
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
        if self.shards_in_flight < 0:
            raise ValueError(f"--shards-in-flight must be 0 (automatic) or more, got {self.shards_in_flight}")
        if self.writer_threads < 0:
            raise ValueError(f"--writer-threads must be 0 (automatic) or more, got {self.writer_threads}")

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
def default_shard_tokens(context_size: int, chunk_tokens: int, d_model: int, dtype: str) -> int:
    """Whole context windows and chunks, about :data:`SHARD_BYTES` per hook (at least one unit):
    large objects for object storage, and a bounded amount of host memory per shard in flight."""
    unit = math.lcm(context_size, chunk_tokens)
    return unit * max(1, round(SHARD_BYTES / (unit * d_model * itemsize(dtype))))


def store_config(cfg: HarvestConfig, lm: ModelSpec, existing: dict[str, Any] | None = None) -> actstore.StoreConfig:
    """The store's configuration; shards hold whole context windows.

    ``existing``, the root attributes of the store being resumed, keeps what older versions
    chose differently: its shard size (unless ``--shard-tokens`` asks for another), and no
    ``attn_implementation`` record where it has none (it resumes as it was made)."""
    T = cfg.text.context_size
    existing_shard_tokens = (existing or {}).get("shard_tokens")
    chunk = cfg.chunk_tokens or default_chunk_tokens(lm.d_model, cfg.dtype)
    if cfg.shard_tokens:
        shard = cfg.shard_tokens
        if shard % T or shard % chunk:
            raise ValueError(f"--shard-tokens {shard} must be a multiple of --context-size ({T}) and of the chunk size ({chunk})")
    elif isinstance(existing_shard_tokens, int) and existing_shard_tokens > 0 and existing_shard_tokens % T == 0 \
            and existing_shard_tokens % chunk == 0:
        shard = existing_shard_tokens
    else:
        shard = default_shard_tokens(T, chunk, lm.d_model, cfg.dtype)
    n_tokens = T * math.ceil(cfg.tokens / T)
    # what else changes the stored numbers: a resume must use the same
    # (special_token_ids: what `actstore.stream(..., drop_special=True)` drops)
    extra = {"model_dtype": str(lm.dtype).removeprefix("torch."), "batch_size": cfg.batch_size,
             "shuffle_buffer": cfg.text.shuffle_buffer, "attn_implementation": lm.attn_implementation,
             "special_token_ids": sorted(int(t) for t in lm.tokenizer.all_special_ids)}
    if existing is not None and "attn_implementation" not in existing.get("extra", {"attn_implementation": None}):
        del extra["attn_implementation"]  # a store made before it was recorded
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
        extra=extra,
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
    existing = None if cfg.overwrite else _existing_store(cfg.out, storage_options)
    store_cfg = store_config(cfg, spec, existing)
    # tokenized in a background thread from here on, so the model never waits on text
    ahead = Prefetcher(lambda: token_windows(cfg.text, spec.tokenizer), PREFETCH_DEPTH, "actstore-harvest-text")
    try:
        windows = iter(ahead)
        first = next(windows, None)
        if first is None:
            raise DatasetError(f"dataset {cfg.text.dataset!r} yielded no tokens (is it empty?)")
        with join_ranks(spec.device) as ranks:
            return _harvest_rank(cfg, spec, store_cfg, itertools.chain([first], windows), ranks, storage_options, model)
    finally:
        ahead.close()


def auto_shards_in_flight(cpus: int | None = None) -> int:
    """Shards in flight when none is asked for: one per 4 cores this rank may use, from 2 to 4.

    Measured on an H200 with 16 cores (a Gemma-2-2B-shaped model, 26 layers, 64 MiB shards to
    tmpfs): 4 in flight against 2 raised the steady harvest from 14.9k to 23.2k tokens/s with zstd
    and from 17.6k to 60.9k uncompressed; a 2-core machine keeps 2 (its figures are unchanged)."""
    return max(2, min(4, (cpus or rank_cpus()) // 4))


def _existing_store(url: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The configuration (root attributes) of the store at ``url``, if there is a readable one."""
    try:
        return read_root_attrs(open_location(url, storage_options))
    except (ActstoreError, OSError, ValueError):
        return None


def _harvest_rank(cfg: HarvestConfig, spec: ModelSpec, store_cfg: actstore.StoreConfig, windows: Iterator[np.ndarray],
                  ranks: Ranks, storage_options: dict[str, Any] | None, model: LoadedModel | None) -> HarvestResult:
    """This rank's part of :func:`harvest`: open the store, then harvest the shards it owns."""
    in_flight = cfg.shards_in_flight or auto_shards_in_flight()
    writer = actstore.StoreWriter(cfg.out, store_cfg, writer_id=ranks.rank, overwrite=cfg.overwrite and ranks.rank == 0,
                                  storage_options=storage_options, io_threads=cfg.writer_threads or rank_cpus(),
                                  max_in_flight=in_flight)
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

    spans = [Span(s, a // T, b // T) for s in pending for a, b in [store_cfg.shard_range(s)]]
    handoff: ShardHandoff | None = None
    t0, flush_s = None, 0.0
    try:
        lm = model or load_weights(replace(spec, device=ranks.device))  # under torchrun: this rank's GPU
        ring = ShardRing(cfg.hooks, dict.fromkeys(cfg.hooks, spec.d_model), capture_dtype(cfg.dtype), store_cfg.shard_tokens,
                         lm.device, depth=in_flight + 2,
                         # statistics summed on the GPU spare the host a third of its work; fp8 is quantised on the host
                         device_stats=lm.device.type == "cuda" and cfg.dtype != "float8_e4m3fn")
        handoff = ShardHandoff(writer, ring, T)
        with (
            torch.inference_mode(),
            ActivationCapture(lm.model, cfg.hooks, dtype=capture_dtype(cfg.dtype)) as cap,
            progress_bar(cfg.progress and ranks.main, "[bold]harvest", todo, show_rate=True) as advance,
        ):
            t0 = time.perf_counter()
            run_batches(plan_batches(spans, store_cfg.n_tokens_target // T, cfg.batch_size), windows, cap, ring, handoff,
                        store_cfg, cfg.text.dataset, advance)
        t_flush = time.perf_counter()
        handoff.close()
        flush_s = time.perf_counter() - t_flush
    except BaseException:  # an error, Ctrl-C, the text running out: keep what is committed, visible to any reader
        if handoff is not None:
            handoff.close_quietly()
        writer.abort()
        raise
    loop_s = time.perf_counter() - t0 if t0 else 0.0
    return _finish(cfg, writer, ranks, storage_options, HarvestResult(cfg.out, handoff.committed_tokens, loop_s, flush_s, 0))


def run_batches(batches: Iterator[Batch], windows: Iterator[np.ndarray], cap: ActivationCapture, ring: ShardRing,
                handoff: ShardHandoff, store_cfg: actstore.StoreConfig, dataset: str, advance: Callable[[int], None]) -> None:
    """Run the model on each of ``batches`` (windows numbered in ``windows``' order), send its rows
    to their shards' buffers, and hand each full buffer over; the text running out before a
    shard is full is a :class:`DataExhaustedError` (the shards handed over before it are kept)."""
    T = store_cfg.context_size
    open_bufs: dict[int, HostShard] = {}
    seen, done = 0, 0  # windows read from the text; tokens run
    device = ring.device
    for batch in batches:
        for _ in itertools.islice(windows, batch.first - seen):  # windows of no pending shard of this rank
            seen += 1
        ids_WT = list(itertools.islice(windows, batch.size))
        seen += len(ids_WT)
        if len(ids_WT) < batch.size:
            raise DataExhaustedError(
                f"dataset {dataset!r} ran out after {seen * T:,} tokens, short of --tokens {store_cfg.n_tokens_target:,}; "
                f"rerun with --tokens {seen * T} to finish the store with the text there is, or add text (committed shards are kept)"
            )
        ids_BT = np.stack(ids_WT)
        acts = cap.run(torch.from_numpy(ids_BT).to(device, non_blocking=True))
        finite_H = ring.batch_finite(acts)
        for seg in batch.segments:
            buf = open_bufs.get(seg.shard)
            if buf is None:
                a, b = store_cfg.shard_range(seg.shard)
                buf = open_bufs[seg.shard] = ring.take(seg.shard, b - a)
            if buf.filled != seg.offset * T:
                raise RuntimeError(f"shard {seg.shard}: rows arrive at {buf.filled}, planned at {seg.offset * T}")
            ring.copy_in(buf, acts, finite_H, slice(seg.lo * T, seg.hi * T), ids_BT[seg.lo : seg.hi].reshape(-1))
            done += (seg.hi - seg.lo) * T
            if buf.filled == buf.n_tokens:
                ring.seal(buf)
                handoff.put(open_bufs.pop(seg.shard))
        del acts, finite_H  # not alive during the next forward pass
        advance(done)


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
