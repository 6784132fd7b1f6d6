"""BatchTopK SAE (Bussmann, Leask & Nanda 2024, arXiv 2412.06410).

- Training (§3): the ``B K`` largest of all ``B x F`` ReLU pre-activations of a batch are kept,
  so ``K`` active latents per token on average while each token uses as many as it needs.
  Decoder rows at unit norm; the AuxK dead-latent loss of TopK SAEs (:mod:`trainers.topk`).
- Inference (§3): batch-independent: ``f = pre * 1[pre > theta]``, a JumpReLU with one global
  threshold ``theta`` estimated during training as the running mean (rate ``threshold_lr``)
  of the smallest kept activation per batch. Saved as a SAELens ``jumprelu`` SAE with
  ``threshold = theta`` for every latent, as SAELens does.

Fast path (:mod:`trainers.sparse`, as TopK's): the encoder matmul without gradient picks the
``B K`` pairs (token, latent), then gradients and decoding touch those pairs only
(:meth:`~trainers.sparse.Selection.of_pairs`: any number per token), AuxK likewise
(:func:`trainers.topk.sparse_auxk`); :meth:`BatchTopKSAE.dense_training_step` is the plain
reference it is tested against.
Shape letters: B batch, D d_in, F d_sae.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .sae import SAE, SAEConfig, StepOutput, mse
from .sparse import Selected, Selection, sparse_decode
from .topk import aux_width, compute_dtype, dense_auxk, sparse_auxk


@dataclass(frozen=True)
class BatchTopKConfig(SAEConfig):
    k: int = 32
    """Mean active latents per token."""
    aux_k: int = 512
    """k_aux of the AuxK loss."""
    aux_coeff: float = 1 / 32
    """alpha of the AuxK loss."""
    threshold_lr: float = 0.01
    """Rate of the running mean that estimates the inference threshold."""

    arch: ClassVar[str] = "batchtopk"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.k <= self.d_sae:
            raise ValueError(f"k ({self.k}) must be between 1 and the SAE width d_sae ({self.d_sae}); lower k or widen the SAE")
        if not 0 < self.threshold_lr <= 1:
            raise ValueError(f"threshold_lr must be in (0, 1], got {self.threshold_lr}")


class BatchTopKSAE(SAE):
    cfg: BatchTopKConfig
    unit_norm_decoder: ClassVar[bool] = True
    saelens_architecture: ClassVar[str] = "jumprelu"

    def __init__(self, cfg: BatchTopKConfig):
        super().__init__(cfg)
        self.register_buffer("threshold", torch.zeros((), dtype=torch.float64))

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = self.pre_acts(x_BD)
        return pre_BF * (pre_BF > self.threshold.to(pre_BF.dtype))

    def training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None,
                      target_BO: torch.Tensor | None = None) -> StepOutput:
        """``target_BO``: what the decoder must reproduce (a transcoder's output; ``x`` when None)."""
        y_BO = x_BD if target_BO is None else target_BO
        B, F = len(x_BD), self.cfg.d_sae
        width = aux_width(dead_F, self.cfg.aux_k) if dead_F is not None and self.cfg.aux_coeff else 0
        x_in_BD = self.sae_in(x_BD).detach()
        b_in_D = self.b_dec if self.center_input else None
        dt = compute_dtype(x_BD.device, self.W_enc.dtype)  # bf16 under autocast: the one B x D x F matmul
        with torch.no_grad():
            pre_BF = torch.addmm(self.b_enc.to(dt), x_in_BD.to(dt), self.W_enc.to(dt))
            top = torch.relu(pre_BF).flatten().topk(self.cfg.k * B, sorted=False)
            flat_S, order_S = top.indices.sort()  # token by token
            kept_S = top.values[order_S]
        with torch.autocast(x_BD.device.type, enabled=False):  # the S D sparse products: in the weights' dtype
            sel = Selection.of_pairs(flat_S // F, flat_S % F, B, F)
            pre_S = pre_BF.flatten()[flat_S].to(self.W_enc.dtype)
            vals_S = torch.relu(Selected.apply(pre_S, x_in_BD, sel, self.W_enc, self.b_enc, b_in_D))
            decoded_BO = sparse_decode(vals_S, sel, self.W_dec)
            recon_BD = self.add_skip(x_BD, decoded_BO + self.b_dec)
            l2 = mse(y_BO, recon_BD)
            loss, terms = l2, {"mse": l2.detach()}
            latent_S = sel.idx_BK.reshape(-1)
            prefix = lambda m: sparse_decode(vals_S * (latent_S < m), sel, self.W_dec)  # noqa: E731
            for name, term in self.extra_losses(y_BO, prefix).items():  # Matryoshka's inner levels
                loss = loss + term
                terms[name] = term.detach()
            terms["aux"] = torch.zeros((), device=x_BD.device)
            if width:
                aux = sparse_auxk(self, x_in_BD, b_in_D, pre_BF.to(self.W_enc.dtype), dead_F, width, y_BO - recon_BD.detach())
                loss = loss + self.cfg.aux_coeff * aux
                terms["aux"] = aux.detach()
        self._update_threshold(kept_S)
        active_S = vals_S.detach() > 0
        fired_F = torch.zeros(F, dtype=torch.int32, device=x_BD.device).index_add_(0, latent_S, active_S.to(torch.int32)) > 0
        terms["threshold"] = self.threshold.detach().float()
        return StepOutput(loss, recon_BD.detach(), active_S.sum().float() / B, fired_F, terms)

    def dense_training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None,
                            target_BO: torch.Tensor | None = None) -> StepOutput:
        """Reference: the same loss with dense matrices throughout (for tests)."""
        y_BO = x_BD if target_BO is None else target_BO
        pre_BF = self.pre_acts(x_BD)
        acts_BF = torch.relu(pre_BF)
        top = acts_BF.flatten().topk(self.cfg.k * len(x_BD), sorted=False)
        f_BF = torch.zeros_like(acts_BF).flatten().scatter(0, top.indices, top.values).view_as(acts_BF)
        recon_BD = self.add_skip(x_BD, self.decode(f_BF))
        l2 = mse(y_BO, recon_BD)
        loss, terms = l2, {"mse": l2.detach()}
        for name, term in self.extra_losses(y_BO, lambda m: f_BF[:, :m] @ self.W_dec[:m]).items():  # Matryoshka's inner levels
            loss = loss + term
            terms[name] = term.detach()
        aux = dense_auxk(y_BO, recon_BD, pre_BF, dead_F, self.W_dec, self.cfg.aux_k, self.cfg.aux_coeff)
        loss = loss if aux is None else loss + self.cfg.aux_coeff * aux
        terms["aux"] = torch.zeros((), device=x_BD.device) if aux is None else aux.detach()
        self._update_threshold(top.values)
        active_BF = f_BF.detach() > 0
        terms["threshold"] = self.threshold.detach().float()
        return StepOutput(loss, recon_BD.detach(), active_BF.sum(-1).float().mean(), active_BF.any(0), terms)

    @torch.no_grad()
    def _update_threshold(self, kept: torch.Tensor) -> None:
        """Running mean of the smallest kept activation; kept on the device (no host sync)."""
        smallest = torch.where(kept > 0, kept, float("inf")).min().double()
        lr = self.cfg.threshold_lr
        self.threshold.copy_(torch.where(smallest.isfinite(), self.threshold * (1 - lr) + lr * smallest, self.threshold))

    def extra_losses(self, y_BO: torch.Tensor, decode_prefix: Callable[[int], torch.Tensor]) -> dict[str, torch.Tensor]:
        """Reconstruction terms added to the loss by subclasses (none here), by name;
        ``decode_prefix(m)``: the decoded contribution of latents ``0 .. m-1`` (no bias)."""
        return {}

    @torch.no_grad()
    def saelens_state(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        state = super().saelens_state(scale)
        state["threshold"] = torch.full((self.cfg.d_sae,), float(self.threshold), dtype=state["b_enc"].dtype)
        return state

    def saelens_config(self) -> dict[str, Any]:
        return {"architecture": "jumprelu"}
