"""``actstore train-sae``: several SAEs from one read, SAELens folders, resume, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import actstore
from tests.helpers import HOOKS, dense_store, folder_bytes, make_config, make_data, write_shards
from tests.helpers import run_cli_here as run_in_process
from tests.helpers import run_cli_process as run_cli

HOOK = HOOKS[0]


@pytest.fixture
def store(tmp_path):
    return dense_store(tmp_path / "s")


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
    files = folder_bytes(out)
    again = run_cli(*args)  # the same command on a finished run: nothing trained, nothing written
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["finished_before"] and json.loads(again.stdout)["experiments"] == rows
    assert folder_bytes(out) == files
    table = run_cli(*args[:-1])
    assert table.returncode == 0 and "is finished; nothing to do" in table.stdout and "topk-96-k4" in table.stdout
    assert folder_bytes(out) == files
    other = run_cli(*[a if a != "4,8" else "16" for a in args])
    assert other.returncode == 2 and "holds another run" in other.stderr
    assert folder_bytes(out) == files


def small_run(store, out, *extra):
    return ["train-sae", "--store", store, "--hook", HOOK, "--out", str(out), "--tokens", "2k", "--k", "4", "--expansion", "2",
            "--batch-size", "256", "--eval-tokens", "1k", "--json", *extra]


def test_bfloat16_training_is_its_own_run_and_float32_runs_keep_their_identity(store, tmp_path):
    out = tmp_path / "run"
    half = run_cli(*small_run(store, out, "--dtype", "bfloat16", "--no-tf32"))
    assert half.returncode == 0, half.stderr
    assert 0 < json.loads(half.stdout)["experiments"][0]["eval_fvu"] < 1.5
    files = folder_bytes(out)
    full = run_cli(*small_run(store, out))  # the same run in fp32 is another run: refused, nothing touched
    assert full.returncode == 2 and "holds another run" in full.stderr and "dtype" in full.stderr
    assert folder_bytes(out) == files
    assert "dtype" not in run_identity_of(tmp_path, store)  # fp32 (the default) adds nothing: old runs resume


def test_matryoshka_trains_from_the_cli_and_loads_in_saelens(store, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    out = tmp_path / "run"
    res = run_cli(*small_run(store, out, "--arch", "matryoshka", "--widths", "12,24,96"))
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)["experiments"]
    assert row["name"] == "matryoshka-96-k4-lr0.0002" and 0 < row["eval_fvu"] < 1.5
    cfg = json.loads((out / row["name"] / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu" and cfg["actstore"]["settings"]["widths"] == [12, 24, 96]
    theirs = sae_lens.SAE.load_from_disk(str(out / row["name"]))
    from trainers.saelens_format import load_saelens

    mine, _ = load_saelens(out / row["name"])
    x = torch.from_numpy(actstore.open_store(store).read(HOOK, 0, 64).astype("float32"))
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), mine.encode(x), atol=1e-5, rtol=1e-4)


def run_identity_of(tmp_path, store) -> dict:
    from pipelines.train import TrainSAEConfig, experiments, run_identity

    cfg = TrainSAEConfig(store=store, hook=HOOK, out=str(tmp_path / "x"), tokens=2048)
    opened = actstore.open_store(store)
    return run_identity(cfg, opened, [HOOK], experiments(cfg, opened.config.model.d_model), 1)


def test_a_store_made_anew_at_the_same_path_is_another_run(store, tmp_path):
    out = tmp_path / "run"
    assert run_cli(*small_run(store, out)).returncode == 0
    cfg = actstore.open_store(store).config
    with actstore.open_store(store, "w", config=cfg) as w:  # the same settings, harvested again: another store id
        write_shards(w, cfg, make_data(cfg, seed=1), range(cfg.n_shards))
    files = folder_bytes(out)
    res = run_cli(*small_run(store, out))
    assert res.returncode == 2 and "holds another run" in res.stderr and "store.id" in res.stderr
    assert folder_bytes(out) == files
    fresh = run_cli(*small_run(store, out, "--overwrite"))  # --overwrite starts it again
    assert fresh.returncode == 0, fresh.stderr and not json.loads(fresh.stdout)["finished_before"]
    assert folder_bytes(out) != files


def test_a_resumed_run_keeps_its_split_when_the_store_grew(store, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from trainers.trainer import Trainer

    reference = tmp_path / "reference"
    settings = ("--tokens", "4k", "--checkpoint-every", "4", "--min-position", "0")  # scales from the store's statistics
    assert run_cli(*small_run(store, reference, *settings)).returncode == 0
    real = Trainer.fit

    def fit_dying_after_step_6(self):  # step 4 checkpointed, steps 5 and 6 lost
        on_step = self.on_step

        def dying(step, tokens):
            if on_step is not None:
                on_step(step, tokens)
            if step == 6:
                raise KeyboardInterrupt

        self.on_step = dying
        return real(self)

    monkeypatch.setattr(Trainer, "fit", fit_dying_after_step_6)
    out = tmp_path / "run"
    args = small_run(store, out, *settings)
    killed = run_in_process(*args)
    assert killed.exit_code == 130 and "rerun the same command to resume" in killed.stderr
    monkeypatch.setattr(Trainer, "fit", real)
    cfg = actstore.open_store(store).config
    bigger = cfg.with_(n_tokens_target=cfg.n_tokens_target + 2048)  # the harvest went on: two more shards
    with actstore.open_store(store, "a", config=bigger) as w:
        write_shards(w, bigger, make_data(bigger, seed=3), w.pending_shards())
    resumed = run_in_process(*args)
    assert resumed.exit_code == 0, resumed.stderr
    name = json.loads(resumed.stdout)["experiments"][0]["name"]
    a, b = (load_file(str(d / name / "sae_weights.safetensors")) for d in (reference, out))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads(resumed.stdout)["experiments"][0]["eval_fvu"] == pytest.approx(
        json.loads((reference / "summary.json").read_text())["experiments"][0]["eval_fvu"], rel=1e-6)


def test_a_store_too_small_to_hold_out_says_so(tmp_path, caplog):
    from pipelines.train import split_shards

    cfg = make_config(dtype="float32", n_tokens_target=1024, shard_tokens=1024, chunk_tokens=128)
    with actstore.open_store(str(tmp_path / "one"), "w", config=cfg) as w:
        write_shards(w, cfg, make_data(cfg), [0])
    with caplog.at_level("WARNING"):
        assert split_shards(actstore.open_store(str(tmp_path / "one")), 65536) == ([0], [])
    assert "0 tokens held out for evaluation instead of the 65,536 asked" in caplog.text


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--hook", "blocks.9.hook_resid_post"], "not in"),
        (["--k", "500"], "larger than|between 1 and the SAE width"),
        (["--arch", "sparse-magic"], "unknown --arch"),
        (["--sweep", "SWEEP"], "unknown setting"),
        (["--dtype", "float16"], "unknown --dtype 'float16'; choose from float32, bfloat16"),
        (["--arch", "matryoshka", "--widths", "8,4,384"], "Matryoshka widths must be positive and increasing"),
        (["--arch", "matryoshka", "--widths", "8,64"], "the last Matryoshka width must be the SAE width d_sae \\(384\\)"),
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


class FakeWandb(types.ModuleType):
    """Records what the trainer would send to Weights & Biases."""

    def __init__(self):
        super().__init__("wandb")
        self.logged: list[tuple[int, dict]] = []
        self.summary: dict = {}
        self.config: dict = {}
        self.finished = False

    def init(self, project, name, config, dir):
        self.config = {"project": project, **config}
        return self

    def log(self, metrics, step):
        self.logged.append((step, dict(metrics)))

    def finish(self):
        self.finished = True


def test_wandb_gets_every_recorded_metric_and_the_held_out_results(store, tmp_path, monkeypatch):
    from pipelines.train import TrainSAEConfig, train_sae

    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = TrainSAEConfig(store=store, hook=HOOK, out=str(tmp_path / "run"), tokens=4096, archs=("topk",),
                         expansions=(2,), sparsity={"topk": (4,)}, batch_size=256, eval_tokens=1024, log_every=4,
                         progress=False, wandb_project="proj")
    result = train_sae(cfg)
    name = result.rows[0]["name"]
    assert [step for step, _ in fake.logged] == [1, 4, 8, 12, 16]
    assert {f"{name}/{k}" for k in ("fvu", "l0", "dead", "loss", "lr", "tokens")} <= set(fake.logged[-1][1])
    assert fake.summary[f"{name}/eval_fvu"] == result.rows[0]["eval_fvu"] and fake.finished
    assert fake.config["project"] == "proj" and fake.config["experiments"][name]["k"] == 4


def test_wandb_offline_run_is_written_under_the_output_folder(store, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    args = ["train-sae", "--store", store, "--hook", HOOK, "--out", str(out), "--tokens", "2k", "--k", "4",
            "--expansion", "2", "--batch-size", "256", "--eval-tokens", "1k", "--wandb", "proj", "--json"]
    res = subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    (record,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    data = record.read_bytes()
    assert b"topk-96-k4-lr0.0002/fvu" in data and b"topk-96-k4-lr0.0002/eval_fvu" in data


def transcoder_run(store, out, *extra):
    return ["train-sae", "--store", store, "--hook-in", HOOKS[0], "--hook-out", HOOKS[2], "--out", str(out), "--tokens", "3k",
            "--k", "4", "--expansion", "2", "--batch-size", "256", "--eval-tokens", "1k", "--json", *extra]


def test_transcoders_train_from_the_cli_in_saelens_transcoder_format(store, tmp_path):
    from trainers.saelens_format import load_saelens

    out = tmp_path / "tc"
    args = transcoder_run(store, out, "--arch", "topk-transcoder,topk-skip-transcoder,jumprelu-transcoder")
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["experiments"]}
    assert sorted(rows) == ["jumprelu-transcoder-96-l00.001-lr0.0002", "topk-skip-transcoder-96-k4-lr0.0002",
                            "topk-transcoder-96-k4-lr0.0002"]
    for name, row in rows.items():
        # the store's hooks are independent noise: the FVU is only checked to be there (learning: tests/test_transcoders.py)
        assert np.isfinite(row["eval_fvu"]) and row["eval_fvu"] > 0 and row["eval_tokens"] > 0
        cfg = json.loads((out / name / "cfg.json").read_text())
        assert cfg["d_out"] == 48 and cfg["apply_b_dec_to_input"] is False
        assert cfg["metadata"]["hook_name"] == HOOKS[0] and cfg["metadata"]["hook_name_out"] == HOOKS[2]
        assert cfg["architecture"] == {"topk-transcoder": "topk_transcoder", "topk-skip-transcoder": "topk_skip_transcoder",
                                       "jumprelu-transcoder": "jumprelu_transcoder"}[name.split("-96")[0]]
        sae, hook = load_saelens(out / name)
        assert hook.hook_name_out == HOOKS[2] and sae.cfg.d_out == 48
    summary = json.loads((out / "summary.json").read_text())
    assert summary["hook"] == HOOKS[0] and summary["hook_out"] == HOOKS[2]
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(out / "jumprelu-transcoder-96-l00.001-lr0.0002"))
    ours, _ = load_saelens(out / "jumprelu-transcoder-96-l00.001-lr0.0002")
    x = torch.randn(20, 48) * 3
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-4, rtol=1e-4)
    files = folder_bytes(out)
    again = run_cli(*args)
    assert again.returncode == 0 and json.loads(again.stdout)["finished_before"] and folder_bytes(out) == files


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a[:a.index("--hook-out")] + a[a.index("--hook-out") + 2:], "need both --hook-in .* and --hook-out"),
        (lambda a: [*a, "--hook", HOOKS[0]], "for transcoders, or --hook / --groups for SAEs, not both"),
        (lambda a: [HOOKS[0] if x == HOOKS[2] else x for x in a], "both blocks.0.hook_resid_post; a transcoder maps one hook to another"),
        (lambda a: [*a, "--arch", "topk,topk-transcoder"], "topk is an SAE; use topk-transcoder"),
        (lambda a: [*a, "--arch", "topk-transcoder"][:1] + ["--store", a[2], "--hook", HOOKS[0], "--out", a[8], "--arch",
                                                            "topk-transcoder"], "topk-transcoder needs --hook-in and --hook-out"),
        (lambda a: ["blocks.1.hook_mlp_in" if x == HOOKS[2] else x for x in a], "'blocks.1.hook_mlp_in' is not in"),
        (lambda a: [*a, "--arch", "relu-transcoder"], "unknown --arch relu-transcoder"),
    ],
)
def test_transcoder_bad_input_is_one_line_exit_2(store, tmp_path, change, message):
    import re

    res = run_cli(*change(transcoder_run(store, tmp_path / "o", "--arch", "topk-transcoder")))
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert re.search(message, res.stderr), res.stderr


def test_transcoders_and_crosscoders_come_from_a_sweep_file_too(store, tmp_path):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps([{"arch": "topk-transcoder", "k": 4, "expansion": 2},
                                 {"arch": "topk-skip-transcoder", "k": 4, "expansion": 2, "name": "skip"}]))
    res = run_cli(*transcoder_run(store, tmp_path / "tc", "--sweep", str(sweep)))
    assert res.returncode == 0, res.stderr
    rows = {r["name"]: r for r in json.loads(res.stdout)["experiments"]}
    assert set(rows) == {"topk-transcoder-96-k4-lr0.0002", "skip"} and rows["skip"]["skip"] is True
    cfg = json.loads((tmp_path / "tc" / "skip" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk_skip_transcoder" and cfg["d_out"] == 48
    sweep.write_text(json.dumps([{"arch": "crosscoder", "k": 8, "expansion": 2}]))
    res = run_cli("train-sae", "--store", store, "--hook", ",".join(HOOKS[:2]), "--sweep", str(sweep), "--out", str(tmp_path / "cc"),
                  "--tokens", "2k", "--batch-size", "256", "--eval-tokens", "1k", "--json")
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)["experiments"]
    assert row["arch"] == "crosscoder" and row["d_sae"] == 96 and set(row["eval_layers"]) == set(HOOKS[:2])
