"""``actstore eval``: how well SAEs stand in for the activations they read, on the live model.

On held-out text (the built-in corpus' ``test`` split by default), for each window of token ids
``t_0 .. t_{T-1}`` and each position ``i < T - 1`` predicting ``t_{i+1}``:

- ``ce_clean``: the model's cross-entropy loss, adapters (if any) off, nothing spliced;
- ``ce_spliced``: the same with every SAE spliced in (:mod:`pipelines.splice`), adapters on;
- ``delta_loss = ce_spliced - ce_clean``;
- ``ce_zero``: the base model with every spliced hook set to zero (BOS kept), and
  ``loss_recovered = (ce_zero - ce_spliced) / (ce_zero - ce_clean)`` (1 is a perfect SAE,
  0 no better than zero ablation; Bricken et al. 2023 "Towards Monosemanticity", §Ablations);
- ``kl``: the mean over positions of ``KL(p_clean || p_spliced)`` in nats;
- ``ce_adapted`` (with ``--adapter``): the adapted model with nothing spliced, to see that the
  adapter leaves the model's own loss about where it was (arXiv 2501.19406 §5);
- per splice: L0 and FVU on the non-BOS tokens that reach it in the spliced pass.

All means are over every predicted position of the held-out windows.
Shape letters: B windows, T tokens per window, V vocabulary, N positions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .adapters import adapters_off, attach_adapter
from .models import ModelDType, load_model
from .runtime import progress_bar
from .saes import LoadedSAE, check_saes, load_sae
from .splice import Splicer
from .text import TextConfig, take_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    """One evaluation of spliced SAEs."""

    model: str
    """Alias, local folder or HF id."""
    saes: tuple[str, ...]
    """SAE specs (:mod:`pipelines.saes`), spliced together."""
    adapter: str | None = None
    """A LoRA adapter folder from ``actstore lora``, on in the spliced pass."""
    text: TextConfig = field(default_factory=lambda: TextConfig(split="test", context_size=256))
    """Held-out text."""
    tokens: int = 32_768
    """Tokens evaluated (rounded up to whole windows)."""
    batch_size: int = 4
    """Windows per forward pass."""
    model_dtype: ModelDType = "auto"
    device: str = "auto"
    progress: bool = True

    def __post_init__(self) -> None:
        if self.tokens <= 0:
            raise ValueError(f"--tokens must be positive, got {self.tokens}")
        if self.batch_size <= 0:
            raise ValueError(f"--batch-size must be positive, got {self.batch_size}")


@dataclass(frozen=True)
class SpliceMetrics:
    hook: str
    l0: float
    fvu: float
    tokens: int


@dataclass(frozen=True)
class EvalResult:
    """The figures of the module docstring."""

    tokens: int
    """Predicted positions evaluated."""
    ce_clean: float
    ce_spliced: float
    kl: float
    splices: tuple[SpliceMetrics, ...]
    ce_zero: float | None = None
    ce_adapted: float | None = None

    @property
    def delta_loss(self) -> float:
        return self.ce_spliced - self.ce_clean

    @property
    def loss_recovered(self) -> float | None:
        if self.ce_zero is None:
            return None
        return (self.ce_zero - self.ce_spliced) / (self.ce_zero - self.ce_clean)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["splices"] = [asdict(s) for s in self.splices]
        out.update(delta_loss=self.delta_loss, loss_recovered=self.loss_recovered)
        return out


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on CUDA (a no-op on CPU, whose models run in their own dtype)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _logprobs(model: nn.Module, ids_BT: torch.Tensor) -> torch.Tensor:
    """Log-probabilities ``[B*(T-1), V]`` of the next token at positions 0..T-2."""
    logits_BTV = model(input_ids=ids_BT, use_cache=False).logits
    return F.log_softmax(logits_BTV[:, :-1].float(), dim=-1).flatten(0, 1)


@torch.no_grad()
def measure(model: nn.Module, splicer: Splicer, windows: Sequence[np.ndarray], *, batch_size: int,
            zero: bool = True, adapted: bool = False, autocast: bool = True,
            on_windows: Callable[[int], None] | None = None) -> EvalResult:
    """The figures of the module docstring for ``windows``. ``model`` may carry peft adapters
    (off for the clean and zero-ablation passes); ``splicer`` is installed on it."""
    device = next(model.parameters()).device
    sums = {"clean": 0.0, "spliced": 0.0, "kl": 0.0, "zero": 0.0, "adapted": 0.0}
    n = 0
    splicer.reset_stats()
    for start in range(0, len(windows), batch_size):
        ids_BT = torch.from_numpy(np.stack(windows[start:start + batch_size])).to(device)
        labels_N = ids_BT[:, 1:].reshape(-1)
        splicer.set_inputs(ids_BT)
        with autocast_for(device, autocast):
            with adapters_off(model), splicer.mode("clean"):
                clean_NV = _logprobs(model, ids_BT)
            with splicer.mode("sae", measure=True):
                spliced_NV = _logprobs(model, ids_BT)
            sums["clean"] += float(F.nll_loss(clean_NV, labels_N, reduction="sum"))
            sums["spliced"] += float(F.nll_loss(spliced_NV, labels_N, reduction="sum"))
            sums["kl"] += float(F.kl_div(spliced_NV, clean_NV, log_target=True, reduction="sum"))
            del spliced_NV, clean_NV
            if zero:
                with adapters_off(model), splicer.mode("zero"):
                    sums["zero"] += float(F.nll_loss(_logprobs(model, ids_BT), labels_N, reduction="sum"))
            if adapted:
                with splicer.mode("clean"):
                    sums["adapted"] += float(F.nll_loss(_logprobs(model, ids_BT), labels_N, reduction="sum"))
        n += labels_N.numel()
        if on_windows is not None:
            on_windows(min(start + batch_size, len(windows)))
    splices = tuple(SpliceMetrics(hook, st.l0, st.fvu, st.tokens) for hook, st in splicer.stats.items())
    return EvalResult(n, sums["clean"] / n, sums["spliced"] / n, sums["kl"] / n, splices,
                      ce_zero=sums["zero"] / n if zero else None, ce_adapted=sums["adapted"] / n if adapted else None)


def load_saes(specs: Sequence[str], model: nn.Module, model_name: str) -> list[LoadedSAE]:
    """Load ``specs`` and check them against ``model`` (:func:`pipelines.saes.check_saes`)."""
    saes = [load_sae(s) for s in specs]
    check_saes(saes, int(model.config.num_hidden_layers), int(model.config.hidden_size), model_name)
    return saes


def evaluate(cfg: EvalConfig) -> EvalResult:
    """Run ``cfg``; see the module docstring."""
    lm = load_model(cfg.model, model_dtype=cfg.model_dtype, device=cfg.device)
    saes = load_saes(cfg.saes, lm.model, cfg.model)
    model = attach_adapter(lm.model, cfg.adapter, cfg.model) if cfg.adapter else lm.model
    windows = take_windows(cfg.text, lm.tokenizer, cfg.tokens)
    with Splicer(lm.model, saes, lm.tokenizer.bos_token_id) as splicer, \
            progress_bar(cfg.progress, "eval", len(windows), unit="windows") as advance:
        return measure(model, splicer, windows, batch_size=cfg.batch_size, adapted=cfg.adapter is not None,
                       on_windows=advance)

