"""Gated SAE (Rajamanoharan et al. 2024, arXiv 2404.16014), with weight sharing.

§3.1-3.2: two paths over the same ``x_in = x - b_dec``:

- gate: ``pi_gate = x_in @ W_enc + b_gate``, deciding which latents are active;
- magnitude: ``pi_mag = x_in @ (W_enc * exp(r_mag)) + b_mag`` (weights shared with the gate up
  to a per-latent rescaling ``exp(r_mag)``);
- ``f = 1[pi_gate > 0] * ReLU(pi_mag)``.

Loss (§3.2, eq. 9, with the decoder-norm penalty its authors recommend in place of unit-norm
decoder rows): ``||x - x_hat||^2 + lambda sum_i ReLU(pi_gate)_i ||W_dec,i|| + ||x - x_hat(ReLU(pi_gate))||^2``.
The last (auxiliary) term decodes the gate's ReLU, so the gate path gets a reconstruction
signal through the Heaviside step. The paper keeps decoder rows at unit norm and freezes the
decoder in the auxiliary term; weighting the L1 by the decoder row norms (Anthropic, "Circuits
Updates, April 2024") does away with the norm constraint, and then the decoder must be trainable
in both places or frozen in both (Rajamanoharan, on the paper's LessWrong post: mixing the two is
worse). Trainable in both, as SAELens does; on SmolLM2 activations this gives SAELens' FVU at
equal L0, where the paper's unit-norm version was 7% worse (``benchmarks/bench_train.py``).
Shape letters: B batch, D d_in, F d_sae.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .sae import SAE, SAEConfig, StepOutput, mse


@dataclass(frozen=True)
class GatedConfig(SAEConfig):
    l1_coeff: float = 1.0
    """lambda: weight of the L1 penalty on the gate's ReLU."""

    arch: ClassVar[str] = "gated"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l1_coeff < 0:
            raise ValueError(f"l1_coeff must be >= 0, got {self.l1_coeff}")


class GatedSAE(SAE):
    cfg: GatedConfig
    saelens_architecture: ClassVar[str] = "gated"

    def __init__(self, cfg: GatedConfig):
        super().__init__(cfg)
        del self.b_enc  # the gate's bias takes its place
        self.b_gate = nn.Parameter(torch.zeros(cfg.d_sae))
        self.r_mag = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_mag = nn.Parameter(torch.zeros(cfg.d_sae))

    def _paths(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_in_BD = x_BD - self.b_dec
        gate_BF = torch.addmm(self.b_gate, x_in_BD, self.W_enc)
        mag_BF = x_in_BD @ self.W_enc * self.r_mag.exp() + self.b_mag
        return gate_BF, mag_BF

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        gate_BF, mag_BF = self._paths(x_BD)
        return (gate_BF > 0) * torch.relu(mag_BF)

    def training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None) -> StepOutput:
        gate_BF, mag_BF = self._paths(x_BD)
        active_BF = gate_BF > 0
        f_BF = active_BF * torch.relu(mag_BF)
        recon_BD = self.decode(f_BF)
        gate_relu_BF = torch.relu(gate_BF)
        l2 = mse(x_BD, recon_BD)
        l1 = (gate_relu_BF * self.W_dec.norm(dim=1)).sum(-1).mean()  # decoder-norm-weighted L1
        aux = mse(x_BD, self.decode(gate_relu_BF))  # auxiliary: the gate path alone, decoder trainable
        loss = l2 + sparsity_scale * self.cfg.l1_coeff * l1 + aux
        terms = {"mse": l2.detach(), "l1": l1.detach(), "aux": aux.detach()}
        return StepOutput(loss, recon_BD.detach(), active_BF.sum(-1).float().mean(), active_BF.any(0), terms)

    @torch.no_grad()
    def saelens_state(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        return {
            "W_enc": (self.W_enc * scale).contiguous(), "W_dec": (self.W_dec / scale).contiguous(),
            "b_dec": self.b_dec / scale, "b_gate": self.b_gate.clone(), "r_mag": self.r_mag.clone(), "b_mag": self.b_mag.clone(),
        }

    def saelens_config(self) -> dict[str, Any]:
        return {"architecture": "gated"}
