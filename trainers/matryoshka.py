"""Matryoshka BatchTopK SAE (Bussmann, Nabeshima, Karvonen & Nanda 2025, arXiv 2503.17547).

A BatchTopK SAE (:mod:`trainers.batchtopk`: the ``B K`` largest ReLU pre-activations of a batch
kept, AuxK for dead latents, a global threshold ``theta`` learned for inference) whose latents
are ordered in nested prefixes ("levels") of widths ``m_1 < m_2 < ... < m_L = F``. Each prefix
alone must reconstruct the input (§3, Eq. 2)::

    L = sum_l ||x - (f[:, :m_l] W_dec[:m_l] + b_dec)||^2 + alpha * AuxK

so early latents learn general, frequent features and later ones refine them instead of
absorbing them. The full level's term is the BatchTopK loss; the inner levels add their own
reconstruction errors (as SAELens' ``matryoshka_batchtopk`` trainer does). Inference is the
BatchTopK SAE's: a JumpReLU with the learned threshold, saved as a SAELens ``jumprelu`` SAE.
Shape letters: B batch, D d_in, F d_sae.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch

from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .sae import mse

DEFAULT_LEVELS = (8, 4, 2, 1)
"""Without ``widths``: levels at ``F/8, F/4, F/2, F``."""


@dataclass(frozen=True)
class MatryoshkaConfig(BatchTopKConfig):
    widths: tuple[int, ...] = ()
    """Widths of the nested levels, increasing, the last equal to d_sae (empty: F/8, F/4, F/2, F)."""

    arch: ClassVar[str] = "matryoshka"

    def __post_init__(self) -> None:
        super().__post_init__()
        widths = tuple(int(w) for w in self.widths) or tuple(sorted({max(1, self.d_sae // n) for n in DEFAULT_LEVELS}))
        if any(b <= a for a, b in zip(widths, widths[1:], strict=False)) or widths[0] < 1:
            raise ValueError(f"Matryoshka widths must be positive and increasing, got {list(widths)}")
        if widths[-1] != self.d_sae:
            raise ValueError(f"the last Matryoshka width must be the SAE width d_sae ({self.d_sae}), got {list(widths)}; "
                             f"end the list with {self.d_sae}")
        object.__setattr__(self, "widths", widths)


class MatryoshkaSAE(BatchTopKSAE):
    cfg: MatryoshkaConfig

    def extra_losses(self, y_BO: torch.Tensor, decode_prefix: Callable[[int], torch.Tensor]) -> dict[str, torch.Tensor]:
        """``mse_<m>``: the error of the first ``m`` latents alone, for every inner level (the
        full level's is BatchTopK's ``mse``)."""
        return {f"mse_{width}": mse(y_BO, decode_prefix(width) + self.b_dec) for width in self.cfg.widths[:-1]}
