"""LoRA-around-SAE benchmark: the CE gap a LoRA finetune closes on SmolLM2-135M (arXiv 2501.19406).

In one run, all on this machine:

1. harvest ``blocks.L.hook_resid_post`` of SmolLM2-135M (L = 15 of 30, the middle) over the
   built-in corpus' ``train`` split (``pipelines.harvest``);
2. train a TopK SAE on it (``pipelines.train``, k 32, 8x expansion);
3. ``actstore lora``: LoRA on the attention and MLP projections of blocks L+1..29 around the
   frozen SAE, KL to the model with adapters off; before and after, on held-out windows of the
   ``test`` split (docstrings neither the SAE nor the adapters trained on): CE clean, CE with
   the SAE spliced in, KL, L0 and FVU, and the CE gap closed,
   ``(ce_sae_before - ce_sae_after) / (ce_sae_before - ce_clean)``.

Goal (issue 7): at least 30% of the gap closed (the paper reports 30-55% on Gemma-2-2B after
15M tokens) in about 15 minutes on 2 CPU cores: the paper's settings (rank 64, alpha 32, AdamW,
clip 1.0) but for the learning rate, 2e-4 rather than 5e-5, which the paper sets for 15M tokens;
this budget is 0.1M. (With 5e-5 the same run closed 28.1%.)

    python benchmarks/bench_lora.py [--layer 15] [--lora-tokens 98304] [--lr 2e-4] [--rank 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the model loader's bars

import torch  # noqa: E402
from rich.console import Console  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import scratch, write_json  # noqa: E402

from pipelines import smollm2  # noqa: E402
from pipelines.harvest import HarvestConfig, harvest  # noqa: E402
from pipelines.lora import LoRAConfig, train_lora  # noqa: E402
from pipelines.report import before_after_table  # noqa: E402
from pipelines.text import TextConfig  # noqa: E402
from pipelines.train import TrainSAEConfig, train_sae  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layer", type=int, default=15)
    p.add_argument("--context-size", type=int, default=256)
    p.add_argument("--harvest-tokens", type=int, default=131072)
    p.add_argument("--sae-tokens", type=int, default=262144, help="SAE training tokens (two passes over the store)")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--lora-tokens", type=int, default=98304)
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--batch-size", type=int, default=4, help="windows per LoRA step")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--out", help="keep the store, SAE and adapter here (default: a temporary folder)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    console = Console()
    with scratch(args.out, "bench-lora-") as root:
        hook = f"blocks.{args.layer}.hook_resid_post"
        t_all = time.perf_counter()
        console.print(f"torch threads {torch.get_num_threads()}; harvesting {args.harvest_tokens:,} tokens of {hook}...")
        t = time.perf_counter()
        harvest(HarvestConfig(model=smollm2.NAME, out=str(root / "store"), layers=(args.layer,), tokens=args.harvest_tokens,
                              text=TextConfig(context_size=args.context_size), codec="none", progress=False))
        t_harvest = time.perf_counter() - t

        t = time.perf_counter()
        trained = train_sae(TrainSAEConfig(store=str(root / "store"), hook=hook, out=str(root / "sae"), tokens=args.sae_tokens,
                                           archs=("topk",), expansions=(args.expansion,), lrs=(1e-3,), sparsity={"topk": (args.k,)},
                                           eval_tokens=min(8192, args.harvest_tokens // 8), progress=False, log_every=10**9))
        t_sae = time.perf_counter() - t
        row = trained.rows[0]
        sae_dir = root / "sae" / row["name"]
        held_out = (f"held-out FVU {row['eval_fvu']:.3f}, L0 {row['eval_l0']:.1f}" if "eval_fvu" in row
                    else "nothing held out (the store is a single shard)")
        console.print(f"  harvest {t_harvest:.0f} s; SAE {row['name']} in {t_sae:.0f} s, {held_out}")

        t = time.perf_counter()
        result = train_lora(LoRAConfig(model=smollm2.NAME, saes=(str(sae_dir),), out=str(root / "lora"), rank=args.rank,
                                       tokens=args.lora_tokens, eval_tokens=args.eval_tokens, batch_size=args.batch_size,
                                       lr=args.lr, text=TextConfig(split="train", context_size=args.context_size),
                                       checkpoint_every=0, progress=False))
        t_lora = time.perf_counter() - t
        before, after = result.before, result.after
        table = before_after_table(result, f"LoRA rank {args.rank}, lr {args.lr:g}, {result.tokens:,} training tokens, "
                                           f"around a TopK SAE at {hook} of SmolLM2-135M")
        console.print(table)
        total = time.perf_counter() - t_all
        console.print(f"CE gap closed: {result.ce_gap_closed:.1%} (goal >= 30%); lora stage {t_lora:.0f} s "
                      f"(training {result.seconds:.0f} s, {result.tokens / result.seconds:,.0f} tokens/s), whole run {total / 60:.1f} min")
        write_json(args.json, [("CE gap closed by LoRA around a TopK SAE", f"{result.ce_gap_closed:.1%}", ">= 30%"),
                               ("bench_lora whole run", f"{total / 60:.1f} min", "about 15 min")],
                   hook=hook, ce_gap_closed=result.ce_gap_closed, before=before.to_json(), after=after.to_json(),
                   seconds={"harvest": t_harvest, "sae": t_sae, "lora": t_lora, "lora_training": result.seconds, "total": total},
                   torch_threads=torch.get_num_threads(), args=vars(args))


if __name__ == "__main__":
    main()
