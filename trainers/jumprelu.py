"""JumpReLU SAE trained with straight-through estimators (Rajamanoharan et al. 2024, arXiv 2407.14435).

- Latents (§2): ``f = JumpReLU_theta(pre) = pre * H(pre - theta)``, a learned threshold
  ``theta_i >= 0`` per latent (H the Heaviside step).
- Threshold parameter: ``threshold_param="direct"`` (default) trains ``theta`` itself, put back
  to ``max(theta, 0)`` after every step; ``"log"`` trains ``log theta`` as the paper does (§4).
  Adam moves a parameter by about the learning rate per step, so under ``log`` a threshold
  moves by a factor ``exp(lr)`` per step and barely leaves a small initial value in a short
  run (L0 then stays far above what the penalty asks for); ``direct`` moves it by about ``lr``
  per step, as SAELens does (its issue #494).
- Loss (§3): ``||x - x_hat||^2 + lambda ||f||_0``: the L0 itself, not an L1 proxy.
- Gradients through the discontinuities (§3, pseudo-derivatives with a kernel ``K`` and
  bandwidth ``eps``; here the rectangle ``K(u) = 1[|u| < 1/2]``):
  ``d JumpReLU / d theta = -(theta / eps) K((pre - theta) / eps)`` and
  ``d H(pre - theta) / d theta = -(1 / eps) K((pre - theta) / eps)``; with respect to ``pre``
  JumpReLU passes ``H(pre - theta)`` and the step passes nothing.
- Optional ``target_l0`` (not in the paper): the penalty becomes
  ``lambda (L0 / target_l0 - 1)^2``, pulling the mean L0 towards a chosen value.
Decoder rows free (no norm constraint): the L0 penalty does not depend on latent magnitudes, so
nothing pushes the decoder norms to grow to shrink latents (the reason ReLU SAEs constrain or
weight by them), and SAELens' JumpReLU trains them free too. With unit-norm rows instead, FVU on
SmolLM2 activations was 14% above SAELens' at nearly equal L0; free, it matches
(``benchmarks/bench_train.py``).
Shape letters: B batch, D d_in, F d_sae.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from .sae import SAE, SAEConfig, StepOutput, mse


@dataclass(frozen=True)
class JumpReLUConfig(SAEConfig):
    l0_coeff: float = 1e-3
    """lambda: weight of the L0 penalty."""
    bandwidth: float = 1e-3
    """eps: width of the rectangle kernel of the pseudo-derivatives."""
    init_threshold: float = 1e-3
    """Initial theta for every latent."""
    target_l0: float | None = None
    """If set, penalise ``(L0 / target_l0 - 1)^2`` instead of L0."""
    threshold_param: Literal["direct", "log"] = "direct"
    """Train ``theta`` itself (clamped at 0) or ``log theta`` (see the module docstring)."""

    arch: ClassVar[str] = "jumprelu"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.l0_coeff < 0 or self.bandwidth <= 0 or self.init_threshold <= 0:
            raise ValueError("l0_coeff must be >= 0, bandwidth and init_threshold > 0")
        if self.target_l0 is not None and not 0 < self.target_l0 <= self.d_sae:
            raise ValueError(f"target_l0 must be in (0, d_sae], got {self.target_l0}")
        if self.threshold_param not in ("direct", "log"):
            raise ValueError(f"threshold_param must be 'direct' or 'log', got {self.threshold_param!r}")


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BF: torch.Tensor, theta_F: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.eps = eps
        return pre_BF * (pre_BF > theta_F)

    @staticmethod
    def backward(ctx, g_BF: torch.Tensor):
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.eps
        grad_pre = g_BF * (pre_BF > theta_F)
        grad_theta = (g_BF * -(theta_F / eps) * _rectangle((pre_BF - theta_F) / eps)).sum(0)
        return grad_pre, grad_theta, None


class _Step(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pre_BF: torch.Tensor, theta_F: torch.Tensor, eps: float) -> torch.Tensor:
        ctx.save_for_backward(pre_BF, theta_F)
        ctx.eps = eps
        return (pre_BF > theta_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, g_BF: torch.Tensor):
        pre_BF, theta_F = ctx.saved_tensors
        eps = ctx.eps
        grad_theta = (g_BF * -(1.0 / eps) * _rectangle((pre_BF - theta_F) / eps)).sum(0)
        return None, grad_theta, None


class JumpReLUSAE(SAE):
    cfg: JumpReLUConfig
    saelens_architecture: ClassVar[str] = "jumprelu"

    def __init__(self, cfg: JumpReLUConfig):
        super().__init__(cfg)
        if cfg.threshold_param == "direct":
            self.theta = nn.Parameter(torch.full((cfg.d_sae,), cfg.init_threshold))
        else:
            self.log_threshold = nn.Parameter(torch.full((cfg.d_sae,), math.log(cfg.init_threshold)))

    @property
    def threshold(self) -> torch.Tensor:
        """``theta``, per latent."""
        return self.theta if self.cfg.threshold_param == "direct" else self.log_threshold.exp()

    @torch.no_grad()
    def set_threshold(self, theta_F: torch.Tensor) -> None:
        if self.cfg.threshold_param == "direct":
            self.theta.copy_(theta_F.clamp_min(0))
        else:
            self.log_threshold.copy_(theta_F.float().clamp_min(1e-30).log())

    @torch.no_grad()
    def after_step(self) -> None:
        super().after_step()
        if self.cfg.threshold_param == "direct":
            self.theta.clamp_(min=0.0)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Checkpoints of either parametrisation load into both (older ones trained ``log theta``)."""
        theta, log = prefix + "theta", prefix + "log_threshold"
        if self.cfg.threshold_param == "direct" and log in state_dict and theta not in state_dict:
            state_dict[theta] = state_dict.pop(log).exp()
        elif self.cfg.threshold_param == "log" and theta in state_dict and log not in state_dict:
            state_dict[log] = state_dict.pop(theta).clamp_min(1e-30).log()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        pre_BF = self.pre_acts(x_BD)
        return pre_BF * (pre_BF > self.threshold)

    def training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None,
                      target_BO: torch.Tensor | None = None) -> StepOutput:
        """``target_BO``: what the decoder must reproduce (a transcoder's output; ``x`` when None)."""
        pre_BF = self.pre_acts(x_BD)
        theta_F = self.threshold
        f_BF = _JumpReLU.apply(pre_BF, theta_F, self.cfg.bandwidth)
        recon_BD = self.add_skip(x_BD, self.decode(f_BF))
        l2 = mse(x_BD if target_BO is None else target_BO, recon_BD)
        l0 = _Step.apply(pre_BF, theta_F, self.cfg.bandwidth).sum(-1).mean()
        penalty = l0 if self.cfg.target_l0 is None else (l0 / self.cfg.target_l0 - 1) ** 2
        loss = l2 + sparsity_scale * self.cfg.l0_coeff * penalty
        active_BF = f_BF.detach() != 0
        return StepOutput(loss, recon_BD.detach(), l0.detach(), active_BF.any(0), {"mse": l2.detach(), "l0_penalty": penalty.detach()})

    @torch.no_grad()
    def saelens_state(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        state = super().saelens_state(scale)
        state["threshold"] = self.threshold.clone()
        return state

    def saelens_config(self) -> dict[str, Any]:
        return {"architecture": "jumprelu"}
