"""Data-parallel training on CPU with gloo: two ranks equal one process on both ranks' batches."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import HOOKS, dense_store, sparse_data
from tests.helpers import run_cli_process as run_cli
from trainers import sae_config
from trainers.trainer import Experiment, TrainConfig, Trainer

D, F, B, STEPS = 24, 96, 64, 12
ROOT = Path(__file__).resolve().parent.parent
HOOK = HOOKS[0]


@pytest.fixture
def store(tmp_path):
    return dense_store(tmp_path / "s")


def experiments() -> list[Experiment]:
    return [
        Experiment("relu", sae_config("relu", d_in=D, d_sae=F, l1_coeff=1.0), lr=3e-3),
        Experiment("topk", sae_config("topk", d_in=D, d_sae=F, k=4), lr=3e-3),
        Experiment("batchtopk", sae_config("batchtopk", d_in=D, d_sae=F, k=4), lr=3e-3),
    ]


def batches(rank: int) -> list[torch.Tensor]:
    return [sparse_data(B, seed=100 * step + rank) for step in range(STEPS)]


def train_config() -> TrainConfig:
    # no latent goes dead in this short run, so AuxK (normalised per batch) stays off
    return TrainConfig(tokens=2 * B * STEPS, lr_warmup_steps=3, sparsity_warmup=0.25, log_every=1, dead_tokens=10**9)


def _rank_main(rank: int, world: int, rendezvous: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world)
    try:
        trainer = Trainer(train_config(), experiments(), batches(rank))
        trainer.fit()
        torch.save({"tokens": trainer.tokens, "step": trainer.step,
                    "sae": {r.exp.name: r.sae.state_dict() for r in trainer.runs}}, f"{out}/rank{rank}.pt")
        dist.barrier()  # both done before either tears the group down
    finally:
        dist.destroy_process_group()


def test_two_gloo_ranks_match_one_process_on_both_batches(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["tokens"] == r1["tokens"] == 2 * B * STEPS and r0["step"] == STEPS
    for name in ("relu", "topk", "batchtopk"):  # every rank holds the same SAE after every step
        for key, value in r0["sae"][name].items():
            torch.testing.assert_close(value, r1["sae"][name][key], atol=1e-6, rtol=1e-6, msg=f"{name}.{key}")
    together = [torch.cat([a, b]) for a, b in zip(batches(0), batches(1), strict=True)]
    single = Trainer(train_config(), experiments(), together).fit()
    assert single.tokens == r0["tokens"]
    for run in single.runs:
        if run.exp.name == "batchtopk":  # its threshold is a per-batch statistic, averaged over ranks
            continue
        for key, value in run.sae.state_dict().items():
            torch.testing.assert_close(r0["sae"][run.exp.name][key], value, atol=2e-4, rtol=2e-4, msg=f"{run.exp.name}.{key}")


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(ROOT / "cli.py"), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.slow
def test_train_sae_under_torchrun_two_ranks(store, tmp_path):
    out = tmp_path / "ddp"
    args = ["train-sae", "--store", store, "--hook", HOOK, "--out", str(out), "--tokens", "4k", "--arch", "topk",
            "--k", "4", "--expansion", "2", "--lr", "1e-3", "--batch-size", "256", "--eval-tokens", "1k", "--json"]
    res = torchrun(*args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = json.loads(res.stdout)["experiments"]  # one report, from rank 0
    assert len(rows) == 1 and 0 < rows[0]["eval_fvu"] < 1.5
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and 4000 <= summary["tokens"] < 4000 + 2 * 256
    assert (out / rows[0]["name"] / "sae_weights.safetensors").exists()
    single = run_cli(*args)  # resuming a 2-rank run on one process is refused: the data positions differ
    assert single.returncode == 2 and "world_size: 1 != 2" in single.stderr


@pytest.mark.parametrize(("affinity", "cpu_count", "local_ranks", "expected"), [
    (range(16), 16, None, 16),  # one process: every core
    (range(16), 16, "8", 2),  # 8 ranks given all 16 cores: a share each
    (range(4), 16, "8", 4),  # the launcher pinned this rank to 4 cores: all of them
    (range(2), 2, "8", 1),  # more ranks than cores: still one thread
])
def test_rank_cpus_shares_the_cores_among_the_node_s_ranks(monkeypatch, affinity, cpu_count, local_ranks, expected):
    from actstore import devices

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(affinity))
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    if local_ranks is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_ranks)
    assert devices.rank_cpus() == expected


def test_rank_timeout_comes_from_the_environment(monkeypatch):
    from datetime import timedelta

    from pipelines.runtime import rank_timeout

    monkeypatch.delenv("ACTSTORE_RANK_TIMEOUT", raising=False)
    assert rank_timeout() == timedelta(hours=2)
    monkeypatch.setenv("ACTSTORE_RANK_TIMEOUT", "90")
    assert rank_timeout() == timedelta(seconds=90)
    monkeypatch.setenv("ACTSTORE_RANK_TIMEOUT", "2h")
    with pytest.raises(ValueError, match="ACTSTORE_RANK_TIMEOUT must be a number of seconds, got '2h'"):
        rank_timeout()


class Replay:
    """A rank's batches with a resumable position, like a stream's state."""

    def __init__(self, rank: int):
        self.items, self.pos = batches(rank), 0

    def __iter__(self):
        while self.pos < len(self.items):
            self.pos += 1
            yield self.items[self.pos - 1]

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.pos = state["pos"]


class Crash(Exception):
    pass


def _resume_main(rank: int, world: int, rendezvous: str, out: str, mode: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}-{mode}", rank=rank, world_size=world)
    try:
        # two machines: each rank has its own --out folder; only rank 0's ever holds the checkpoint
        folder = Path(out) / f"{mode}-rank{rank}"
        cfg = TrainConfig(tokens=2 * B * STEPS, lr_warmup_steps=3, sparsity_warmup=0.25, log_every=1, dead_tokens=10**9,
                          checkpoint_every=STEPS // 2)
        trainer = Trainer(cfg, experiments(), Replay(rank), out_dir=folder)
        if mode == "crash":
            def crash(step: int, tokens: int) -> None:
                if step == STEPS // 2 + 1:
                    raise Crash
            trainer.on_step = crash
            try:
                trainer.fit()
            except Crash:
                pass
            dist.barrier()
            trainer = Trainer(cfg, experiments(), Replay(rank), out_dir=folder)
            assert (rank == 0) == (folder / "checkpoint").exists()
            trainer.load_checkpoint()
        trainer.fit()
        torch.save({"step": trainer.step, "sae": {r.exp.name: r.sae.state_dict() for r in trainer.runs}},
                   f"{out}/{mode}-{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_resume_from_a_checkpoint_only_rank_0_holds_as_an_uninterrupted_run(tmp_path):
    for mode in ("straight", "crash"):
        mp.spawn(_resume_main, args=(2, str(tmp_path / "rendezvous"), str(tmp_path), mode), nprocs=2, join=True)
    for rank in (0, 1):
        straight, resumed = (torch.load(tmp_path / f"{m}-{rank}.pt", weights_only=True) for m in ("straight", "crash"))
        assert straight["step"] == resumed["step"] == STEPS
        for name, state in straight["sae"].items():
            for key, value in state.items():
                torch.testing.assert_close(resumed["sae"][name][key], value, atol=0, rtol=0, msg=f"rank {rank} {name}.{key}")
