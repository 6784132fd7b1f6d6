"""Text sources, the seeded document order and packing into windows."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from transformers import AutoTokenizer

from actstore.units import parse_count, parse_layers
from pipelines.text import DatasetError, TextConfig, buffer_shuffle, documents, token_windows


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
