"""``actstore train-sae``: several SAEs from one read, SAELens folders, resume, one-line errors."""

from __future__ import annotations

import json

import pytest

import actstore
from tests.conftest import make_config, make_data, write_shards
from tests.test_cli import run_cli

HOOK = "blocks.0.hook_resid_post"


@pytest.fixture
def store(tmp_path):
    cfg = make_config(dtype="float32", n_tokens_target=8192, shard_tokens=1024, chunk_tokens=128)
    with actstore.open_store(str(tmp_path / "s"), "w", config=cfg) as w:
        write_shards(w, cfg, make_data(cfg), range(cfg.n_shards))
    return str(tmp_path / "s")


def test_train_sae_sweeps_in_one_read_and_saves_saelens_folders(store, tmp_path):
    out = tmp_path / "run"
    args = ["train-sae", "--store", store, "--hook", HOOK, "--out", str(out), "--tokens", "6k", "--arch", "topk,relu",
            "--k", "4,8", "--expansion", "2", "--lr", "1e-3", "--batch-size", "256", "--eval-tokens", "1k", "--json"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["experiments"]
    assert sorted(r["name"] for r in rows) == ["relu-96-l15-lr0.001", "topk-96-k4-lr0.001", "topk-96-k8-lr0.001"]
    for row in rows:
        assert 0 < row["eval_fvu"] < 1.5 and row["eval_tokens"] > 0
        cfg = json.loads((out / row["name"] / "cfg.json").read_text())
        assert cfg["metadata"]["hook_name"] == HOOK and cfg["actstore"]["scale_folded"] > 0
    assert (out / "training_curves.png").stat().st_size > 0 and (out / "l0_vs_fvu.png").exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tokens"] >= 6000 and len(summary["experiments"]) == 3
    again = run_cli(*args)  # the same command resumes from the final checkpoint: nothing left to train
    assert again.returncode == 0, again.stderr
    other = run_cli(*[a if a != "4,8" else "16" for a in args])
    assert other.returncode == 2 and "holds another run" in other.stderr


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hook", "blocks.9.hook_resid_post"], "not in"),
        (["--k", "500"], "larger than|between 1 and the SAE width"),
        (["--arch", "sparse-magic"], "unknown --arch"),
        (["--sweep", "SWEEP"], "unknown setting"),
    ],
)
def test_train_sae_bad_input_is_one_line_exit_2(store, tmp_path, extra, message):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"arch": "topk", "k": 4, "kk": 2}]))
    args = ["train-sae", "--store", store, "--hook", HOOK, "--out", str(tmp_path / "o"), "--tokens", "1k", "--batch-size", "128"]
    extra = [str(sweep) if e == "SWEEP" else e for e in extra]
    res = run_cli(*args, *extra)
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    import re

    assert re.search(message, res.stderr), res.stderr
