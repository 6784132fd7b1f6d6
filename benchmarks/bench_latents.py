"""Latent-dashboard benchmark: ``actstore latents`` against the SAE encoder alone, and against
running the model again to get the same contexts.

SmolLM2-135M ``blocks.{layer}.hook_resid_post`` over the built-in corpus is harvested into a
zstd store (the harvest is timed from its first forward pass to its last commit, model loading
left out: what recomputing the activations costs at the least), a TopK SAE of ``d_sae`` latents is trained on it with ``actstore train-sae`` (one
epoch), and then, interleaved ``--repeats`` times on the same tokens:

- **encoder alone**: the same batches of ``batch`` tokens, read into memory beforehand as
  float32, through ``sae.encode`` and nothing else;
- **latents pass**: the pass of :func:`pipelines.latents.run_latents` (its ``pass_seconds``:
  read from the store, encode, every statistic and example, the final checkpoint);
- **latents command**: the whole run (tokenizer loading and the dashboards written included).

Reported (medians): tokens/s of each, the pass / encoder ratio (goal: at least 0.7) and the speed-up
of the whole command over harvesting the same tokens again. The pass has a start-up cost the
encoder has not: its first batches fill every latent's example lists, so nearly every firing
enters them (about 0.5 s on 2 cores); later batches add little. Short runs show it: about 0.67 at
65,536 tokens, 0.97 at 131,072 on this project's machine.

    python benchmarks/bench_latents.py [--tokens 131072] [--d-sae 4608] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

import torch  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from report import scratch, write_json  # noqa: E402

import actstore  # noqa: E402
from actstore.dtypes import to_torch  # noqa: E402
from pipelines.harvest import HarvestConfig, harvest  # noqa: E402
from pipelines.latent_stats import StatsConfig  # noqa: E402
from pipelines.latents import (  # noqa: E402
    LatentsConfig,
    run_latents,
    window_batch,  # noqa: E402
)
from pipelines.saes import load_sae  # noqa: E402
from pipelines.text import TextConfig  # noqa: E402
from pipelines.train import TrainSAEConfig, train_sae  # noqa: E402


def encoder_alone(sae: torch.nn.Module, batches: list[torch.Tensor]) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        for x_BD in batches:
            sae.encode(x_BD)
    return time.perf_counter() - t


def latents_run(store: str, sae_dir: str, out: Path, batch: int) -> tuple[float, float]:
    """Seconds of the pass (first read to last checkpoint) and of the whole command."""
    cfg = LatentsConfig(store=store, saes=(sae_dir,), out=str(out), batch_tokens=batch, stats=StatsConfig(),
                        progress=False, overwrite=True, checkpoint_every=1e9)
    t = time.perf_counter()
    result = run_latents(cfg)
    return result.pass_seconds, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=131_072)
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--d-sae", type=int, default=4608)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch", type=int, default=8192, help="tokens per batch")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", help="keep the store, SAE and dashboards here (default: a temporary folder)")
    p.add_argument("--json", help="write the figures to this JSON file")
    args = p.parse_args()
    console = Console()
    hook = f"blocks.{args.layer}.hook_resid_post"
    with scratch(args.out, "bench-latents-") as root:
        store_url = str(root / "store")
        harvested = harvest(HarvestConfig(model="smollm2-135m", out=store_url, layers=(args.layer,), tokens=args.tokens,
                              text=TextConfig(context_size=256), progress=False, overwrite=True))
        harvest_s = harvested.loop_seconds  # first forward pass to last commit: model loading left out
        store = actstore.open_store(store_url)
        n = store.n_tokens
        console.print(f"harvested {n:,} tokens of {hook} in {harvest_s:.1f} s ({n / harvest_s:,.0f} tokens/s)")
        train_sae(TrainSAEConfig(store=store_url, hook=hook, out=str(root / "sae"), tokens=n, archs=("topk",), lrs=(1e-3,),
                                 sparsity={"topk": (args.k,)}, expansions=(args.d_sae // store.config.width(hook),),
                                 eval_tokens=2048, batch_size=2048, progress=False, overwrite=True))
        sae_dir = str(next((root / "sae").glob("*/cfg.json")).parent)
        sae = load_sae(sae_dir).sae.eval()
        assert sae.cfg.d_sae == args.d_sae, sae.cfg.d_sae
        batch = window_batch(store, args.batch)
        batches = [to_torch(store.read(hook, s, min(s + batch, n))).float() for s in range(0, n, batch)]
        times: dict[str, list[float]] = {"encoder": [], "pass": [], "command": []}
        for r in range(args.repeats):
            times["encoder"].append(encoder_alone(sae, batches))
            pass_s, command_s = latents_run(store_url, sae_dir, root / "dash", batch)
            times["pass"].append(pass_s)
            times["command"].append(command_s)
            console.print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
        med = {k: statistics.median(v) for k, v in times.items()}
        rate = {k: n / v for k, v in med.items()}
        ratio = rate["pass"] / rate["encoder"]
        speedup = harvest_s / med["command"]
        table = Table(title=f"actstore latents: SmolLM2-135M {hook}, TopK d_sae {args.d_sae} k {args.k}, {n:,} tokens, "
                            f"batches of {batch:,} (medians of {args.repeats})", title_justify="left")
        for col in ("run", "seconds", "tokens/s", "vs encoder alone"):
            table.add_column(col, justify="left" if col == "run" else "right")
        table.add_row("SAE encoder alone, batches in memory", f"{med['encoder']:.2f}", f"{rate['encoder']:,.0f}", "1.00")
        table.add_row("latents pass (read, encode, statistics, examples)", f"{med['pass']:.2f}", f"{rate['pass']:,.0f}", f"{ratio:.2f}")
        table.add_row("latents command (pass + dashboards written)", f"{med['command']:.2f}", f"{rate['command']:,.0f}",
                      f"{rate['command'] / rate['encoder']:.2f}")
        table.add_row("harvest the same tokens again (model forward)", f"{harvest_s:.2f}", f"{n / harvest_s:,.0f}",
                      f"{(n / harvest_s) / rate['encoder']:.2f}")
        console.print(table)
        console.print(f"latents pass / encoder alone: {ratio:.2f} (goal >= 0.7); the whole command is {speedup:.1f}x "
                      "faster than running the model again to get the same contexts")
        write_json(args.json, [("latents pass / SAE encoder alone", f"{ratio:.2f}", ">= 0.7"),
                               ("latents command vs harvesting again", f"{speedup:.1f}x", "")],
                   tokens=n, seconds=med, harvest_seconds=harvest_s, batch=batch, d_sae=args.d_sae)


if __name__ == "__main__":
    main()
