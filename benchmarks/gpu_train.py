"""Training-side rows of the GPU smoke script: the trainer and the stream against the device's own limits.

- TopK SAE training tokens/s (the real :class:`trainers.trainer.Trainer`, batches already on the
  device so the data path is not measured) at fp32 with TF32 and at bf16 autocast, against one
  encoder matmul ``[B, D] @ [D, F]`` of the same shape timed in the same run, in strict fp32 and
  in bf16: the bound no TopK step can beat, since its one dense product is that matmul (the issue's
  goal: >= 0.5 of the fp32 bound, >= 1M tokens/s at 16k latents on an H100-class GPU);
- the stream (:func:`actstore.stream`) from a local store into device memory, tokens/s of bf16
  activations (goal >= 1M tokens/s at d 2304);
- the sparse TopK step against the dense reference on the device (:func:`trainers.kernel_check.check_against_dense`).

Everything takes the device as a parameter; ``gpu_smoke.py --reduced`` runs it on the CPU with small shapes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from synthetic import feed_writer, random_acts

import actstore
from trainers import sae_config
from trainers.trainer import Experiment, TrainConfig, Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, batch: int, d_in: int, d_sae: int, dtype: torch.dtype, repeats: int = 20) -> float:
    """Tokens/s of the encoder matmul alone: ``batch`` tokens per ``[B, D] @ [D, F]`` in ``dtype``
    (fp32 strictly: TF32 off while timed)."""
    x_BD = torch.randn(batch, d_in, device=device, dtype=dtype)
    W_DF = torch.randn(d_in, d_sae, device=device, dtype=dtype)
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        for _ in range(3):
            x_BD @ W_DF
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            x_BD @ W_DF
        sync(device)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    return batch * repeats / (time.perf_counter() - t0)


def train_rate(device: torch.device, batch: int, d_in: int, d_sae: int, k: int, dtype: str, steps: int, warmup: int = 5,
               auxk: bool = False) -> float:
    """Tokens/s of TopK training steps on device-resident batches: no latent dead yet (AuxK skipped,
    the state of a healthy run), or with ``auxk`` every latent unfired for one step dead, so AuxK's
    ``aux_k`` (512) extra latents per token are selected, decoded and differentiated every step."""
    gen = torch.Generator(device=device).manual_seed(0)
    pool = [torch.randn(batch, d_in, device=device, generator=gen) for _ in range(4)]
    cfg = TrainConfig(tokens=batch * (steps + warmup), device=str(device), dtype=dtype, log_every=steps + warmup,
                      dead_tokens=batch if auxk else 10_000_000)
    exp = Experiment("topk", sae_config("topk", d_in=d_in, d_sae=d_sae, k=k))
    batches = itertools.cycle(pool)
    trainer = Trainer(cfg, [exp], (next(batches) for _ in range(steps + warmup)))
    timer: dict[str, float] = {}

    def on_step(step: int, _tokens: int) -> None:
        if step == warmup:
            sync(device)
            timer["t0"] = time.perf_counter()

    trainer.on_step = on_step
    trainer.fit()
    sync(device)
    return batch * steps / (time.perf_counter() - timer["t0"])


def stream_rate(folder: Path, device: torch.device, d_in: int, shard_tokens: int, n_shards: int, batch: int, codec: str) -> float:
    """Tokens/s of bf16 batches streamed from a local ``codec`` store of one hook into ``device`` memory."""
    acts = random_acts(1, d_in, shard_tokens)
    url = str(folder / f"stream-{codec}")
    feed_writer(url, acts, n_shards, codec, 4, 2, "stream")
    hook = next(iter(acts))
    store = actstore.open_store(url)
    n = 0
    t0 = time.perf_counter()
    for x in actstore.stream(store, hook, batch, dtype="bfloat16", device=str(device), normalize="none"):
        n += len(x)
    sync(device)
    return n / (time.perf_counter() - t0)


def rows(folder: Path, device: torch.device, reduced: bool) -> list[tuple[str, str, str]]:
    """The table rows: (check, measured, goal)."""
    from trainers.kernel_check import check_against_dense

    d_in, batch, k = (64, 512, 8) if reduced else (2304, 4096, 64)
    widths = (1024,) if reduced else (16384, 65536)
    steps = 5 if reduced else 50
    out = []
    for d_sae in widths:
        bound32 = matmul_rate(device, batch, d_in, d_sae, torch.float32)
        bound16 = matmul_rate(device, batch, d_in, d_sae, torch.bfloat16)
        fp32 = train_rate(device, batch, d_in, d_sae, k, "float32", steps)
        bf16 = train_rate(device, batch, d_in, d_sae, k, "bfloat16", steps)
        aux = train_rate(device, batch, d_in, d_sae, k, "bfloat16", steps, auxk=True)
        label = f"TopK {d_sae // 1024}k latents, k {k}, batch {batch}"
        if "triton" in backends(device):  # the backend auto does not take, side by side
            with kernel_env("triton"):
                out.append((f"{label}: bf16 training, Triton kernels (tokens/s)",
                            f"{train_rate(device, batch, d_in, d_sae, k, 'bfloat16', steps):,.0f}", ""))
        out += [(f"{label}: fp32 (TF32) training (tokens/s)", f"{fp32:,.0f}", ">= 1,000,000" if d_sae == 16384 else ""),
                (f"{label}: bf16 training (tokens/s)", f"{bf16:,.0f}", ""),
                (f"{label}: bf16 training, AuxK every step (tokens/s)", f"{aux:,.0f}", ""),
                (f"{label}: encoder matmul alone, fp32 / bf16 (tokens/s)", f"{bound32:,.0f} / {bound16:,.0f}", ""),
                (f"{label}: training / fp32 matmul bound, fp32 (TF32) / bf16", f"{fp32 / bound32:.2f} / {bf16 / bound32:.2f}", ">= 0.5")]
    shard = 2048 if reduced else 16384
    for codec in ("zstd", "none"):
        rate = stream_rate(folder, device, d_in, shard, 4 if reduced else 16, batch, codec)
        out.append((f"stream into {device.type} memory, local {codec} store, d {d_in} bf16 (tokens/s)", f"{rate:,.0f}",
                    ">= 1,000,000"))
    for backend in backends(device):
        with kernel_env(backend):
            check = check_against_dense(device, d_in=d_in, d_sae=widths[0], k=k, batch=batch)
        worst = max(float(v) for key, v in check.items() if key.startswith("rel_err"))
        out.append((f"TopK sparse step vs fp64 dense reference on {device.type} ({check['backend']}), worst rel. error",
                    f"{worst:.1e}", "< 1e-3"))
    return out


def backends(device: torch.device) -> list[str]:
    """The sparse backends to check on ``device``: torch's, and Triton's where it can run."""
    from trainers import triton_kernels

    return ["torch"] + (["triton"] if device.type == "cuda" and triton_kernels.UNAVAILABLE is None else [])


@contextlib.contextmanager
def kernel_env(backend: str) -> Iterator[None]:
    """``ACTSTORE_SPARSE_KERNEL=backend`` while open."""
    from trainers.sparse import KERNEL_ENV

    saved = os.environ.get(KERNEL_ENV)
    os.environ[KERNEL_ENV] = backend
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(KERNEL_ENV)
        else:
            os.environ[KERNEL_ENV] = saved
