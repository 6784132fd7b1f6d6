"""The issue's acceptance command on the real SmolLM2-135M, offline, checked against an
independent forward pass of the same model (slow: about two minutes on 2 CPU cores)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import actstore
from pipelines import smollm2

pytestmark = pytest.mark.slow
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def test_harvest_smollm2_all_layers_offline(tmp_path):
    out = tmp_path / "smol"
    run = subprocess.run(
        [sys.executable, "-m", "cli", "harvest", "--model", "smollm2-135m", "--layers", "0-29",
         "--dataset", "builtin:python-docs", "--tokens", "20000", "--out", str(out)],
        capture_output=True, text=True, env=ENV, timeout=900,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    info = subprocess.run([sys.executable, "-m", "cli", "info", str(out), "--json"], capture_output=True, text=True, env=ENV)
    assert info.returncode == 0, info.stderr
    s = json.loads(info.stdout)
    assert s["n_tokens"] == s["n_tokens_target"] == 20480  # 20000 rounded up to whole 1024-token contexts
    assert s["model"] == {"name": "smollm2-135m", "d_model": 576, "n_layers": 30, "revision": None}
    assert len(s["hooks"]) == 30 and s["compression_ratio"] > 1.3

    store = actstore.open_store(str(out))
    ids = store.tokens(0, 2048).reshape(2, 1024).astype(np.int64)
    model, _ = smollm2.load(torch.float32)
    with torch.no_grad():
        hidden = model(torch.from_numpy(ids), output_hidden_states=True).hidden_states
    for layer in range(29):  # hidden_states[30] has the final norm applied
        want = hidden[layer + 1].reshape(-1, 576).numpy()
        got = store.read(f"blocks.{layer}.hook_resid_post", 0, 2048).astype(np.float32)
        rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
        assert rel.max() < 1e-2, (layer, rel.max())  # bf16 storage: ~2e-3 per token
