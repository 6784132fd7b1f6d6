"""Capturing residual-stream activations from a HF decoder in one forward pass.

Hook names follow TransformerLens: ``blocks.{L}.hook_{site}`` with site one of

- ``resid_pre``: the input of block L (for L = 0, the embeddings; Gemma-2 scales them by
  sqrt(d_model) inside the embedding, so this is the scaled value the block sees);
- ``attn_out``: what the attention sub-block adds to the residual stream (for Gemma-2, after its
  ``post_attention_layernorm``);
- ``mlp_in``: what the MLP itself reads: the residual after attention through the pre-MLP norm
  (Llama's ``post_attention_layernorm``, Gemma-2's ``pre_feedforward_layernorm``), the input a
  transcoder maps to ``mlp_out`` (both recorded in one pass);
- ``mlp_out``: what the MLP sub-block adds (for Gemma-2, after ``post_feedforward_layernorm``);
- ``resid_post``: the output of block L.

so that ``resid_post = resid_pre + attn_out + mlp_out`` holds for every block. Forward hooks on
the decoder's modules record these, and the pass stops (by an exception the caller catches)
right after the last module any requested hook needs: later blocks, the final norm and the LM
head never run. Only the base decoder is called, never the LM head.

Shape letters: B batch of windows, T tokens per window, D width.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

SITES = ("resid_pre", "attn_out", "mlp_in", "mlp_out", "resid_post")
"""In the order a block computes them."""
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(" + "|".join(SITES) + r")$")


def hook_name(layer: int, site: str) -> str:
    return f"blocks.{layer}.hook_{site}"


@dataclass(frozen=True, order=True)
class HookPoint:
    layer: int
    site: str

    @property
    def name(self) -> str:
        return hook_name(self.layer, self.site)

    @classmethod
    def parse(cls, name: str) -> HookPoint:
        m = _HOOK_RE.match(name)
        if not m:
            raise ValueError(f"unknown hook {name!r}; use blocks.<layer>.hook_<site> with site one of {', '.join(SITES)}")
        return cls(int(m.group(1)), m.group(2))


def module_for(layers: nn.ModuleList, point: HookPoint) -> tuple[nn.Module, str]:
    """The module whose output (or input, for resid_pre) is ``point``; phase 'pre' or 'post'."""
    block = layers[point.layer]
    if point.site == "resid_pre":
        return block, "pre"
    if point.site == "resid_post":
        return block, "post"
    if point.site == "attn_out":
        return (block.post_attention_layernorm if _sandwich_norms(block) else block.self_attn), "post"
    if point.site == "mlp_in":
        return block.mlp, "pre"
    return (block.post_feedforward_layernorm if _sandwich_norms(block) else block.mlp), "post"


class _StopForward(Exception):
    """Raised inside a hook once every requested activation is recorded."""


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The transformer blocks of a HF causal LM (Llama, Gemma, Mistral, Qwen style)."""
    base = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(base, "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(hasattr(b, "self_attn") and hasattr(b, "mlp") for b in layers):
        raise ValueError(f"unsupported architecture {type(model).__name__}: expected decoder blocks with self_attn and mlp")
    return layers


def _sandwich_norms(block: nn.Module) -> bool:
    """Gemma-2/3 style blocks normalise each sub-block's output before adding it."""
    return hasattr(block, "post_feedforward_layernorm") and hasattr(block, "pre_feedforward_layernorm")


def _tensor(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


class ActivationCapture:
    """Records ``hooks`` during :meth:`run`; use as a context manager to remove the hooks after.

    ``dtype`` casts each activation as it is recorded (e.g. to the store's bf16): the model's
    own output is then freed at once instead of living to the end of the pass, which halves the
    memory a wide capture holds and spares the allocator (30 layers of SmolLM2: 712 -> 927 tok/s).
    """

    def __init__(self, model: nn.Module, hooks: Iterable[str], dtype: torch.dtype | None = None):
        self.model = model
        self.dtype = dtype
        self.points = sorted({HookPoint.parse(h) for h in hooks})
        if not self.points:
            raise ValueError("no hooks to capture")
        self.layers = decoder_layers(model)
        n = len(self.layers)
        deepest = max(p.layer for p in self.points)
        if deepest >= n:
            raise ValueError(f"layer {deepest} is past the model's depth: it has {n} layers (0-{n - 1})")
        self.base = model.get_decoder() if hasattr(model, "get_decoder") else model
        self._acts: dict[str, torch.Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._install()

    # ---- hooks ----------------------------------------------------------------------------
    def _module_for(self, point: HookPoint) -> tuple[nn.Module, str]:
        return module_for(self.layers, point)

    def _install(self) -> None:
        for point in self.points:
            module, phase = self._module_for(point)
            if phase == "pre":
                self._handles.append(module.register_forward_pre_hook(self._record_input(point.name), with_kwargs=True))
            else:
                self._handles.append(module.register_forward_hook(self._record_output(point.name)))
        # stop right after the last point in execution order (registered last, so it runs after the recorders)
        last = max(self.points, key=lambda p: (p.layer, SITES.index(p.site)))
        module, phase = self._module_for(last)
        if phase == "pre":
            self._handles.append(module.register_forward_pre_hook(self._stop, with_kwargs=True))
        else:
            self._handles.append(module.register_forward_hook(self._stop))

    def _record_input(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._acts[name] = self._keep(args[0] if args else kwargs["hidden_states"])

        return hook

    def _record_output(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self._acts[name] = self._keep(_tensor(output))

        return hook

    def _keep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        return x.to(self.dtype) if self.dtype is not None else x

    @staticmethod
    def _stop(*_: Any) -> None:
        raise _StopForward

    # ---- running --------------------------------------------------------------------------
    @torch.no_grad()
    def run(self, input_ids_BT: torch.Tensor) -> dict[str, torch.Tensor]:
        """Activations ``{hook: [B*T, D]}`` for ``input_ids_BT`` (on the model's device)."""
        self._acts = {}
        try:
            self.base(input_ids=input_ids_BT, use_cache=False)
        except _StopForward:
            pass
        acts, self._acts = self._acts, {}
        missing = [p.name for p in self.points if p.name not in acts]
        if missing:
            raise RuntimeError(f"hooks {missing} did not fire; the model's blocks are not wired as expected")
        return {name: a.reshape(-1, a.shape[-1]) for name, a in acts.items()}

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationCapture:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()
