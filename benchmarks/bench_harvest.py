"""Harvest benchmark: the writer under a synthetic GPU-rate producer, then SmolLM2-135M end to end.

Prints, measured in one run:

- the store writer fed random bf16 activations of Gemma-2-2B's shape (26 hooks x 2304) as fast
  as it takes them (:mod:`synthetic`), local disk and S3 (moto on loopback, its own process),
  with 1, 2 and 4 shards in flight and compression on and off, against numcodecs' blosc-zstd of
  the same bytes on the same number of threads with no store around it (the most these cores
  can compress); goal: the store >= 0.80 of it, with the producer blocked only while every core
  is busy. Medians of interleaved repeats;

- harvest tokens/s (store writing, compression and commits included) over bare forward tokens/s
  (the same capture with early exit, nothing stored), medians of interleaved repeats; goal >= 0.90.
  Two figures from the same runs: end to end, and steady state, which leaves out the wait for
  the last shard's write after the last forward pass (one shard's write per run: a large share
  of a short benchmark run, a negligible one of a real harvest of many shards);
- what early exit saves: layers 0-7 captured with early exit against a full forward through
  all blocks, and against the full model with its LM head.

    python benchmarks/bench_harvest.py [--tokens 32768] [--context-size 1024] [--batch-size 8]
        [--synthetic-shards 6] [--synthetic-shard-tokens 2048] [--skip-model]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import time

import numpy as np
import torch
from report import scratch, write_json
from rich.console import Console
from rich.table import Table
from synthetic import GEMMA_2_2B, Run, bare_codec, feed_writer, loopback_s3, random_acts

from actstore.devices import rank_cpus
from actstore.units import parse_layers
from pipelines import smollm2
from pipelines.capture import ActivationCapture, hook_name
from pipelines.harvest import HarvestConfig, capture_dtype, harvest
from pipelines.models import load_model
from pipelines.text import TextConfig, token_windows


def median_run(runs: list[Run]) -> Run:
    """The run with the median GB/s (its own cores and blocked share kept with it)."""
    return sorted(runs, key=lambda r: r.gb_per_s)[len(runs) // 2]


def writer_table(args, console: Console) -> list[tuple[str, str, str]]:
    """The synthetic-producer table; returns headline rows."""
    threads = rank_cpus()
    n_hooks, width = GEMMA_2_2B
    acts = random_acts(n_hooks, width, args.synthetic_shard_tokens)
    shard_mb = sum(x.nbytes for x in acts.values()) / 1e6
    gpu = "stats from the GPU"
    cases = [("local, zstd", "local", "zstd", 1), ("local, zstd", "local", "zstd", 2), ("local, zstd", "local", "zstd", 4),
             (f"local, zstd, {gpu}", "local", "zstd", 2), ("local, none", "local", "none", 2),
             ("S3 (moto), zstd", "s3", "zstd", 2), (f"S3 (moto), zstd, {gpu}", "s3", "zstd", 2), ("S3 (moto), none", "s3", "none", 2)]
    runs: dict[tuple[str, int], list[Run]] = {}
    bare: list[Run] = []
    with scratch(None, "actstore-bench-writer-") as root, loopback_s3("bench-writer") as s3:
        for rep in range(args.repeats):  # interleaved: this machine's speed drifts from minute to minute
            bare.append(bare_codec(acts, args.synthetic_shards, threads))
            for label, where, codec, depth in cases:
                if where == "s3" and s3 is None:
                    continue
                name = f"r{rep}-{codec}-{depth}-{gpu in label}"
                url = f"{s3}/{name}" if where == "s3" else str(root / name)
                runs.setdefault((label, depth), []).append(
                    feed_writer(url, acts, args.synthetic_shards, codec, threads, depth, label, device_stats=gpu in label))
                if where == "local":
                    shutil.rmtree(url, ignore_errors=True)
    ref = median_run(bare)
    table = Table(title=f"store writer fed at full speed: Gemma-2-2B-shaped bf16 ({n_hooks} x {width}), {args.synthetic_shards} "
                        f"shards of {args.synthetic_shard_tokens} tokens ({shard_mb:,.0f} MB each), {threads} compression "
                        f"threads (cores this rank may use), medians of {args.repeats}")
    for col in ("", "in flight", "GB/s", "cores busy", "GB/s per core", "vs bare codec", "producer blocked"):
        table.add_column(col, justify="right")
    table.add_row(ref.label, "", f"{ref.gb_per_s:.3f}", f"{ref.cores:.2f}", f"{ref.per_core:.3f}", "1.00", "")
    headline = []
    for (label, depth), rs in runs.items():
        r = median_run(rs)
        table.add_row(label, str(depth), f"{r.gb_per_s:.3f}", f"{r.cores:.2f}", f"{r.per_core:.3f}",
                      f"{r.gb_per_s / ref.gb_per_s:.2f}", f"{r.producer_blocked:.0%}")
        if depth == 2 and "zstd" in label:
            headline.append((f"writer / bare blosc-zstd, {label}, same {threads} threads", f"{r.gb_per_s / ref.gb_per_s:.2f}",
                             ">= 0.80" if label == f"local, zstd, {gpu}" else ""))
    console.print(table)
    per_token = n_hooks * width * 2
    console.print(f"Gemma-2-2B tokens/s the local zstd writer takes per busy core: "
                  f"{median_run(runs[('local, zstd', 2)]).per_core * 1e9 / per_token:,.0f} ({per_token / 1e3:.0f} KB per token)")
    return headline


CPU = torch.device("cpu")


def bare_forward(model, windows: np.ndarray, batch_size: int, layers, device: torch.device = CPU) -> float:
    """Tokens/s of the capture alone, as the harvest runs it (inference mode, early exit after the
    deepest layer, activations cast to bf16 on ``device`` as recorded), nothing copied out or stored."""
    hooks = [hook_name(layer, "resid_post") for layer in layers]
    cuda = device.type == "cuda"
    with torch.inference_mode(), ActivationCapture(model, hooks, dtype=capture_dtype("bfloat16")) as cap:
        cap.run(torch.from_numpy(windows[:batch_size] if cuda else windows[:1, :64]).to(device))  # warm-up
        if cuda:
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        for i in range(0, len(windows), batch_size):
            cap.run(torch.from_numpy(windows[i : i + batch_size]).to(device))
        if cuda:
            torch.cuda.synchronize(device)
        return windows.size / (time.perf_counter() - t)


def count_passes(model, run) -> list[int]:
    """Windows of each forward pass the base model makes while ``run()`` runs."""
    sizes: list[int] = []
    hook = model.get_decoder().register_forward_pre_hook(lambda m, a, kw: sizes.append(kw["input_ids"].shape[0]), with_kwargs=True)
    try:
        run()
    finally:
        hook.remove()
    return sizes


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
    parser.add_argument("--synthetic-shards", type=int, default=6, help="shards per synthetic writer run")
    parser.add_argument("--synthetic-shard-tokens", type=int, default=2048, help="tokens per synthetic shard")
    parser.add_argument("--skip-model", action="store_true", help="only the synthetic writer table")
    parser.add_argument("--json", help="also write the headline figures to this JSON file")

    args = parser.parse_args()
    console = Console()
    headline = writer_table(args, console)
    if args.skip_model:
        write_json(args.json, headline, cores=os.cpu_count())
        return
    layers = parse_layers(args.layers)
    text = TextConfig(context_size=args.context_size)
    lm = load_model(smollm2.NAME)
    n_windows = args.tokens // args.context_size
    windows = np.stack(list(itertools.islice(token_windows(text, lm.tokenizer), n_windows)))

    with scratch(None, "actstore-bench-harvest-") as root:
        cfg = HarvestConfig(model=smollm2.NAME, out=str(root / "store"), layers=layers, text=text,
                            tokens=args.tokens, batch_size=args.batch_size, progress=False, overwrite=True,
                            shard_tokens=args.shard_tokens, writer_threads=args.writer_threads)
        assert count_passes(lm.model, lambda: harvest(cfg, model=lm)) == [args.batch_size] * (n_windows // args.batch_size) \
            + ([n_windows % args.batch_size] if n_windows % args.batch_size else []), "the harvest did not honour --batch-size"
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
    write_json(args.json, [*headline, ("harvest end to end / bare forward", f"{end_to_end / bare:.2f}", ""),
                           ("harvest steady state / bare forward", f"{steady / bare:.2f}", ""),
                           ("early exit at layer 7 / full model", f"{early / with_head:.1f}x", "")],
               bare_tokens_per_s=bare, harvest_tokens_per_s=end_to_end, steady_tokens_per_s=steady, cores=os.cpu_count())


if __name__ == "__main__":
    main()
