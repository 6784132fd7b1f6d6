"""Transcoders and skip-transcoders: sparse dictionaries from one activation to another.

A transcoder (Dunefsky, Chlenski & Nanda 2024, arXiv 2406.11944, §3.1) approximates an MLP:
it reads the MLP's input ``x`` (site ``mlp_in``, width D) and predicts its output ``y`` (site
``mlp_out``, width O) through sparse latents::

    pre   = x @ W_enc + b_enc                    # [B, F]: x itself, no input centring
    f     = act(pre)                             # TopK, BatchTopK or JumpReLU
    y_hat = f @ W_dec + b_dec                    # [B, O]
    loss  = ||y - y_hat||^2 + the sparsity terms of act

A skip-transcoder (Paulo, Shabalin & Belrose 2025, arXiv 2501.18823, §2) adds a dense linear
path, ``y_hat += x @ W_skip^T`` (``W_skip [O, D]``, zero at the start), which takes the MLP's
linear part so the latents need not: at the same L0 it reconstructs better (their Fig. 2).

Each sparsity keeps its own file's training step (:mod:`trainers.topk`, with the sparse kernels,
:mod:`trainers.batchtopk`, :mod:`trainers.jumprelu`); :class:`Transcoding` changes only what
the encoder reads (:attr:`~trainers.sae.SAE.center_input`), the decoder's width and the skip
path, and the step is given the target ``y``. Saved in SAELens' transcoder format
(:mod:`trainers.saelens_format`): ``d_out``, ``W_dec [F, O]``, ``b_dec [O]`` and ``W_skip``;
JumpReLU and BatchTopK (as a JumpReLU with its learned threshold) as SAELens'
``jumprelu_transcoder`` / ``jumprelu_skip_transcoder``, which ``SAE.load_from_disk`` reads;
TopK as ``topk_transcoder`` / ``topk_skip_transcoder``, which SAELens does not have (actstore
loads them).
Shape letters: B batch, D input width (d_in), O output width (d_out), F latents (d_sae).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .sae import SAE
from .topk import TopKConfig, TopKSAE


@dataclass(frozen=True, kw_only=True)
class TranscoderFields:
    """What a transcoder config adds to its sparsity's: the output width and the skip path."""

    d_out: int = 0
    """Width of the output activation (O); 0 takes ``d_in``."""
    skip: bool = False
    """Add the dense ``x @ W_skip^T`` path (a skip-transcoder)."""

    @property
    def width_out(self) -> int:
        return self.d_out or self.d_in  # type: ignore[attr-defined]

    def check_out(self) -> None:
        if self.d_out < 0:
            raise ValueError(f"d_out must be positive (or 0 for d_in), got {self.d_out}")


@dataclass(frozen=True)
class TopKTranscoderConfig(TopKConfig, TranscoderFields):
    arch: ClassVar[str] = "topk-transcoder"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_out()


@dataclass(frozen=True)
class BatchTopKTranscoderConfig(BatchTopKConfig, TranscoderFields):
    arch: ClassVar[str] = "batchtopk-transcoder"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_out()


@dataclass(frozen=True)
class JumpReLUTranscoderConfig(JumpReLUConfig, TranscoderFields):
    arch: ClassVar[str] = "jumprelu-transcoder"

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_out()


class Transcoding(SAE):
    """Mixed in before a sparsity's SAE class: the encoder reads ``x``, the decoder writes ``O``
    wide, and with ``skip`` a dense ``W_skip [O, D]`` path (zero at the start) is added."""

    center_input: ClassVar[bool] = False

    def __init__(self, cfg: Any):
        super().__init__(cfg)
        if cfg.width_out != cfg.d_in:  # decoder rows: random unit directions of the output space
            gen = torch.Generator().manual_seed(cfg.seed + 1)
            W_dec_FO = torch.randn(cfg.d_sae, cfg.width_out, generator=gen)
            self.W_dec = nn.Parameter(W_dec_FO / W_dec_FO.norm(dim=1, keepdim=True))
            self.b_dec = nn.Parameter(torch.zeros(cfg.width_out))
        if cfg.skip:
            self.W_skip = nn.Parameter(torch.zeros(cfg.width_out, cfg.d_in))

    def add_skip(self, x_BD: torch.Tensor, recon_BO: torch.Tensor) -> torch.Tensor:
        if not self.cfg.skip:
            return recon_BO
        return recon_BO + x_BD.to(self.W_skip.dtype) @ self.W_skip.T

    @torch.no_grad()
    def saelens_state(self, scale: float = 1.0, scale_out: float | None = None) -> dict[str, torch.Tensor]:
        """Weights for raw activations when trained on ``scale * x`` and ``scale_out * y``:
        ``W_enc * s``, ``W_dec / s_out``, ``b_dec / s_out``, ``W_skip * s / s_out``."""
        s_out = scale if scale_out is None else scale_out
        state = super().saelens_state(scale)
        state["W_dec"], state["b_dec"] = (self.W_dec / s_out).contiguous(), self.b_dec / s_out
        if self.cfg.skip:
            state["W_skip"] = (self.W_skip * (scale / s_out)).contiguous()
        return state

    def saelens_config(self) -> dict[str, Any]:
        base = super().saelens_config()["architecture"]  # the sparsity's: topk or jumprelu
        kind = "skip_transcoder" if self.cfg.skip else "transcoder"
        return {**super().saelens_config(), "architecture": f"{base}_{kind}", "d_out": self.cfg.width_out}


class TopKTranscoder(Transcoding, TopKSAE):
    cfg: TopKTranscoderConfig


class BatchTopKTranscoder(Transcoding, BatchTopKSAE):
    cfg: BatchTopKTranscoderConfig


class JumpReLUTranscoder(Transcoding, JumpReLUSAE):
    cfg: JumpReLUTranscoderConfig


TRANSCODERS = {
    "topk-transcoder": (TopKTranscoderConfig, TopKTranscoder),
    "batchtopk-transcoder": (BatchTopKTranscoderConfig, BatchTopKTranscoder),
    "jumprelu-transcoder": (JumpReLUTranscoderConfig, JumpReLUTranscoder),
}
"""Transcoder architectures by name (``train-sae --arch``), each a sparsity's SAE made a transcoder."""


def is_transcoder(arch: str) -> bool:
    return arch in TRANSCODERS
