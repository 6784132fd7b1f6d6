"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, arXiv 2406.04093).

- Latents (§2.3, "TopK activation function"): ``f = ReLU(TopK_K(pre))``: the ``K`` largest
  pre-activations of each token, every other latent zero. Sparsity is set by ``K``, no penalty.
- Decoder rows at unit norm, gradients along them removed before each step (§2.4, A.1).
- AuxK (Appendix A.2): with ``e = x - x_hat`` the main reconstruction's error, the top
  ``k_aux`` pre-activations among *dead* latents (not fired for ``dead_tokens``) reconstruct
  it, ``e_hat = W_dec^T z_aux``, and ``alpha ||e - e_hat||^2`` is added, ``alpha = 1/32``. The
  error is normalised by ``||e - mean(e)||^2`` (as reference implementations do) so alpha does
  not depend on the activations' scale. ``k_aux`` is capped at the number of dead latents;
  on CUDA that count is never read on the host (:data:`HOST_COUNT_DEVICES`): ``k_aux`` latents
  are taken with the live ones at ``-inf``, which contribute nothing.

Fast path (:mod:`trainers.sparse`): one dense encoder matmul without gradient to pick the
latents, then gradients and decoding at the ``B K`` selected entries only; checked against
:meth:`TopKSAE.dense_training_step`, the plain reference.
Shape letters: B batch, D d_in, F d_sae, K active latents per token, A AuxK latents per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .sae import SAE, SAEConfig, StepOutput, mse
from .sparse import Selected, Selection, select_topk, sparse_decode


@dataclass(frozen=True)
class TopKConfig(SAEConfig):
    k: int = 32
    """Active latents per token."""
    aux_k: int = 512
    """k_aux: dead latents used by the AuxK loss (capped at the number dead)."""
    aux_coeff: float = 1 / 32
    """alpha: weight of the AuxK loss."""

    arch: ClassVar[str] = "topk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k ({self.k}) must be between 1 and the SAE width d_sae ({self.d_sae}); lower k or widen the SAE")
        if self.aux_k < 0 or self.aux_coeff < 0:
            raise ValueError("aux_k and aux_coeff must be >= 0")


class TopKSAE(SAE):
    cfg: TopKConfig
    unit_norm_decoder: ClassVar[bool] = True
    saelens_architecture: ClassVar[str] = "topk"

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`encode` without the dense matrix: each token's ``k`` largest pre-activations
        after the ReLU ``[B, k]`` (zeros where they are negative) and their latents ``[B, k]``."""
        top = self.pre_acts(x_BD).topk(self.cfg.k, dim=-1)
        return torch.relu(top.values), top.indices

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        vals_BK, idx_BK = self.encode_sparse(x_BD)
        return vals_BK.new_zeros(x_BD.shape[0], self.cfg.d_sae).scatter_(-1, idx_BK, vals_BK)

    def training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None,
                      target_BO: torch.Tensor | None = None) -> StepOutput:
        """``target_BO``: what the decoder must reproduce (a transcoder's output; ``x`` when None)."""
        y_BO = x_BD if target_BO is None else target_BO
        width = aux_width(dead_F, self.cfg.aux_k) if dead_F is not None and self.cfg.aux_coeff else 0
        use_aux = width > 0
        x_in_BD = self.sae_in(x_BD).detach()
        b_in_D = self.b_dec if self.center_input else None  # the encoder's input bias, differentiated through x_in
        dt = compute_dtype(x_BD.device, self.W_enc.dtype)  # bf16 under autocast: the one B x D x F matmul
        pre_BK, idx_BK, pre_BF = select_topk(x_in_BD.to(dt), self.W_enc.to(dt), self.b_enc.to(dt), self.cfg.k, keep_pre=use_aux)
        with torch.autocast(x_BD.device.type, enabled=False):  # the S D sparse products: in the weights' dtype
            sel = Selection.of(idx_BK, self.cfg.d_sae)
            vals_BK = torch.relu(Selected.apply(pre_BK.to(self.W_enc.dtype), x_in_BD, sel, self.W_enc, self.b_enc, b_in_D))
            recon_BD = self.add_skip(x_BD, sparse_decode(vals_BK, sel, self.W_dec) + self.b_dec)
            l2 = mse(y_BO, recon_BD)
            loss, terms = l2, {"mse": l2.detach(), "aux": torch.zeros((), device=x_BD.device)}
            if use_aux:
                aux = sparse_auxk(self, x_in_BD, b_in_D, pre_BF, dead_F, width, y_BO - recon_BD.detach())
                loss = loss + self.cfg.aux_coeff * aux
                terms["aux"] = aux.detach()
        active_BK = vals_BK.detach() > 0
        fired_F = torch.zeros(self.cfg.d_sae, dtype=torch.int32, device=x_BD.device).index_add_(
            0, idx_BK.reshape(-1), active_BK.reshape(-1).to(torch.int32)) > 0
        return StepOutput(loss, recon_BD.detach(), active_BK.sum(-1).float().mean(), fired_F, terms)

    def dense_training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None,
                            target_BO: torch.Tensor | None = None) -> StepOutput:
        """Reference: the same loss with dense matrices throughout (for tests)."""
        y_BO = x_BD if target_BO is None else target_BO
        pre_BF = self.pre_acts(x_BD)
        top = pre_BF.topk(self.cfg.k, dim=-1)
        f_BF = torch.zeros_like(pre_BF).scatter(-1, top.indices, torch.relu(top.values))
        recon_BD = self.add_skip(x_BD, self.decode(f_BF))
        l2 = mse(y_BO, recon_BD)
        loss, terms = l2, {"mse": l2.detach()}
        aux = dense_auxk(y_BO, recon_BD, pre_BF, dead_F, self.W_dec, self.cfg.aux_k, self.cfg.aux_coeff)
        loss = loss if aux is None else loss + self.cfg.aux_coeff * aux
        terms["aux"] = torch.zeros((), device=x_BD.device) if aux is None else aux.detach()
        active_BF = f_BF > 0
        return StepOutput(loss, recon_BD.detach(), active_BF.sum(-1).float().mean(), active_BF.any(0), terms)

    def saelens_config(self) -> dict[str, Any]:
        return {"architecture": "topk", "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}


def aux_loss(e_BD: torch.Tensor, e_hat_BD: torch.Tensor) -> torch.Tensor:
    """AuxK's ``||e - e_hat||^2``, normalised by ``||e - mean(e)||^2``."""
    return mse(e_BD, e_hat_BD) / (e_BD - e_BD.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


def sparse_auxk(sae, x_in_BD: torch.Tensor, b_in_D: torch.Tensor | None, pre_BF: torch.Tensor, dead_F: torch.Tensor,
                width: int, err_BO: torch.Tensor) -> torch.Tensor:
    """AuxK (Appendix A.2) at the selected entries only: the top ``width`` dead pre-activations of
    each token (``pre_BF``, overwritten) reconstruct ``err``, the main reconstruction's error;
    weighted by "any dead" on the device. ``b_in_D``: the encoder's input bias (None for transcoders)."""
    aux_pre_BA, idx_BA = pre_BF.masked_fill_(~dead_F, float("-inf")).topk(width, dim=-1, sorted=False)
    aux_sel = Selection.of(idx_BA, sae.cfg.d_sae)
    aux_BA = torch.relu(Selected.apply(aux_pre_BA.to(sae.W_enc.dtype), x_in_BD, aux_sel, sae.W_enc, sae.b_enc, b_in_D))
    return aux_loss(err_BO, sparse_decode(aux_BA, aux_sel, sae.W_dec)) * dead_F.any()


def compute_dtype(device: torch.device, dtype: torch.dtype) -> torch.dtype:
    """The dtype matmuls run in on ``device``: autocast's (bf16) where it is on, else ``dtype``."""
    return torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype


HOST_COUNT_DEVICES = frozenset({"cpu"})
"""Devices where AuxK reads the number of dead latents on the host to take no more than that
(reading a CPU tensor costs nothing). Elsewhere (CUDA) it takes ``aux_k`` latents, the live
ones at ``-inf``, which ReLU zeroes, and weights the loss by "any dead" on the device: the same
loss and gradients, and no step waits for the device."""


def aux_width(dead_F: torch.Tensor, aux_k: int) -> int:
    """How many latents per token AuxK selects (0: skip it): ``min(aux_k, dead)`` where the
    count is free to read (:data:`HOST_COUNT_DEVICES`), else ``min(aux_k, d_sae)``."""
    if dead_F.device.type in HOST_COUNT_DEVICES:
        return min(aux_k, int(dead_F.sum()))
    return min(aux_k, dead_F.numel())


def dense_auxk(
    x_BD: torch.Tensor, recon_BD: torch.Tensor, pre_BF: torch.Tensor, dead_F: torch.Tensor | None,
    W_dec_FD: torch.Tensor, aux_k: int, aux_coeff: float,
) -> torch.Tensor | None:
    """AuxK loss with dense matrices: the top ``aux_k`` dead latents reconstruct the error of
    ``recon`` (0 when none is dead); None when AuxK is skipped (``dead_F`` None, AuxK off, or
    no latent dead where the count is read, :func:`aux_width`)."""
    width = aux_width(dead_F, aux_k) if dead_F is not None and aux_coeff else 0
    if not width:
        return None
    with torch.no_grad():
        idx_BA = pre_BF.masked_fill(~dead_F, float("-inf")).topk(width, dim=-1, sorted=False).indices
    mask_BF = torch.zeros_like(pre_BF, dtype=torch.bool).scatter_(-1, idx_BA, True) & dead_F
    z_BF = torch.relu(pre_BF.masked_fill(~mask_BF, 0.0))
    return aux_loss(x_BD - recon_BD.detach(), z_BF.to(W_dec_FD.dtype) @ W_dec_FD) * dead_F.any()
