"""ReLU SAE with a decoder-norm-weighted L1 penalty.

Conerly et al., "Circuits Updates, April 2024" (Anthropic), "Training SAEs": latents
``f = ReLU(pre)``; loss ``||x - x_hat||^2 + lambda * sum_i f_i ||W_dec,i||_2``, with the decoder
left unconstrained (its row norms sit inside the penalty instead), lambda warmed up from 0
over the first part of training (the trainer's ``sparsity_warmup``).
Shape letters: B batch, D d_in, F d_sae.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from .sae import SAE, SAEConfig, StepOutput, mse


@dataclass(frozen=True)
class ReLUConfig(SAEConfig):
    l1_coeff: float = 5.0
    """lambda: weight of the decoder-norm-weighted L1 penalty (inputs scaled to E||x||^2 = D)."""

    arch: ClassVar[str] = "relu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}")


class ReLUSAE(SAE):
    cfg: ReLUConfig
    saelens_architecture: ClassVar[str] = "standard"

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.pre_acts(x_BD))

    def training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None) -> StepOutput:
        f_BF = self.encode(x_BD)
        recon_BD = self.decode(f_BF)
        l2 = mse(x_BD, recon_BD)
        l1 = (f_BF * self.W_dec.norm(dim=1)).sum(-1).mean()
        loss = l2 + sparsity_scale * self.cfg.l1_coeff * l1
        active_BF = f_BF > 0
        return StepOutput(loss, recon_BD.detach(), active_BF.sum(-1).float().mean(), active_BF.any(0), {"mse": l2.detach(), "l1": l1.detach()})
