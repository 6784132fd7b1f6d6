"""Stream benchmark: shuffled batch throughput against a plain sequential read of the same files.

Real SmolLM2-135M ``hook_resid_post`` activations from the built-in corpus (captured once,
then tiled to the store size: chunks compress independently, so tiling keeps the ratios) are
written as bf16 stores, uncompressed and zstd. Measured side by side, interleaved, median of
``--repeats`` runs, page cache warm for both (the new store's files written back, evicted and
read once first, as for a store harvested earlier):

- ``actstore.stream`` (stored dtype, ``--epochs`` passes): activation bytes delivered per second
  over the whole run (the store opened afresh inside the timed span), over the first epoch (which
  also verifies every chunk's checksum once and, for uncompressed stores, faults the mapped pages
  in) and over the later epochs (the rate of a multi-epoch run once the store is mapped);
- plain sequential read of the same shard files (``open().read()``, one after another):
  file bytes per second. Ratio = stream / plain (the goal is >= 0.70 uncompressed);
- the same against the loopback S3 server (moto), plain being ``cat_file`` of each object;
- S3 latency: a larger S3 store (``--s3-latency-tokens``, several blocks) streamed through a
  proxy that delays every request by ``--s3-latency-ms`` (20: a region's time to first byte;
  :mod:`s3proxy`) and with no delay, against the same store streamed from local disk in the same
  run (the issue's goal is >= 0.5 with the delay) and against itself without the delay (1.00: the
  delay entirely hidden), with the requests made and the most in flight at once, and the plain
  S3 read beside them (what the server delivers: moto on these 2 cores serves a few hundred
  requests a second, far slower than the page cache, so it bounds every S3 figure here);
- shuffle quality: same-context pairs per batch over an ideal uniform shuffle's rate, for
  several memory budgets, beside a SAELens-like mixing buffer holding as many tokens.

    python benchmarks/bench_stream.py [--tokens 524288] [--batch-size 4096] [--repeats 5] [--s3-only]
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_store import Capture, capture, store_config, write_capture  # noqa: E402
from report import scratch, write_json  # noqa: E402
from s3proxy import S3Proxy  # noqa: E402
from synthetic import loopback_s3  # noqa: E402

import actstore  # noqa: E402
from actstore.stream.plan import ideal_same_context_rate, same_context_rate  # noqa: E402
from actstore.units import parse_layers  # noqa: E402
from pipelines import smollm2  # noqa: E402
from pipelines.models import load_model  # noqa: E402

CONTEXT = 256


def tiled(cap: Capture, n_tokens: int) -> Capture:
    reps = -(-n_tokens // len(cap.tokens_N))
    return Capture(
        np.tile(cap.tokens_N, reps)[:n_tokens], np.tile(cap.positions_N, reps)[:n_tokens],
        {h: np.tile(x, (reps, 1))[:n_tokens] for h, x in cap.acts.items()},
    )


def shard_files(store: actstore.Store, hooks: list[str]) -> list[str]:
    fs, root = store.loc.fs, store.loc.root
    return sorted(p for h in hooks for p in fs.find(f"{root}/acts/{h}/c"))


def reread(files: list[str]) -> None:
    """Put freshly written files in the page cache as a store harvested earlier is: written back,
    evicted, then read once (pages the writer left behind are laid out differently: gathers
    from them ran 10-20% slower here, a plain read no slower), so the timings that follow
    read the same warm pages, both of them."""
    os.sync()
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            while os.read(fd, 16 << 20):
                pass
        finally:
            os.close(fd)


def plain_read(store: actstore.Store, files: list[str]) -> float:
    """File bytes per second reading ``files`` whole, one after another."""
    t = time.perf_counter()
    if store.loc.url.startswith("s3://"):
        n = sum(len(store.loc.fs.cat_file(f)) for f in files)
    else:
        n = 0
        for f in files:
            with open(f, "rb") as fh:
                n += len(fh.read())
    return n / (time.perf_counter() - t)


def stream_read(store: actstore.Store, hooks: list[str], batch_size: int, epochs: int, memory: str,
                storage_options: dict | None = None) -> tuple[float, ...]:
    """Activation bytes per second delivered by the shuffled stream (stored dtype): over the
    whole run (the store opened afresh just before, so shard indexes are read inside the timed
    span, and the first block is read before the first batch), over the first epoch (up to the
    first batch that ends in the second), and over the rest (NaN for one epoch)."""
    fresh = actstore.open_store(store.url, storage_options=storage_options)
    n = 0
    t = time.perf_counter()
    split: tuple[float, int] | None = None
    s = actstore.stream(fresh, hooks if len(hooks) > 1 else hooks[0], batch_size, dtype=None, epochs=epochs, memory=memory)
    for batch in s:
        n += batch.numel() * batch.element_size()
        if split is None and s.cursor.epoch >= 1:
            split = time.perf_counter(), n
    end = time.perf_counter()
    if split is None or split[1] == n:
        return n / (end - t), n / (end - t), float("nan")
    return n / (end - t), split[1] / (split[0] - t), (n - split[1]) / (end - split[0])


def ratio_cells(plain: list[float], streamed: list[tuple[float, ...]]) -> list[str]:
    """Plain MB/s, then MB/s and ratio for the whole run, the first epoch and the later ones."""
    pm = statistics.median(plain)
    cells = [f"{pm / 1e6:,.0f}"]
    for rates in zip(*streamed, strict=True):
        rate = statistics.median(rates)
        cells += ["", ""] if math.isnan(rate) else [f"{rate / 1e6:,.0f}", f"{rate / pm:.2f}"]
    return cells


def quality(store: actstore.Store, hook: str, batch_size: int, memory: str) -> tuple[int, float]:
    contexts = np.arange(store.n_tokens) - store.positions()
    s = actstore.stream(store, hook, batch_size, memory=memory)
    batches = [contexts[b.index_B.numpy()] for b in s.indexed()]
    return s.block_tokens, same_context_rate(batches) / ideal_same_context_rate(contexts)


def mixing_buffer_quality(store: actstore.Store, batch_size: int, buffer_tokens: int, seed: int = 0) -> float:
    """SAELens-like: contexts read in order into a buffer of ``buffer_tokens``, shuffled, the
    first half served as batches, the rest kept and the buffer refilled."""
    contexts = np.arange(store.n_tokens) - store.positions()
    rng = np.random.default_rng(seed)
    serve = max(batch_size, (buffer_tokens // 2) // batch_size * batch_size)
    buf = np.zeros(0, dtype=np.int64)
    batches, nxt = [], 0
    while nxt < len(contexts) or len(buf):
        take = max(0, buffer_tokens - len(buf))
        buf = rng.permutation(np.concatenate([buf, contexts[nxt : nxt + take]]))
        nxt += take
        n = min(serve, len(buf)) if nxt < len(contexts) else len(buf)
        batches.extend(buf[i : i + batch_size] for i in range(0, n, batch_size))
        buf = buf[n:]
    return same_context_rate(batches) / ideal_same_context_rate(contexts)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=524288)
    p.add_argument("--capture-tokens", type=int, default=16384)
    p.add_argument("--layers", default="3,6,9,12")
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--memory", default="256MiB")
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per figure (median); ratios move by several hundredths between runs here")
    p.add_argument("--s3-tokens", type=int, default=32768)
    p.add_argument("--s3-latency-tokens", type=int, default=262144,
                   help="tokens of the S3 latency rows' store (several blocks, so read-ahead can hide the delay)")
    p.add_argument("--s3-latency-ms", type=float, default=20.0, help="delay of every request in the S3 latency rows")
    p.add_argument("--s3-only", action="store_true", help="only the S3 rows (no local stores, no shuffle quality)")
    p.add_argument("--json", help="also write the headline figures to this JSON file")
    args = p.parse_args()
    console = Console(width=max(Console().width, 120))
    layers = list(parse_layers(args.layers))
    console.print(f"capturing {args.capture_tokens} tokens of SmolLM2-135M at layers {layers}...")
    lm = load_model(smollm2.NAME)
    cap = tiled(capture(lm, layers, args.capture_tokens, context_size=CONTEXT), args.tokens)
    hooks = list(cap.acts)
    with scratch(None, "bench-stream-") as tmp:

        table = Table(title=f"shuffled stream vs plain sequential read ({os.cpu_count()} cores, torch threads {torch.get_num_threads()}, "
                            f"batch {args.batch_size}, memory {args.memory}, median of {args.repeats})")
        for col in ("store (bf16)", "hooks", "plain MB/s", "stream MB/s", "ratio", "epoch 1 MB/s", "ratio ", "epochs 2+ MB/s", "ratio  "):
            table.add_column(col, justify="right" if col != "store (bf16)" else "left")
        headline: list[tuple[str, str, str]] = []
        for codec in () if args.s3_only else ("none", "zstd"):
            cfg = store_config(lm, cap, CONTEXT, dtype="bfloat16", codec=codec)
            store = write_capture(str(tmp / codec), cap, cfg)
            reread(shard_files(store, hooks))
            for chosen in (hooks[:1], hooks):
                files = shard_files(store, chosen)
                plain, streamed = [], []
                for _ in range(args.repeats):
                    plain.append(plain_read(store, files))
                    streamed.append(stream_read(store, chosen, args.batch_size, args.epochs, args.memory))
                cells = ratio_cells(plain, streamed)
                table.add_row(f"local, {codec}", str(len(chosen)), *cells)
                goal = ">= 0.70" if codec == "none" else ""
                headline += [(f"stream / plain read, local {codec}, {len(chosen)} hook(s), whole run ({args.epochs} epochs)", cells[2], goal),
                             (f"stream / plain read, local {codec}, {len(chosen)} hook(s), 1st epoch / later epochs",
                              f"{cells[4]} / {cells[6]}", "")]

        latency = None
        with loopback_s3("bench") as bucket:
            if bucket is not None:
                s3 = s3_store(cap, lm, args.s3_tokens, bucket)
                files = shard_files(s3, hooks[:1])
                plain = [plain_read(s3, files) for _ in range(args.repeats)]
                streamed = [stream_read(s3, hooks[:1], args.batch_size, 1, args.memory) for _ in range(args.repeats)]
                cells = ratio_cells(plain, streamed)
                table.add_row("S3 (moto, loopback), none", "1", *cells)
                headline.append(("stream / plain read, S3 (moto, loopback), 1 hook, whole run", cells[2], ""))
                big = s3_store(cap, lm, args.s3_latency_tokens, f"{bucket}/latency")
                latency = latency_table(big, s3_store(cap, lm, args.s3_latency_tokens, str(tmp)), hooks[:1], args,
                                        [plain_read(big, shard_files(big, hooks[:1])) for _ in range(args.repeats)], headline)
        console.print(table)
        if latency is not None:
            console.print(latency)
        if args.s3_only:
            write_json(args.json, headline, cores=os.cpu_count(), torch_threads=torch.get_num_threads())
            return

        store = actstore.open_store(str(tmp / "none"))
        q = Table(title=f"shuffle quality: same-context pairs per batch / ideal uniform shuffle (store {store.n_tokens} tokens, "
                        f"contexts of {CONTEXT}, batch {args.batch_size}; ideal = 1, goal <= 2)")
        for col in ("order", "tokens mixed", "ratio"):
            q.add_column(col, justify="right" if col != "order" else "left")
        for memory in ("2GiB", "128MiB", "32MiB", "8MiB"):
            block, ratio = quality(store, hooks[0], args.batch_size, memory)
            q.add_row(f"actstore memory={memory}", f"{block:,} per block", f"{ratio:.2f}")
            headline.append((f"shuffle quality, memory {memory} (ideal 1)", f"{ratio:.2f}", "<= 2" if memory == "2GiB" else ""))
            if block < store.n_tokens:  # a mixing buffer holding as many tokens as actstore's two blocks
                q.add_row("  mixing buffer, same memory (SAELens-like)", f"{2 * block:,} in buffer",
                          f"{mixing_buffer_quality(store, args.batch_size, 2 * block):.2f}")
        console.print(q)
        write_json(args.json, headline, cores=os.cpu_count(), torch_threads=torch.get_num_threads())


def s3_store(cap: Capture, lm, n_tokens: int, root: str) -> actstore.Store:
    """The first hook's ``n_tokens`` tokens, uncompressed, in a store under ``root`` (s3://bucket, or a local folder)."""
    small = tiled(Capture(cap.tokens_N, cap.positions_N, {h: x for h, x in list(cap.acts.items())[:1]}), n_tokens)
    return write_capture(f"{root}/stream", small, store_config(lm, small, CONTEXT, dtype="bfloat16", codec="none"))


def latency_table(s3: actstore.Store, local: actstore.Store, hooks: list[str], args: argparse.Namespace, plain: list[float],
                  headline: list) -> Table:
    """The S3 store streamed through :class:`S3Proxy` with ``--s3-latency-ms`` per request and with
    none, and the same store from local disk (page cache warm), interleaved: MB/s and the ratio
    to local for the whole run, the first epoch and the later ones, and the delayed whole run over
    the undelayed one (1.00: the delay is entirely hidden). Beside them the ``plain`` reads of the
    S3 objects one after another (no proxy): what this server delivers to a simple reader."""
    reread(shard_files(local, hooks))
    delay = args.s3_latency_ms / 1e3
    runs: dict[float, list[tuple[float, ...]]] = {0.0: [], delay: []}
    counts: dict[float, tuple[int, int]] = {}
    local_runs = []
    with S3Proxy(os.environ["AWS_ENDPOINT_URL_S3"]) as proxy:
        opts = {"endpoint_url": proxy.url, "skip_instance_cache": True}
        for _ in range(args.repeats):
            local_runs.append(stream_read(local, hooks, args.batch_size, args.epochs, args.memory))
            for d in runs:
                proxy.delay = d
                proxy.reset_counts()
                runs[d].append(stream_read(s3, hooks, args.batch_size, args.epochs, args.memory, opts))
                counts[d] = proxy.requests, proxy.max_in_flight
    t = Table(title=f"S3 latency: an S3 store streamed through a proxy adding a delay to every request, against the same "
                    f"store on local disk ({s3.n_tokens:,} tokens, 1 hook, {args.epochs} epochs, memory {args.memory}, median of {args.repeats})")
    for col in ("store (bf16, none)", "stream MB/s", "/ local", "/ no delay", "epoch 1 MB/s", "/ local ", "epochs 2+ MB/s",
                "/ local  ", "requests", "most in flight"):
        t.add_column(col, justify="right" if col != "store (bf16, none)" else "left", no_wrap=col == "store (bf16, none)")
    base = [statistics.median(r) for r in zip(*local_runs, strict=True)]
    t.add_row("local disk", f"{base[0] / 1e6:,.0f}", "", "", *[c for b in base[1:] for c in (f"{b / 1e6:,.0f}", "")], "", "")
    ceiling = statistics.median(plain)
    t.add_row("S3 plain read, no delay", f"{ceiling / 1e6:,.0f}", f"{ceiling / base[0]:.2f}", *[""] * 7)
    undelayed = statistics.median(r[0] for r in runs[0.0])
    for d, rs in runs.items():
        cells = []
        for rates, b in zip(zip(*rs, strict=True), base, strict=True):
            rate = statistics.median(rates)
            cells += ["", ""] if math.isnan(rate) else [f"{rate / 1e6:,.0f}", f"{rate / b:.2f}"]
        hidden = f"{statistics.median(r[0] for r in rs) / undelayed:.2f}"
        label = f"S3 (moto + {d * 1e3:g} ms per request)" if d else "S3 (moto, no delay)"
        t.add_row(label, *cells[:2], hidden, *cells[2:], f"{counts[d][0]:,}", str(counts[d][1]))
        if d:
            headline += [(f"stream S3 (moto + {d * 1e3:g} ms per request) / stream local, same store, 1 hook, whole run "
                          f"({args.epochs} epochs)", cells[1], ">= 0.5"),
                         (f"stream S3 (moto + {d * 1e3:g} ms per request) / S3 without the delay, whole run", hidden, ""),
                         (f"stream S3 (moto + {d * 1e3:g} ms per request) / plain S3 read (the server's rate), whole run",
                          f"{statistics.median(r[0] for r in rs) / ceiling:.2f}", "")]
    return t


if __name__ == "__main__":
    main()
