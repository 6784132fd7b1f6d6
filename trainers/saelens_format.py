"""Save and load SAEs in SAELens' on-disk format: ``cfg.json`` + ``sae_weights.safetensors``.

The files are what ``sae_lens.SAE.save_model`` writes (SAELens 6: ``architecture``, ``d_in``,
``d_sae``, ``dtype``, ``apply_b_dec_to_input``, ``normalize_activations``, ``metadata`` with
``hook_name``, ``model_name``, ``context_size``, ``prepend_bos``), so
``sae_lens.SAE.load_from_disk(dir)`` loads them and encodes and decodes as the trained SAE
does. A normalisation scale used in training is folded into the weights
(:meth:`trainers.sae.SAE.saelens_state`), so the saved SAE takes raw activations. actstore's
own settings (architecture hyperparameters, training summary) go under ``cfg["actstore"]``.

Transcoders (:mod:`trainers.transcoder`) follow SAELens' transcoder format: ``d_out``,
``apply_b_dec_to_input: false``, ``W_dec [d_sae, d_out]``, ``b_dec [d_out]``, ``W_skip
[d_out, d_in]`` for skip-transcoders, and the output hook as ``metadata.hook_name_out`` (SAELens
keeps unknown metadata keys); the input's and the output's scales are folded in separately.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from . import ARCHITECTURES, SAE, make_sae, sae_config

SAVED_AS_JUMPRELU = frozenset({"batchtopk", "matryoshka", "batchtopk-transcoder"})
"""Trained with a batch-level TopK, used (and loaded back) as a JumpReLU with the learned threshold."""
CONFIG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_FORMAT = "6.0.0"  # the SAELens config format these files follow


@dataclass(frozen=True)
class HookInfo:
    """Where the SAE reads: SAELens' metadata fields."""

    hook_name: str
    model_name: str
    context_size: int
    prepend_bos: bool = True
    hook_name_out: str | None = None
    """Where a transcoder writes (None: an SAE, which writes where it reads)."""


def save_saelens(sae: SAE, out_dir: str | Path, hook: HookInfo, scale: float = 1.0, extra: dict[str, Any] | None = None,
                 scale_out: float | None = None) -> Path:
    """Write ``sae`` (trained on ``scale * x``; a transcoder's target on ``scale_out * y``) to
    ``out_dir`` in SAELens' format."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"hook_name": hook.hook_name, "model_name": hook.model_name, "context_size": hook.context_size, "prepend_bos": hook.prepend_bos}
    if hook.hook_name_out is not None:
        meta["hook_name_out"] = hook.hook_name_out
    # SAELens reads the metadata block only from configs that say they are in its 6.x format
    cfg_meta = {"sae_lens_version": SAELENS_FORMAT, "sae_lens_training_version": None, **meta}
    cfg = {
        "d_in": sae.cfg.d_in, "d_sae": sae.cfg.d_sae, "dtype": "float32", "device": "cpu",
        "apply_b_dec_to_input": sae.center_input, "normalize_activations": "none", "reshape_activations": "none",
        "metadata": cfg_meta, **sae.saelens_config(),
        "actstore": {"arch": sae.cfg.arch, "settings": sae.cfg.hyperparameters(), "scale_folded": scale,
                     **({"scale_out_folded": scale_out} if scale_out is not None else {}), **(extra or {})},
    }
    weights = sae.saelens_state(scale) if scale_out is None else sae.saelens_state(scale, scale_out)
    state = {k: v.detach().float().cpu().contiguous() for k, v in weights.items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={k: json.dumps(v) for k, v in meta.items()})
    (out / CONFIG_FILE).write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def load_saelens(path: str | Path) -> tuple[SAE, HookInfo]:
    """An SAE saved by :func:`save_saelens` or by SAELens (standard, topk, jumprelu, gated,
    jumprelu_transcoder, jumprelu_skip_transcoder)."""
    root = Path(path)
    if not (root / CONFIG_FILE).is_file() or not (root / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{root} is not an SAE folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        cfg = json.loads((root / CONFIG_FILE).read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"{root / CONFIG_FILE} is not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{root / CONFIG_FILE} is not an SAE config (a JSON object)")
    try:
        state = load_file(str(root / WEIGHTS_FILE))
    except SafetensorError as e:
        raise ValueError(f"{root / WEIGHTS_FILE} is not a readable safetensors file ({e})") from None
    meta = cfg.get("metadata", cfg)  # SAELens 5 kept these at the top level
    hook = HookInfo(meta["hook_name"], meta.get("model_name", ""), int(meta.get("context_size") or 0), bool(meta.get("prepend_bos", True)),
                    meta.get("hook_name_out"))
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{root}: SAEs with normalize_activations={cfg['normalize_activations']!r} are not supported; fold the scale first")
    arch = cfg.get("architecture", "standard")
    d_in, d_sae = int(cfg["d_in"]), int(cfg["d_sae"])
    ours = cfg.get("actstore", {})
    if ours.get("arch") in ARCHITECTURES and ours["arch"] not in SAVED_AS_JUMPRELU:
        sae = make_sae(sae_config(ours["arch"], d_in=d_in, d_sae=d_sae, **ours.get("settings", {})))
    elif arch == "standard":
        sae = make_sae(sae_config("relu", d_in=d_in, d_sae=d_sae))
    elif arch == "topk":
        sae = make_sae(sae_config("topk", d_in=d_in, d_sae=d_sae, k=int(cfg["k"])))
    elif arch == "jumprelu":
        sae = make_sae(sae_config("jumprelu", d_in=d_in, d_sae=d_sae))
    elif arch == "gated":
        sae = make_sae(sae_config("gated", d_in=d_in, d_sae=d_sae))
    elif arch in ("jumprelu_transcoder", "jumprelu_skip_transcoder"):
        sae = make_sae(sae_config("jumprelu-transcoder", d_in=d_in, d_sae=d_sae, d_out=int(cfg["d_out"]), skip="skip" in arch))
    else:
        raise ValueError(f"{root}: SAELens architecture {arch!r} is not supported (standard, topk, jumprelu, gated, "
                         "jumprelu_transcoder, jumprelu_skip_transcoder are)")
    with torch.no_grad():
        for name, tensor in state.items():
            target = getattr(sae, name, None)
            if not isinstance(target, torch.Tensor):
                raise ValueError(f"{root}: unexpected weight {name!r} for a {arch} SAE")
            want = target.shape
            if tensor.shape != want:
                raise ValueError(f"{root}: weight {name} has shape {list(tensor.shape)}, but {CONFIG_FILE} "
                                 f"(d_in {d_in}, d_sae {d_sae}) needs {list(want)}; the config and the weights disagree")
            if name == "threshold":
                sae.set_threshold(tensor.float())
            else:
                getattr(sae, name).copy_(tensor.float())
        if not cfg.get("apply_b_dec_to_input", True) and sae.center_input:
            _fold_b_dec(sae)
    return sae, hook


@torch.no_grad()
def _fold_b_dec(sae: SAE) -> None:
    """SAELens SAEs with ``apply_b_dec_to_input: false`` encode ``x`` itself; actstore's encode
    ``x - b_dec``. Adding ``b_dec @ W_enc`` to the encoder biases gives the same pre-activations."""
    shift_F = (sae.b_dec.double() @ sae.W_enc.double()).float()
    if hasattr(sae, "b_gate"):  # gated: both paths read x @ W_enc (the magnitude path rescaled)
        sae.b_gate += shift_F
        sae.b_mag += shift_F * sae.r_mag.exp()
    else:
        sae.b_enc += shift_F
