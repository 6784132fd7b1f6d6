"""Harvest benchmark on SmolLM2-135M and the built-in corpus.

Prints, measured in one run on the same model, windows, batch size and layers:

- harvest tokens/s (store writing, compression and commits included) over bare forward tokens/s
  (the same capture with early exit, nothing stored), medians of interleaved repeats; goal >= 0.90.
  Two figures from the same runs: end to end, and steady state, which leaves out the wait for
  the last shard's write after the last forward pass (one shard's write per run: a large share
  of a short benchmark run, a negligible one of a real harvest of many shards);
- what early exit saves: layers 0-7 captured with early exit against a full forward through
  all blocks, and against the full model with its LM head.

    python benchmarks/bench_harvest.py [--tokens 32768] [--context-size 1024] [--batch-size 8]
"""

from __future__ import annotations

import argparse
import itertools
import os
import time

import numpy as np
import torch
from report import scratch, write_json
from rich.console import Console
from rich.table import Table

from actstore.units import parse_layers
from pipelines import smollm2
from pipelines.capture import ActivationCapture, hook_name
from pipelines.harvest import HarvestConfig, capture_dtype, harvest
from pipelines.models import load_model
from pipelines.text import TextConfig, token_windows


def bare_forward(model, windows: np.ndarray, batch_size: int, layers) -> float:
    """Tokens/s of the capture alone, as the harvest runs it (early exit after the deepest layer,
    activations cast to bf16 as recorded), nothing stored."""
    hooks = [hook_name(layer, "resid_post") for layer in layers]
    with ActivationCapture(model, hooks, dtype=capture_dtype("bfloat16")) as cap:
        cap.run(torch.from_numpy(windows[:1, :64]))  # warm-up
        t = time.perf_counter()
        for i in range(0, len(windows), batch_size):
            cap.run(torch.from_numpy(windows[i : i + batch_size]))
        return windows.size / (time.perf_counter() - t)


@torch.no_grad()
def full_forward(model, windows: np.ndarray, batch_size: int, lm_head: bool) -> float:
    run = model if lm_head else model.get_decoder()
    t = time.perf_counter()
    for i in range(0, len(windows), batch_size):
        run(input_ids=torch.from_numpy(windows[i : i + batch_size]), use_cache=False)
    return windows.size / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser(description="actstore harvest benchmark")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--context-size", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--layers", default="0-29")
    parser.add_argument("--shard-tokens", type=int, default=0, help="0: the harvest default")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are shown")
    parser.add_argument("--writer-threads", type=int, default=0, help="0: the harvest default")
    parser.add_argument("--json", help="also write the headline figures to this JSON file")

    args = parser.parse_args()
    console = Console()
    layers = parse_layers(args.layers)
    text = TextConfig(context_size=args.context_size)
    lm = load_model(smollm2.NAME)
    n_windows = args.tokens // args.context_size
    windows = np.stack(list(itertools.islice(token_windows(text, lm.tokenizer), n_windows)))

    with scratch(None, "actstore-bench-harvest-") as root:
        cfg = HarvestConfig(model=smollm2.NAME, out=str(root / "store"), layers=layers, text=text,
                            tokens=args.tokens, batch_size=args.batch_size, progress=False, overwrite=True,
                            shard_tokens=args.shard_tokens, writer_threads=args.writer_threads)
        # interleaved repeats: this machine's speed drifts by several percent from minute to minute
        bare_runs, results = [], []
        for _ in range(args.repeats):
            bare_runs.append(bare_forward(lm.model, windows, args.batch_size, layers))
            results.append(harvest(cfg, model=lm))
    bare = float(np.median(bare_runs))
    end_to_end = float(np.median([r.tokens_per_s for r in results]))
    steady = float(np.median([r.steady_tokens_per_s for r in results]))
    flush = float(np.median([r.flush_seconds for r in results]))

    table = Table(title=f"harvest vs bare forward (medians of {args.repeats} interleaved runs): {smollm2.NAME} ({lm.dtype}), layers {args.layers}, "
                        f"{args.tokens} tokens, batch {args.batch_size}x{args.context_size}, shards of "
                        f"{args.shard_tokens or 'default'} tokens, {os.cpu_count()} cores")
    for col in ("", "tokens/s", "ratio"):
        table.add_column(col, justify="right")
    table.add_row("bare forward (early exit)", f"{bare:,.0f}", "1.00")
    table.add_row("harvest, end to end (bf16, zstd, commits)", f"{end_to_end:,.0f}", f"{end_to_end / bare:.3f}")
    table.add_row(f"harvest, steady state (without the {flush:.1f}s final flush)", f"{steady:,.0f}", f"{steady / bare:.3f}")
    console.print(table)

    early = bare_forward(lm.model, windows[: max(1, n_windows // 4)], args.batch_size, range(8))
    decoder = full_forward(lm.model, windows[: max(1, n_windows // 4)], args.batch_size, lm_head=False)
    with_head = full_forward(lm.model, windows[: max(1, n_windows // 4)], args.batch_size, lm_head=True)
    saves = Table(title="what early exit saves (layers 0-7 of 30)")
    for col in ("", "tokens/s", "speed-up"):
        saves.add_column(col, justify="right")
    saves.add_row("full model with LM head", f"{with_head:,.0f}", "1.00")
    saves.add_row("all 30 blocks, no LM head", f"{decoder:,.0f}", f"{decoder / with_head:.2f}")
    saves.add_row("layers 0-7, early exit", f"{early:,.0f}", f"{early / with_head:.2f}")
    console.print(saves)
    write_json(args.json, [("harvest end to end / bare forward", f"{end_to_end / bare:.2f}", ""),
                           ("harvest steady state / bare forward", f"{steady / bare:.2f}", ""),
                           ("early exit at layer 7 / full model", f"{early / with_head:.1f}x", "")],
               bare_tokens_per_s=bare, harvest_tokens_per_s=end_to_end, steady_tokens_per_s=steady, cores=os.cpu_count())


if __name__ == "__main__":
    main()
