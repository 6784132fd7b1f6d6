"""Crosscoders: one dictionary read from and written to several layers at once.

A crosscoder (Lindsey et al. 2024, "Sparse Crosscoders for Cross-Layer Features and Model
Diffing", transformer-circuits.pub, §"Crosscoder basics") encodes the activations of ``L``
layers of one token together and reconstructs every one of them from shared latents::

    pre   = sum_l x_l @ W_enc[l] + b_enc          # [B, F]
    f     = ReLU(TopK_K(pre))                     # K active latents shared by all layers
    x_l^  = f @ W_dec[:, l] + b_dec[l]            # [B, D] for each layer l
    loss  = sum_l ||x_l - x_l^||^2 (+ AuxK)

With ``x`` the layers side by side (``[B, L D]``), ``W_enc`` stacked as ``[L D, F]`` and
``W_dec`` as ``[F, L D]`` this is exactly a TopK SAE of width ``L D`` (Gao et al. 2024, arXiv
2406.04093: ``x - b_dec`` encoded, decoder rows at unit norm over all layers, AuxK), so
:class:`CrosscoderSAE` is :class:`~trainers.topk.TopKSAE` with the sparse kernels, trained on
flattened batches (:func:`flatten_layers`), each layer normalised by its own scale. A latent's
decoder norm per layer, ``||W_dec[f, l]||``, tells which layers it writes
(:func:`layer_norms`, :func:`shared_latents`).

Saved as ``crosscoder.safetensors`` + ``cfg.json`` (:func:`save_crosscoder`), layout:

- ``W_enc [L, D, F]``, ``b_enc [F]``, ``W_dec [F, L, D]``, ``b_dec [L, D]``, float32, for raw
  activations (layer ``l``'s scale ``s_l`` folded in: ``W_enc[l] * s_l``, ``W_dec[:, l] / s_l``,
  ``b_dec[l] / s_l``); the encoder reads ``x - b_dec`` layer by layer, as above;
- ``cfg.json``: ``architecture: "crosscoder"``, ``activation: "topk"``, ``k``, ``d_in`` (one
  layer's width D), ``n_layers`` (L), ``d_sae`` (F), ``hook_names`` (the L hooks, in the order of
  the weights' layer axis), ``model_name``, ``context_size``, ``prepend_bos``, ``dtype``, and
  actstore's own settings under ``actstore``.

:func:`load_crosscoder` reads it back. Shape letters: B batch, L layers, D one layer's width,
F latents, K active latents per token.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file

from .topk import TopKConfig, TopKSAE

CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "crosscoder.safetensors"
SHARED_FRACTION = 0.25
"""A latent writes layer ``l`` when ``||W_dec[f, l]||`` is at least this fraction of its largest layer's."""


@dataclass(frozen=True, kw_only=True)
class CrosscoderFields:
    n_layers: int = 1
    """Layers read and written (L); ``d_in`` is their total width, ``L D``."""


@dataclass(frozen=True)
class CrosscoderConfig(TopKConfig, CrosscoderFields):
    arch: ClassVar[str] = "crosscoder"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.n_layers < 1 or self.d_in % self.n_layers:
            raise ValueError(f"a crosscoder's d_in ({self.d_in}) must be n_layers ({self.n_layers}) layers of one width")

    @property
    def d_layer(self) -> int:
        """One layer's width (D)."""
        return self.d_in // self.n_layers


class CrosscoderSAE(TopKSAE):
    """A TopK SAE on the layers side by side (see the module docstring)."""

    cfg: CrosscoderConfig

    @torch.no_grad()
    def layer_norms(self) -> torch.Tensor:
        """``||W_dec[f, l]||``, ``[F, L]``."""
        return self.W_dec.view(self.cfg.d_sae, self.cfg.n_layers, self.cfg.d_layer).norm(dim=-1)


def flatten_layers(x_BLD: torch.Tensor) -> torch.Tensor:
    """``[B, L, D]`` to ``[B, L D]``, layer by layer (the crosscoder's input)."""
    return x_BLD.reshape(len(x_BLD), -1)


def shared_latents(sae: CrosscoderSAE, fraction: float = SHARED_FRACTION) -> int:
    """Latents writing two layers or more (decoder norm at least ``fraction`` of their largest layer's)."""
    norms_FL = sae.layer_norms()
    writes_FL = norms_FL >= fraction * norms_FL.max(dim=1, keepdim=True).values.clamp_min(1e-12)
    return int((writes_FL.sum(1) >= 2).sum())


@torch.no_grad()
def layer_fvus(sae: CrosscoderSAE, batches, device: str = "cpu") -> list[float]:
    """Held-out FVU of each layer (pooled over tokens) for ``[B, L D]`` batches."""
    L, D = sae.cfg.n_layers, sae.cfg.d_layer
    resid_L = torch.zeros(L, dtype=torch.float64)
    sum_LD = torch.zeros(L, D, dtype=torch.float64)
    sq_L = torch.zeros(L, dtype=torch.float64)
    n = 0
    for x in batches:
        x_BLD = x.to(device).float().view(len(x), L, D)
        recon_BLD = sae(x_BLD.reshape(len(x), -1)).view(len(x), L, D)
        resid_L += (x_BLD - recon_BLD).double().pow(2).sum((0, 2)).cpu()
        sum_LD += x_BLD.double().sum(0).cpu()
        sq_L += x_BLD.double().pow(2).sum((0, 2)).cpu()
        n += len(x)
    if not n:
        raise ValueError("no evaluation tokens")
    total_L = sq_L - sum_LD.pow(2).sum(1) / n
    return (resid_L / total_L.clamp_min(1e-12)).tolist()


def save_crosscoder(sae: CrosscoderSAE, out_dir: str | Path, hooks: list[str], scales: list[float], model_name: str,
                    context_size: int, prepend_bos: bool = True, extra: dict[str, Any] | None = None) -> Path:
    """Write ``sae`` (trained on layer ``l`` times ``scales[l]``) to ``out_dir`` (the layout of the module docstring)."""
    L, D, F = sae.cfg.n_layers, sae.cfg.d_layer, sae.cfg.d_sae
    if len(hooks) != L or len(scales) != L:
        raise ValueError(f"a crosscoder of {L} layers needs {L} hooks and scales, got {len(hooks)} and {len(scales)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    s_L11 = torch.tensor(scales, dtype=torch.float32).view(L, 1, 1)
    with torch.no_grad():
        state = {
            "W_enc": (sae.W_enc.detach().float().cpu().view(L, D, F) * s_L11).contiguous(),
            "b_enc": sae.b_enc.detach().float().cpu().contiguous(),
            "W_dec": (sae.W_dec.detach().float().cpu().view(F, L, D) / s_L11.view(1, L, 1)).contiguous(),
            "b_dec": (sae.b_dec.detach().float().cpu().view(L, D) / s_L11.view(L, 1)).contiguous(),
        }
    save_file(state, str(out / WEIGHTS_FILE), metadata={"hook_names": json.dumps(hooks)})
    cfg = {"architecture": "crosscoder", "activation": "topk", "k": sae.cfg.k, "d_in": D, "n_layers": L, "d_sae": F,
           "hook_names": list(hooks), "model_name": model_name, "context_size": context_size, "prepend_bos": prepend_bos,
           "dtype": "float32",
           "actstore": {"arch": sae.cfg.arch, "settings": sae.cfg.hyperparameters(), "scales_folded": list(scales), **(extra or {})}}
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def is_crosscoder_folder(path: str | Path) -> bool:
    return (Path(path) / WEIGHTS_FILE).is_file()


def load_crosscoder(path: str | Path) -> tuple[CrosscoderSAE, list[str], dict[str, Any]]:
    """``(crosscoder for raw activations, its hooks, cfg.json)`` from a folder :func:`save_crosscoder` wrote."""
    root = Path(path)
    if not (root / CONFIG_FILE).is_file() or not is_crosscoder_folder(root):
        raise FileNotFoundError(f"{root} is not a crosscoder folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads((root / CONFIG_FILE).read_text())
        L, D, F, k = int(cfg["n_layers"]), int(cfg["d_in"]), int(cfg["d_sae"]), int(cfg["k"])
        hooks = list(cfg["hook_names"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{root / CONFIG_FILE} is not a crosscoder config ({type(e).__name__}: {e})") from None
    settings = {k_: v for k_, v in cfg.get("actstore", {}).get("settings", {}).items() if k_ not in ("k", "n_layers")}
    sae = CrosscoderSAE(CrosscoderConfig(d_in=L * D, d_sae=F, k=k, n_layers=L, **settings))
    state = load_file(str(root / WEIGHTS_FILE))
    want = {"W_enc": (L, D, F), "b_enc": (F,), "W_dec": (F, L, D), "b_dec": (L, D)}
    for name, shape in want.items():
        if name not in state or tuple(state[name].shape) != shape:
            got = tuple(state[name].shape) if name in state else "missing"
            raise ValueError(f"{root / WEIGHTS_FILE}: {name} is {got}, but {CONFIG_FILE} (L {L}, D {D}, F {F}) needs {shape}")
    with torch.no_grad():
        sae.W_enc_FD.copy_(state["W_enc"].reshape(L * D, F).T)
        sae.b_enc.copy_(state["b_enc"])
        sae.W_dec.copy_(state["W_dec"].reshape(F, L * D))
        sae.b_dec.copy_(state["b_dec"].reshape(L * D))
    return sae, hooks, cfg
