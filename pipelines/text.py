"""Text for harvests: sources, deterministic document order, and packing into context windows.

Sources (``--dataset``):

- ``builtin:python-docs``: the offline corpus of standard-library docstrings;
- local files: ``.txt`` (one document per file), ``.jsonl`` and ``.parquet`` (one document per
  row, from ``--text-column``), folders (every such file, recursively) and globs;
- HF datasets by name, streamed (``--split``), where a hub is reachable;
- rows that already hold ``input_ids`` (any of the tabular sources) are used as token ids.

Documents pass through a seeded buffer shuffle (so ``--seed`` picks the order and the same seed
always gives the same tokens), are tokenized without special tokens, and are packed back to
back into windows of ``context_size`` tokens: ``[BOS] + context_size - 1`` tokens when
``prepend_bos`` (the default), else ``context_size`` tokens. Text documents end with EOS as a
separator; pre-tokenized rows are joined as they are (a leading BOS is dropped when windows get
their own).

Text is tokenized in batches (one tokenizer call per :data:`TOKENIZE_BATCH_DOCS` documents or
:data:`TOKENIZE_BATCH_CHARS` characters, whichever comes first, flushed before each token-id
row so the order is kept): the windows are exactly those of one call per document, but a fast
tokenizer encodes the batch in Rust, across cores, and takes the GIL once per batch, not once
per document.

A harvest runs :func:`token_windows` (reading, shuffling, tokenizing, packing) in a background
thread (:class:`actstore.prefetch.Prefetcher`, :data:`PREFETCH_DEPTH` windows ahead), so the model
thread never waits on text; errors (a :class:`DatasetError` included) reach it with their type.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import random
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipelines import corpus

log = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")
SHUFFLE_BUFFER = 4096
TOKENIZE_BATCH_DOCS = 256
"""Text documents per tokenizer call (a fast tokenizer encodes a batch on all cores, in Rust)..."""
TOKENIZE_BATCH_CHARS = 1 << 20
"""...or fewer, once they hold this many characters."""
PREFETCH_DEPTH = 256
"""Windows a harvest keeps tokenized ahead of the model."""
_END = object()

Document = str | list[int]


class DatasetError(ValueError):
    """The dataset cannot be read as asked (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class TextConfig:
    """Where text comes from and how it is packed."""

    dataset: str = corpus.NAME
    """``builtin:python-docs``, a local file, folder or glob, or an HF dataset name."""
    split: str = "train"
    """Split of an HF dataset or of the built-in corpus (train, test, all); local files have none."""
    text_column: str = "text"
    """Column holding the text (rows with ``input_ids`` are used as token ids instead)."""
    context_size: int = 1024
    """Tokens per window."""
    prepend_bos: bool = True
    """Put BOS at position 0 of every window."""
    seed: int = 0
    """Seed of the document shuffle."""
    shuffle_buffer: int = SHUFFLE_BUFFER
    """Documents held by the seeded buffer shuffle (0 keeps the source order)."""

    def __post_init__(self) -> None:
        if self.context_size < 2:
            raise ValueError(f"context_size must be at least 2, got {self.context_size}")
        if self.shuffle_buffer < 0:
            raise ValueError("shuffle_buffer must be >= 0")


# ---- sources -----------------------------------------------------------------------------
def _row_document(row: dict[str, Any], column: str, where: str) -> Document:
    if column in row and row[column] is not None:
        value = row[column]
        if isinstance(value, str):
            return value
        raise DatasetError(f"column {column!r} in {where} holds {type(value).__name__}, not text")
    if "input_ids" in row:
        return [int(t) for t in row["input_ids"]]
    raise DatasetError(
        f"column {column!r} not found in {where}; it has: {', '.join(map(str, row)) or 'no columns'}; pass --text-column"
    )


def _jsonl_documents(path: Path, column: str) -> Iterator[Document]:
    with path.open(encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{path}:{i} is not valid JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise DatasetError(f"{path}:{i} is not a JSON object")
            yield _row_document(row, column, str(path))


def _parquet_documents(path: Path, column: str) -> Iterator[Document]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    col = column if column in names else "input_ids" if "input_ids" in names else None
    if col is None:
        raise DatasetError(f"column {column!r} not found in {path}; it has: {', '.join(names)}; pass --text-column")
    for batch in pf.iter_batches(columns=[col]):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value if isinstance(value, str) else [int(t) for t in value]


def _file_documents(path: Path, column: str) -> Iterator[Document]:
    if path.suffix == ".txt":
        yield path.read_text(encoding="utf-8", errors="replace")
    elif path.suffix == ".jsonl":
        yield from _jsonl_documents(path, column)
    elif path.suffix == ".parquet":
        yield from _parquet_documents(path, column)
    else:
        raise DatasetError(f"unsupported file {path}: use {', '.join(LOCAL_SUFFIXES)}")


def local_files(spec: str) -> list[Path] | None:
    """The files a local dataset spec names, or None if it is not a local spec."""
    path = Path(spec).expanduser()
    if any(ch in spec for ch in "*?["):
        files = [Path(p) for p in sorted(glob.glob(str(path), recursive=True)) if Path(p).is_file()]
        if not files:
            raise DatasetError(f"no files match {spec!r}")
        return files
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)
        if not files:
            raise DatasetError(f"folder {spec} holds no {', '.join(LOCAL_SUFFIXES)} files")
        return files
    if path.is_file():
        return [path]
    if path.suffix in LOCAL_SUFFIXES or spec.startswith((".", "/", "~")):
        raise DatasetError(f"dataset file {spec} does not exist")
    return None


def _hub_documents(cfg: TextConfig) -> Iterator[Document]:
    try:
        import datasets

        ds = datasets.load_dataset(cfg.dataset, split=cfg.split, streaming=True)
        if cfg.shuffle_buffer:
            ds = ds.shuffle(seed=cfg.seed, buffer_size=cfg.shuffle_buffer)
        rows = iter(ds)
        first = next(rows, None)
    except DatasetError:
        raise
    except Exception as e:  # hub offline, unknown dataset or split: the library's own exception types
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DatasetError(f"cannot load dataset {cfg.dataset!r} (split {cfg.split!r}): {first_line}") from e
    if first is None:
        return
    yield _row_document(first, cfg.text_column, cfg.dataset)
    for row in rows:
        yield _row_document(row, cfg.text_column, cfg.dataset)


def buffer_shuffle(items: Iterable[Document], seed: int, buffer: int) -> Iterator[Document]:
    """A seeded streaming shuffle: keep ``buffer`` items, emit a random one for each new one."""
    if buffer <= 1:
        yield from items
        return
    rng = random.Random(seed)
    pool: list[Document] = []
    for item in items:
        if len(pool) < buffer:
            pool.append(item)
            continue
        i = rng.randrange(buffer)
        yield pool[i]
        pool[i] = item
    rng.shuffle(pool)
    yield from pool


def documents(cfg: TextConfig) -> Iterator[Document]:
    """Documents of ``cfg.dataset`` in the seeded order."""
    if cfg.dataset == corpus.NAME:
        if cfg.split not in corpus.SPLITS:
            raise DatasetError(f"unknown split {cfg.split!r} of {corpus.NAME}; choose {', '.join(corpus.SPLITS)}")
        source: Iterable[Document] = corpus.python_docs(cfg.split)
    elif cfg.dataset.startswith("builtin:"):
        raise DatasetError(f"unknown built-in dataset {cfg.dataset!r}; the built-in one is {corpus.NAME}")
    else:
        files = local_files(cfg.dataset)
        if files is None:
            yield from _hub_documents(cfg)  # the hub shuffles with the same seed
            return
        source = (doc for f in files for doc in _file_documents(f, cfg.text_column))
    yield from buffer_shuffle(source, cfg.seed, cfg.shuffle_buffer)


# ---- packing -----------------------------------------------------------------------------
def _encode(texts: list[str], tokenizer: Any, eos: int | None) -> list[list[int]]:
    """The token ids of ``texts`` from one tokenizer call, each followed by ``eos``."""
    if not texts:
        return []
    batch = tokenizer(texts, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if eos is not None:
        for ids in batch:
            ids.append(eos)
    return batch


def _document_ids(docs: Iterable[Document], tokenizer: Any, eos: int | None,
                  drop_first: int | None) -> Iterator[list[int]]:
    """Each document's token ids, in document order: text documents tokenized in batches of
    :data:`TOKENIZE_BATCH_DOCS` (or :data:`TOKENIZE_BATCH_CHARS`), each followed by ``eos``;
    token-id documents as they are, less a leading ``drop_first``."""
    texts: list[str] = []
    chars = 0
    docs = iter(docs)
    while True:
        try:
            doc = next(docs, _END)
        except Exception:
            yield from _encode(texts, tokenizer, eos)  # what was read before a source error comes first
            raise
        if isinstance(doc, str):
            texts.append(doc)
            chars += len(doc)
            if len(texts) < TOKENIZE_BATCH_DOCS and chars < TOKENIZE_BATCH_CHARS:
                continue
        yield from _encode(texts, tokenizer, eos)
        texts, chars = [], 0
        if doc is _END:
            return
        if not isinstance(doc, str):
            yield doc[1:] if drop_first is not None and doc and doc[0] == drop_first else doc


def token_windows(cfg: TextConfig, tokenizer: Any) -> Iterator[np.ndarray]:
    """Packed windows, each an int64 array of ``context_size`` token ids."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if cfg.prepend_bos and bos is None:
        raise DatasetError("the tokenizer has no BOS token; pass --no-bos")
    body = cfg.context_size - 1 if cfg.prepend_bos else cfg.context_size
    head = [bos] if cfg.prepend_bos else []
    buf: list[int] = []
    for ids in _document_ids(documents(cfg), tokenizer, eos, bos if cfg.prepend_bos else None):
        buf.extend(ids)
        if len(buf) >= body:
            end = len(buf) // body * body
            for start in range(0, end, body):
                yield np.asarray(head + buf[start:start + body], dtype=np.int64)
            del buf[:end]


def take_windows(cfg: TextConfig, tokenizer: Any, n_tokens: int, skip: int = 0) -> list[np.ndarray]:
    """The first ``ceil(n_tokens / context_size)`` windows after skipping ``skip`` windows;
    fewer when the text runs out, and a :class:`DatasetError` when it yields none."""
    n_windows = -(-n_tokens // cfg.context_size)
    windows = list(itertools.islice(token_windows(cfg, tokenizer), skip, skip + n_windows))
    if not windows:
        split = f" (split {cfg.split})" if cfg.split else ""
        raise DatasetError(f"{cfg.dataset}{split} holds no window of {cfg.context_size} tokens after the first {skip}; "
                           "use more text or a smaller --context-size")
    if len(windows) < n_windows:
        log.warning("%s (split %s) holds only %d windows of %d tokens; asked for %d", cfg.dataset, cfg.split,
                    len(windows), cfg.context_size, n_windows)
    return windows
