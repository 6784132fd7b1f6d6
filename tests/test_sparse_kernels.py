"""The TopK SAE's sparse products (trainers.sparse, trainers.triton_kernels) against dense references.

The Triton kernels run on the CPU under Triton's interpreter, which Triton picks when a kernel is
decorated, that is when ``trainers.triton_kernels`` is imported, if ``TRITON_INTERPRET=1`` is set.
In this process that may be too late (other test modules import ``trainers`` first) and setting
it in ``conftest.py`` would reach every other test and the processes they start (on a GPU machine
it would interpret kernels meant for CUDA). So one child process, started with
``TRITON_INTERPRET=1 ACTSTORE_SPARSE_KERNEL=triton``, runs every check in :data:`CHECKS` (this file
run as a module) and each ``test_triton_*`` reports one check's outcome. Backend choice, the
sync-free counts and the torch path's :func:`check_against_dense` need no interpreter and run here.
Shape letters: B batch, D d_in, F d_sae, K latents per token.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from tests.helpers import check_topk_sparse_step
from trainers import sparse, triton_kernels
from trainers.kernel_check import check_against_dense
from trainers.sparse import KERNEL_ENV, Selected, Selection, kernel_backend

ROOT = Path(__file__).resolve().parent.parent
TOL = dict(atol=1e-5, rtol=1e-4)
BF16_TOL = dict(atol=2e-2, rtol=2e-2)


@contextlib.contextmanager
def small_blocks():
    """Blocks smaller than the sizes below, so every loop and mask of the kernels runs
    (``BLOCK_S`` = 16 is already below the 29 to 37 tokens that all select latent 3)."""
    saved = triton_kernels.MAX_BLOCK_D, triton_kernels.MAX_BLOCK_K
    triton_kernels.MAX_BLOCK_D, triton_kernels.MAX_BLOCK_K = 32, 16
    try:
        yield
    finally:
        triton_kernels.MAX_BLOCK_D, triton_kernels.MAX_BLOCK_K = saved


def selections(B: int, K: int, F: int, seed: int) -> torch.Tensor:
    """``idx_BK``: distinct latents per token; latent 3 chosen by every token (a segment longer
    than ``BLOCK_S``), latents 0-2 and the last 7 by none."""
    gen = torch.Generator().manual_seed(seed)
    idx_BK = torch.stack([torch.randperm(F - 11, generator=gen)[:K] + 4 for _ in range(B)])
    idx_BK[:, 0] = 3
    return idx_BK


# ---- checks run in the child process (TRITON_INTERPRET=1, ACTSTORE_SPARSE_KERNEL=triton) ------
def check_backend_is_triton_under_the_interpreter():
    assert triton_kernels.INTERPRETED and kernel_backend(torch.zeros(1)) == "triton"


def check_decode_values_and_gradients():
    """x_hat, d vals, d W_dec; D = 75 (not a multiple of the 32-wide blocks), K = 5 and 20
    (one and two steps of 16 rows), fp32 and bf16 inputs against fp32 from the same values."""
    B, F, D = 37, 50, 75
    with small_blocks():
        for K, dtype in [(5, torch.float32), (20, torch.float32), (5, torch.bfloat16)]:
            gen = torch.Generator().manual_seed(K)
            idx_BK = selections(B, K, F, seed=K)
            vals_BK = torch.randn(B, K, generator=gen).to(dtype).requires_grad_()
            W_FD = torch.randn(F, D, generator=gen).to(dtype).requires_grad_()
            g_BD = torch.randn(B, D, generator=gen).to(dtype)
            out_BD = sparse.sparse_decode(vals_BK, Selection.of(idx_BK, F), W_FD)
            got = torch.autograd.grad(out_BD, [vals_BK, W_FD], g_BD)
            vals32, W32 = vals_BK.detach().float().requires_grad_(), W_FD.detach().float().requires_grad_()
            ref_BD = torch.einsum("bk,bkd->bd", vals32, W32[idx_BK])
            want = torch.autograd.grad(ref_BD, [vals32, W32], g_BD.float())
            tol = TOL if dtype == torch.float32 else BF16_TOL
            assert out_BD.dtype == dtype and got[0].dtype == dtype and got[1].dtype == dtype
            torch.testing.assert_close(out_BD.float(), ref_BD, **tol)
            for g, w, name in zip(got, want, ["vals", "W_dec"], strict=True):
                torch.testing.assert_close(g.float(), w, **tol, msg=f"d {name}, K={K}, {dtype}")
            assert not got[1][:3].any() and not got[1][F - 7:].any(), "latents never selected: zero gradient rows"


def check_selected_gradients():
    """d W_enc, d b_enc, d b_dec of the selected pre-activations, W_enc a transposed view of
    W_enc_FD as in the SAE; fp32 and bf16 weights."""
    B, F, D, K = 29, 40, 45, 6
    with small_blocks():
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(1)
            x_BD = torch.randn(B, D, generator=gen)
            W_enc_FD = torch.randn(F, D, generator=gen).to(dtype).requires_grad_()
            b_enc_F = torch.randn(F, generator=gen).to(dtype).requires_grad_()
            b_dec_D = torch.randn(D, generator=gen).to(dtype).requires_grad_()
            idx_BK = selections(B, K, F, seed=2)
            w_BK = torch.randn(B, K, generator=gen)
            params = [W_enc_FD, b_enc_F, b_dec_D]
            x_in_BD = (x_BD - b_dec_D.float()).detach()
            pre_BK = (x_in_BD @ W_enc_FD.float().T + b_enc_F.float()).gather(1, idx_BK).to(dtype)
            out_BK = Selected.apply(pre_BK, x_in_BD, Selection.of(idx_BK, F), W_enc_FD.T, b_enc_F, b_dec_D)
            got = torch.autograd.grad((out_BK.float() * w_BK).sum(), params)
            ref = [p.detach().float().requires_grad_() for p in params]
            dense_BF = (x_BD - ref[2]) @ ref[0].T + ref[1]
            want = torch.autograd.grad((dense_BF.gather(1, idx_BK) * w_BK).sum(), ref)
            tol = TOL if dtype == torch.float32 else BF16_TOL
            for g, w, name in zip(got, want, ["W_enc_FD", "b_enc", "b_dec"], strict=True):
                assert g.dtype == dtype
                torch.testing.assert_close(g.float(), w, **tol, msg=f"d {name}, {dtype}")


def check_topk_training_step_with_auxk():
    """TopKSAE.training_step on the Triton kernels against dense_training_step: loss,
    reconstruction and every parameter's gradient, AuxK on with a third of the latents dead."""
    D, F = 24, 96
    calls = set()
    with contextlib.ExitStack() as undo:
        for name in ("gather_decode", "sampled_dot", "latent_sum"):
            fn = getattr(triton_kernels, name)
            setattr(triton_kernels, name, lambda *a, _fn=fn, _name=name, **kw: calls.add(_name) or _fn(*a, **kw))
            undo.callback(setattr, triton_kernels, name, fn)
        check_topk_sparse_step(D, F, TOL)
    assert calls == {"gather_decode", "sampled_dot", "latent_sum"}, calls



def check_against_dense_reports_triton():
    errs = check_against_dense("cpu", d_in=40, d_sae=64, k=4, batch=48, aux_k=8)
    assert errs["backend"] == "triton" and errs["tokens"] > 40, errs
    assert max(v for n, v in errs.items() if n.startswith("rel_err")) < 1e-5, errs


CHECKS = {f.__name__: f for f in [
    check_backend_is_triton_under_the_interpreter, check_decode_values_and_gradients,
    check_selected_gradients, check_topk_training_step_with_auxk, check_against_dense_reports_triton,
]}


@pytest.fixture(scope="module")
def interpreted() -> dict[str, str]:
    """``{check: "ok" or its traceback}`` from one child process under the interpreter."""
    pytest.importorskip("triton", reason="triton is not installed (pip install -e '.[dev]' on Linux x86_64): the Triton kernels are not checked")
    env = {**os.environ, "TRITON_INTERPRET": "1", KERNEL_ENV: "triton"}
    run = subprocess.run([sys.executable, "-m", "tests.test_sparse_kernels"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", CHECKS)
def test_triton_under_interpreter(interpreted, check):
    if interpreted[check] != "ok":
        pytest.fail(f"{check} (in a TRITON_INTERPRET=1 child process):\n{interpreted[check]}")


# ---- checks in this process ---------------------------------------------------------------
def test_selection_counts_match_bincount():
    idx_BK = selections(33, 5, 40, seed=0)
    sel = Selection.of(idx_BK, 40)
    want_F1 = torch.cat([torch.zeros(1, dtype=torch.int64), torch.bincount(idx_BK.flatten(), minlength=40).cumsum(0)])
    assert torch.equal(sel.crow_F1, want_F1)
    assert torch.equal(idx_BK.flatten()[sel.order_S], torch.repeat_interleave(torch.arange(40), want_F1.diff()))


def test_backend_choice(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    assert kernel_backend(cpu) == "torch"
    for value, backend in [("auto", "torch"), ("torch", "torch"), ("TORCH", "torch")]:
        monkeypatch.setenv(KERNEL_ENV, value)
        assert kernel_backend(cpu) == backend
    monkeypatch.setenv(KERNEL_ENV, "cuda")
    with pytest.raises(ValueError, match="auto, torch or triton"):
        kernel_backend(cpu)
    monkeypatch.setenv(KERNEL_ENV, "triton")
    if triton_kernels.UNAVAILABLE is None and not triton_kernels.INTERPRETED:
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            kernel_backend(cpu)
    monkeypatch.setattr(triton_kernels, "UNAVAILABLE", "triton cannot be imported (No module named 'triton'); install it")
    with pytest.raises(ValueError, match="install it"):
        kernel_backend(cpu)
    monkeypatch.setenv(KERNEL_ENV, "auto")
    assert kernel_backend(cpu) == "torch"


def test_without_triton_the_modules_import_and_train_on_torch():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch\nfrom trainers import make_sae, sae_config, sparse, triton_kernels\n"
            "assert triton_kernels.UNAVAILABLE and 'pip install' in triton_kernels.UNAVAILABLE\n"
            "sae = make_sae(sae_config('topk', d_in=8, d_sae=16, k=2))\n"
            "sae.training_step(torch.randn(4, 8)).loss.backward()\n"
            "assert sparse.kernel_backend(torch.zeros(1)) == 'torch'\n")
    env = {k: v for k, v in os.environ.items() if k not in (KERNEL_ENV, "TRITON_INTERPRET")}
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr


def test_check_against_dense_on_the_torch_path(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "torch")
    errs = check_against_dense("cpu", d_in=24, d_sae=96, k=4, batch=64, aux_k=16)
    assert errs["backend"] == "torch" and errs["tokens"] + errs["dropped_tokens"] == 64 and errs["tokens"] > 50
    assert {n for n in errs if n.startswith("rel_err")} == {f"rel_err_{n}" for n in (
        "loss", "recon", "grad_W_dec", "grad_W_enc_FD", "grad_b_enc", "grad_b_dec")}
    assert max(v for n, v in errs.items() if n.startswith("rel_err")) < 1e-5, errs


def _run_checks() -> dict[str, str]:
    assert kernel_backend(torch.zeros(1)) == "triton", "run with TRITON_INTERPRET=1 ACTSTORE_SPARSE_KERNEL=triton"
    results = {}
    for name, check in CHECKS.items():
        try:
            check()
            results[name] = "ok"
        except Exception:  # reported by the parent test named after the check
            results[name] = traceback.format_exc()
    return results


if __name__ == "__main__":
    print(json.dumps(_run_checks()))
