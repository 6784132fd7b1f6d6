"""Compute the blocks a teacher pass and a student pass share only once.

In a LoRA step (:mod:`pipelines.lora`) the teacher (adapters off, nothing spliced) and the
student (adapters on, SAEs spliced) run the same blocks ``0 .. p-1`` when no adapter and no
splice sits in them, so the student's input to block ``p`` is exactly the teacher's. The teacher
pass records that input (:meth:`SharedPrefix.record`); the student pass (:meth:`SharedPrefix.reuse`)
swaps blocks ``0 .. p-1`` for pass-throughs (the embedding lookup still runs; it is a gather)
and feeds the recorded input to block ``p``. For an SAE in the middle of the model this skips
half of the student's forward pass. The recorded tensor carries no gradient, which is right:
nothing before block ``p`` is trained.
Shape letters: B windows, T tokens, D width.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .capture import decoder_layers


class _PassThrough(nn.Module):
    """Stands in for a skipped block: returns its input as the block would return its output."""

    def __init__(self, block: nn.Module, tuple_output: bool):
        super().__init__()
        self.tuple_output = tuple_output
        if hasattr(block, "attention_type"):  # Gemma-2 style loops pick the mask by it
            self.attention_type = block.attention_type

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        return (hidden_states,) if self.tuple_output else hidden_states


def _hidden_states(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class SharedPrefix:
    """Share blocks ``0 .. first_block - 1`` of ``model`` between a recording pass and a reusing one."""

    def __init__(self, model: nn.Module, first_block: int):
        self.layers = decoder_layers(model)
        self.first_block = first_block
        self._input_BTD: torch.Tensor | None = None
        self._tuple_output = False

    @contextmanager
    def record(self) -> Iterator[None]:
        """Keep the input of block ``first_block`` of the passes run inside."""
        if self.first_block == 0:
            yield
            return

        def keep_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
            self._input_BTD = _hidden_states(args, kwargs).detach()

        def output_type(module: nn.Module, args: tuple, output: Any) -> None:
            self._tuple_output = isinstance(output, tuple)

        handles = [self.layers[self.first_block].register_forward_pre_hook(keep_input, with_kwargs=True),
                   self.layers[0].register_forward_hook(output_type)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def reuse(self) -> Iterator[None]:
        """Run the passes inside from block ``first_block`` on, fed the recorded input."""
        if self.first_block == 0:
            yield
            return
        if self._input_BTD is None:
            raise RuntimeError("SharedPrefix.reuse needs a recorded pass first")
        recorded_BTD = self._input_BTD

        def feed(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if _hidden_states(args, kwargs).shape != recorded_BTD.shape:
                raise RuntimeError("SharedPrefix.reuse: the batch differs from the recorded one")
            if args:
                return (recorded_BTD, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": recorded_BTD}

        skipped = [self.layers[i] for i in range(self.first_block)]
        # prepended: splices installed on block first_block (resid_pre) must see the fed input
        handle = self.layers[self.first_block].register_forward_pre_hook(feed, with_kwargs=True, prepend=True)
        for i, block in enumerate(skipped):
            self.layers[i] = _PassThrough(block, self._tuple_output)
        try:
            yield
        finally:
            for i, block in enumerate(skipped):
                self.layers[i] = block
            handle.remove()
            self._input_BTD = None
