"""Stores are readable without actstore: tensorstore opens them as plain zarr v3 arrays."""

from __future__ import annotations

import numpy as np
import pytest

import actstore
from actstore.layout import acts_path, scale_path
from tests.helpers import make_config, make_data, write_shards

ts = pytest.importorskip("tensorstore")


def _write(path, cfg):
    data = make_data(cfg)
    with actstore.open_store(str(path), "a", config=cfg) as w:
        write_shards(w, cfg, data, w.pending_shards())
    return actstore.open_store(str(path))


def _ts_read(path):
    spec = {"driver": "zarr3", "kvstore": {"driver": "file", "path": str(path)}}
    return np.asarray(ts.open(spec, read=True).result().read().result())


def test_tensorstore_reads_bf16_bit_exact(tmp_path):
    cfg = make_config()
    store = _write(tmp_path / "s", cfg)
    for hook in cfg.hooks:
        arr = _ts_read(tmp_path / "s" / acts_path(hook))
        assert str(arr.dtype) == "bfloat16"
        np.testing.assert_array_equal(arr.view(np.uint16), store.read(hook).view(np.uint16))
    np.testing.assert_array_equal(_ts_read(tmp_path / "s" / "tokens"), store.tokens())
    np.testing.assert_array_equal(_ts_read(tmp_path / "s" / "positions"), store.positions())


def test_tensorstore_reads_fp8_and_scales(tmp_path):
    cfg = make_config(dtype="float8_e4m3fn")
    store = _write(tmp_path / "s", cfg)
    hook = cfg.hooks[0]
    q = _ts_read(tmp_path / "s" / acts_path(hook))
    scale = _ts_read(tmp_path / "s" / scale_path(hook))
    assert str(q.dtype) == "float8_e4m3fn" and scale.dtype == np.float32
    np.testing.assert_array_equal(q.astype(np.float32) * scale[:, None], store.read(hook))
