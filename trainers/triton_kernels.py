"""Triton kernels for the TopK SAE's sparse products (:mod:`trainers.sparse`), fp32 accumulation.

A TopK SAE (Gao et al. 2024, arXiv 2406.04093, §2.3) selects ``K`` latents per token; its
decoder and gradients are products with the sparse ``[B, F]`` matrix ``G`` of the selections.
Three kernels cover them, each doing ``S D`` work (``S = B K``) and never forming ``G``:

- :func:`gather_decode`: ``out[b] = sum_k vals[b, k] W[idx[b, k]]`` (``x_hat = G W_dec``).
  One program per (token, block of ``D``) gathers ``BLOCK_K`` rows of ``W`` at a time.
- :func:`sampled_dot`: ``out[b, k] = <g[b], W[idx[b, k]]>`` (the gradient of ``vals``, ``G``'s
  pattern sampled from ``g W^T``). One program per (token, block of ``K``) walks ``D``.
- :func:`latent_sum`: ``out[f] = sum_{s: idx_s = f} vals_s dense[token_s]`` (``G^T dense``:
  ``dW_dec = G^T dx_hat``, ``dW_enc^T = G^T x_in``), and optionally ``sums[f] = sum vals_s``
  (``db_enc``). One program per (latent, block of ``D``) walks its latent's segment of the
  latent-sorted selections (``order_S``, ``crow_F1``, ``token_S`` of ``sparse.Selection``):
  each output row has one writer and a fixed summation order, so no atomics and the result
  is deterministic. Latents never selected get zero rows.

Every kernel reads any float dtype, accumulates in fp32 and writes the caller's dtype. On the one
GPU measured (an H200) they train slower than torch's CSR kernels (:mod:`trainers.sparse` has the
figures), so they run only when ``ACTSTORE_SPARSE_KERNEL=triton`` asks for them.
Importing this module never fails: without triton :data:`UNAVAILABLE` says why and the kernels
are absent. ``TRITON_INTERPRET=1`` in the environment before this module is imported runs the
kernels on CPU tensors (Triton's interpreter; how the tests check them), see :data:`INTERPRETED`.
Shape letters: B batch, D d_in, F d_sae, K latents per token, S = B K selections.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError as err:
    triton = tl = None
    UNAVAILABLE: str | None = (
        f"triton cannot be imported ({err}); install it (pip install 'triton>=3.2', Linux x86_64) "
        "or set ACTSTORE_SPARSE_KERNEL=torch"
    )
else:
    UNAVAILABLE = None

MAX_BLOCK_D = 128
"""Columns per program: 128 fp32 = 512 B per gathered row, whole 128 B lines for any dtype."""
MAX_BLOCK_K = 32
"""Gathered rows per step of :func:`gather_decode` and :func:`sampled_dot`."""
BLOCK_S = 16
"""Selections per step of :func:`latent_sum` (a latent has ``S / F`` of them on average)."""

if triton is not None:

    # Loops with bounds known only at run time are `while` loops: Triton 3.4's interpreter
    # cannot iterate a `range` over them with numpy >= 2.4 (triton-lang/triton#9171). D is a
    # compile-time constant (one compilation per d_in), so loops over D stay `for` loops.

    @triton.jit
    def _gather_decode_kernel(vals_ptr, idx_ptr, W_ptr, out_ptr, K, stride_w,
                              D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        k0 = 0
        while k0 < K:
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < K
            f = tl.load(idx_ptr + b * K + k, mask=k_ok, other=0).to(tl.int64)
            v = tl.load(vals_ptr + b * K + k, mask=k_ok, other=0.0).to(tl.float32)
            w = tl.load(W_ptr + f[:, None] * stride_w + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
            k0 += BLOCK_K
        tl.store(out_ptr + b * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)

    @triton.jit
    def _sampled_dot_kernel(g_ptr, idx_ptr, W_ptr, out_ptr, K, stride_g, stride_w,
                            D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
        b = tl.program_id(0).to(tl.int64)
        k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = k < K
        f = tl.load(idx_ptr + b * K + k, mask=k_ok, other=0).to(tl.int64)
        acc = tl.zeros([BLOCK_K], dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            d = d0 + tl.arange(0, BLOCK_D)
            d_ok = d < D
            g = tl.load(g_ptr + b * stride_g + d, mask=d_ok, other=0.0).to(tl.float32)
            w = tl.load(W_ptr + f[:, None] * stride_w + d[None, :], mask=k_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
        tl.store(out_ptr + b * K + k, acc.to(out_ptr.dtype.element_ty), mask=k_ok)

    @triton.jit
    def _latent_sum_kernel(vals_ptr, order_ptr, token_ptr, crow_ptr, dense_ptr, out_ptr, sums_ptr, stride_dense,
                           D: tl.constexpr, WRITE_SUMS: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
        f = tl.program_id(0).to(tl.int64)
        d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
        d_ok = d < D
        s0 = tl.load(crow_ptr + f)
        hi = tl.load(crow_ptr + f + 1)
        acc = tl.zeros([BLOCK_D], dtype=tl.float32)
        total = tl.zeros([BLOCK_S], dtype=tl.float32)
        while s0 < hi:
            s = s0 + tl.arange(0, BLOCK_S)
            s_ok = s < hi
            pos = tl.load(order_ptr + s, mask=s_ok, other=0)
            t = tl.load(token_ptr + s, mask=s_ok, other=0).to(tl.int64)
            v = tl.load(vals_ptr + pos, mask=s_ok, other=0.0).to(tl.float32)
            x = tl.load(dense_ptr + t[:, None] * stride_dense + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.sum(x.to(tl.float32) * v[:, None], axis=0)
            total += v
            s0 += BLOCK_S
        tl.store(out_ptr + f * D + d, acc.to(out_ptr.dtype.element_ty), mask=d_ok)
        if WRITE_SUMS:
            tl.store(sums_ptr + f, tl.sum(total, axis=0).to(sums_ptr.dtype.element_ty), mask=tl.program_id(1) == 0)

INTERPRETED: bool = triton is not None and "Interpret" in type(_gather_decode_kernel).__name__
"""Whether the kernels run under Triton's interpreter (on CPU tensors), fixed at import."""


def _blocks(n: int, most: int) -> int:
    return min(most, max(16, triton.next_power_of_2(n)))


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` with unit column stride (a row stride is passed to the kernels)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def gather_decode(vals_BK: torch.Tensor, idx_BK: torch.Tensor, W_FD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[b] = sum_k vals[b, k] W[idx[b, k]]`` ([B, D], ``dtype``)."""
    (B, K), D = idx_BK.shape, W_FD.shape[1]
    vals_BK, idx_BK, W_FD = vals_BK.contiguous(), idx_BK.contiguous(), _rows(W_FD)
    out_BD = torch.empty(B, D, dtype=dtype, device=W_FD.device)
    if B and D:
        BLOCK_D = _blocks(D, MAX_BLOCK_D)
        _gather_decode_kernel[(B, triton.cdiv(D, BLOCK_D))](
            vals_BK, idx_BK, W_FD, out_BD, K, W_FD.stride(0), D=D, BLOCK_K=_blocks(K, MAX_BLOCK_K), BLOCK_D=BLOCK_D)
    return out_BD


def sampled_dot(g_BD: torch.Tensor, idx_BK: torch.Tensor, W_FD: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``out[b, k] = <g[b], W[idx[b, k]]>`` ([B, K], ``dtype``)."""
    (B, K), D = idx_BK.shape, W_FD.shape[1]
    g_BD, idx_BK, W_FD = _rows(g_BD), idx_BK.contiguous(), _rows(W_FD)
    out_BK = torch.empty(B, K, dtype=dtype, device=W_FD.device)
    if B:
        BLOCK_K = _blocks(K, MAX_BLOCK_K)
        _sampled_dot_kernel[(B, triton.cdiv(K, BLOCK_K))](
            g_BD, idx_BK, W_FD, out_BK, K, g_BD.stride(0), W_FD.stride(0),
            D=D, BLOCK_K=BLOCK_K, BLOCK_D=_blocks(D, MAX_BLOCK_D))
    return out_BK


def latent_sum(
    vals_BK: torch.Tensor, order_S: torch.Tensor, token_S: torch.Tensor, crow_F1: torch.Tensor,
    dense_BD: torch.Tensor, dtype: torch.dtype, with_sums: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(out [F, D], sums [F] or None)``: ``out[f] = sum vals_s dense[token_s]`` and
    ``sums[f] = sum vals_s`` over the selections ``s`` of latent ``f`` (latent-sorted: the
    ``order_S[crow_F1[f]:crow_F1[f + 1]]`` flat positions of ``vals``), both in ``dtype``."""
    F, D = len(crow_F1) - 1, dense_BD.shape[1]
    vals_BK, dense_BD = vals_BK.contiguous(), _rows(dense_BD)
    out_FD = torch.empty(F, D, dtype=dtype, device=dense_BD.device)
    sums_F = torch.empty(F, dtype=dtype, device=dense_BD.device) if with_sums else None
    if F:
        BLOCK_D = _blocks(D, MAX_BLOCK_D)
        _latent_sum_kernel[(F, max(1, triton.cdiv(D, BLOCK_D)))](
            vals_BK, order_S.contiguous(), token_S.contiguous(), crow_F1.contiguous(), dense_BD, out_FD,
            sums_F if with_sums else out_FD, dense_BD.stride(0),
            D=D, WRITE_SUMS=with_sums, BLOCK_S=BLOCK_S, BLOCK_D=BLOCK_D)
    return out_FD, sums_F
