"""Store benchmark on real SmolLM2-135M activations from the built-in corpus.

Prints, measured side by side in one run on the same bytes:

- write throughput of the store (bf16, zstd and none) over plain ``ndarray.tofile`` of the
  same raw bytes, one file per hook and shard (ratio > 1: the store is faster);
- read throughput of ``Store.read`` over plain ``np.fromfile`` of those files;
- compression ratios per dtype and codec (plain zstd-1 without shuffling for reference);
- the fp8 mode's error against the float32 activations, beside bf16's rounding error.

    python benchmarks/bench_store.py [--tokens 16384] [--layers 0,7,14,21,28]
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numcodecs
import numpy as np
import torch
from report import scratch, write_json
from rich.console import Console
from rich.table import Table

import actstore
from actstore.dtypes import encode_acts, fp8_dequantize
from actstore.units import parse_layers
from pipelines import corpus, smollm2
from pipelines.capture import ActivationCapture, hook_name
from pipelines.models import load_model
from pipelines.text import TextConfig, token_windows


@dataclass(frozen=True)
class Capture:
    """Activations of N tokens: ids, positions, and ``acts[hook]`` float32 ``[N, D]``."""

    tokens_N: np.ndarray
    positions_N: np.ndarray
    acts: dict[str, np.ndarray]


def capture(lm, layers: list[int], n_tokens: int, context_size: int = 256, batch_size: int = 8,
            sites: tuple[str, ...] = ("resid_post",)) -> Capture:
    """``sites`` (default ``hook_resid_post``) of ``layers`` over the first ``n_tokens`` tokens of the built-in corpus."""
    windows = np.stack(list(itertools.islice(token_windows(TextConfig(context_size=context_size), lm.tokenizer), n_tokens // context_size)))
    hooks = [hook_name(layer, site) for layer in layers for site in sites]
    parts: dict[str, list[np.ndarray]] = {h: [] for h in hooks}
    with ActivationCapture(lm.model, hooks) as cap:
        for i in range(0, len(windows), batch_size):
            for h, x in cap.run(torch.from_numpy(windows[i : i + batch_size])).items():
                parts[h].append(x.float().numpy())
    positions = np.tile(np.arange(context_size, dtype=np.int32), len(windows))
    return Capture(windows.reshape(-1), positions, {h: np.concatenate(p) for h, p in parts.items()})


def store_config(lm, cap: Capture, context_size: int, **changes) -> actstore.StoreConfig:
    return actstore.StoreConfig(
        model=actstore.ModelInfo(smollm2.NAME, lm.d_model, lm.n_layers),
        dataset=actstore.DatasetInfo(corpus.NAME),
        hooks=tuple(cap.acts),
        n_tokens_target=len(cap.tokens_N),
        context_size=context_size,
        **changes,
    )


def write_capture(url: str, cap: Capture, cfg: actstore.StoreConfig, overwrite: bool = False) -> actstore.Store:
    """Write a capture into a store, shard by shard."""
    with actstore.open_store(url, "w" if overwrite else "a", config=cfg) as w:
        for shard in w.pending_shards():
            a, b = w.shard_range(shard)
            w.write_shard(shard, tokens=cap.tokens_N[a:b], positions=cap.positions_N[a:b],
                          acts={h: x[a:b] for h, x in cap.acts.items()})
    return actstore.open_store(url)


def best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def plain_write(root: Path, cap_bf16: dict[str, np.ndarray], shard_tokens: int) -> None:
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    for i, x in enumerate(cap_bf16.values()):
        for s, a in enumerate(range(0, len(x), shard_tokens)):
            x[a : a + shard_tokens].tofile(root / f"{i}-{s}.bin")


def plain_read(root: Path, cap_bf16: dict[str, np.ndarray]) -> int:
    n = 0
    for f in sorted(root.iterdir()):
        n += np.fromfile(f, dtype=np.uint16).nbytes
    return n


def store_read(url: str) -> int:
    store = actstore.open_store(url)
    return sum(store.read(h).nbytes for h in store.hooks)


def fp8_errors(x_ND: np.ndarray) -> tuple[float, float, float]:
    """Mean and max per-token relative L2 error, and mean cosine similarity, of fp8 vs float32."""
    q, s = encode_acts(x_ND, "float8_e4m3fn")
    y = fp8_dequantize(q, s)
    rel = np.linalg.norm(y - x_ND, axis=1) / np.maximum(np.linalg.norm(x_ND, axis=1), 1e-12)
    cos = (y * x_ND).sum(1) / np.maximum(np.linalg.norm(y, axis=1) * np.linalg.norm(x_ND, axis=1), 1e-12)
    return float(rel.mean()), float(rel.max()), float(cos.mean())


def bf16_error(x_ND: np.ndarray) -> float:
    y = encode_acts(x_ND, "bfloat16")[0].astype(np.float32)
    return float((np.linalg.norm(y - x_ND, axis=1) / np.maximum(np.linalg.norm(x_ND, axis=1), 1e-12)).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description="actstore store benchmark")
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--layers", default="0,7,14,21,28")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", default=None, help="scratch folder (default: a temp dir)")
    parser.add_argument("--json", help="also write the headline figures to this JSON file")
    args = parser.parse_args()
    console = Console()
    with scratch(args.dir, "actstore-bench-") as work:

        lm = load_model(smollm2.NAME)
        layers = list(parse_layers(args.layers))
        t0 = time.perf_counter()
        cap = capture(lm, layers, args.tokens, context_size=256)
        console.print(f"captured {args.tokens} tokens x {len(layers)} layers of {smollm2.NAME} in {time.perf_counter() - t0:.1f}s")
        cap_bf16 = {h: encode_acts(x, "bfloat16")[0] for h, x in cap.acts.items()}
        cfg = store_config(lm, cap, 256)
        raw_bytes = sum(x.nbytes for x in cap_bf16.values())

        # ---- throughput, side by side -------------------------------------------------------
        rows = []
        plain_dir = work / "plain"
        t_plain_w = best_of(args.repeats, lambda: plain_write(plain_dir, cap_bf16, cfg.shard_tokens))
        t_plain_r = best_of(args.repeats, lambda: plain_read(plain_dir, cap_bf16))
        bf16_cap = Capture(cap.tokens_N, cap.positions_N, cap_bf16)
        for codec in ("zstd", "none"):
            url = str(work / f"store-{codec}")
            c = cfg.with_(codec=codec)
            t_w = best_of(args.repeats, lambda c=c, url=url: write_capture(url, bf16_cap, c, overwrite=True))
            t_r = best_of(args.repeats, lambda url=url: store_read(url))
            rows.append((f"bf16 {codec}", t_w, t_r))
        mb = raw_bytes / 1e6
        table = Table(title=f"store throughput vs plain files ({mb:.0f} MB of bf16 activations, {os.cpu_count()} cores, page cache)")
        for col in ("", "write MB/s", "write ratio", "read MB/s", "read ratio"):
            table.add_column(col, justify="right")
        table.add_row("plain files", f"{mb / t_plain_w:.0f}", "1.00", f"{mb / t_plain_r:.0f}", "1.00")
        for name, t_w, t_r in rows:
            table.add_row(f"store {name}", f"{mb / t_w:.0f}", f"{t_plain_w / t_w:.2f}", f"{mb / t_r:.0f}", f"{t_plain_r / t_r:.2f}")
        console.print(table)
        headline = [(f"store {name} {kind} / plain files", f"{t_plain / t:.2f}", "")
                    for name, t_w, t_r in rows for kind, t_plain, t in (("write", t_plain_w, t_w), ("read", t_plain_r, t_r))]

        # ---- compression ----------------------------------------------------------------------
        comp = Table(title="compression on real activations (raw bytes of the stored dtype / bytes stored)")
        for col in ("dtype", "codec", "ratio", "bytes/value on disk"):
            comp.add_column(col, justify="right")
        zstd1 = numcodecs.Zstd(level=1)
        chunks = [np.ascontiguousarray(x[a : a + cfg.chunk_tokens]) for x in cap_bf16.values() for a in range(0, len(x), cfg.chunk_tokens)]
        plain_ratio = sum(c.nbytes for c in chunks) / sum(len(zstd1.encode(c.tobytes())) for c in chunks)
        comp.add_row("bfloat16", "zstd-1, no shuffle (reference)", f"{plain_ratio:.3f}", f"{2 / plain_ratio:.3f}")
        for dtype in ("bfloat16", "float16", "float32", "float8_e4m3fn"):
            url = str(work / f"comp-{dtype}")
            s = write_capture(url, cap, cfg.with_(dtype=dtype), overwrite=True).summary()
            values = s["n_tokens"] * sum(cfg.width(h) for h in cfg.hooks)
            comp.add_row(dtype, "zstd-1 byte-shuffled", f"{s['compression_ratio']:.3f}", f"{s['acts_bytes_stored'] / values:.3f}")
            if dtype == "bfloat16":
                headline.append(("compression, bf16 zstd-1 byte-shuffled", f"{s['compression_ratio']:.2f}x", ""))
        console.print(comp)

        # ---- fp8 error ------------------------------------------------------------------------
        err = Table(title="fp8 (e4m3fn, per-token scale) error against float32 activations, per hook")
        for col in ("hook", "fp8 mean rel. L2", "fp8 max rel. L2", "fp8 mean cosine", "bf16 mean rel. L2"):
            err.add_column(col, justify="right")
        for hook, x in cap.acts.items():
            mean_rel, max_rel, cos = fp8_errors(x)
            err.add_row(hook, f"{mean_rel:.4f}", f"{max_rel:.4f}", f"{cos:.5f}", f"{bf16_error(x):.4f}")
        console.print(err)
        write_json(args.json, headline, megabytes=mb, cores=os.cpu_count())


if __name__ == "__main__":
    main()
