"""Sparse kernels for TopK SAEs: gradients at the selected latents only, decoding by gathering.

A TopK SAE (Gao et al. 2024, arXiv 2406.04093, §2.3) keeps ``K`` of ``F`` latents per token. The
dense reference computes ``pre_BF = x_in_BD @ W_enc_DF + b_enc_F``, takes the top ``K`` and
decodes with ``f_BF @ W_dec_FD``; its backward costs two more ``B x D x F`` matmuls although only
the ``S = B K`` selected entries of ``pre_BF`` matter. Here the selections form a sparse
``G_BF`` (``K`` entries per row) and every product touches only them (``S D`` work each):

- :func:`select_topk`: the encoder matmul and the top-``K`` in row blocks, while each block of
  ``pre_BF`` is still in cache; the full ``pre_BF`` is kept only when asked (AuxK needs it);
- :class:`Selected`: the selected pre-activations as a function of ``(W_enc, b_enc, b_dec)``:
  ``dW_enc = x_in^T G`` (latent-major: row ``f`` of ``dW_enc_FD`` sums ``g[b, k] x_in[b]``
  over ``idx[b, k] = f``), ``db_enc_F`` (the same sums of ``g``), ``db_dec = -W_enc db_enc``
  (``x_in = x - b_dec``, the input ``x`` needs no gradient);
- :class:`SparseDecode`: ``x_hat_BD = G W_dec`` (``x_hat[b] = sum_k vals[b, k] W_dec[idx[b, k]]``,
  a gather); ``dW_dec_FD = G^T dx_hat`` (latent-major, as above) and
  ``dvals[b, k] = <dx_hat[b], W_dec[idx[b, k]]>`` (a sampled dense-dense product).

:class:`Selection` holds the index structures both need, built once per step without a host
sync: ``K`` per token for TopK (:meth:`Selection.of`), or the ``B K`` pairs of a whole batch,
any number per token, for BatchTopK and Matryoshka (:meth:`Selection.of_pairs`; torch's kernels,
the Triton ones take ``K`` per token). Two backends compute the products (:func:`kernel_backend`, environment variable
``ACTSTORE_SPARSE_KERNEL`` = ``auto`` | ``torch`` | ``triton``):

- ``torch``: torch's sparse CSR ops (``torch.sparse.mm``, ``sampled_addmm``), ``index_add_``
  for ``db_enc``; ``auto`` picks it on every device. On an H200 (d_in 2304, k 64, batch 4096,
  bf16) it trains at 896k tokens/s with 16k latents and 320k with 64k, against 623k and 221k
  through the Triton kernels, and 300k against 141k with AuxK every step;
- ``triton``: :mod:`trainers.triton_kernels` (gather-decode, sampled dot, latent-major
  segmented sum over :class:`Selection`'s latent-sorted order: deterministic, no atomics),
  fp32 accumulation; only when asked for (slower on that GPU: the segmented sum, one program
  per latent reading every selected row, took 2.6 ms of a 7 ms step).

Both are tested against the dense reference (values and gradients); :func:`trainers.kernel_check.check_against_dense`
does it for one training step on any device (the GPU smoke script).
Shape letters: B batch, D d_in, F d_sae, K active latents per token, S = B K selections.
"""

from __future__ import annotations

import os
import warnings
from typing import Literal, NamedTuple

import torch

from . import triton_kernels

ROW_BLOCK = 512
"""Rows of ``pre`` computed and searched at a time by :func:`select_topk` on the CPU (cache-sized)."""
GPU_ROW_BLOCK = 8192
"""The same on a GPU, where one launch over the batch beats eight small ones: measured on an H200
(d_in 2304, 16k latents, batch 4096), blocks of 512 rows spent 0.9 ms a step in ``topk``."""
KERNEL_ENV = "ACTSTORE_SPARSE_KERNEL"
"""Environment variable choosing the backend: ``auto`` (default: torch), ``torch`` or ``triton``."""


def kernel_backend(*tensors: torch.Tensor) -> Literal["torch", "triton"]:
    """The backend for products on ``tensors``, as :data:`KERNEL_ENV` asks: ``auto`` and
    ``torch`` take torch's kernels (the faster on the GPU measured, see the module docstring);
    ``triton`` needs CUDA tensors, or CPU tensors under Triton's interpreter
    (``TRITON_INTERPRET=1``, how the tests run the kernels)."""
    choice = os.environ.get(KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "torch", "triton"):
        raise ValueError(f"{KERNEL_ENV}={choice!r} is not a backend; set it to auto, torch or triton")
    if choice in ("auto", "torch"):
        return "torch"
    if triton_kernels.UNAVAILABLE is not None:
        raise ValueError(f"{KERNEL_ENV}=triton but {triton_kernels.UNAVAILABLE}")
    if not all(t.is_cuda for t in tensors) and not triton_kernels.INTERPRETED:
        devices = sorted({str(t.device) for t in tensors})
        raise ValueError(
            f"{KERNEL_ENV}=triton with tensors on {', '.join(devices)}: Triton kernels need CUDA tensors, or "
            f"TRITON_INTERPRET=1 set before trainers.sparse is imported to interpret them on the CPU; "
            f"set {KERNEL_ENV}=auto to use the torch path there")
    return "triton"


class Selection(NamedTuple):
    """Selected (token, latent) pairs as sparse-matrix index structures: ``K`` latents per token
    (:meth:`of`, TopK), or any number per token (:meth:`of_pairs`, BatchTopK)."""

    idx_BK: torch.Tensor
    """Latent of each selection (row-major: token by token); ``[1, S]`` for :meth:`of_pairs`."""
    crow_B1: torch.Tensor
    """Token-major CSR row pointers."""
    order_S: torch.Tensor
    """Selections (flat positions in ``idx_BK``) sorted by latent."""
    crow_F1: torch.Tensor
    """Latent-major CSR row pointers."""
    token_S: torch.Tensor
    """Token of each latent-sorted selection."""
    n_latents: int
    n_tokens: int
    fixed_k: bool
    """``K`` selections per token (the Triton kernels' layout)."""

    @classmethod
    def of(cls, idx_BK: torch.Tensor, n_latents: int) -> Selection:
        B, K = idx_BK.shape
        flat_S = idx_BK.reshape(-1)
        order_S = torch.argsort(flat_S)
        crow_B1 = torch.arange(0, B * K + 1, K, device=idx_BK.device)
        return cls(idx_BK, crow_B1, order_S, _crow(flat_S, n_latents), order_S // K, n_latents, B, True)

    @classmethod
    def of_pairs(cls, token_S: torch.Tensor, latent_S: torch.Tensor, n_tokens: int, n_latents: int) -> Selection:
        """Selections given token by token (``token_S`` non-decreasing), any number per token."""
        order_S = torch.argsort(latent_S, stable=True)
        return cls(latent_S.view(1, -1), _crow(token_S, n_tokens), order_S, _crow(latent_S, n_latents), token_S[order_S],
                   n_latents, n_tokens, False)

    def token_major(self, vals_BK: torch.Tensor) -> torch.Tensor:
        """``G [B, F]`` with ``G[b, idx[b, k]] = vals[b, k]``, CSR."""
        return _csr(self.crow_B1, self.idx_BK.reshape(-1), vals_BK.reshape(-1), (self.n_tokens, self.n_latents))

    def latent_outer(self, vals_BK: torch.Tensor, dense_BD: torch.Tensor) -> torch.Tensor:
        """``G^T dense`` ([F, D]): row ``f`` sums ``vals[b, k] dense[b]`` over ``idx[b, k] = f``."""
        G_FB = _csr(self.crow_F1, self.token_S, vals_BK.reshape(-1)[self.order_S], (self.n_latents, self.n_tokens))
        return torch.sparse.mm(G_FB, dense_BD)


def _crow(rows_S: torch.Tensor, n_rows: int) -> torch.Tensor:
    """CSR row pointers of selections whose rows are ``rows_S``: counts by ``index_add_``, not
    ``bincount``, which reads the largest index on the host (a sync on CUDA)."""
    crow_R1 = torch.zeros(n_rows + 1, dtype=torch.int64, device=rows_S.device)
    crow_R1[1:].index_add_(0, rows_S, torch.ones_like(rows_S))
    return crow_R1.cumsum_(0)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


@torch.no_grad()
def select_topk(
    x_in_BD: torch.Tensor, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, k: int, keep_pre: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(values [B, K], indices [B, K], pre [B, F] or None)`` of the ``k`` largest entries of
    ``pre = x_in @ W_enc + b_enc`` per row (unsorted), computed ``ROW_BLOCK`` rows at a time
    (``GPU_ROW_BLOCK`` off the CPU)."""
    B, F = len(x_in_BD), W_enc_DF.shape[1]
    rows = ROW_BLOCK if x_in_BD.device.type == "cpu" else GPU_ROW_BLOCK
    vals_BK = torch.empty(B, k, dtype=W_enc_DF.dtype, device=x_in_BD.device)
    idx_BK = torch.empty(B, k, dtype=torch.int64, device=x_in_BD.device)
    pre_BF = torch.empty(B, F, dtype=W_enc_DF.dtype, device=x_in_BD.device) if keep_pre else None
    scratch = None if keep_pre else torch.empty(min(B, rows), F, dtype=W_enc_DF.dtype, device=x_in_BD.device)
    for lo in range(0, B, rows):
        hi = min(B, lo + rows)
        block = pre_BF[lo:hi] if pre_BF is not None else scratch[: hi - lo]
        torch.addmm(b_enc_F, x_in_BD[lo:hi], W_enc_DF, out=block)
        torch.topk(block, k, dim=-1, sorted=False, out=(vals_BK[lo:hi], idx_BK[lo:hi]))
    return vals_BK, idx_BK, pre_BF


class Selected(torch.autograd.Function):
    """The selected pre-activations ``pre[b, idx[b, k]]`` (computed by the caller, ``pre_BK``)
    of ``pre = (x - b_dec) @ W_enc + b_enc``, differentiable in ``W_enc``, ``b_enc``, ``b_dec``
    at the selected entries only; ``x_in_BD = x - b_dec`` is given without gradient."""

    @staticmethod
    def forward(ctx, pre_BK: torch.Tensor, x_in_BD: torch.Tensor, sel: Selection, W_enc_DF: torch.Tensor,
                b_enc_F: torch.Tensor, b_dec_D: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_in_BD, W_enc_DF)
        ctx.sel = sel
        ctx.backend = kernel_backend(x_in_BD, W_enc_DF) if sel.fixed_k else "torch"  # the kernels take K per token
        return pre_BK.clone()

    @staticmethod
    def backward(ctx, g_BK: torch.Tensor):
        x_in_BD, W_enc_DF = ctx.saved_tensors
        sel: Selection = ctx.sel
        need_W, need_b, need_b_dec = ctx.needs_input_grad[3:6]
        dtype = W_enc_DF.dtype
        g_BK = g_BK.to(dtype)
        grad_W = db_F = None
        fused = None
        if ctx.backend == "triton" and need_W:  # dW_enc_FD and db_enc_F in one pass over the selections
            fused = triton_kernels.latent_sum(g_BK, sel.order_S, sel.token_S, sel.crow_F1, x_in_BD, dtype, with_sums=True)
        if fused is not None:
            grad_W, db_F = fused[0].T, fused[1]  # [F, D] storage, see trainers.sae
        elif need_W:
            grad_W = sel.latent_outer(g_BK, x_in_BD.to(dtype)).T
        if db_F is None and (need_b or need_b_dec):
            db_F = torch.zeros(sel.n_latents, dtype=dtype, device=g_BK.device).index_add_(0, sel.idx_BK.reshape(-1), g_BK.reshape(-1))
        grad_b = db_F if need_b else None
        grad_b_dec = -(W_enc_DF @ db_F) if need_b_dec else None
        return None, None, None, grad_W, grad_b, grad_b_dec


class SparseDecode(torch.autograd.Function):
    """``x_hat[b] = sum_k vals[b, k] W_dec[idx[b, k]]`` ([B, D]), differentiable in ``vals``
    and ``W_dec``, without a dense ``[B, F]``."""

    @staticmethod
    def forward(ctx, vals_BK: torch.Tensor, sel: Selection, W_dec_FD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(vals_BK, W_dec_FD)
        ctx.sel = sel
        ctx.backend = kernel_backend(vals_BK, W_dec_FD) if sel.fixed_k else "torch"
        if ctx.backend == "triton":
            return triton_kernels.gather_decode(vals_BK, sel.idx_BK, W_dec_FD, W_dec_FD.dtype)
        return torch.sparse.mm(sel.token_major(vals_BK.to(W_dec_FD.dtype)), W_dec_FD)

    @staticmethod
    def backward(ctx, g_BD: torch.Tensor):
        vals_BK, W_dec_FD = ctx.saved_tensors
        sel: Selection = ctx.sel
        g_BD = g_BD.to(W_dec_FD.dtype).contiguous()
        grad_vals = grad_W = None
        if ctx.backend == "triton":
            gv = triton_kernels.sampled_dot(g_BD, sel.idx_BK, W_dec_FD, vals_BK.dtype) if ctx.needs_input_grad[0] else None
            gW = (triton_kernels.latent_sum(vals_BK, sel.order_S, sel.token_S, sel.crow_F1, g_BD, W_dec_FD.dtype)[0]
                  if ctx.needs_input_grad[2] else None)
            return gv, None, gW
        if ctx.needs_input_grad[0]:
            pattern = sel.token_major(torch.zeros_like(vals_BK, dtype=W_dec_FD.dtype))
            grad_vals = torch.sparse.sampled_addmm(pattern, g_BD, W_dec_FD.T, beta=0.0).values().view_as(vals_BK).to(vals_BK.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = sel.latent_outer(vals_BK.to(W_dec_FD.dtype), g_BD)
        return grad_vals, None, grad_W


def sparse_decode(vals_BK: torch.Tensor, sel: Selection, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """``sum_k vals[b, k] * W_dec[idx[b, k]]`` ([B, D]); see :class:`SparseDecode`."""
    return SparseDecode.apply(vals_BK, sel, W_dec_FD)
