"""StoreConfig validation and defaults; dtype conversions and the fp8 mode's error bound."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from actstore import ModelInfo, StoreConfig
from actstore.config import default_chunk_tokens
from actstore.dtypes import encode_acts, fp8_dequantize, fp8_quantize, to_numpy, to_torch
from tests.helpers import make_config


def test_default_chunks_are_at_least_one_mib_and_shards_tens_of_mib():
    cfg = make_config(chunk_tokens=0, shard_tokens=0, model=ModelInfo("smol", 576, 30))
    assert cfg.chunk_tokens == 1024 and cfg.chunk_tokens * 576 * 2 >= 1 << 20
    assert cfg.shard_tokens * 576 * 2 >= 16 << 20
    assert default_chunk_tokens(2304, "bfloat16") == 256  # gemma-2-2b
    assert default_chunk_tokens(2304, "float8_e4m3fn") == 512


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(hooks=()), "at least one hook"),
        (dict(hooks=("a", "a")), "repeated"),
        (dict(hooks=("blocks/0",)), "invalid hook name"),
        (dict(dtype="int8"), "unknown dtype"),
        (dict(codec="lz4"), "unknown codec"),
        (dict(n_tokens_target=0), "n_tokens_target"),
        (dict(shard_tokens=100, chunk_tokens=64), "multiple of chunk_tokens"),
        (dict(hook_dims={"nope": 3}), "hook_dims"),
    ],
)
def test_config_validation(changes, message):
    with pytest.raises(ValueError, match=message):
        make_config(**changes)


def test_config_json_roundtrip_and_differences():
    cfg = make_config(hook_dims={"blocks.1.hook_mlp_out": 96}, extra={"batch_size": 8})
    back = StoreConfig.from_json(cfg.to_json())
    assert back == cfg and back.width("blocks.1.hook_mlp_out") == 96
    diffs = cfg.differences(cfg.with_(context_size=32, extra={"batch_size": 4}))
    assert diffs == ["context_size: 16 != 32", "extra.batch_size: 8 != 4"]


def test_bf16_cast_matches_torch_round_to_nearest_even():
    x = torch.randn(512, 64) * 10
    ours, _ = encode_acts(x.numpy(), "bfloat16")
    theirs = to_numpy(x.to(torch.bfloat16))
    np.testing.assert_array_equal(ours.view(np.uint16), theirs.view(np.uint16))
    back = to_torch(ours)
    assert back.dtype == torch.bfloat16 and torch.equal(back, x.to(torch.bfloat16))


def test_fp8_per_token_scale_error_bound():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1000, 256)).astype(np.float32) * rng.uniform(0.01, 100, (1000, 1)).astype(np.float32)
    x[3] = 0.0
    q, scale = fp8_quantize(x)
    assert q.dtype == np.dtype(ml_dtypes.float8_e4m3fn) and scale.shape == (1000,)
    y = fp8_dequantize(q, scale)
    assert np.all(np.isfinite(y)) and np.all(y[3] == 0)
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 for normal values
    big = np.abs(x) >= scale[:, None] * 2.0**-6
    assert np.all(np.abs(y - x)[big] <= np.abs(x)[big] * 2.0**-4 + 1e-12)
    assert np.abs(np.abs(x).max(axis=1) - np.abs(y).max(axis=1)).max() <= 1e-3 * np.abs(x).max()
