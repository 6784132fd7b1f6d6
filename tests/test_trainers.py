"""SAE architectures and the training loop on synthetic data; SAELens' loader on our files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import actstore
from tests.helpers import (
    arch_configs,
    check_topk_sparse_step,
    folder_bytes,
    make_config,
    make_data,
    sparse_data,
    write_shards,
)
from trainers import ARCHITECTURES, make_sae, sae_config, sparse
from trainers.saelens_format import HookInfo, load_saelens, save_saelens
from trainers.sparse import Selected, Selection, select_topk, sparse_decode
from trainers.trainer import Experiment, TrainConfig, Trainer, evaluate
from trainers.transcoder import is_transcoder

D, F = 24, 96


def configs():
    return arch_configs(D, F)


def test_topk_sparse_path_matches_the_dense_reference_values_and_gradients():
    check_topk_sparse_step(D, F)


@pytest.mark.parametrize("arch, settings", [("batchtopk", {}), ("matryoshka", {"widths": (8, 32, F)}),
                                            ("batchtopk-transcoder", {"skip": True}), ("topk-transcoder", {"skip": True})])
def test_batchtopk_family_sparse_path_matches_the_dense_reference(arch, settings):
    check_topk_sparse_step(D, F, arch=arch, **settings)


def test_sparse_kernels_match_dense_values_and_gradients():
    torch.manual_seed(1)
    x = torch.randn(40, D)
    W = torch.randn(D, F, requires_grad=True)
    b = torch.randn(F, requires_grad=True)
    b_dec = torch.randn(D, requires_grad=True)
    k = 5
    sparse.ROW_BLOCK, block = 16, sparse.ROW_BLOCK  # several row blocks, the last one short
    try:
        pre_BK, idx, pre_full = select_topk((x - b_dec).detach(), W, b, k, keep_pre=True)
    finally:
        sparse.ROW_BLOCK = block
    dense = (x - b_dec) @ W + b
    torch.testing.assert_close(pre_full, dense.detach())
    torch.testing.assert_close(pre_BK.sort(-1).values, dense.detach().topk(k, dim=-1).values.sort(-1).values)
    sel = Selection.of(idx, F)
    out = Selected.apply(pre_BK, (x - b_dec).detach(), sel, W, b, b_dec)
    w = torch.randn(40, k)
    g_fast = torch.autograd.grad((out * w).sum(), [W, b, b_dec])
    g_ref = torch.autograd.grad((dense.gather(1, idx) * w).sum(), [W, b, b_dec])
    for g1, g2 in zip(g_fast, g_ref, strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)
    W_dec = torch.randn(F, D, requires_grad=True)
    vals = torch.randn(40, k, requires_grad=True)
    g_out = torch.randn(40, D)
    fast = sparse_decode(vals, sel, W_dec)
    ref = torch.einsum("bk,bkd->bd", vals, W_dec[idx])
    torch.testing.assert_close(fast, ref, atol=1e-5, rtol=1e-4)
    for g1, g2 in zip(torch.autograd.grad(fast, [vals, W_dec], g_out), torch.autograd.grad(ref, [vals, W_dec], g_out), strict=True):
        torch.testing.assert_close(g1, g2, atol=1e-5, rtol=1e-4)


def test_jumprelu_pseudo_derivatives_follow_the_rectangle_kernel():
    """Through the public training step, d loss / d theta is the paper's (§3): the reconstruction
    term's gradient through JumpReLU, ``dL/df * -(theta / eps) K``, plus the L0 term's through the
    step, ``-(1 / eps) K``, with ``K`` the rectangle: non-zero only within eps/2 of theta."""
    eps = 0.5
    x_BD = torch.tensor([[1.1, 0.9, 2.0, 0.3]])
    theta_F = torch.tensor([1.0, 0.8, 1.0, 1.0])  # latents 0 and 1 within eps/2 of theirs, 2 and 3 not
    grads = {}
    for l0_coeff in (0.0, 1.0):
        sae = make_sae(sae_config("jumprelu", d_in=4, d_sae=4, bandwidth=eps, l0_coeff=l0_coeff, init_threshold=1.0))
        with torch.no_grad():  # pre-activations = x, reconstruction = f / 2
            sae.W_enc.copy_(torch.eye(4))
            sae.W_dec.copy_(0.5 * torch.eye(4))
            sae.b_enc.zero_()
            sae.b_dec.zero_()
        sae.set_threshold(theta_F)
        assert torch.equal(sae.threshold, theta_F)
        out = sae.training_step(x_BD)
        (grads[l0_coeff],) = torch.autograd.grad(out.loss, [sae.threshold])
    # f = [1.1, 0.9, 2.0, 0], dL/df = -(x - f / 2) = [-0.55, -0.45, -1.0, -0.3]
    torch.testing.assert_close(grads[0.0], torch.tensor([-0.55 * -(1.0 / eps), -0.45 * -(0.8 / eps), 0.0, 0.0]))
    torch.testing.assert_close(grads[1.0] - grads[0.0], torch.tensor([-1 / eps, -1 / eps, 0.0, 0.0]))


def test_jumprelu_threshold_parametrisations_step_as_adam_moves_them():
    """``direct``: Adam moves theta by about lr per step, clamped at 0; ``log``: by a factor
    of about exp(lr). Both load the other's weights (older checkpoints hold ``log_threshold``)."""
    x = sparse_data(256, seed=4)
    moved = {}
    for param in ("direct", "log"):
        torch.manual_seed(0)
        sae = make_sae(sae_config("jumprelu", d_in=D, d_sae=F, l0_coeff=10.0, bandwidth=2.0, init_threshold=0.01,
                                  threshold_param=param))
        opt = torch.optim.Adam(sae.parameters(), lr=0.05)
        sae.training_step(x).loss.backward()
        opt.step()
        sae.after_step()
        moved[param] = sae.threshold.detach()
        other = make_sae(sae_config("jumprelu", d_in=D, d_sae=F, threshold_param="log" if param == "direct" else "direct"))
        other.load_state_dict(sae.state_dict())
        torch.testing.assert_close(other.threshold.detach(), moved[param].clamp_min(1e-30) if param == "direct" else moved[param])
    pushed = moved["direct"] != 0.01  # latents whose threshold the step moved
    assert pushed.sum() > F // 4
    torch.testing.assert_close(moved["direct"][pushed], torch.full((int(pushed.sum()),), 0.06), atol=1e-4, rtol=0)  # +lr
    torch.testing.assert_close(moved["log"][pushed], torch.full((int(pushed.sum()),), 0.01 * np.exp(0.05)), atol=1e-6, rtol=1e-4)
    # pushed the other way, theta stops at 0
    sae = make_sae(sae_config("jumprelu", d_in=D, d_sae=F, init_threshold=0.01))
    with torch.no_grad():
        sae.theta.sub_(1.0)
    sae.after_step()
    assert torch.equal(sae.threshold, torch.zeros(F))


def test_gated_loss_and_gradients_match_eq9_with_the_decoder_norm_penalty():
    """Reference written out: reconstruction + lambda * ReLU(pi_gate) . ||W_dec rows|| + the
    auxiliary reconstruction from ReLU(pi_gate), the decoder trainable in every term."""
    torch.manual_seed(3)
    sae = make_sae(sae_config("gated", d_in=D, d_sae=F, l1_coeff=0.7))
    with torch.no_grad():
        for p in (sae.b_gate, sae.r_mag, sae.b_mag, sae.b_dec):
            p.normal_(std=0.3)
        sae.W_dec.mul_(torch.rand(F, 1) + 0.5)  # rows of different norms
    x = torch.randn(32, D)
    got = sae.training_step(x, sparsity_scale=0.5)
    params = dict(sae.named_parameters())
    W_enc, W_dec, b_dec = params["W_enc_FD"].T, params["W_dec"], params["b_dec"]
    x_in = x - b_dec
    gate = x_in @ W_enc + params["b_gate"]
    mag = x_in @ (W_enc * params["r_mag"].exp()) + params["b_mag"]
    recon = ((gate > 0) * torch.relu(mag)) @ W_dec + b_dec
    want = (
        (x - recon).pow(2).sum(-1).mean()
        + 0.5 * 0.7 * (torch.relu(gate) * W_dec.norm(dim=1)).sum(-1).mean()
        + (x - (torch.relu(gate) @ W_dec + b_dec)).pow(2).sum(-1).mean()
    )
    torch.testing.assert_close(got.loss, want)
    names = list(params)
    for name, g, h in zip(names, torch.autograd.grad(got.loss, list(params.values()), retain_graph=True),
                          torch.autograd.grad(want, list(params.values())), strict=True):
        torch.testing.assert_close(g, h, msg=name)
    assert not sae.unit_norm_decoder


def test_matryoshka_loss_is_batchtopk_plus_each_nested_prefix_reconstructing_alone():
    torch.manual_seed(2)
    x = torch.randn(48, D)
    sae = make_sae(configs()["matryoshka"])
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
    dead = torch.zeros(F, dtype=torch.bool)
    dead[::5] = True
    got = sae.training_step(x, dead_F=dead)
    # reference: the BatchTopK latents by hand, then one dense decode per prefix of the latents
    acts = torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc)
    top = acts.flatten().topk(4 * len(x))
    f = torch.zeros_like(acts).flatten().scatter(0, top.indices, top.values).view_as(acts)
    levels = [((x - (f[:, :m] @ sae.W_dec[:m] + sae.b_dec)) ** 2).sum(-1).mean() for m in (8, 32, F)]
    aux = got.terms["aux"]
    torch.testing.assert_close(got.loss, sum(levels) + sae.cfg.aux_coeff * aux)
    torch.testing.assert_close(got.terms["mse_8"], levels[0])
    torch.testing.assert_close(got.terms["mse_32"], levels[1])
    torch.testing.assert_close(got.terms["mse"], levels[2])
    assert float(aux) > 0 and "mse_96" not in got.terms


@pytest.mark.parametrize("widths, message", [((8, 4, F), "increasing"), ((8, 32), f"end the list with {F}"), ((0, F), "positive")])
def test_matryoshka_widths_must_nest_up_to_the_sae_width(widths, message):
    with pytest.raises(ValueError, match=message):
        sae_config("matryoshka", d_in=D, d_sae=F, widths=widths)
    assert sae_config("matryoshka", d_in=D, d_sae=F).widths == (F // 8, F // 4, F // 2, F)


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_each_architecture_learns_a_sparse_code(arch):
    cfg = configs()[arch]
    data = sparse_data(256 * 300, seed=1)
    held_out = sparse_data(2048, seed=2)
    trainer = Trainer(TrainConfig(tokens=len(data), lr_warmup_steps=20, log_every=25, dead_tokens=256 * 50),
                      [Experiment(arch, cfg, lr=1e-2)], data.split(256))
    trainer.fit()
    run = trainer.runs[0]
    result = evaluate(run.sae, held_out.split(512))
    assert result["fvu"] < 0.3, result  # a dense code of the 3-of-64 features would need all 96 latents
    assert 0 < result["l0"] < 25, result
    assert run.history[-1]["fvu"] < run.history[0]["fvu"]


@pytest.mark.parametrize("arch", [a for a in ARCHITECTURES if not is_transcoder(a) and a != "crosscoder"])  # their own formats: test_transcoders.py, test_crosscoders.py
def test_saved_sae_loads_in_saelens_with_the_same_outputs(tmp_path, arch):
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(3)
    sae = make_sae(configs()[arch])
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    if arch in ("batchtopk", "matryoshka"):
        sae.threshold.fill_(0.2)
    scale = 0.5  # trained on 0.5 * x: the saved SAE must take raw x
    save_saelens(sae, tmp_path / arch, HookInfo("blocks.3.hook_resid_post", "smollm2-135m", 256), scale=scale)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / arch))
    x = torch.randn(32, D) * 3
    with torch.no_grad():
        f_ours = sae.encode(scale * x)
        torch.testing.assert_close(theirs.encode(x), f_ours, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(theirs.decode(f_ours), sae.decode(f_ours) / scale, atol=1e-5, rtol=1e-4)
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    mine, hook = load_saelens(tmp_path / arch)
    with torch.no_grad():
        torch.testing.assert_close(mine.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-4)
    assert hook.context_size == 256 and json.loads((tmp_path / arch / "cfg.json").read_text())["actstore"]["arch"] == arch


def test_checkpoint_resume_continues_exactly(tmp_path):
    cfg = make_config(dtype="float32", n_tokens_target=4096, shard_tokens=512, chunk_tokens=64)
    data = make_data(cfg)
    url = str(tmp_path / "store")
    with actstore.open_store(url, "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards))
    hook = "blocks.0.hook_resid_post"
    exps = [Experiment("topk", sae_config("topk", d_in=48, d_sae=96, k=4), lr=1e-3),
            Experiment("relu", sae_config("relu", d_in=48, d_sae=96, l1_coeff=0.1), lr=1e-3)]
    train = TrainConfig(tokens=64 * 40, lr_warmup_steps=5, log_every=5, checkpoint_every=15)

    def stream():
        return actstore.stream(url, hook, 64, seed=1, epochs=None)

    class Crash(Exception):
        pass

    def crash_after_15(step, tokens):
        if step == 16:  # the checkpoint of step 15 is on disk, step 16 is lost
            raise Crash

    full = Trainer(train, exps, stream()).fit()
    with pytest.raises(Crash):
        Trainer(train, exps, stream(), out_dir=tmp_path / "run", on_step=crash_after_15).fit()
    resumed = Trainer(train, exps, stream(), out_dir=tmp_path / "run")
    resumed.load_checkpoint()
    assert resumed.step == 15
    resumed.fit()
    assert resumed.step == full.step == 40
    for a, b in zip(full.runs, resumed.runs, strict=True):
        for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values(), strict=True):
            torch.testing.assert_close(p, q, msg=name)
    with pytest.raises(ValueError, match="other experiments"):
        Trainer(train, exps[:1], stream(), out_dir=tmp_path / "run").load_checkpoint()
    saved = folder_bytes(tmp_path / "run")
    again = Trainer(train, exps, stream(), out_dir=tmp_path / "run")
    again.load_checkpoint()
    assert again.finished and again.fit().step == 40  # a finished run takes no further batch
    assert folder_bytes(tmp_path / "run") == saved, "and writes nothing"


def reference_lr_scale(step: int, total: int, warmup: int, decay_start: float) -> float:
    """The schedule as the trainer wrote it by hand before it used ``LambdaLR``."""
    lr = min(1.0, (step + 1) / max(1, warmup))
    decay_from = int(total * decay_start)
    if step >= decay_from and total > decay_from:
        lr *= max(0.0, (total - step) / (total - decay_from))
    return lr


def test_learning_rate_at_every_step_is_the_schedule_also_after_a_resume(tmp_path):
    steps, saved_at = 20, 7
    exps = [Experiment("topk", sae_config("topk", d_in=D, d_sae=F, k=4), lr=3e-3),
            Experiment("relu", sae_config("relu", d_in=D, d_sae=F, l1_coeff=0.1), lr=1e-3)]
    train = TrainConfig(tokens=64 * steps, lr_warmup_steps=4, lr_decay_start=0.6, log_every=1, checkpoint_every=saved_at)
    data = [sparse_data(64, seed=s) for s in range(steps)]
    expected = {e.name: [e.lr * reference_lr_scale(s, steps, 4, 0.6) for s in range(steps)] for e in exps}
    assert expected["topk"][0] < expected["topk"][5] == 3e-3 > expected["topk"][-1] > 0  # warmup, plateau, decay

    def lrs_used(trainer: Trainer) -> dict[str, list[float]]:
        """The learning rate each optimiser step runs with, recorded as it runs."""
        seen: dict[str, list[float]] = {r.exp.name: [] for r in trainer.runs}
        for r in trainer.runs:
            r.opt.register_step_pre_hook(lambda opt, args, kwargs, name=r.exp.name: seen[name].append(opt.param_groups[0]["lr"]))
        return seen

    full = Trainer(train, exps, data)
    used = lrs_used(full)
    full.fit()
    assert used == expected
    assert {r.exp.name: [h["lr"] for h in r.history] for r in full.runs} == expected

    class Crash(Exception):
        pass

    def crash(step, tokens):
        if step == saved_at + 2:
            raise Crash

    with pytest.raises(Crash):
        Trainer(train, exps, data, out_dir=tmp_path / "run", on_step=crash).fit()
    folder = tmp_path / "run" / "checkpoint"
    resumed = Trainer(train, exps, data[saved_at:], out_dir=tmp_path / "run")
    resumed.load_checkpoint()
    used = lrs_used(resumed)
    resumed.fit()
    assert used == {name: lrs[saved_at:] for name, lrs in expected.items()}
    for a, b in zip(full.runs, resumed.runs, strict=True):
        for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values(), strict=True):
            assert torch.equal(p, q), name

    # a checkpoint written before the LambdaLR (same version 3): the optimiser groups hold the
    # last step's learning rate and no initial_lr
    doc = json.loads((folder / "state.json").read_text())
    assert doc["state"]["step"] == steps
    with pytest.raises(Crash):
        Trainer(train, exps, data, out_dir=tmp_path / "old", on_step=crash).fit()
    doc = json.loads((tmp_path / "old" / "checkpoint" / "state.json").read_text())
    for e in exps:
        for group in doc["state"]["runs"][e.name]["opt"]["param_groups"]:
            group.pop("initial_lr")
            group["lr"] = expected[e.name][saved_at - 1]
    (tmp_path / "old" / "checkpoint" / "state.json").write_text(json.dumps(doc))
    old = Trainer(train, exps, data[saved_at:], out_dir=tmp_path / "old")
    old.load_checkpoint()
    used = lrs_used(old)
    old.fit()
    assert used == {name: lrs[saved_at:] for name, lrs in expected.items()}


def test_the_final_step_is_always_recorded():
    exps = [Experiment("topk", sae_config("topk", d_in=48, d_sae=96, k=4), lr=1e-3)]
    x = torch.randn(64, 48)
    for steps in (1, 4):
        trainer = Trainer(TrainConfig(tokens=64 * steps, log_every=50), exps, [x] * 10).fit()
        history = trainer.runs[0].history
        assert trainer.step == steps and [r["step"] for r in history] == sorted({1, steps})


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="k \\(200\\) must be between 1 and the SAE width"):
        sae_config("topk", d_in=8, d_sae=64, k=200)
    with pytest.raises(ValueError, match="unknown setting"):
        sae_config("relu", d_in=8, d_sae=64, k=3)
    with pytest.raises(ValueError, match="unknown SAE architecture"):
        sae_config("transcoder", d_in=8, d_sae=64)
    with pytest.raises(ValueError, match="distinct names"):
        Trainer(TrainConfig(tokens=10), [Experiment("a", configs()["relu"])] * 2, [])
