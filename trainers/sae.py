"""The SAE base class every architecture file builds on, and the numbers all of them report.

An SAE maps an activation ``x`` to latents ``f`` and back (Bricken et al. 2023, "Towards
Monosemanticity", §Problem setup; the decoder bias subtracted first, as in Gao et al. 2024,
arXiv 2406.04093 §2.1)::

    pre  = (x - b_dec) @ W_enc + b_enc        # [B, F]
    f    = act(pre)                           # architecture-specific, sparse
    x_hat = f @ W_dec + b_dec                 # [B, D]

A transcoder (:mod:`trainers.transcoder`; Dunefsky et al. 2024, arXiv 2406.11944) reads one
activation and writes another (an MLP's input ``x`` and output ``y``, widths D and O): its
encoder reads ``x`` itself (:attr:`SAE.center_input` off), its decoder writes ``y_hat [B, O]``,
and a skip-transcoder adds ``x @ W_skip^T`` (Paulo et al. 2025, arXiv 2501.18823).

Each architecture (``relu``, ``topk``, ``batchtopk``, ``gated``, ``jumprelu``) overrides
:meth:`SAE.encode` and :meth:`SAE.training_step`, which returns a :class:`StepOutput`: the
loss to minimise and detached metrics. Metrics (Gao et al. 2024 §2.2 for FVU):

- ``mse``: mean over tokens of ``||x - x_hat||^2``;
- ``fvu``: fraction of variance unexplained, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``;
- ``l0``: mean number of active latents per token.

Weights use SAELens' names and layouts (``W_enc [D, F]``, ``W_dec [F, D]``) so saving is a
rename-free copy (:mod:`trainers.saelens_format`); the encoder is stored latent-major
(``W_enc_FD``, ``W_enc`` its transposed view) so the sparse TopK gradient lands in storage
order without a transposing copy.
Shape letters: B batch, D input width (d_in), F latents (d_sae), K active latents per token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn


@dataclass(frozen=True)
class SAEConfig:
    """Shape of an SAE; each architecture's config adds its own hyperparameters."""

    d_in: int
    """Width of the activations (D)."""
    d_sae: int
    """Number of latents (F)."""
    seed: int = 0
    """Seed of the initial weights."""

    arch: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in and d_sae must be positive, got {self.d_in} and {self.d_sae}")

    def hyperparameters(self) -> dict[str, Any]:
        """The architecture's own settings (for tables and ``cfg.json``)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("d_in", "d_sae", "seed")}


class StepOutput(NamedTuple):
    """One training forward pass."""

    loss: torch.Tensor
    """Scalar to minimise."""
    recon_BD: torch.Tensor
    """Reconstruction (detached)."""
    l0: torch.Tensor
    """Mean active latents per token (detached)."""
    fired_F: torch.Tensor
    """bool: latents active on at least one token of the batch."""
    terms: dict[str, torch.Tensor]
    """Named loss terms (detached), for logging."""


def fvu(x_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2``."""
    resid = (x_BD - recon_BD).float().pow(2).sum()
    total = (x_BD - x_BD.mean(0, keepdim=True)).float().pow(2).sum()
    return resid / total.clamp_min(1e-12)


def mse(x_BD: torch.Tensor, recon_BD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of the squared reconstruction error."""
    return (x_BD - recon_BD).float().pow(2).sum(-1).mean()


class SAE(nn.Module):
    """Weights shared by all architectures and the plain encode/decode; see the module docstring."""

    unit_norm_decoder: ClassVar[bool] = False
    """Whether decoder rows are kept at unit norm (and gradients along them removed)."""
    saelens_architecture: ClassVar[str] = "standard"
    center_input: ClassVar[bool] = True
    """The encoder reads ``x - b_dec`` (an SAE); transcoders read ``x``, their ``b_dec`` being the output's."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        # decoder rows: random unit directions; encoder: its transpose (Gao et al. 2024 §2.4 / A.1)
        W_dec_FD = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        W_dec_FD /= W_dec_FD.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec_FD)
        self.W_enc_FD = nn.Parameter(W_dec_FD.clone())
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    @property
    def W_enc(self) -> torch.Tensor:
        """The encoder ``[D, F]`` (a view of ``W_enc_FD``; writes go through)."""
        return self.W_enc_FD.T

    # ---- inference ------------------------------------------------------------------------
    def sae_in(self, x_BD: torch.Tensor) -> torch.Tensor:
        """What the encoder multiplies: ``x - b_dec`` for an SAE, ``x`` for a transcoder."""
        return x_BD - self.b_dec if self.center_input else x_BD

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_enc, self.sae_in(x_BD), self.W_enc)

    def add_skip(self, x_BD: torch.Tensor, recon_BO: torch.Tensor) -> torch.Tensor:
        """``recon`` plus what a skip connection adds from the input (nothing here; see
        :class:`trainers.transcoder.Transcoding`)."""
        return recon_BO

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Latents ``f [B, F]`` (dense)."""
        raise NotImplementedError

    def decode(self, f_BF: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.b_dec, f_BF, self.W_dec)

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Reconstruction of ``x`` (a transcoder's prediction of its output)."""
        return self.add_skip(x_BD, self.decode(self.encode(x_BD)))

    # ---- training -------------------------------------------------------------------------
    def training_step(self, x_BD: torch.Tensor, sparsity_scale: float = 1.0, dead_F: torch.Tensor | None = None) -> StepOutput:
        """Loss and metrics for a batch. ``sparsity_scale`` in [0, 1] warms the sparsity
        penalty up; ``dead_F`` marks latents that have not fired for long (for AuxK)."""
        raise NotImplementedError

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm (after each optimiser step, where required)."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def after_step(self) -> None:
        """Constraints put back after each optimiser step (unit-norm decoder rows, where required)."""
        if self.unit_norm_decoder:
            self.normalize_decoder()

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the part of each decoder row's gradient along the row (Bricken et al. 2023,
        §Appendix: Autoencoder training details), so the unit-norm step loses nothing."""
        if self.W_dec.grad is None:
            return
        W_FD = self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)
        self.W_dec.grad -= (self.W_dec.grad * W_FD).sum(1, keepdim=True) * W_FD

    # ---- export ---------------------------------------------------------------------------
    @torch.no_grad()
    def saelens_state(self, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """Weights for raw activations when trained on ``scale * x`` (see ``actstore.stream``):
        ``W_enc * s``, ``W_dec / s``, ``b_dec / s``; pre-activations are unchanged."""
        return {
            "W_enc": (self.W_enc * scale).contiguous(), "W_dec": (self.W_dec / scale).contiguous(),
            "b_enc": self.b_enc.clone(), "b_dec": self.b_dec / scale,
        }

    def saelens_config(self) -> dict[str, Any]:
        """Architecture fields of SAELens' ``cfg.json``."""
        return {"architecture": self.saelens_architecture}
