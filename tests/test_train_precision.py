"""The trainer's GPU-facing behaviour, checked on the CPU through the same functions: no host
synchronisation inside a step, bf16 autocast with fp32 master weights, TF32 flags scoped to fit."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.helpers import arch_configs, sparse_data, twin_saes
from trainers import ARCHITECTURES, make_sae, sae_config, topk
from trainers.trainer import Experiment, TrainConfig, Trainer, evaluate
from trainers.transcoder import is_transcoder

D, F = 24, 96

# ops that make the host wait for a CUDA device (they read a value back, or size an output by one)
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "bincount", "repeat_interleave", "unique",
               "_unique", "_unique2", "unique_consecutive", "is_nonzero", "equal", "item"}


class SyncWatch(TorchDispatchMode):
    """Record every aten op that would synchronise the host with a CUDA device, including
    boolean-mask indexing (``x[mask]``, ``x[mask] = v``: a ``nonzero`` inside the kernel)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        name = func._schema.name.split("::")[-1]
        if name in SYNCING_OPS:
            self.seen.append(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices or ()):
                self.seen.append(f"{name}[bool mask]")
        return func(*args, **(kwargs or {}))


def configs() -> dict:
    return arch_configs(D, F)


class WatchedTrainer(Trainer):
    """Watches every step that records no metrics (the ones meant to run without a host read)."""

    watch: SyncWatch

    def _step(self, x_BD: torch.Tensor, y_BO: torch.Tensor | None = None) -> None:
        n = self.step + 1
        if n % self.cfg.log_every and self.step and self.tokens + len(x_BD) < self.cfg.tokens:
            with self.watch:
                super()._step(x_BD, y_BO)
        else:
            super()._step(x_BD, y_BO)


@pytest.fixture
def cuda_policy(monkeypatch):
    """AuxK sized as on CUDA (the dead count never read on the host), here on the CPU."""
    monkeypatch.setattr(topk, "HOST_COUNT_DEVICES", frozenset())


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_a_step_that_records_nothing_never_waits_for_the_device(arch, cuda_policy):
    data = sparse_data(64 * 40, seed=1)
    batches = data.split(64)
    if is_transcoder(arch):  # (input, target) pairs, the transcoders' path through the trainer
        batches = [(x, 0.5 * x.roll(1, dims=1)) for x in batches]
    # dead_tokens 64 * 3: latents die within a few steps, so the AuxK path (TopK, BatchTopK) runs watched too
    trainer = WatchedTrainer(TrainConfig(tokens=len(data), lr_warmup_steps=5, log_every=4, dead_tokens=64 * 3),
                             [Experiment(arch, configs()[arch], lr=1e-2)], batches)
    trainer.watch = SyncWatch()
    trainer.fit()
    assert trainer.step == 40 and trainer.watch.seen == [], sorted(set(trainer.watch.seen))
    if arch in ("topk", "batchtopk", "matryoshka", "topk-transcoder", "batchtopk-transcoder"):
        assert any(h["dead"] > 0 and h["aux"] > 0 for h in trainer.runs[0].history), "the AuxK path never ran"


def test_the_watch_sees_the_syncs_it_is_meant_to_catch():
    x, mask = torch.randn(8), torch.rand(8) > 0.5
    with SyncWatch() as watch:
        float(x.sum())
        _ = x[mask]
        x[mask] = 0.0
        torch.bincount(torch.tensor([1, 2]))
    assert watch.seen == ["_local_scalar_dense", "index[bool mask]", "index_put_[bool mask]", "bincount"]


def train(arch: str, dtype: str, data: torch.Tensor) -> Trainer:
    return Trainer(TrainConfig(tokens=len(data), lr_warmup_steps=20, log_every=25, dead_tokens=256 * 50, dtype=dtype),
                   [Experiment(arch, configs()[arch], lr=1e-2)], data.split(256)).fit()


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_bfloat16_trains_as_well_as_float32_with_fp32_master_weights(arch):
    data, held_out = sparse_data(256 * 150, seed=1), sparse_data(2048, seed=2)
    full, half = train(arch, "float32", data), train(arch, "bfloat16", data)
    sae = half.runs[0].sae
    assert all(p.dtype == torch.float32 for p in sae.parameters())
    assert all(v.dtype == torch.float32 for s in half.runs[0].opt.state.values() for k, v in s.items() if k != "step")
    a, b = evaluate(full.runs[0].sae, held_out.split(512)), evaluate(sae, held_out.split(512))
    assert b["fvu"] < 0.3 and abs(b["fvu"] - a["fvu"]) < 0.05 + 0.2 * a["fvu"], (a, b)
    assert half.runs[0].history[-1]["fvu"] < half.runs[0].history[0]["fvu"]


def test_topk_under_autocast_runs_its_encoder_matmul_in_bfloat16_and_matches_the_dense_reference():
    torch.manual_seed(0)
    x = torch.randn(64, D)
    fast, ref = twin_saes(sae_config("topk", d_in=D, d_sae=F, k=5, aux_k=7))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::3] = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a, b = fast.training_step(x, dead_F=dead), ref.dense_training_step(x, dead_F=dead)
    a.loss.backward()
    b.loss.backward()
    assert a.loss.dtype == torch.float32 and fast.W_enc_FD.grad.dtype == torch.float32
    torch.testing.assert_close(a.loss, b.loss, rtol=2e-2, atol=1e-3)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name, rtol=5e-2, atol=2e-3)
    exact = make_sae(fast.cfg)  # and bf16 really ran: the same step in fp32 differs in the low bits
    exact.load_state_dict(ref.state_dict())
    full = exact.training_step(x, dead_F=dead)
    assert full.loss != a.loss and torch.isclose(full.loss, a.loss, rtol=2e-2)


@pytest.mark.parametrize("policy", ["cpu", "cuda"])
@pytest.mark.parametrize("n_dead", [0, 3, F // 2])
def test_topk_auxk_with_fewer_dead_latents_than_aux_k_matches_the_dense_reference(n_dead, policy, monkeypatch):
    if policy == "cuda":
        monkeypatch.setattr(topk, "HOST_COUNT_DEVICES", frozenset())
    torch.manual_seed(1)
    x = torch.randn(32, D)
    fast, ref = twin_saes(sae_config("topk", d_in=D, d_sae=F, k=4, aux_k=16))
    dead = torch.zeros(F, dtype=torch.bool)
    dead[torch.randperm(F)[:n_dead]] = True
    a, b = fast.training_step(x, dead_F=dead), ref.dense_training_step(x, dead_F=dead)
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss)
    assert (float(a.terms["aux"]) > 0) == (n_dead > 0) and float(b.terms["aux"]) == pytest.approx(float(a.terms["aux"]), rel=1e-4)
    reference = make_sae(fast.cfg)  # the same step where the count is read (the CPU's way): the same loss
    reference.load_state_dict(ref.state_dict())
    monkeypatch.setattr(topk, "HOST_COUNT_DEVICES", frozenset({"cpu"}))
    torch.testing.assert_close(reference.training_step(x, dead_F=dead).loss, a.loss)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name, atol=1e-5, rtol=1e-4)


def test_tf32_is_set_for_the_fit_and_put_back_after():
    seen: list[bool] = []

    def batches() -> Iterator[torch.Tensor]:
        for x in sparse_data(64 * 3).split(64):
            seen.append(torch.backends.cuda.matmul.allow_tf32)
            yield x

    before = torch.backends.cuda.matmul.allow_tf32
    for tf32 in (True, False):
        Trainer(TrainConfig(tokens=64 * 3, tf32=tf32), [Experiment("t", configs()["topk"])], batches()).fit()
        assert seen[-1] is tf32 and torch.backends.cuda.matmul.allow_tf32 is before


def test_an_unknown_dtype_is_a_clear_error():
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16"):
        TrainConfig(tokens=10, dtype="float16")
