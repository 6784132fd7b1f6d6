"""A small real store: SmolLM2-135M residual streams on the built-in corpus, offline.

``python -m pipelines.store_demo --out runs/demo`` captures ``hook_resid_post`` at a few layers
for a few thousand tokens and writes them to a store that ``actstore info`` then describes.
The capture here is the plain reference one (``output_hidden_states``); the streaming,
crash-safe harvest is ``actstore harvest``.
Shape letters: B batch of windows, T tokens per window, N tokens, D width.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

import numpy as np
import torch

import actstore
from pipelines import corpus, smollm2


@dataclass(frozen=True)
class Capture:
    """Activations of ``n`` tokens: ids, positions, and ``acts[hook]`` float32 ``[N, D]``."""

    tokens_N: np.ndarray
    positions_N: np.ndarray
    acts: dict[str, np.ndarray]


def pack_windows(tokenizer, n_tokens: int, context_size: int) -> np.ndarray:
    """Corpus token ids packed into ``[n_windows, T]`` windows, BOS at position 0 of each."""
    body = context_size - 1
    n_windows = -(-n_tokens // context_size)
    ids: list[int] = []
    for text in corpus.python_docs():
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
        if len(ids) >= n_windows * body:
            break
    stream = np.asarray(ids[: n_windows * body], dtype=np.int64).reshape(n_windows, body)
    bos = np.full((n_windows, 1), tokenizer.bos_token_id, dtype=np.int64)
    return np.concatenate([bos, stream], axis=1)


@torch.no_grad()
def capture_resid_post(model, tokenizer, layers: list[int], n_tokens: int, context_size: int = 256, batch_size: int = 8) -> Capture:
    """``blocks.{L}.hook_resid_post`` for ``layers`` over the first ``n_tokens`` corpus tokens.

    ``hidden_states[L + 1]`` is the output of block L; the last block's entry has the final
    norm applied, so it is refused here.
    """
    n_layers = model.config.num_hidden_layers
    if any(not 0 <= layer < n_layers - 1 for layer in layers):
        raise ValueError(f"layers must be in 0..{n_layers - 2} for the output_hidden_states capture")
    windows_BT = pack_windows(tokenizer, n_tokens, context_size)
    acts: dict[str, list[np.ndarray]] = {f"blocks.{layer}.hook_resid_post": [] for layer in layers}
    for first in range(0, len(windows_BT), batch_size):
        ids_BT = torch.from_numpy(windows_BT[first : first + batch_size])
        hidden = model(ids_BT, output_hidden_states=True).hidden_states
        for layer in layers:
            acts[f"blocks.{layer}.hook_resid_post"].append(hidden[layer + 1].reshape(-1, hidden[0].shape[-1]).float().numpy())
    positions_N = np.tile(np.arange(context_size), len(windows_BT))[:n_tokens]
    return Capture(
        tokens_N=windows_BT.reshape(-1)[:n_tokens],
        positions_N=positions_N,
        acts={hook: np.concatenate(parts)[:n_tokens] for hook, parts in acts.items()},
    )


def write_capture(url: str, cap: Capture, cfg: actstore.StoreConfig, overwrite: bool = False) -> actstore.Store:
    """Write a capture into a store, shard by shard, resuming if the store exists."""
    with actstore.open_store(url, "w" if overwrite else "a", config=cfg) as w:
        for shard in w.pending_shards():
            a, b = w.shard_range(shard)
            w.write_shard(shard, tokens=cap.tokens_N[a:b], positions=cap.positions_N[a:b],
                          acts={h: x[a:b] for h, x in cap.acts.items()})
    return actstore.open_store(url)


def store_config(model, cap: Capture, context_size: int, **changes) -> actstore.StoreConfig:
    return actstore.StoreConfig(
        model=actstore.ModelInfo(smollm2.NAME, model.config.hidden_size, model.config.num_hidden_layers),
        dataset=actstore.DatasetInfo(corpus.NAME),
        hooks=tuple(cap.acts),
        n_tokens_target=len(cap.tokens_N),
        context_size=context_size,
        **changes,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--layers", default="3,9,15,21")
    args = parser.parse_args()
    model, tokenizer = smollm2.load()
    layers = [int(x) for x in args.layers.split(",")]
    print(f"capturing {args.tokens} tokens of {smollm2.NAME} at layers {layers} ...")
    cap = capture_resid_post(model, tokenizer, layers, args.tokens, context_size=256)
    store = write_capture(args.out, cap, store_config(model, cap, 256, shard_tokens=2048), overwrite=True)
    print(f"wrote {store.n_tokens} tokens to {store.url}")


if __name__ == "__main__":
    main()
