"""Sparse kernels for TopK SAEs: gradients at the selected latents only, decoding by gathering.

A TopK SAE (Gao et al. 2024, arXiv 2406.04093, §2.3) keeps ``K`` of ``F`` latents per token. The
dense reference computes ``pre = x_in @ W_enc + b_enc`` ([B, F]), takes the top ``K`` and
decodes with ``f @ W_dec``; its backward costs two more ``B x D x F`` matmuls although only the
``S = B K`` selected entries of ``pre`` matter. Here the selections form a sparse ``[B, F]``
matrix ``G`` (``K`` entries per row) and every product touches only them (``S D`` work each):

- :func:`select_topk`: the encoder matmul and the top-``K`` in row blocks, while each block of
  ``pre`` is still in cache; the full ``pre`` is kept only when asked (AuxK needs it);
- :class:`Selected`: the selected pre-activations as a function of ``(W_enc, b_enc, b_dec)``:
  ``dW_enc = x_in^T G`` (a sparse-dense matmul, latent-major), ``db_enc`` by index-add, and
  ``db_dec = -W_enc db_enc`` (``x_in = x - b_dec``, the input ``x`` needs no gradient);
- :class:`SparseDecode`: ``x_hat = G W_dec`` with ``G`` holding the latent values (CSR
  sparse-dense matmul); ``dW_dec = G^T dx_hat`` (latent-major) and
  ``dvals[b, k] = <dx_hat[b], W_dec[idx[b, k]]>`` (a sampled dense-dense matmul).

:class:`Selection` holds the index structures both need, built once per step.
Both are tested against the dense reference (values and gradients).
Shape letters: B batch, D d_in, F d_sae, K active latents per token, S = B K selections.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import torch

ROW_BLOCK = 512
"""Rows of ``pre`` computed and searched at a time by :func:`select_topk`."""


class Selection(NamedTuple):
    """``K`` latents per token as sparse-matrix index structures."""

    idx_BK: torch.Tensor
    """Latent of each selection (row-major: token by token)."""
    crow_B1: torch.Tensor
    """Token-major CSR row pointers (``K`` per token)."""
    order_S: torch.Tensor
    """Selections (flat positions in ``idx_BK``) sorted by latent."""
    crow_F1: torch.Tensor
    """Latent-major CSR row pointers."""
    token_S: torch.Tensor
    """Token of each latent-sorted selection."""
    n_latents: int

    @classmethod
    def of(cls, idx_BK: torch.Tensor, n_latents: int) -> Selection:
        B, K = idx_BK.shape
        flat_S = idx_BK.reshape(-1)
        order_S = torch.argsort(flat_S)
        crow_F1 = torch.zeros(n_latents + 1, dtype=torch.int64, device=idx_BK.device)
        crow_F1[1:] = torch.bincount(flat_S, minlength=n_latents).cumsum(0)
        crow_B1 = torch.arange(0, B * K + 1, K, device=idx_BK.device)
        return cls(idx_BK, crow_B1, order_S, crow_F1, order_S // K, n_latents)

    def token_major(self, vals_BK: torch.Tensor) -> torch.Tensor:
        """``G [B, F]`` with ``G[b, idx[b, k]] = vals[b, k]``, CSR."""
        B = len(self.idx_BK)
        return _csr(self.crow_B1, self.idx_BK.reshape(-1), vals_BK.reshape(-1), (B, self.n_latents))

    def latent_outer(self, vals_BK: torch.Tensor, dense_BD: torch.Tensor) -> torch.Tensor:
        """``G^T dense`` ([F, D]): row ``f`` sums ``vals[b, k] dense[b]`` over ``idx[b, k] = f``."""
        B = len(self.idx_BK)
        G_FB = _csr(self.crow_F1, self.token_S, vals_BK.reshape(-1)[self.order_S], (self.n_latents, B))
        return torch.sparse.mm(G_FB, dense_BD)


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta"
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


@torch.no_grad()
def select_topk(
    x_in_BD: torch.Tensor, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, k: int, keep_pre: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(values [B, K], indices [B, K], pre [B, F] or None)`` of the ``k`` largest entries of
    ``pre = x_in @ W_enc + b_enc`` per row (unsorted), computed ``ROW_BLOCK`` rows at a time."""
    B, F = len(x_in_BD), W_enc_DF.shape[1]
    vals_BK = torch.empty(B, k, dtype=W_enc_DF.dtype, device=x_in_BD.device)
    idx_BK = torch.empty(B, k, dtype=torch.int64, device=x_in_BD.device)
    pre_BF = torch.empty(B, F, dtype=W_enc_DF.dtype, device=x_in_BD.device) if keep_pre else None
    scratch = None if keep_pre else torch.empty(min(B, ROW_BLOCK), F, dtype=W_enc_DF.dtype, device=x_in_BD.device)
    for lo in range(0, B, ROW_BLOCK):
        hi = min(B, lo + ROW_BLOCK)
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
        return pre_BK.clone()

    @staticmethod
    def backward(ctx, g_BK: torch.Tensor):
        x_in_BD, W_enc_DF = ctx.saved_tensors
        sel: Selection = ctx.sel
        g_BK = g_BK.to(W_enc_DF.dtype)
        grad_W = grad_b = grad_b_dec = None
        if ctx.needs_input_grad[3]:
            grad_W = sel.latent_outer(g_BK, x_in_BD.to(W_enc_DF.dtype)).T  # [F, D] storage, see trainers.sae
        if ctx.needs_input_grad[4] or ctx.needs_input_grad[5]:
            db_F = torch.zeros(sel.n_latents, dtype=W_enc_DF.dtype, device=g_BK.device).index_add_(0, sel.idx_BK.reshape(-1), g_BK.reshape(-1))
            grad_b = db_F if ctx.needs_input_grad[4] else None
            grad_b_dec = -(W_enc_DF @ db_F) if ctx.needs_input_grad[5] else None
        return None, None, None, grad_W, grad_b, grad_b_dec


class SparseDecode(torch.autograd.Function):
    """``x_hat[b] = sum_k vals[b, k] W_dec[idx[b, k]]`` ([B, D]), differentiable in ``vals``
    and ``W_dec``, without a dense ``[B, F]``."""

    @staticmethod
    def forward(ctx, vals_BK: torch.Tensor, sel: Selection, W_dec_FD: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(vals_BK, W_dec_FD)
        ctx.sel = sel
        return torch.sparse.mm(sel.token_major(vals_BK.to(W_dec_FD.dtype)), W_dec_FD)

    @staticmethod
    def backward(ctx, g_BD: torch.Tensor):
        vals_BK, W_dec_FD = ctx.saved_tensors
        sel: Selection = ctx.sel
        g_BD = g_BD.to(W_dec_FD.dtype).contiguous()
        grad_vals = grad_W = None
        if ctx.needs_input_grad[0]:
            pattern = sel.token_major(torch.zeros_like(vals_BK, dtype=W_dec_FD.dtype))
            grad_vals = torch.sparse.sampled_addmm(pattern, g_BD, W_dec_FD.T, beta=0.0).values().view_as(vals_BK).to(vals_BK.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = sel.latent_outer(vals_BK.to(W_dec_FD.dtype), g_BD)
        return grad_vals, None, grad_W


def sparse_decode(vals_BK: torch.Tensor, sel: Selection, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """``sum_k vals[b, k] * W_dec[idx[b, k]]`` ([B, D]); see :class:`SparseDecode`."""
    return SparseDecode.apply(vals_BK, sel, W_dec_FD)
