"""The harvest's writer fed by a synthetic producer, against the physical limit of the same cores.

A GPU harvest of Gemma-2-2B (26 layers x 2304, bf16: 120 KB per token at 20-50k tokens/s) needs
the store to take 2.4-6 GB/s. That is measured here without a GPU: a producer hands the real
:class:`actstore.StoreWriter` random bf16 activations of the model's shape as fast as it takes
them (shards submitted with :meth:`~actstore.StoreWriter.submit_shard`, the harvest's path), and
the same bytes are compressed by numcodecs' blosc-zstd (the store's codec) on a pool of the same
number of threads with no store around it: the most these cores can compress. Each run reports
GB/s with the statistics computed by the writer (a CPU harvest) or handed to it (a GPU harvest
sums them on the device), the cores it kept busy (process CPU time / wall time; the S3 server runs in its own
process so it is not counted), GB/s per busy core, and the share of the wall time the producer
spent blocked (backpressure: the writer was the bottleneck).
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import ml_dtypes
import numcodecs
import numpy as np

import actstore
from actstore.layout import BLOSC_BLOCK_BYTES
from actstore.stats import RunningStats

GEMMA_2_2B = (26, 2304)
"""Hooks (resid_post of every layer) and width of Gemma-2-2B."""


@dataclass(frozen=True)
class Run:
    label: str
    gb_per_s: float
    """Raw (uncompressed) activation bytes taken per second."""
    cores: float
    """Cores kept busy on average."""
    producer_blocked: float
    """Share of the wall time the producer waited for the writer (0 for the bare codec)."""

    @property
    def per_core(self) -> float:
        return self.gb_per_s / max(self.cores, 1e-9)


def random_acts(n_hooks: int, width: int, tokens: int, seed: int = 0) -> dict[str, np.ndarray]:
    """``{hook: [tokens, width]}`` bf16, normal values like a residual stream's (as incompressible)."""
    rng = np.random.default_rng(seed)
    return {f"blocks.{i}.hook_resid_post": rng.standard_normal((tokens, width), dtype=np.float32).astype(ml_dtypes.bfloat16)
            for i in range(n_hooks)}


def writer_config(acts: dict[str, np.ndarray], n_shards: int, codec: str, chunk_tokens: int = 256) -> actstore.StoreConfig:
    tokens, width = next(iter(acts.values())).shape
    return actstore.StoreConfig(
        model=actstore.ModelInfo("synthetic/gemma-2-2b-shaped", width, len(acts)), dataset=actstore.DatasetInfo("random"),
        hooks=tuple(acts), n_tokens_target=tokens * n_shards, context_size=chunk_tokens, dtype="bfloat16", codec=codec,
        chunk_tokens=chunk_tokens, shard_tokens=tokens)


def feed_writer(url: str, acts: dict[str, np.ndarray], n_shards: int, codec: str, threads: int, in_flight: int,
                label: str, device_stats: bool = False) -> Run:
    """Submit ``n_shards`` shards of ``acts`` to a new store at ``url`` as fast as the writer takes them.

    ``device_stats``: hand the writer each shard's statistics, as a GPU harvest does (summed on
    the device, :mod:`pipelines.transfer`), instead of the writer computing them on the host."""
    cfg = writer_config(acts, n_shards, codec)
    stats = {h: RunningStats.of(x) for h, x in acts.items()} if device_stats else None
    n = cfg.shard_tokens
    tokens_N, positions_N = np.zeros(n, np.int32), np.arange(n, dtype=np.int32) % cfg.context_size
    blocked = 0.0
    cpu0, t0 = time.process_time(), time.perf_counter()
    with actstore.StoreWriter(url, cfg, io_threads=threads, max_in_flight=in_flight, overwrite=True) as writer:
        futures = []
        for shard in range(n_shards):
            t = time.perf_counter()
            futures.append(writer.submit_shard(shard, tokens=tokens_N, positions=positions_N, acts=acts, stats=stats))
            blocked += time.perf_counter() - t
        t = time.perf_counter()
        for f in futures:
            f.result()
        blocked += time.perf_counter() - t
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    raw = n_shards * sum(x.nbytes for x in acts.values())
    return Run(label, raw / wall / 1e9, cpu / wall, blocked / wall)


def bare_codec(acts: dict[str, np.ndarray], n_shards: int, threads: int, chunk_tokens: int = 256) -> Run:
    """blosc-zstd of the same chunks with the store's settings (level, byte shuffle, block size) on ``threads`` threads."""
    cfg = writer_config(acts, n_shards, "zstd", chunk_tokens)
    codec = numcodecs.Blosc(cname="zstd", clevel=cfg.codec_level, shuffle=numcodecs.Blosc.SHUFFLE, blocksize=BLOSC_BLOCK_BYTES)
    chunks = [x[a : a + chunk_tokens].view(np.uint16) for x in acts.values() for a in range(0, len(x), chunk_tokens)]
    cpu0, t0 = time.process_time(), time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(n_shards):
            list(pool.map(codec.encode, chunks))
    wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    raw = n_shards * sum(x.nbytes for x in acts.values())
    return Run(f"numcodecs blosc-zstd alone, {threads} threads", raw / wall / 1e9, cpu / wall, 0.0)


@contextlib.contextmanager
def loopback_s3(bucket: str) -> Iterator[str | None]:
    """A moto S3 server in its own process on loopback, credentials and endpoint in the environment;
    yields ``s3://bucket`` (None when moto is not installed)."""
    try:
        import moto.server  # noqa: F401
    except ImportError:
        print("moto not installed: no S3 figure (pip install 'moto[server]')")
        yield None
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    old = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL_S3")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL_S3": endpoint})
    try:
        import s3fs

        deadline = time.time() + 30
        while True:
            try:
                s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir(bucket)
                break
            except Exception:
                if time.time() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.2)
        yield f"s3://{bucket}"
    finally:
        server.terminate()
        server.wait(timeout=30)
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
