"""TopK SAE with the AuxK dead-latent loss (Gao et al. 2024, arXiv 2406.04093).

- Latents (§2.3, "TopK activation function"): ``f = ReLU(TopK_K(pre))``: the ``K`` largest
  pre-activations of each token, every other latent zero. Sparsity is set by ``K``, no penalty.
- Decoder rows at unit norm, gradients along them removed before each step (§2.4, A.1).
- AuxK (Appendix A.2): with ``e = x - x_hat`` the main reconstruction's error, the top
  ``k_aux`` pre-activations among *dead* latents (not fired for ``dead_tokens``) reconstruct
  it, ``e_hat = W_dec^T z_aux``, and ``alpha ||e - e_hat||^2`` is added, ``alpha = 1/32``. The
  error is normalised by ``||e - mean(e)||^2`` (as reference implementations do) so alpha does
  not depend on the activations' scale.

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

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = self.pre_acts(x_BD)
        top = pre_BF.topk(self.cfg.k, dim=-1)
        return torch.zeros_like(pre_BF).scatter_(-1, top.indices, torch.relu(top.values))

    def training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None) -> StepOutput:
        n_dead = int(dead_F.sum()) if dead_F is not None else 0
        use_aux = bool(n_dead and self.cfg.aux_k and self.cfg.aux_coeff)
        x_in_BD = (x_BD - self.b_dec).detach()
        pre_BK, idx_BK, pre_BF = select_topk(x_in_BD, self.W_enc, self.b_enc, self.cfg.k, keep_pre=use_aux)
        sel = Selection.of(idx_BK, self.cfg.d_sae)
        vals_BK = torch.relu(Selected.apply(pre_BK, x_in_BD, sel, self.W_enc, self.b_enc, self.b_dec))
        recon_BD = sparse_decode(vals_BK, sel, self.W_dec) + self.b_dec
        l2 = mse(x_BD, recon_BD)
        loss, terms = l2, {"mse": l2.detach()}
        if use_aux:
            with torch.no_grad():
                aux_pre_BA, idx_BA = pre_BF.masked_fill_(~dead_F, float("-inf")).topk(min(self.cfg.aux_k, n_dead), dim=-1, sorted=False)
            aux_sel = Selection.of(idx_BA, self.cfg.d_sae)
            aux_BA = torch.relu(Selected.apply(aux_pre_BA, x_in_BD, aux_sel, self.W_enc, self.b_enc, self.b_dec))
            aux = aux_loss(x_BD - recon_BD.detach(), sparse_decode(aux_BA, aux_sel, self.W_dec))
            loss = loss + self.cfg.aux_coeff * aux
            terms["aux"] = aux.detach()
        fired_F = torch.zeros(self.cfg.d_sae, dtype=torch.bool, device=x_BD.device)
        fired_F[idx_BK[vals_BK.detach() > 0]] = True
        l0 = (vals_BK.detach() > 0).sum(-1).float().mean()
        return StepOutput(loss, recon_BD.detach(), l0, fired_F, terms)

    def dense_training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None) -> StepOutput:
        """Reference: the same loss with dense matrices throughout (for tests)."""
        pre_BF = self.pre_acts(x_BD)
        top = pre_BF.topk(self.cfg.k, dim=-1)
        f_BF = torch.zeros_like(pre_BF).scatter(-1, top.indices, torch.relu(top.values))
        recon_BD = self.decode(f_BF)
        l2 = mse(x_BD, recon_BD)
        loss, terms = l2, {"mse": l2.detach()}
        aux = dense_auxk(x_BD, recon_BD, pre_BF, dead_F, self.W_dec, self.cfg.aux_k, self.cfg.aux_coeff)
        if aux is not None:
            loss = loss + self.cfg.aux_coeff * aux
            terms["aux"] = aux.detach()
        active_BF = f_BF > 0
        return StepOutput(loss, recon_BD.detach(), active_BF.sum(-1).float().mean(), active_BF.any(0), terms)

    def saelens_config(self) -> dict[str, Any]:
        return {"architecture": "topk", "k": self.cfg.k, "rescale_acts_by_decoder_norm": False}


def aux_loss(e_BD: torch.Tensor, e_hat_BD: torch.Tensor) -> torch.Tensor:
    """AuxK's ``||e - e_hat||^2``, normalised by ``||e - mean(e)||^2``."""
    return mse(e_BD, e_hat_BD) / (e_BD - e_BD.mean(0)).pow(2).sum(-1).mean().clamp_min(1e-12)


def dense_auxk(
    x_BD: torch.Tensor, recon_BD: torch.Tensor, pre_BF: torch.Tensor, dead_F: torch.Tensor | None,
    W_dec_FD: torch.Tensor, aux_k: int, aux_coeff: float,
) -> torch.Tensor | None:
    """AuxK loss with dense matrices: the top ``aux_k`` dead latents reconstruct the error of
    ``recon``; None when nothing is dead or AuxK is off."""
    n_dead = int(dead_F.sum()) if dead_F is not None else 0
    if not (n_dead and aux_k and aux_coeff):
        return None
    top = pre_BF.masked_fill(~dead_F, float("-inf")).topk(min(aux_k, n_dead), dim=-1)
    z_BF = torch.zeros_like(pre_BF).scatter(-1, top.indices, torch.relu(top.values))
    return aux_loss(x_BD - recon_BD.detach(), z_BF @ W_dec_FD)
