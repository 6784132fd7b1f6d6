"""``actstore demo``: the whole pipeline on SmolLM2-135M and the built-in corpus, offline.

The stages, each the same function the CLI command runs, each with its own progress bar:

1. ``harvest``: ``hook_resid_post`` of every third block (0, 3, ..., 27) over the corpus'
   ``train`` split into ``out/store``;
2. ``info``: the store's summary;
3. ``groups``: layer distances and AMAD over the harvested layers (``out/groups``, heatmap PNG);
4. ``train-sae``: a TopK and a JumpReLU SAE on the middle layer, trained on each batch read once
   (``out/saes``, training curves and L0-vs-FVU PNGs);
5. ``eval``: each SAE spliced into the live model on the ``test`` split;
6. ``lora``: LoRA around the TopK SAE, the CE gap before and after (``out/lora``, PNG);
7. ``latents``: the TopK SAE's latent dashboard from the store alone, with logit-lens tokens
   (``out/latents/index.html``);

then one summary table. The store is reused on a rerun (the harvest resumes, here: finds every
shard committed); the other stages' folders are replaced. The defaults take about 10 minutes on
2 CPU cores.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from . import smollm2
from .evaluate import EvalConfig, EvalResult, evaluate
from .groups import GroupsConfig, find_groups, save
from .harvest import HarvestConfig, harvest
from .info import describe_store
from .latents import LatentsConfig, run_latents
from .lora import LoRAConfig, LoRAResult, train_lora
from .report import (
    before_after_table,
    eval_tables,
    groups_tables,
    latents_table,
    show,
    store_tables,
)
from .text import TextConfig
from .train import TrainSAEConfig, train_sae


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults fit about 10 minutes on 2 CPU cores."""

    out: str = "runs/demo"
    model: str = smollm2.NAME
    """Any model harvest loads (the tests use a tiny random one)."""
    layers: tuple[int, ...] = tuple(range(0, 30, 3))
    """Blocks harvested."""
    sae_layer: int = 15
    """Block whose SAEs are trained, evaluated and adapted around."""
    context_size: int = 256
    chunk_tokens: int = 1024
    shard_tokens: int = 8192
    """Store chunking: shards of 8,192 tokens, so the last shard (7,040 tokens) holds out
    train-sae's evaluation tokens (the harvest's default, about 64 MiB per hook, would put the
    whole demo store in one shard and leave nothing held out)."""
    tokens: int = 48_000
    """Tokens harvested."""
    sae_tokens: int = 98_304
    """Training tokens per SAE (two passes over the store)."""
    sae_batch_size: int = 1024
    """Tokens per SAE step: small, so the short run still takes about 100 steps."""
    eval_tokens: int = 8_192
    """Held-out tokens for eval and lora's before/after."""
    lora_tokens: int = 40_000
    """LoRA training tokens."""
    lora_lr: float = 1e-4
    """Above the paper's 5e-5: the demo trains on 40k tokens, not 15M."""
    progress: bool = True
    archs: tuple[str, ...] = field(default=("topk", "jumprelu"))

    def __post_init__(self) -> None:
        if self.sae_layer not in self.layers:
            raise ValueError(f"the SAE layer {self.sae_layer} must be one of the harvested layers {self.layers}")


@dataclass
class DemoResult:
    stages: list[tuple[str, float, str]]
    """(stage, seconds, what it produced)."""
    pngs: list[Path]
    evals: dict[str, EvalResult]
    lora: LoRAResult


def run_demo(cfg: DemoConfig, console: Console | None = None) -> DemoResult:
    """Run every stage of the module docstring, printing as it goes."""
    console = console or Console()
    out = Path(cfg.out)
    for stage_dir in ("groups", "saes", "lora", "latents"):
        shutil.rmtree(out / stage_dir, ignore_errors=True)
    stages: list[tuple[str, float, str]] = []
    hook = f"blocks.{cfg.sae_layer}.hook_resid_post"
    store = str(out / "store")

    def stage(name: str) -> float:
        console.rule(f"[bold]{name}")
        return time.perf_counter()

    t = stage(f"1/7 harvest: {cfg.model}, blocks {','.join(map(str, cfg.layers))}, {cfg.tokens:,} tokens")
    harvested = harvest(HarvestConfig(model=cfg.model, out=store, layers=cfg.layers, tokens=cfg.tokens,
                                      text=TextConfig(context_size=cfg.context_size), chunk_tokens=cfg.chunk_tokens,
                                      shard_tokens=cfg.shard_tokens, progress=cfg.progress))
    stages.append(("harvest", time.perf_counter() - t, f"{harvested.store_tokens:,} tokens x {len(cfg.layers)} layers in {store}"))

    t = stage("2/7 info")
    summary = describe_store(store)
    show(store_tables(summary), console)
    stages.append(("info", time.perf_counter() - t, f"{summary['bytes_on_disk'] / 2**20:.0f} MiB on disk, "
                                                     f"compression {summary['compression_ratio']:.2f}x"))

    t = stage("3/7 groups: layer distances and AMAD")
    groups = find_groups(GroupsConfig(store=store, tokens=min(32_768, cfg.tokens)))
    show(groups_tables(groups), console)
    _, heatmap = save(groups, out / "groups")
    stages.append(("groups", time.perf_counter() - t, f"G = {groups.chosen}: " + " | ".join(
        ",".join(h.split(".")[1] for h in g) for g in groups.groups)))

    t = stage(f"4/7 train-sae: {' and '.join(cfg.archs)} on {hook}, each batch read once")
    trained = train_sae(TrainSAEConfig(
        store=store, hook=hook, out=str(out / "saes"), tokens=cfg.sae_tokens, archs=cfg.archs, lrs=(1e-3,),
        sparsity={"topk": (32,), "jumprelu": (3.5,)}, eval_tokens=min(4096, cfg.tokens // 4), batch_size=cfg.sae_batch_size, log_every=2,
        progress=cfg.progress))
    rows = {row["arch"]: row for row in trained.rows}
    stages.append(("train-sae", time.perf_counter() - t, "; ".join(
        f"{a}: held-out FVU {r['eval_fvu']:.3f}, L0 {r['eval_l0']:.0f}" for a, r in rows.items())))

    t = stage("5/7 eval: each SAE spliced into the live model (test split)")
    evals: dict[str, EvalResult] = {}
    for arch, row in rows.items():
        evals[arch] = evaluate(EvalConfig(model=cfg.model, saes=(str(out / "saes" / row["name"]),), tokens=cfg.eval_tokens,
                                          text=TextConfig(split="test", context_size=cfg.context_size), progress=cfg.progress))
        show(eval_tables(evals[arch], f"eval: {arch} SAE at {hook}"), console)
    stages.append(("eval", time.perf_counter() - t, "; ".join(
        f"{a}: delta loss {e.delta_loss:.3f}, loss recovered {e.loss_recovered:.1%}" for a, e in evals.items())))

    t = stage(f"6/7 lora: rank 64 around the topk SAE, {cfg.lora_tokens:,} tokens")
    lora = train_lora(LoRAConfig(model=cfg.model, saes=(str(out / "saes" / rows["topk"]["name"]),), out=str(out / "lora"),
                                 tokens=cfg.lora_tokens, eval_tokens=cfg.eval_tokens, lr=cfg.lora_lr,
                                 text=TextConfig(split="train", context_size=cfg.context_size), checkpoint_every=0,
                                 progress=cfg.progress))
    console.print(before_after_table(lora, f"lora around the topk SAE at {hook}"))
    stages.append(("lora", time.perf_counter() - t, f"CE gap closed {lora.ce_gap_closed:.1%} "
                                                   f"({lora.before.ce_spliced:.3f} -> {lora.after.ce_spliced:.3f}, clean {lora.before.ce_clean:.3f})"))

    t = stage("7/7 latents: what each latent of the topk SAE responds to, from the store alone")
    dashboards = run_latents(LatentsConfig(store=store, saes=(str(out / "saes" / rows["topk"]["name"]),), out=str(out / "latents"),
                                           model=cfg.model, progress=cfg.progress))
    show([latents_table(dashboards)], console)
    stages.append(("latents", time.perf_counter() - t, f"{dashboards.views[0]['d_sae']:,} latents ({dashboards.views[0]['dead']:,} dead) "
                                                      f"over {dashboards.tokens:,} tokens: open {out / 'latents' / 'index.html'}"))

    pngs = [heatmap, out / "saes" / "training_curves.png", out / "saes" / "l0_vs_fvu.png", out / "lora" / "lora_curve.png"]
    return DemoResult(stages, [p for p in pngs if p.exists()], evals, lora)

