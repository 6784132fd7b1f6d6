"""Group-SAE benchmark: AMAD layer groups of SmolLM2-135M, G group SAEs against L per-layer SAEs.

SmolLM2-135M's ``hook_resid_post`` at all 30 layers over the built-in corpus is harvested
(``pipelines.harvest``) into an uncompressed store; its last shards are held out. ``actstore
groups`` measures the layer distances and the AMAD curve and picks G (the smallest with AMAD at
most ``--amad-threshold``; Ghilardi et al. 2024, arXiv 2410.21508). Then, in the same run, with
the same settings and the same token budget per SAE (TopK, k, expansion, lr, ``--train-tokens``):

- L per-layer SAEs (``train-sae --hook`` on each layer),
- G group SAEs (``train-sae --groups``: each token at one layer drawn from its group),

both timed (wall clock, the whole ``train_sae`` calls), and every layer's held-out tokens
evaluated by its own SAE and by its group's SAE (:mod:`pipelines.group_eval`). Reported: the AMAD curve and chosen G, the
per-layer table (FVU and L0 side by side), the training time of the L SAEs over the G group
SAEs (the compute saved; L/G when every SAE costs the same), and the mean FVU change.

    python benchmarks/bench_groups.py [--tokens 49152] [--train-tokens 98304] [--amad-threshold 0.2]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the model loader's bars

from rich.console import Console  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from report import scratch, write_json  # noqa: E402

from pipelines import smollm2  # noqa: E402
from pipelines.group_eval import compare_groups  # noqa: E402
from pipelines.groups import GroupsConfig, find_groups  # noqa: E402
from pipelines.harvest import HarvestConfig, harvest  # noqa: E402
from pipelines.report import comparison_tables, plot_heatmap  # noqa: E402
from pipelines.text import TextConfig  # noqa: E402
from pipelines.train import TrainSAEConfig  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=49152, help="tokens harvested (all 30 layers)")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--train-tokens", type=int, default=98304, help="training tokens per SAE")
    p.add_argument("--group-tokens", type=int, default=32768, help="tokens sampled for the layer distances")
    p.add_argument("--amad-threshold", type=float, default=0.2)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--expansion", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--out", help="keep the store, SAEs and plots here (default: a temporary folder)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args()
    console = Console()
    with scratch(args.out, "bench-groups-") as root:
        console.print(f"harvesting {args.tokens:,} tokens of SmolLM2-135M at all 30 layers into {root / 'store'}...")
        t = time.perf_counter()
        harvest(HarvestConfig(model=smollm2.NAME, out=str(root / "store"), layers=tuple(range(30)), tokens=args.tokens,
                              text=TextConfig(context_size=256), codec="none", shard_tokens=4096, progress=False))
        console.print(f"  done in {time.perf_counter() - t:.0f} s")

        groups = find_groups(GroupsConfig(store=str(root / "store"), tokens=args.group_tokens, amad_threshold=args.amad_threshold))
        plot_heatmap(groups, root / "groups_heatmap.png")
        (root / "groups.json").write_text(json.dumps(groups.to_json(), indent=2) + "\n")
        layers, G = groups.hooks, groups.chosen
        console.print("AMAD by G: " + ", ".join(f"{g}: {v:.3f}" for g, v in groups.amad.items()))
        console.print(f"chosen G = {G} ({groups.rule}): " + " | ".join(",".join(h.split(".")[1] for h in g) for g in groups.groups))

        base = TrainSAEConfig(store=str(root / "store"), hook=layers[0], out=str(root / "saes"), tokens=args.train_tokens,
                              archs=("topk",), expansions=(args.expansion,), lrs=(args.lr,), sparsity={"topk": (args.k,)},
                              batch_size=args.batch_size, eval_tokens=args.eval_tokens, progress=False, log_every=10**9)
        console.print(f"training {G} group SAEs and {len(layers)} per-layer SAEs, {args.train_tokens:,} tokens each...")
        result = compare_groups(base, groups.groups)
        for table in comparison_tables(result):
            console.print(table)
        if args.out:
            console.print(f"heatmap: {root / 'groups_heatmap.png'}")
        summary = result.summary()
        write_json(args.json, [
            ("groups chosen (AMAD <= threshold)", f"{G} of {len(layers)} layers", ""),
            ("training time, per-layer SAEs / group SAEs", f"{summary['time_saved']:.1f}x", ""),
            ("held-out FVU change, group SAE vs own SAE (mean)", f"{summary['mean_fvu_change']:+.1%}", ""),
        ], amad=groups.amad, chosen=G, chosen_groups=groups.groups, **summary)


if __name__ == "__main__":
    main()
