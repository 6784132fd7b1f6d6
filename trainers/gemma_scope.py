"""Import Gemma Scope SAEs (``params.npz``) as actstore JumpReLU SAEs.

Gemma Scope (Lieberum et al. 2024, arXiv 2408.05147, §3; JumpReLU as in arXiv 2407.14435 §2)
releases each SAE as a ``params.npz`` holding ``W_enc [D, F]``, ``W_dec [F, D]``, ``b_enc [F]``,
``b_dec [D]`` and ``threshold [F]``, with the encoder applied to the raw activation::

    pre = x @ W_enc + b_enc,   f = pre * H(pre - threshold),   x_hat = f @ W_dec + b_dec

actstore's SAEs subtract ``b_dec`` before encoding (``pre = (x - b_dec) @ W_enc + b_enc'``),
so the import folds it into the encoder bias, ``b_enc' = b_enc + b_dec @ W_enc``: the same
pre-activations, hence the same latents and reconstruction (up to float rounding).
The folder names of the release say where an SAE reads (``layer_12/width_16k/average_l0_82``
for the residual stream after layer 12: ``blocks.12.hook_resid_post``).
Shape letters: D d_in, F d_sae.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch

from .jumprelu import JumpReLUConfig, JumpReLUSAE

KEYS = ("W_enc", "W_dec", "b_enc", "b_dec", "threshold")


def load_gemma_scope(path: str | Path) -> JumpReLUSAE:
    """The JumpReLU SAE stored in a Gemma Scope ``params.npz``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{p} does not exist; give the path of a Gemma Scope params.npz file")
    try:
        with np.load(p) as npz:
            arrays = {k: torch.from_numpy(np.asarray(npz[k], dtype=np.float32)) for k in KEYS if k in npz.files}
            missing = [k for k in KEYS if k not in npz.files]
    except (ValueError, OSError) as e:
        raise ValueError(f"{p} is not a readable .npz file ({e})") from None
    if missing:
        raise ValueError(f"{p} lacks {', '.join(missing)}: not a Gemma Scope params.npz (needs {', '.join(KEYS)})")
    W_enc_DF, W_dec_FD = arrays["W_enc"], arrays["W_dec"]
    d_in, d_sae = W_enc_DF.shape
    expected = {"W_dec": (d_sae, d_in), "b_enc": (d_sae,), "b_dec": (d_in,), "threshold": (d_sae,)}
    for name, shape in expected.items():
        if tuple(arrays[name].shape) != shape:
            raise ValueError(f"{p}: {name} has shape {tuple(arrays[name].shape)}, expected {shape} for W_enc {tuple(W_enc_DF.shape)}")
    sae = JumpReLUSAE(JumpReLUConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_enc.copy_(W_enc_DF)
        sae.W_dec.copy_(W_dec_FD)
        sae.b_dec.copy_(arrays["b_dec"])
        sae.b_enc.copy_(arrays["b_enc"] + (arrays["b_dec"].double() @ W_enc_DF.double()).float())
        # a zero threshold (latent always on when positive) stays representable in log space
        sae.set_threshold(arrays["threshold"])
    return sae


def hook_from_path(path: str | Path) -> str | None:
    """``blocks.N.hook_resid_post`` for a release path with a ``layer_N`` folder (else None)."""
    m = re.search(r"layer_(\d+)", str(path))
    return f"blocks.{m.group(1)}.hook_resid_post" if m else None
