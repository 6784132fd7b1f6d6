"""SAE architectures and the training loop; trainers take any iterator of activation tensors.

One file per architecture (``relu``, ``topk``, ``batchtopk``, ``gated``, ``jumprelu``,
``matryoshka``, the transcoders of :mod:`trainers.transcoder`, ``crosscoder``), each a
config dataclass and an :class:`~trainers.sae.SAE` subclass; :mod:`trainers.trainer` fits
several SAEs on each batch read once; :mod:`trainers.saelens_format` saves and loads SAELens'
``cfg.json`` + ``sae_weights.safetensors``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .batchtopk import BatchTopKConfig, BatchTopKSAE
from .crosscoder import CrosscoderConfig, CrosscoderSAE
from .gated import GatedConfig, GatedSAE
from .jumprelu import JumpReLUConfig, JumpReLUSAE
from .matryoshka import MatryoshkaConfig, MatryoshkaSAE
from .relu import ReLUConfig, ReLUSAE
from .sae import SAE, SAEConfig, StepOutput, fvu
from .topk import TopKConfig, TopKSAE
from .transcoder import TRANSCODERS

ARCHITECTURES: dict[str, tuple[type[SAEConfig], type[SAE]]] = {
    "relu": (ReLUConfig, ReLUSAE),
    "topk": (TopKConfig, TopKSAE),
    "batchtopk": (BatchTopKConfig, BatchTopKSAE),
    "gated": (GatedConfig, GatedSAE),
    "jumprelu": (JumpReLUConfig, JumpReLUSAE),
    "matryoshka": (MatryoshkaConfig, MatryoshkaSAE),
    **TRANSCODERS,
    "crosscoder": (CrosscoderConfig, CrosscoderSAE),
}


def sae_config(arch: str, **fields: Any) -> SAEConfig:
    """The config of architecture ``arch``; unknown architectures or settings are ValueErrors."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown SAE architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}")
    cls = ARCHITECTURES[arch][0]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)} for a {arch} SAE; known: {', '.join(sorted(known))}")
    return cls(**fields)


def make_sae(cfg: SAEConfig) -> SAE:
    """A freshly initialised SAE for ``cfg``."""
    return ARCHITECTURES[cfg.arch][1](cfg)


__all__ = ["ARCHITECTURES", "SAE", "SAEConfig", "StepOutput", "fvu", "make_sae", "sae_config"]
