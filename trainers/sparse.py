"""Sparse kernels for TopK SAEs: gradients at the selected latents only, decoding by gathering.

A TopK SAE (Gao et al. 2024, arXiv 2406.04093) keeps ``K`` of ``F`` latents per token. The
dense reference computes ``pre = x_in @ W_enc + b_enc`` ([B, F]), takes the top ``K`` and
decodes with ``f @ W_dec``: backward then costs two more ``B x D x F`` matmuls although only
``B K`` entries of ``pre`` matter. Here:

- :class:`GatherPre`: ``pre[b, idx[b, k]]`` as a function of ``(x_in, W_enc, b_enc)`` whose
  backward touches only the selected entries: ``dW_enc = x_in^T G`` with ``G`` the sparse
  ``[B, F]`` matrix of the incoming gradients (a sparse-dense matmul of ``B K D`` work),
  ``db_enc`` by index-add, ``dx_in = G W_enc^T`` by ``embedding_bag``;
- :func:`sparse_decode`: ``sum_k vals[b, k] W_dec[idx[b, k]]`` by ``embedding_bag``
  (``B K D`` work; its backward scatters into the selected decoder rows only).

Both are tested against the dense reference (values and gradients).
Shape letters: B batch, D d_in, F d_sae, K active latents per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class GatherPre(torch.autograd.Function):
    """``pre_BF.gather(1, idx_BK)`` with ``pre = x_in @ W_enc + b_enc`` computed by the caller
    (without gradient); gradients flow to ``x_in``, ``W_enc`` and ``b_enc`` at ``idx`` only."""

    @staticmethod
    def forward(ctx, x_in_BD: torch.Tensor, W_enc_DF: torch.Tensor, b_enc_F: torch.Tensor, idx_BK: torch.Tensor, pre_BF: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x_in_BD, W_enc_DF, idx_BK)
        return pre_BF.gather(1, idx_BK)

    @staticmethod
    def backward(ctx, g_BK: torch.Tensor):
        x_in_BD, W_enc_DF, idx_BK = ctx.saved_tensors
        B, K = idx_BK.shape
        n_latents = W_enc_DF.shape[1]
        flat_idx, flat_g = idx_BK.reshape(-1), g_BK.reshape(-1).to(W_enc_DF.dtype)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(idx_BK, W_enc_DF.T.contiguous(), per_sample_weights=g_BK.to(W_enc_DF.dtype), mode="sum")
        if ctx.needs_input_grad[1]:
            rows = torch.arange(B, device=idx_BK.device).repeat_interleave(K)
            G_FB = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), flat_g, (n_latents, B), check_invariants=False)
            grad_W = torch.sparse.mm(G_FB, x_in_BD.to(W_enc_DF.dtype)).T.contiguous()
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n_latents, dtype=W_enc_DF.dtype, device=W_enc_DF.device).index_add_(0, flat_idx, flat_g)
        return grad_x, grad_W, grad_b, None, None


def sparse_decode(vals_BK: torch.Tensor, idx_BK: torch.Tensor, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """``sum_k vals[b, k] * W_dec[idx[b, k]]`` ([B, D]), without a dense ``[B, F]``."""
    return F.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=vals_BK.to(W_dec_FD.dtype), mode="sum")
