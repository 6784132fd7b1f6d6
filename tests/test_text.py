"""Text sources, the seeded document order and packing into windows."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from actstore.units import parse_count, parse_layers
from pipelines import corpus
from pipelines import text as text_mod
from pipelines.text import (
    PREFETCH_DEPTH,
    DatasetError,
    TextConfig,
    buffer_shuffle,
    documents,
    token_windows,
)


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return AutoTokenizer.from_pretrained(tokenizer_dir)


def take(cfg, tok, n):
    return list(itertools.islice(token_windows(cfg, tok), n))


def test_windows_have_bos_and_are_deterministic_per_seed(tok):
    a = take(TextConfig(context_size=64, seed=0), tok, 20)
    b = take(TextConfig(context_size=64, seed=0), tok, 20)
    c = take(TextConfig(context_size=64, seed=1), tok, 20)
    assert len(a) == len(b) == len(c) == 20
    assert all(w.shape == (64,) and w[0] == tok.bos_token_id for w in a)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_packing_is_the_token_stream_cut_into_windows(tmp_path, tok):
    docs = ["The first document is short.", "A second one follows it, somewhat longer than the first.", "Third."]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs))
    stream = []
    for d in docs:
        stream += tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    cfg = TextConfig(dataset=str(tmp_path / "d.jsonl"), context_size=8, shuffle_buffer=0)
    windows = list(token_windows(cfg, tok))
    assert len(windows) == len(stream) // 7
    assert np.array_equal(np.stack(windows)[:, 1:].reshape(-1), stream[: 7 * len(windows)])
    no_bos = list(token_windows(TextConfig(dataset=str(tmp_path / "d.jsonl"), context_size=8, prepend_bos=False, shuffle_buffer=0), tok))
    assert np.array_equal(np.stack(no_bos).reshape(-1), stream[: 8 * len(no_bos)])


def test_local_sources_txt_jsonl_parquet_folder_glob(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("alpha text")
    (tmp_path / "b.jsonl").write_text('{"body": "beta"}\n\n{"body": "gamma"}\n')
    pq.write_table(pa.table({"body": ["delta", None, "epsilon"]}), tmp_path / "c.parquet")
    cfg = TextConfig(dataset=str(tmp_path), text_column="body", shuffle_buffer=0)
    assert list(documents(cfg)) == ["alpha text", "beta", "gamma", "delta", "epsilon"]
    assert list(documents(TextConfig(dataset=str(tmp_path / "*.jsonl"), text_column="body", shuffle_buffer=0))) == ["beta", "gamma"]
    assert sorted(documents(TextConfig(dataset=str(tmp_path), text_column="body", seed=3, shuffle_buffer=2))) == sorted(
        ["alpha text", "beta", "gamma", "delta", "epsilon"]
    )


def test_pretokenized_rows_are_used_as_token_ids(tmp_path, tok):
    rows = [[tok.bos_token_id, 5, 6, 7], [tok.bos_token_id, 8, 9, 10]]
    (tmp_path / "ids.jsonl").write_text("\n".join(json.dumps({"input_ids": r}) for r in rows))
    windows = list(token_windows(TextConfig(dataset=str(tmp_path / "ids.jsonl"), context_size=4, shuffle_buffer=0), tok))
    assert [w.tolist() for w in windows] == rows


def per_document_windows(cfg, tok):
    """The reference packing: one tokenizer call per document, the stream cut as it grows."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    body = cfg.context_size - 1 if cfg.prepend_bos else cfg.context_size
    buf = []
    for doc in documents(cfg):
        if isinstance(doc, str):
            ids = tok(doc, add_special_tokens=False)["input_ids"] + [eos]
        else:
            ids = doc[1:] if cfg.prepend_bos and doc and doc[0] == bos else doc
        buf += ids
        while len(buf) >= body:
            window, buf = buf[:body], buf[body:]
            yield ([bos] if cfg.prepend_bos else []) + window


class CountingTokenizer:
    """A tokenizer that counts its calls."""

    def __init__(self, tok):
        self.tok, self.calls = tok, 0
        self.bos_token_id, self.eos_token_id = tok.bos_token_id, tok.eos_token_id

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.tok(*args, **kwargs)


def mixed_rows(tok):
    """Long and short text documents, empty ones, and token-id rows with and without BOS."""
    texts = list(itertools.islice(corpus.python_docs("test"), 40))
    rows = []
    for i, t in enumerate(texts):
        rows.append({"text": t * (1 + i % 7) if i % 5 else t[:12]})  # a few tokens to a few thousand
        if i == 20:
            rows.append({"text": "\n\n".join(texts)})  # a long one: many windows of every size below
        if i % 6 == 0:
            rows.append({"input_ids": [tok.bos_token_id, 100 + i, 200 + i, 300 + i]})
        if i % 9 == 0:
            rows.append({"input_ids": [400 + i] * (50 + i)})
        if i % 13 == 0:
            rows.append({"text": ""})
    return rows


@pytest.mark.parametrize("batch_docs, batch_chars", [(256, 1 << 20), (3, 1 << 20), (256, 2000), (1, 1)])
def test_batched_tokenizing_packs_as_per_document_tokenizing(tmp_path, tok, monkeypatch, batch_docs, batch_chars):
    monkeypatch.setattr(text_mod, "TOKENIZE_BATCH_DOCS", batch_docs)
    monkeypatch.setattr(text_mod, "TOKENIZE_BATCH_CHARS", batch_chars)
    rows = mixed_rows(tok)
    (tmp_path / "mixed.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for kw in (dict(context_size=64), dict(context_size=129, prepend_bos=False), dict(context_size=1024, seed=3),
               dict(context_size=2, shuffle_buffer=0)):
        cfg = TextConfig(dataset=str(tmp_path / "mixed.jsonl"), **kw)
        counting = CountingTokenizer(tok)
        got = [w.tolist() for w in token_windows(cfg, counting)]
        want = list(per_document_windows(cfg, tok))
        assert len(got) == len(want) > 0
        assert got == want, kw
        assert all(isinstance(w, np.ndarray) and w.dtype == np.int64 for w in itertools.islice(token_windows(cfg, tok), 3))
        n_texts = sum("text" in r for r in rows)
        if batch_docs == 256 and batch_chars == 1 << 20:  # text between token-id rows goes in one call
            assert counting.calls <= sum("input_ids" in r for r in rows) + 1 < n_texts


def test_batched_tokenizing_on_the_builtin_corpus(tok):
    cfg = TextConfig(context_size=256)
    got = list(itertools.islice(token_windows(cfg, tok), 300))
    assert [w.tolist() for w in got] == list(itertools.islice(per_document_windows(cfg, tok), 300))


def test_a_source_error_comes_after_the_windows_before_it(tmp_path, tok):
    good = [json.dumps({"text": t}) for t in itertools.islice(corpus.python_docs("test"), 30)]
    (tmp_path / "good.jsonl").write_text("\n".join(good))
    (tmp_path / "bad.jsonl").write_text("\n".join(good + ["{not json"]))
    want = list(per_document_windows(TextConfig(dataset=str(tmp_path / "good.jsonl"), context_size=64, shuffle_buffer=0), tok))
    got = []
    with pytest.raises(DatasetError, match="bad.jsonl:31 is not valid JSON"):
        for w in token_windows(TextConfig(dataset=str(tmp_path / "bad.jsonl"), context_size=64, shuffle_buffer=0), tok):
            got.append(w.tolist())
    assert got == want and got
    # taking only windows before the error never reaches it, as when documents were tokenized one by one
    assert len(list(itertools.islice(token_windows(TextConfig(dataset=str(tmp_path / "bad.jsonl"), context_size=64,
                                                              shuffle_buffer=0), tok), 5))) == 5


def test_no_bos_is_still_a_dataset_error(tok):
    no_bos = CountingTokenizer(tok)
    no_bos.bos_token_id = None
    with pytest.raises(DatasetError, match="no BOS token"):
        next(token_windows(TextConfig(), no_bos))
    assert next(token_windows(TextConfig(prepend_bos=False), no_bos)).shape == (1024,)


def test_windows_tokenized_in_a_background_thread_keep_their_order_and_errors(tmp_path, tok):
    from actstore.prefetch import Prefetcher

    cfg = TextConfig(context_size=128)
    want = list(itertools.islice(token_windows(cfg, tok), 200))
    ahead = Prefetcher(lambda: token_windows(cfg, tok), PREFETCH_DEPTH, "test-windows")
    got = list(itertools.islice(ahead, 200))
    ahead.close()
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    (tmp_path / "b.jsonl").write_text('{"body": "beta"}\n')
    with pytest.raises(DatasetError, match="column 'text' not found"):
        list(Prefetcher(lambda: token_windows(TextConfig(dataset=str(tmp_path / "b.jsonl")), tok), 4, "test-windows-error"))


def test_source_errors(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"body": "beta"}\n')
    with pytest.raises(DatasetError, match="column 'text' not found .* it has: body; pass --text-column"):
        list(documents(TextConfig(dataset=str(tmp_path / "b.jsonl"))))
    with pytest.raises(DatasetError, match="does not exist"):
        list(documents(TextConfig(dataset=str(tmp_path / "missing.jsonl"))))
    with pytest.raises(DatasetError, match="no files match"):
        list(documents(TextConfig(dataset=str(tmp_path / "*.parquet"))))
    with pytest.raises(DatasetError, match="unknown built-in"):
        list(documents(TextConfig(dataset="builtin:nope")))
    (tmp_path / "bad.jsonl").write_text("{not json\n")
    with pytest.raises(DatasetError, match="bad.jsonl:1 is not valid JSON"):
        list(documents(TextConfig(dataset=str(tmp_path / "bad.jsonl"))))


def test_hub_dataset_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DatasetError, match="cannot load dataset 'someone/some-corpus'"):
        list(documents(TextConfig(dataset="someone/some-corpus")))


def test_buffer_shuffle_is_a_seeded_permutation():
    items = [str(i) for i in range(100)]
    a = list(buffer_shuffle(items, seed=1, buffer=16))
    assert sorted(a) == sorted(items) and a != items
    assert a == list(buffer_shuffle(items, seed=1, buffer=16))


def test_parse_layers_and_counts():
    assert parse_layers("0-3,10, 2") == (0, 1, 2, 3, 10)
    assert parse_layers("all", 4) == (0, 1, 2, 3)
    for bad in ("3-1", "a", ",", "1-"):
        with pytest.raises(ValueError):
            parse_layers(bad)
    assert [parse_count(s) for s in ("20000", "20k", "5M", "1.5B", "2_000")] == [20000, 20000, 5_000_000, 1_500_000_000, 2000]
    for bad in ("0", "-5", "x", "1.5"):
        with pytest.raises(ValueError):
            parse_count(bad)
