"""Splice SAEs into a live HF model: replace a hook's activation by the SAE's reconstruction.

With an SAE spliced at hook ``h``, the model runs as usual up to ``h``, then carries on from
``x_hat = SAE(x)`` instead of ``x`` (the "spliced-in" or "downstream" loss of an SAE: Gao et al.
2024, arXiv 2406.04093 §4.1; Chen et al. 2025, arXiv 2501.19406 §3.1). Tokens at the
beginning-of-sequence token keep their own activation: BOS activations are outliers no SAE
is trained on (actstore's streams drop position 0), and every evaluation of spliced SAEs leaves
them alone. Several SAEs splice at once, each reading what the earlier splices left.

A transcoder (``LoadedSAE.hook_out``; :mod:`trainers.transcoder`) replaces the activation it
writes, an MLP's output, by its prediction from the live activation it reads, the MLP's input
(``mlp_in``) of the same pass, recorded by a second hook that changes nothing. Its FVU is that of
the replaced output.

A crosscoder (``LoadedSAE.layers``; :mod:`trainers.crosscoder`) reads all its layers at once, so
it cannot encode from the spliced pass itself (its later layers are not computed yet when the
first must be replaced). It encodes the activations its layers had in the clean pass of the
same batch (the original model's: evaluation and LoRA both run that pass first, after
:meth:`Splicer.set_inputs`), and each of its layers is replaced by that layer's reconstruction.
L0 and FVU are reported per layer against those clean activations. Its reconstruction carries
no gradient to what comes before it.

:class:`Splicer` installs one forward hook per SAE on the module that produces the hook's
activation (:func:`pipelines.capture.module_for`) and switches between

- ``clean``: the hooks pass the activation through;
- ``sae``: the activation is replaced by the reconstruction;
- ``zero``: the activation is replaced by zeros (the zero-ablation baseline of "loss recovered").

Measurement (``measure=True``) accumulates at each splice, over non-BOS tokens, the mean number
of active latents (L0) and the fraction of variance unexplained (FVU, as in
:func:`trainers.sae.fvu`: the sum of squared errors over the total squared deviation from the
mean over all measured tokens). Gradients flow through the reconstruction to the activation (the
SAEs' own weights are frozen), so LoRA adapters before a later SAE learn through it.
Shape letters: B windows, T tokens per window, D width, F latents, N tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from .capture import HookPoint, decoder_layers, module_for
from .saes import LoadedSAE

Mode = Literal["clean", "sae", "zero"]


@dataclass
class SpliceStats:
    """Running sums at one splice (float64)."""

    tokens: int = 0
    active: float = 0.0
    """Sum over tokens of the active latent count."""
    sq_err: float = 0.0
    sq_norm: float = 0.0
    sum_D: torch.Tensor | None = field(default=None, repr=False)

    def add(self, x_ND: torch.Tensor, f_NF: torch.Tensor, recon_ND: torch.Tensor) -> None:
        x64_ND = x_ND.detach().double()
        self.tokens += x_ND.shape[0]
        self.active += float((f_NF != 0).sum())
        self.sq_err += float((x64_ND - recon_ND.detach().double()).pow(2).sum())
        self.sq_norm += float(x64_ND.pow(2).sum())
        s_D = x64_ND.sum(0)
        self.sum_D = s_D if self.sum_D is None else self.sum_D + s_D

    @property
    def l0(self) -> float:
        return self.active / max(self.tokens, 1)

    @property
    def fvu(self) -> float:
        if not self.tokens or self.sum_D is None:
            return float("nan")
        total = self.sq_norm - float(self.sum_D.pow(2).sum()) / self.tokens
        return self.sq_err / max(total, 1e-30)


class Splicer:
    """Splices ``saes`` into ``model``; use as a context manager to remove the hooks after.

    Call :meth:`set_inputs` with each batch's token ids before the forward pass (it marks the
    BOS tokens that keep their activation), and run passes under :meth:`mode`.
    """

    def __init__(self, model: nn.Module, saes: Sequence[LoadedSAE], bos_token_id: int | None):
        self.saes = list(saes)
        self.bos_token_id = bos_token_id
        self._mode: Mode = "clean"
        self._measure = False
        self.stats: dict[str, SpliceStats] = self._new_stats()
        self._keep_BT: torch.Tensor | None = None
        self._read: dict[str, torch.Tensor] = {}
        """Each transcoder's input of the current pass, by its label."""
        self._clean: dict[str, dict[str, torch.Tensor]] = {}
        """Each crosscoder's layers in this batch's clean pass, by its source and hook."""
        self._recon: dict[str, torch.Tensor] = {}
        """Each crosscoder's reconstruction ``[B, T, L, D]`` in the current spliced pass, by its source."""
        layers = decoder_layers(model)
        device = next(model.parameters()).device
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        for s in self.saes:
            s.sae.to(device).eval().requires_grad_(False)
            if s.hook_out:  # read the input as it passes, replace the output
                module, phase = module_for(layers, s.point)
                self._handles.append(module.register_forward_pre_hook(self._read_pre(s), with_kwargs=True) if phase == "pre"
                                     else module.register_forward_hook(self._read_post(s)))
            for i, hook in enumerate(s.writes):
                replace = partial(self._replace_layer, s, i) if s.layers else partial(self._replace, s)
                module, phase = module_for(layers, HookPoint.parse(hook))
                if phase == "pre":
                    self._handles.append(module.register_forward_pre_hook(self._pre_hook(replace), with_kwargs=True))
                else:
                    self._handles.append(module.register_forward_hook(self._post_hook(replace)))

    def _new_stats(self) -> dict[str, SpliceStats]:
        """One entry per SAE or transcoder, one per layer of a crosscoder."""
        return {label: SpliceStats() for s in self.saes for label in ([s.layer_label(h) for h in s.layers] or [s.label])}

    # ---- control ----------------------------------------------------------------------------
    def set_inputs(self, input_ids_BT: torch.Tensor) -> None:
        """Mark the tokens of this batch that keep their own activation (BOS)."""
        if self.bos_token_id is None:
            self._keep_BT = torch.zeros_like(input_ids_BT, dtype=torch.bool)
        else:
            self._keep_BT = input_ids_BT == self.bos_token_id
        self._clean.clear()  # crosscoders take this batch's clean pass, never an earlier one's

    @contextmanager
    def mode(self, mode: Mode, measure: bool = False) -> Iterator[None]:
        """Run forward passes with the splices in ``mode``; ``measure`` accumulates L0 and FVU."""
        old = self._mode, self._measure
        self._mode, self._measure = mode, measure
        try:
            yield
        finally:
            self._mode, self._measure = old

    def reset_stats(self) -> None:
        self.stats = self._new_stats()

    # ---- the replacement -------------------------------------------------------------------
    def _replace(self, s: LoadedSAE, x_BTD: torch.Tensor) -> torch.Tensor | None:
        if self._mode == "clean":
            return None
        if self._keep_BT is None or self._keep_BT.shape != x_BTD.shape[:-1]:
            raise RuntimeError("Splicer.set_inputs must be called with this batch's token ids before the forward pass")
        keep_BT1 = self._keep_BT.unsqueeze(-1)
        if self._mode == "zero":
            return x_BTD.masked_fill(~keep_BT1, 0.0)
        x_ND = x_BTD.reshape(-1, x_BTD.shape[-1]).float()
        if s.hook_out:  # a transcoder: from what it read in this pass
            read_BTD = self._read.pop(s.label, None)
            if read_BTD is None or read_BTD.shape[:-1] != x_BTD.shape[:-1]:
                raise RuntimeError(f"transcoder {s.source}: {s.hook} was not seen before {s.hook_out} in this pass")
            read_ND = read_BTD.reshape(-1, read_BTD.shape[-1]).float()
            f_NF = s.sae.encode(read_ND)
            recon_ND = s.sae.add_skip(read_ND, s.sae.decode(f_NF))
        else:
            f_NF = s.sae.encode(x_ND)
            recon_ND = s.sae.decode(f_NF)
        if self._measure:
            spliced_N = ~self._keep_BT.reshape(-1)
            self.stats[s.label].add(x_ND[spliced_N], f_NF[spliced_N], recon_ND[spliced_N])
        return torch.where(keep_BT1, x_BTD, recon_ND.view(x_BTD.shape).to(x_BTD.dtype))

    def _replace_layer(self, s: LoadedSAE, i: int, x_BTD: torch.Tensor) -> torch.Tensor | None:
        """Layer ``i`` of crosscoder ``s`` (see the module docstring)."""
        if self._mode == "clean":
            self._clean.setdefault(s.source, {})[s.layers[i]] = x_BTD.detach()
            return None
        if self._keep_BT is None or self._keep_BT.shape != x_BTD.shape[:-1]:
            raise RuntimeError("Splicer.set_inputs must be called with this batch's token ids before the forward pass")
        keep_BT1 = self._keep_BT.unsqueeze(-1)
        if self._mode == "zero":
            return x_BTD.masked_fill(~keep_BT1, 0.0)
        if s.layers[i] == s.hook:  # the first of its layers the pass reaches: encode the clean pass's layers
            clean = self._clean.get(s.source, {})
            if set(clean) != set(s.layers) or any(c.shape != x_BTD.shape for c in clean.values()):
                raise RuntimeError(f"crosscoder {s.source} encodes the clean pass of the same batch: run it (mode 'clean') "
                                   "after set_inputs and before the spliced pass")
            x_BTLD = torch.stack([clean[h] for h in s.layers], -2).float()
            B, T, L, D = x_BTLD.shape
            f_NF = s.sae.encode(x_BTLD.reshape(B * T, L * D))
            recon_NLD = s.sae.decode(f_NF).view(B * T, L, D)
            self._recon[s.source] = recon_NLD.view(B, T, L, D)
            if self._measure:
                spliced_N = ~self._keep_BT.reshape(-1)
                x_NLD = x_BTLD.view(B * T, L, D)
                for j, hook in enumerate(s.layers):
                    self.stats[s.layer_label(hook)].add(x_NLD[spliced_N, j], f_NF[spliced_N], recon_NLD[spliced_N, j])
        return torch.where(keep_BT1, x_BTD, self._recon[s.source][:, :, i].to(x_BTD.dtype))

    def _post_hook(self, replace: Callable[[torch.Tensor], torch.Tensor | None]):
        def hook(module: nn.Module, args: tuple, output: Any) -> Any:
            x_BTD = output[0] if isinstance(output, tuple) else output
            new_BTD = replace(x_BTD)
            if new_BTD is None:
                return None
            return (new_BTD, *output[1:]) if isinstance(output, tuple) else new_BTD

        return hook

    def _pre_hook(self, replace: Callable[[torch.Tensor], torch.Tensor | None]):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> Any:
            if args:
                new_BTD = replace(args[0])
                return None if new_BTD is None else ((new_BTD, *args[1:]), kwargs)
            new_BTD = replace(kwargs["hidden_states"])
            return None if new_BTD is None else (args, {**kwargs, "hidden_states": new_BTD})

        return hook

    def _read_post(self, s: LoadedSAE):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if self._mode == "sae":
                self._read[s.label] = output[0] if isinstance(output, tuple) else output

        return hook

    def _read_pre(self, s: LoadedSAE):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._mode == "sae":
                self._read[s.label] = args[0] if args else kwargs["hidden_states"]

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> Splicer:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
