"""Harvest end to end on tiny random-weight models: stored activations against an independent
forward pass, kill -9 and resume, torchrun with two ranks, and bad input."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import actstore
from pipelines.capture import SITES, hook_name
from pipelines.harvest import DataExhaustedError, HarvestConfig, harvest
from pipelines.models import load_model
from pipelines.text import TextConfig
from pipelines.transfer import NonFiniteActivationsError
from tests.helpers import assert_same_arrays

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def small_harvest(model_dir, out, **changes) -> HarvestConfig:
    base = dict(
        model=str(model_dir), out=str(out), layers=(0, 1, 2, 3), sites=SITES,
        text=TextConfig(context_size=64), tokens=1024, batch_size=2,
        chunk_tokens=64, shard_tokens=256, model_dtype="float32", progress=False,
    )
    base.update(changes)
    return HarvestConfig(**base)


def cli(*args, env=ENV, **kw):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, **kw)


def cli_harvest_args(model_dir, out, tokens="4096", extra=()):
    """Shards of 4 windows, batches of 3: batches straddle shard boundaries (kill -9, torchrun)."""
    return ["harvest", "--model", str(model_dir), "--out", str(out), "--layers", "0-3", "--sites", "resid_post,mlp_out",
            "--tokens", tokens, "--context-size", "64", "--batch-size", "3", "--chunk-tokens", "64",
            "--shard-tokens", "256", "--model-dtype", "float32", "--no-progress", *extra]


def test_harvested_store_streams_without_special_tokens(tiny_llama, tmp_path):
    harvest(small_harvest(tiny_llama, tmp_path / "s", layers=(1,), sites=("resid_post",)))
    store = actstore.open_store(str(tmp_path / "s"))
    special = store.config.extra["special_token_ids"]
    assert 1 in special  # the SmolLM2 tokenizer's BOS
    tokens = store.tokens()
    s = actstore.stream(store, "blocks.1.hook_resid_post", 100, drop_special=True, dtype=None)
    index = np.concatenate([b.index_B.numpy() for b in s.indexed()])
    assert sorted(index.tolist()) == [i for i in range(1024) if tokens[i] not in special]
    b = next(actstore.stream(store, "blocks.1.hook_resid_post", 100, dtype=None).indexed())
    np.testing.assert_array_equal(b.acts.view(torch.int16).numpy(), store.read("blocks.1.hook_resid_post")[b.index_B.numpy()].view(np.int16))


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gemma2"])
def test_stored_activations_equal_an_independent_forward_pass(request, tmp_path, kind):
    model_dir = request.getfixturevalue(kind)
    result = harvest(small_harvest(model_dir, tmp_path / "s"))
    store = actstore.open_store(str(tmp_path / "s"))
    assert result.store_tokens == store.n_tokens == 1024 and store.is_complete
    assert store.hooks == tuple(hook_name(layer, s) for layer in range(4) for s in SITES)
    tokens = store.tokens().reshape(-1, 64)
    assert (tokens[:, 0] == 1).all(), "BOS at position 0"
    np.testing.assert_array_equal(store.positions(), np.tile(np.arange(64), 16))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    mlp_in = {}  # what each MLP reads, from forward hooks on the MLPs themselves
    for i, block in enumerate(model.get_decoder().layers):
        block.mlp.register_forward_hook(lambda m, args, out, i=i: mlp_in.__setitem__(i, args[0].detach()))
    with torch.no_grad():
        hidden = model(torch.from_numpy(tokens.astype(np.int64)), output_hidden_states=True).hidden_states
    for layer in range(4):
        ref = {"resid_pre": hidden[layer], "resid_post": hidden[layer + 1] if layer < 3 else None, "mlp_in": mlp_in[layer]}
        for site, want in ref.items():
            if want is None:
                continue
            got = store.read(hook_name(layer, site)).astype(np.float32)
            want = want.reshape(-1, 64).numpy()
            # stored in bf16: within bf16 rounding (relative 2^-8) of the float32 forward
            np.testing.assert_allclose(got, want, rtol=2**-7, atol=2**-7 * np.abs(want).max())
        total = sum(store.read(hook_name(layer, s)).astype(np.float32) for s in ("resid_pre", "attn_out", "mlp_out"))
        post = store.read(hook_name(layer, "resid_post")).astype(np.float32)
        assert np.abs(total - post).max() <= 0.05 * np.abs(post).max()


def test_every_forward_pass_runs_batch_size_windows_whatever_the_shard_size(tmp_path, tiny_llama):
    lm = load_model(str(tiny_llama), model_dtype="float32", device="cpu")
    passes: list[int] = []
    hook = lm.model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: passes.append(kwargs["input_ids"].shape[0]), with_kwargs=True)
    stored = {}
    try:
        for shard_tokens in (64, 256, 2048):  # 1 window per shard (a batch spans 16), 4, 32 (a shard spans 2 batches)
            passes.clear()
            cfg = small_harvest(tiny_llama, tmp_path / f"s{shard_tokens}", tokens=64 * 16 * 4, batch_size=16,
                                shard_tokens=shard_tokens, sites=("resid_post",))
            harvest(cfg, model=lm)
            assert passes == [16, 16, 16, 16], (shard_tokens, passes)
            store = actstore.open_store(cfg.out)
            stored[shard_tokens] = store.read("blocks.3.hook_resid_post", 0, store.n_tokens)
    finally:
        hook.remove()
    assert np.array_equal(stored[64], stored[256]) and np.array_equal(stored[64], stored[2048])


def test_non_finite_activations_stop_the_harvest_before_their_shard_is_stored(tmp_path, tiny_llama, monkeypatch):
    from pipelines.capture import ActivationCapture

    real, calls = ActivationCapture.run, []

    def overflow_in_the_fifth_batch(self, ids_BT):  # windows 8-9: shard 2
        acts = real(self, ids_BT)
        calls.append(1)
        if len(calls) == 5:
            acts["blocks.2.hook_resid_post"][3, 5] = float("inf")
        return acts

    monkeypatch.setattr(ActivationCapture, "run", overflow_in_the_fifth_batch)
    cfg = small_harvest(tiny_llama, tmp_path / "s", sites=("resid_post",))
    with pytest.raises(NonFiniteActivationsError, match=r"inf or NaN activations at blocks\.2\.hook_resid_post in shard 2 "
                                                         r"\(nothing of it was stored\).*--model-dtype bfloat16 or float32"):
        harvest(cfg)
    store = actstore.open_store(cfg.out)
    assert 2 not in store.committed_shards and {0, 1} <= set(store.committed_shards)
    assert all(np.isfinite(store.stats(h).mean_D).all() for h in store.hooks)


def test_rerun_of_a_finished_harvest_writes_nothing(tmp_path, tiny_llama):
    cfg = small_harvest(tiny_llama, tmp_path / "s", sites=("resid_post",))
    harvest(cfg)
    again = harvest(cfg)
    assert again.tokens_written == 0 and again.store_tokens == 1024


def test_dataset_too_short_keeps_committed_shards(tmp_path, tiny_llama):
    (tmp_path / "t.txt").write_text("A short text. " * 120)  # ~ 480 tokens: one shard of 256
    cfg = small_harvest(tiny_llama, tmp_path / "s", text=TextConfig(dataset=str(tmp_path / "t.txt"), context_size=64))
    with pytest.raises(actstore.ActstoreError, match=r"ran out after \d+ tokens, short of --tokens 1,024"):
        harvest(cfg)
    assert actstore.open_store(str(tmp_path / "s")).committed_shards == [0]


def root_summary(url) -> dict:
    """The root attribute as a plain zarr reader sees it."""
    import zarr

    return dict(zarr.open_group(str(url), mode="r").attrs["actstore"])


def test_text_running_out_leaves_a_readable_store_that_a_lower_target_finishes(tmp_path, tiny_llama):
    (tmp_path / "t.txt").write_text("A short text. " * 120)  # ~ 480 tokens: one shard of 256, then 3 windows
    text = TextConfig(dataset=str(tmp_path / "t.txt"), context_size=64)
    cfg = small_harvest(tiny_llama, tmp_path / "s", text=text, sites=("resid_post",))
    with pytest.raises(DataExhaustedError, match=r"rerun with --tokens (\d+) to finish") as e:
        harvest(cfg)
    held = int(re.search(r"--tokens (\d+) to finish", str(e.value)).group(1))
    assert 256 < held < 512 and held % 64 == 0
    assert root_summary(tmp_path / "s")["n_tokens"] == 256 == actstore.open_store(str(tmp_path / "s")).n_tokens
    done = harvest(replace(cfg, tokens=held))  # the suggested target: the store is finished from what is there
    assert done.store_tokens == held and root_summary(tmp_path / "s")["n_tokens"] == held
    assert actstore.open_store(str(tmp_path / "s")).is_complete
    harvest(replace(cfg, out=str(tmp_path / "fresh"), tokens=held))
    assert_same_arrays(tmp_path / "s", tmp_path / "fresh")


def test_a_higher_target_extends_a_finished_store_as_one_harvest_would(tmp_path, tiny_llama):
    cfg = small_harvest(tiny_llama, tmp_path / "s", sites=("resid_post",), tokens=640)  # shards 256, 256, 128
    harvest(cfg)
    extended = harvest(replace(cfg, tokens=1024))
    assert extended.tokens_written == 1024 - 512  # the short last shard again at full length, and one more
    harvest(replace(cfg, out=str(tmp_path / "fresh"), tokens=1024))
    assert_same_arrays(tmp_path / "s", tmp_path / "fresh")
    assert root_summary(tmp_path / "s")["n_tokens"] == 1024


def test_another_configuration_is_refused_before_the_weights_load(tmp_path, tiny_llama, monkeypatch):
    import pipelines.harvest

    cfg = small_harvest(tiny_llama, tmp_path / "s", sites=("resid_post",), tokens=512)
    harvest(cfg)

    def no_weights(spec):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(pipelines.harvest, "load_weights", no_weights)
    with pytest.raises(actstore.ConfigMismatchError, match="context_size"):
        harvest(replace(cfg, text=replace(cfg.text, context_size=32)))
    with pytest.raises(actstore.ConfigMismatchError, match="batch_size"):
        harvest(replace(cfg, batch_size=4))
    with pytest.raises(actstore.ConfigMismatchError, match="would cut them off"):
        harvest(replace(cfg, tokens=256))
    assert harvest(cfg).tokens_written == 0  # finished: nothing to load either


def test_an_interrupted_harvest_leaves_the_summary_of_its_commits(tmp_path, tiny_llama, monkeypatch):
    from pipelines.background import ShardHandoff

    real, ended = ShardHandoff.put, []

    def interrupted_at_the_third_shard(self, buf):
        if len(ended) == 2:
            raise KeyboardInterrupt
        ended.append(buf.shard)
        return real(self, buf)

    monkeypatch.setattr(ShardHandoff, "put", interrupted_at_the_third_shard)
    cfg = small_harvest(tiny_llama, tmp_path / "s", sites=("resid_post",))
    with pytest.raises(KeyboardInterrupt):
        harvest(cfg)
    summary = root_summary(tmp_path / "s")
    assert summary["n_tokens"] == 512 and summary["n_shards_committed"] == 2
    monkeypatch.setattr(ShardHandoff, "put", real)
    assert harvest(cfg).tokens_written == 512 and root_summary(tmp_path / "s")["n_tokens"] == 1024


@pytest.mark.slow
def test_kill_9_then_resume_is_bit_identical(tmp_path, tiny_llama):
    out = tmp_path / "killed"
    args = cli_harvest_args(tiny_llama, out, tokens="16384")
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args], env=ENV, stdout=log, stderr=log)
    record = out / "commits" / "writer-0" / "zarr.json"
    deadline = time.time() + 120
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        if record.exists():
            try:
                ranges = json.loads(record.read_text())["attributes"]["actstore_commit"]["shard_ranges"]
                committed = sum(b - a for a, b in ranges)
            except (json.JSONDecodeError, KeyError):
                pass  # never seen: the record is replaced atomically
        if committed >= 3:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait(timeout=60)
    log.close()
    assert proc.returncode == -signal.SIGKILL, f"ended before it could be killed: {(tmp_path / 'killed.log').read_text()[-500:]}"
    killed = actstore.open_store(str(out))
    assert 3 <= len(killed.committed_shards) < killed.config.n_shards

    resumed = cli(*args)
    assert resumed.returncode == 0, resumed.stderr
    reference = cli(*cli_harvest_args(tiny_llama, tmp_path / "reference", tokens="16384"))
    assert reference.returncode == 0, reference.stderr
    assert_same_arrays(out, tmp_path / "reference")


@pytest.mark.slow
def test_torchrun_two_ranks_write_disjoint_shards_of_one_store(tmp_path, tiny_llama):
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    args = cli_harvest_args(tiny_llama, tmp_path / "ddp", tokens="2048")
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "cli", *args],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    store = actstore.open_store(str(tmp_path / "ddp"))
    assert store.is_complete and store.n_tokens == 2048
    writers = sorted(p.name for p in (tmp_path / "ddp" / "commits").iterdir() if p.is_dir())
    assert writers == ["writer-0", "writer-1"]
    single = cli(*cli_harvest_args(tiny_llama, tmp_path / "single", tokens="2048"), env=env)
    assert single.returncode == 0, single.stderr
    assert_same_arrays(tmp_path / "ddp", tmp_path / "single")


# ---- bad input: one line, exit code 2, nothing committed lost --------------------------------
def assert_user_error(run, *fragments):
    assert run.returncode == 2, (run.returncode, run.stderr[-1500:])
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-1500:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_bad_inputs(tmp_path, tiny_llama):
    base = cli_harvest_args(tiny_llama, tmp_path / "s", tokens="512")
    assert_user_error(cli("harvest", "--model", "gemma-7z", "--out", str(tmp_path / "x"), "--layers", "0"), "unknown model 'gemma-7z'")
    assert_user_error(cli("harvest", "--model", "gemma-7z", "--out", str(tmp_path / "x")), "unknown model 'gemma-7z'")
    assert_user_error(cli(*[a if a != "0-3" else "0-4" for a in base]), "layer 4 is past the model's depth", "4 layers (0-3)")
    assert_user_error(cli(*[a if a != "resid_post,mlp_out" else "resid_mid" for a in base]), "unknown site resid_mid")
    (tmp_path / "empty.txt").write_text("")
    assert_user_error(cli(*base, "--dataset", str(tmp_path / "empty.txt")), "yielded no tokens")
    (tmp_path / "rows.jsonl").write_text('{"content": "hello"}\n')
    assert_user_error(cli(*base, "--dataset", str(tmp_path / "rows.jsonl")), "column 'text' not found", "--text-column")
    assert not (tmp_path / "s").exists(), "no store is created for input that fails before the first shard"

    ok = cli(*base)
    assert ok.returncode == 0, ok.stderr
    before = actstore.open_store(str(tmp_path / "s"))
    other = cli(*[a if a != "64" else "32" for a in base])  # another context size
    assert_user_error(other, "another configuration", "context_size", "--overwrite")
    after = actstore.open_store(str(tmp_path / "s"))
    assert after.n_tokens == before.n_tokens == 512 and after.config == before.config

    env = {**ENV, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}
    assert_user_error(cli(*cli_harvest_args(tiny_llama, "s3://bucket/store", tokens="512"), env=env), "cannot read s3://bucket/store")


def test_shards_in_flight_default_scales_with_cores_and_bad_values_are_refused():
    from pipelines.harvest import auto_shards_in_flight

    assert [auto_shards_in_flight(c) for c in (1, 2, 8, 12, 16, 64)] == [2, 2, 2, 3, 4, 4]
    assert 2 <= auto_shards_in_flight() <= 4
    assert small_harvest("m", "o").shards_in_flight == 0  # automatic unless asked
    assert small_harvest("m", "o", shards_in_flight=3).shards_in_flight == 3
    with pytest.raises(ValueError, match="--shards-in-flight must be 0 \\(automatic\\) or more, got -1"):
        small_harvest("m", "o", shards_in_flight=-1)
