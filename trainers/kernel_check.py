"""The TopK SAE's fast training step against its dense reference on any device: the check the
GPU smoke script runs on CUDA (:mod:`trainers.sparse`'s kernels, Triton or torch) and the tests
run on the CPU.

The reference is :meth:`trainers.topk.TopKSAE.dense_training_step` in float64 on the same batch;
the errors are ``max |fast - ref| / max |ref|`` of the loss, the reconstruction and every
parameter's gradient (Gao et al. 2024, arXiv 2406.04093, for the TopK and AuxK losses).
Shape letters: B batch, D d_in, F d_sae, K active latents per token, A AuxK latents per token.
"""

from __future__ import annotations

import copy

import torch

from .sparse import kernel_backend, select_topk
from .topk import TopKConfig, TopKSAE


def check_against_dense(
    device: str | torch.device, d_in: int = 768, d_sae: int = 16384, k: int = 32, batch: int = 4096,
    aux_k: int = 256, dead_fraction: float = 0.5, seed: int = 0,
) -> dict[str, float | int | str]:
    """One TopK training step on ``device`` by the fast path (backend from :func:`kernel_backend`)
    against :meth:`~trainers.topk.TopKSAE.dense_training_step` in float64 on the same batch, AuxK
    on with a ``dead_fraction`` of the latents dead. Returns ``backend``, ``tokens`` (checked),
    ``dropped_tokens`` and the relative errors ``max |fast - ref| / max |ref|``: ``rel_err_loss``,
    ``rel_err_recon`` and ``rel_err_grad_<parameter>`` for every parameter.

    The errors measure the sparse products alone: float32 matmuls run at full precision (no TF32)
    and without autocast during the check, and tokens whose selection (top ``k``, AuxK's dead
    latents, a selected value's sign) differs between float32 and float64 pre-activations
    (near-ties) are dropped from the batch first."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    sae = TopKSAE(TopKConfig(d_in=d_in, d_sae=d_sae, k=k, aux_k=aux_k, seed=seed))
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=gen))
        sae.b_dec.copy_(0.1 * torch.randn(d_in, generator=gen))
    ref = copy.deepcopy(sae).to(device=device, dtype=torch.float64)
    sae.to(device)
    x_BD = torch.randn(batch, d_in, generator=gen).to(device)
    dead_F = (torch.rand(d_sae, generator=gen) < dead_fraction).to(device)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        with torch.autocast(device.type, enabled=False):
            x_BD = x_BD[_same_selection(sae, ref, x_BD, dead_F)]
            fast, dense = sae.training_step(x_BD, dead_F=dead_F), ref.dense_training_step(x_BD.double(), dead_F=dead_F)
            fast.loss.backward()
            dense.loss.backward()
    finally:
        torch.set_float32_matmul_precision(precision)
    out: dict[str, float | int | str] = {
        "backend": kernel_backend(x_BD, sae.W_dec), "tokens": len(x_BD), "dropped_tokens": batch - len(x_BD),
        "rel_err_loss": _rel_err(fast.loss, dense.loss), "rel_err_recon": _rel_err(fast.recon_BD, dense.recon_BD),
    }
    for (name, p), q in zip(sae.named_parameters(), ref.parameters(), strict=True):
        out[f"rel_err_grad_{name}"] = _rel_err(p.grad, q.grad)
    return out


@torch.no_grad()
def _same_selection(sae: TopKSAE, ref: TopKSAE, x_BD: torch.Tensor, dead_F: torch.Tensor) -> torch.Tensor:
    """bool ``[B]``: tokens whose fast-path selections (float32, :func:`select_topk` as in the
    training step) equal the float64 reference's."""
    k, aux_k = sae.cfg.k, min(sae.cfg.aux_k, int(dead_F.sum()))
    _, idx_BK, pre_BF = select_topk(x_BD - sae.b_dec, sae.W_enc, sae.b_enc, k, keep_pre=True)
    ref_BF = ref.pre_acts(x_BD.double())
    same_B = idx_BK.sort(-1).values.eq(ref_BF.topk(k, dim=-1).indices.sort(-1).values).all(-1)
    same_B &= (pre_BF.gather(1, idx_BK) > 0).eq(ref_BF.gather(1, idx_BK) > 0).all(-1)
    if aux_k:
        aux32_BA = pre_BF.masked_fill(~dead_F, float("-inf")).topk(aux_k, dim=-1).indices.sort(-1).values
        aux64_BA = ref_BF.masked_fill(~dead_F, float("-inf")).topk(aux_k, dim=-1).indices.sort(-1).values
        same_B &= aux32_BA.eq(aux64_BA).all(-1) & (pre_BF.gather(1, aux32_BA) > 0).eq(ref_BF.gather(1, aux32_BA) > 0).all(-1)
    return same_B


def _rel_err(fast: torch.Tensor, ref: torch.Tensor) -> float:
    fast, ref = fast.detach().double(), ref.detach().double()
    return float((fast - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
