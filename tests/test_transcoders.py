"""Transcoders and skip-transcoders (trainers.transcoder): the step against a hand-written
reference, the sparse TopK path against the dense one, saving with two scales, SAELens' loader,
the paired stream (aligned, every token once, resumable), and that they learn what they should.
Shape letters: B batch, D input width, O output width, F latents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import actstore
from pipelines.train import Paired
from tests.helpers import HOOKS, make_config, make_data, sparse_data, write_shards
from trainers import make_sae, sae_config
from trainers.saelens_format import HookInfo, load_saelens, save_saelens
from trainers.trainer import Experiment, TrainConfig, Trainer, evaluate

D, D_OUT, F = 16, 24, 64
SPARSITY = {"topk-transcoder": {"k": 4}, "batchtopk-transcoder": {"k": 4}, "jumprelu-transcoder": {"init_threshold": 0.05}}


def transcoder(arch: str, skip: bool, seed: int = 0):
    sae = make_sae(sae_config(arch, d_in=D, d_sae=F, d_out=D_OUT, skip=skip, seed=seed, **SPARSITY[arch]))
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():  # biases and the skip path away from their zero start, so each term is checked
        sae.b_enc.copy_(0.1 * torch.randn(F, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(D_OUT, generator=gen))
        if skip:
            sae.W_skip.copy_(0.1 * torch.randn(D_OUT, D, generator=gen))
    return sae


def reference_prediction(sae, x_BD: torch.Tensor) -> torch.Tensor:
    """``act(x @ W_enc + b_enc) @ W_dec + b_dec (+ x @ W_skip^T)``, written out from the papers."""
    pre_BF = x_BD @ sae.W_enc + sae.b_enc  # no input centring
    if sae.cfg.arch == "topk-transcoder":
        top = pre_BF.topk(sae.cfg.k, dim=-1)
        f_BF = torch.zeros_like(pre_BF).scatter(-1, top.indices, torch.relu(top.values))
    elif sae.cfg.arch == "batchtopk-transcoder":
        acts = torch.relu(pre_BF).flatten()
        top = acts.topk(sae.cfg.k * len(x_BD))
        f_BF = torch.zeros_like(acts).scatter(0, top.indices, top.values).view_as(pre_BF)
    else:
        f_BF = pre_BF * (pre_BF > sae.threshold)
    y_hat_BO = f_BF @ sae.W_dec + sae.b_dec
    return y_hat_BO + x_BD @ sae.W_skip.T if sae.cfg.skip else y_hat_BO


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", list(SPARSITY))
def test_the_step_reproduces_the_target_as_the_papers_write_it(arch, skip):
    sae = transcoder(arch, skip)
    x_BD, y_BO = torch.randn(32, D), torch.randn(32, D_OUT)
    out = sae.training_step(x_BD, 0.0, None, target_BO=y_BO)  # sparsity scale 0: JumpReLU's loss is the error alone
    want_BO = reference_prediction(sae, x_BD)
    torch.testing.assert_close(out.recon_BD, want_BO.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.loss, (y_BO - want_BO).pow(2).sum(-1).mean(), atol=1e-5, rtol=1e-5)
    out.loss.backward()
    assert sae.b_dec.grad.shape == (D_OUT,) and sae.W_dec.grad.shape == (F, D_OUT)
    assert not skip or sae.W_skip.grad.abs().sum() > 0
    if arch != "batchtopk-transcoder":  # its inference is a JumpReLU (checked where it is saved)
        torch.testing.assert_close(sae(x_BD), want_BO.detach())


@pytest.mark.parametrize("skip", [False, True])
def test_topk_transcoder_sparse_step_equals_the_dense_step_with_auxk(skip):
    fast, dense = transcoder("topk-transcoder", skip), transcoder("topk-transcoder", skip)
    x_BD, y_BO = torch.randn(64, D), torch.randn(64, D_OUT)
    dead_F = torch.rand(F, generator=torch.Generator().manual_seed(1)) < 0.5
    a = fast.training_step(x_BD, 1.0, dead_F, target_BO=y_BO)
    b = dense.dense_training_step(x_BD, 1.0, dead_F, target_BO=y_BO)
    assert float(a.terms["aux"]) > 0
    torch.testing.assert_close(a.loss, b.loss, atol=1e-5, rtol=1e-5)
    a.loss.backward()
    b.loss.backward()
    for (name, p), q in zip(fast.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", list(SPARSITY))
def test_saved_transcoders_take_raw_activations_and_load_back(arch, skip, tmp_path):
    sae = transcoder(arch, skip)
    if arch == "batchtopk-transcoder":
        sae.threshold.fill_(0.05)
    s_in, s_out = 2.0, 0.25  # trained on 2 x and 0.25 y
    hook = HookInfo("blocks.1.hook_mlp_in", "tiny", 16, hook_name_out="blocks.1.hook_mlp_out")
    save_saelens(sae, tmp_path / "t", hook, scale=s_in, scale_out=s_out)
    cfg = json.loads((tmp_path / "t" / "cfg.json").read_text())
    assert cfg["d_out"] == D_OUT and cfg["apply_b_dec_to_input"] is False
    assert cfg["metadata"]["hook_name_out"] == "blocks.1.hook_mlp_out"
    loaded, info = load_saelens(tmp_path / "t")
    assert info == hook and loaded.cfg.d_out == D_OUT and loaded.cfg.skip == skip
    x_raw = torch.randn(40, D)
    want = sae.eval()(x_raw * s_in) / s_out if arch != "batchtopk-transcoder" else None
    with torch.no_grad():
        if want is None:  # BatchTopK is used as a JumpReLU with its threshold
            pre = (x_raw * s_in) @ sae.W_enc + sae.b_enc
            want = sae.add_skip(x_raw * s_in, (pre * (pre > 0.05)) @ sae.W_dec + sae.b_dec) / s_out
        torch.testing.assert_close(loaded(x_raw), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("skip", [False, True])
@pytest.mark.parametrize("arch", ["jumprelu-transcoder", "batchtopk-transcoder"])
def test_sae_lens_loads_jumprelu_and_batchtopk_transcoders(arch, skip, tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    sae = transcoder(arch, skip)
    with torch.no_grad():
        if arch == "batchtopk-transcoder":
            sae.threshold.fill_(0.05)
        else:
            sae.set_threshold(torch.rand(F) * 0.1)
    save_saelens(sae, tmp_path / "t", HookInfo("blocks.1.hook_mlp_in", "tiny", 16, hook_name_out="blocks.1.hook_mlp_out"),
                 scale=1.5, scale_out=0.5)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "t"))
    assert type(theirs).__name__ == ("JumpReLUSkipTranscoder" if skip else "JumpReLUTranscoder")
    assert theirs.cfg.d_out == D_OUT
    ours, _ = load_saelens(tmp_path / "t")
    x = torch.randn(50, D)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), atol=1e-5, rtol=1e-5)


def linear_plus_sparse(n: int, seed: int):
    """Pairs ``(x, y)``: ``x`` a sparse code of 64 directions in 24 dimensions, ``y`` a linear map of
    ``x`` plus a sparse non-linear part (what a skip-transcoder is for)."""
    x = sparse_data(n, seed=seed, d=24)
    gen = torch.Generator().manual_seed(99)
    A = torch.randn(24, 24, generator=gen) / 24**0.5
    dirs = torch.nn.functional.normalize(torch.randn(64, 24, generator=gen), dim=1)
    feats = torch.relu(x @ dirs.T - 0.8)  # only strongly present directions fire
    return x, x @ A + feats @ torch.randn(64, 24, generator=gen)


def test_a_skip_transcoder_beats_the_plain_one_at_the_same_l0():
    x, y = linear_plus_sparse(16384, seed=0)
    exps = [Experiment("plain", sae_config("topk-transcoder", d_in=24, d_sae=128, k=4, d_out=24), 3e-3),
            Experiment("skip", sae_config("topk-transcoder", d_in=24, d_sae=128, k=4, d_out=24, skip=True), 3e-3)]
    batches = [(x[i:i + 256], y[i:i + 256]) for i in range(0, len(x), 256)]
    trainer = Trainer(TrainConfig(tokens=len(x) * 3, lr_warmup_steps=10), exps, batches * 3).fit()
    held = linear_plus_sparse(2048, seed=1)
    got = {run.exp.name: evaluate(run.sae, [held]) for run in trainer.runs}
    assert got["plain"]["l0"] == got["skip"]["l0"] == 4
    assert got["skip"]["fvu"] < 0.8 * got["plain"]["fvu"] and got["plain"]["fvu"] < 0.6, got  # measured 0.30 vs 0.44
    assert trainer.runs[0].history[-1]["fvu"] < trainer.runs[0].history[0]["fvu"]


def pair_store(url):
    cfg = make_config(dtype="float32")
    data = make_data(cfg)
    with actstore.open_store(url, "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards))
    return cfg, data


def test_paired_hooks_stream_aligned_every_token_once_and_resume(tmp_path):
    url = str(tmp_path / "s")
    cfg, data = pair_store(url)
    pair = [HOOKS[0], HOOKS[2]]
    args = dict(hooks=pair, batch_size=48, seed=2, epochs=2, stack=False, normalize="none", memory="64KiB")
    seen = []
    for b in actstore.stream(url, **args).indexed():
        idx = b.index_B.numpy()
        for hook in pair:  # both hooks of the same tokens
            np.testing.assert_array_equal(b.acts[hook].numpy(), data[hook][idx])
        seen.append(idx)
    epochs = np.concatenate(seen)
    assert len(epochs) == 2000 and sorted(epochs[:1000].tolist()) == sorted(epochs[1000:].tolist()) == list(range(1000))
    full = list(Paired(actstore.stream(url, **args), *pair))
    for cut in (3, 22):  # inside the first epoch and the second
        part = Paired(actstore.stream(url, **args), *pair)
        it = iter(part)
        for _ in range(cut):
            next(it)
        state = json.loads(json.dumps(part.state_dict()))
        it.close()
        resumed = Paired(actstore.stream(url, **args), *pair)
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == len(full) - cut
        for (x, y), (x2, y2) in zip(full[cut:], rest, strict=True):
            assert torch.equal(x, x2) and torch.equal(y, y2)
