"""Reproduce the headline of the LoRA-around-SAEs paper on SmolLM2-135M from one cache.

Chen, Engels & Tegmark 2025, "Low-Rank Adapting Models for Sparse Autoencoders" (arXiv
2501.19406, ICML 2025): keep a trained SAE and the model frozen, splice the SAE's reconstruction
in, and train LoRA adapters on the blocks after it so that the spliced model predicts what the
clean model predicts (§3.4: KL(p_clean || p_adapted+SAE), mean over positions;
:mod:`pipelines.lora`). The paper reports that this closes 30-55% of the CE gap an SAE opens
(Gemma Scope SAEs on Gemma-2-2B, 15M training tokens), that it adapts several SAEs at once, and
that the adapted model keeps its general capabilities. Here, on the built-in corpus:

1. TopK SAEs (k 32, 8x expansion, 262,144 tokens) on ``blocks.{6,15,24}.hook_resid_post`` from
   the shared store of :mod:`reproduce_common`, each in its own resumable ``train-sae`` folder;
2. LoRA runs (``bench_lora``'s settings: AdamW lr 2e-4, alpha 32, 4 windows of 256 tokens a
   step, clip 1.0; each its own resumable ``lora`` folder), for a budget of ``T`` training
   tokens (``--lora-tokens``, 65,536 by default):
   a) the layer-15 SAE, rank 64, ``T`` tokens, evaluated also after ``T/4`` and ``T/2``
      (``eval_at``: with a constant learning rate these equal runs of those budgets);
   b) the layer-15 SAE at ranks 4 and 16, ``T/2`` tokens (rank 64's point is (a)'s at ``T/2``);
   c) the three SAEs spliced at once, rank 64, ``T`` tokens, also after ``T/4`` and ``T/2``.
   ``bench_lora`` closed about 42% with (a) at 98,304 tokens; 65,536 keeps the whole script
   within about half an hour on 2 CPU cores (``--lora-tokens 98304`` for that budget).

Every point is measured on 8,192 held-out tokens of the corpus' test split
(:mod:`pipelines.evaluate`): CE clean; CE with the SAEs spliced in before and after; the CE gap
closed, ``(ce_sae_before - ce_sae_after) / (ce_sae_before - ce_clean)``; KL(p_clean ||
p_spliced) before and after; and the adapted model's own CE with nothing spliced
(``ce_adapted``) minus the clean CE, in nats and relative: the paper's check that the adapters
leave the model's own behaviour about where it was (§5, there on MMLU, HellaSwag, TruthfulQA).

Output: ``docs/figures/lora.png`` in the paper's form (CE gap closed against training tokens for
one and three SAEs; against rank; the adapted model's own CE change at every point) and
``lora.json`` (every point, the curves, the settings, each run's seconds, the paper's figures
and the headline). Finished runs are not redone (their figures come from their folders), a
killed run resumes from its checkpoint, so rerunning the command only redraws.

    python benchmarks/reproduce_lora.py [--quick] [--out runs/reproduce] [--store URL] [--figures docs/figures]
                                        [--lora-tokens 65536]
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce_common import CONTEXT, MODEL, Cache, parse, shared_store, write_figures  # noqa: E402
from reproduce_common import resid_post as hook  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

FULL = {
    "layers": (6, 15, 24), "main_layer": 15, "k": 32, "expansion": 8, "sae_lr": 1e-3, "sae_tokens": 262_144,
    "sae_eval_tokens": 8192, "sae_batch_size": 4096,
    "rank": 64, "ranks": (4, 16), "lora_tokens": 65_536, "eval_tokens": 8192, "lr": 2e-4, "alpha": 32.0, "batch_size": 4,
    "checkpoint_every": 8,
}
QUICK = {
    **FULL, "expansion": 2, "sae_tokens": 16_384, "sae_eval_tokens": 4096, "sae_batch_size": 1024,
    "rank": 8, "ranks": (1, 4), "lora_tokens": 3072, "eval_tokens": 1024, "checkpoint_every": 1,
}
MIN_STEPS = 3
"""The smallest ``--lora-tokens`` in steps: T/4, T/2 and T must be three distinct budgets."""
PAPER = {
    "source": "Chen, Engels & Tegmark 2025, Low-Rank Adapting Models for Sparse Autoencoders, arXiv 2501.19406 (ICML 2025)",
    "ce_gap_closed": [0.30, 0.55],
    "ce_gap_closed_where": "Gemma Scope SAEs on Gemma-2-2B, across SAE sparsity and width, model size, LoRA rank and layer "
                           "(abstract)",
    "training": "15M tokens of The Pile (uncopyrighted), 1M held-out tokens; KL to the clean model, AdamW lr 5e-5, "
                "clip 1.0, rank 64, alpha 32 (§3.4 and the authors' code)",
    "multiple_saes": "several SAEs adapted at once by one set of adapters (abstract; the authors' multiple_saes.py "
                     "splices Llama Scope SAEs at every k-th layer of Llama-3.1-8B)",
    "own_ce": "general capabilities kept: MMLU, HellaSwag and TruthfulQA about unchanged with the adapters on",
    "speed": "the same downstream CE 3-20x faster than end-to-end SAEs on Gemma-2-2B, 2-10x on Llama-3.2-1B",
}
"""What the paper reports (its abstract and setup; the rank and token curves of its figures are
read here for their direction only: the gap closed grows with training tokens and rank)."""
COLORS = {"1 SAE": "tab:blue", "3 SAEs": "tab:red", "rank": "tab:green"}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora-tokens", type=int, help=f"LoRA budget T (default {FULL['lora_tokens']:,}; "
                                                   f"{QUICK['lora_tokens']:,} with --quick)")


def settings(quick: bool, lora_tokens: int | None) -> dict[str, Any]:
    """``QUICK`` or ``FULL`` with the LoRA budgets: ``lora_tokens`` T, ``eval_at`` (T/4, T/2) and
    ``rank_tokens`` T/2, each rounded up to whole steps (what a run of that many tokens trains)."""
    s = dict(QUICK if quick else FULL)
    step = s["batch_size"] * CONTEXT
    total = math.ceil((lora_tokens or s["lora_tokens"]) / step) * step
    if total < MIN_STEPS * step:
        raise ValueError(f"--lora-tokens {lora_tokens}: give at least {MIN_STEPS * step:,} ({MIN_STEPS} steps of {step:,} tokens)")
    quarter, half = (math.ceil(total * f / step) * step for f in (0.25, 0.5))
    return {**s, "lora_tokens": total, "eval_at": (quarter, half), "rank_tokens": half}


def train_saes(store: str, out: Path, s: dict[str, Any], timings: Cache, console: Console) -> dict[int, dict[str, Any]]:
    """One TopK SAE per layer in ``out/sae-L<layer>`` (a finished folder returns at once): its
    folder, held-out FVU and L0 by layer."""
    from pipelines.train import TrainSAEConfig, train_sae

    saes = {}
    for layer in s["layers"]:
        folder = out / f"sae-L{layer}"
        console.print(f"SAE at {hook(layer)}: TopK k {s['k']}, {s['expansion']}x, {s['sae_tokens']:,} tokens ...")
        t = time.perf_counter()
        result = train_sae(TrainSAEConfig(
            store=store, hook=hook(layer), out=str(folder), tokens=s["sae_tokens"], archs=("topk",),
            expansions=(s["expansion"],), lrs=(s["sae_lr"],), sparsity={"topk": (s["k"],)}, batch_size=s["sae_batch_size"],
            eval_tokens=s["sae_eval_tokens"], progress=False, log_every=10**9))
        if not result.finished_before:
            timings.put(f"sae-L{layer}", time.perf_counter() - t)
        row = result.rows[0]
        saes[layer] = {"path": str(folder / row["name"]), "hook": hook(layer), "fvu": row.get("eval_fvu"),
                       "l0": row.get("eval_l0"), "seconds": timings.get(f"sae-L{layer}")}
    return saes


def lora_plan(s: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The LoRA runs by folder name: their layers, rank, tokens and ``eval_at`` (module docstring)."""
    main, all_layers, total = (s["main_layer"],), tuple(s["layers"]), s["lora_tokens"]
    runs = {f"lora-L{main[0]}-r{s['rank']}-{total}": {"series": "1 SAE", "layers": main, "rank": s["rank"], "tokens": total,
                                                       "eval_at": s["eval_at"]}}
    for rank in s["ranks"]:
        runs[f"lora-L{main[0]}-r{rank}-{s['rank_tokens']}"] = {"series": "rank", "layers": main, "rank": rank,
                                                                "tokens": s["rank_tokens"], "eval_at": ()}
    runs[f"lora-L{'+'.join(map(str, all_layers))}-r{s['rank']}-{total}"] = {
        "series": "3 SAEs", "layers": all_layers, "rank": s["rank"], "tokens": total, "eval_at": s["eval_at"]}
    return runs


def train_loras(out: Path, s: dict[str, Any], saes: dict[int, dict[str, Any]], timings: Cache,
                console: Console) -> dict[str, Any]:
    """Every run of :func:`lora_plan` (a finished folder returns its ``lora.json`` at once): its
    :class:`pipelines.lora.LoRAResult` by name."""
    from pipelines.lora import LoRAConfig, train_lora
    from pipelines.text import TextConfig

    results = {}
    for name, run in lora_plan(s).items():
        console.print(f"{name}: LoRA rank {run['rank']} around {', '.join(hook(layer) for layer in run['layers'])}, "
                      f"{run['tokens']:,} tokens ...")
        t = time.perf_counter()
        result = train_lora(LoRAConfig(
            model=MODEL, saes=tuple(saes[layer]["path"] for layer in run["layers"]), out=str(out / name), rank=run["rank"],
            alpha=s["alpha"], tokens=run["tokens"], eval_at=run["eval_at"], text=TextConfig(split="train", context_size=CONTEXT),
            eval_tokens=s["eval_tokens"], batch_size=s["batch_size"], lr=s["lr"], checkpoint_every=s["checkpoint_every"],
            progress=False))
        if not result.finished_before:
            timings.put(name, {"seconds": time.perf_counter() - t, "training_seconds": result.seconds,
                               "tokens_per_s": result.tokens / max(result.seconds, 1e-9)})
        results[name] = result
    return results


def point(name: str, run: dict[str, Any], result: Any, ev: Any) -> dict[str, Any]:
    """One evaluation of one run as the figures of the module docstring."""
    before, after = result.before, ev.after
    change = after.ce_adapted - before.ce_clean
    return {"run": name, "series": run["series"], "hooks": [hook(layer) for layer in run["layers"]], "rank": run["rank"],
            "tokens": ev.tokens, "steps": ev.steps, "ce_clean": before.ce_clean, "ce_spliced_before": before.ce_spliced,
            "ce_spliced_after": after.ce_spliced, "ce_gap_before": before.delta_loss, "ce_gap_after": after.delta_loss,
            "ce_gap_closed": ev.ce_gap_closed, "kl_before": before.kl, "kl_after": after.kl, "ce_adapted": after.ce_adapted,
            "ce_adapted_change": change, "ce_adapted_change_rel": change / before.ce_clean}


def gather(s: dict[str, Any], results: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, list[dict[str, Any]]]]:
    """Every point, and the three curves: gap closed by training tokens for one and three SAEs,
    and by rank at ``rank_tokens`` (the main rank's point from its ``eval_at`` evaluation)."""
    plan = lora_plan(s)
    points = [point(name, plan[name], r, ev) for name, r in results.items() for ev in r.evals]
    curves: dict[str, list[dict[str, Any]]] = {
        series: sorted(({"tokens": p["tokens"], "ce_gap_closed": p["ce_gap_closed"]} for p in points if p["series"] == series),
                       key=lambda c: c["tokens"]) for series in ("1 SAE", "3 SAEs")}
    by_rank = [p for p in points if p["tokens"] == s["rank_tokens"] and p["hooks"] == [hook(s["main_layer"])]]
    curves["rank"] = sorted(({"rank": p["rank"], "ce_gap_closed": p["ce_gap_closed"]} for p in by_rank), key=lambda c: c["rank"])
    return points, curves


def increasing(values: list[float]) -> bool:
    return all(b > a for a, b in zip(values, values[1:], strict=False))


def headline(s: dict[str, Any], points: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str]]:
    """``(figure, measured, goal)`` rows as ``benchmarks/report.py``'s."""
    def last(series: str) -> float:
        return curves[series][-1]["ce_gap_closed"]

    def trail(series: str, key: str) -> str:
        return " -> ".join(f"{c['ce_gap_closed']:.1%}" + (f" (r{c['rank']})" if key == "rank" else "") for c in curves[series])

    worst = max(points, key=lambda p: abs(p["ce_adapted_change"]))
    layers = "+".join(f"L{layer}" for layer in s["layers"])
    return [
        (f"CE gap closed, 1 SAE (L{s['main_layer']}), rank {s['rank']}, {s['lora_tokens']:,} tokens", f"{last('1 SAE'):.1%}",
         "30-55% (paper, Gemma-2-2B, 15M tokens)"),
        ("CE gap closed grows with LoRA training tokens, 1 SAE", trail("1 SAE", "tokens"), "increasing"),
        (f"CE gap closed grows with rank, {s['rank_tokens']:,} tokens", trail("rank", "rank"), "increasing"),
        (f"CE gap closed, 3 SAEs at once ({layers}), rank {s['rank']}, {s['lora_tokens']:,} tokens", f"{last('3 SAEs'):.1%}",
         "> 0, growing with tokens (paper: several SAEs at once)"),
        ("adapted model's own CE, nothing spliced, minus clean CE (largest of all points)",
         f"{worst['ce_adapted_change']:+.4f} nats ({worst['ce_adapted_change_rel']:+.2%})",
         "about 0 (paper: MMLU, HellaSwag, TruthfulQA kept)"),
    ]


def plot(points: list[dict[str, Any]], curves: dict[str, list[dict[str, Any]]], s: dict[str, Any], title: str):
    """The paper's form: gap closed by tokens (log x) and by rank, and the adapted model's own CE change."""
    from pipelines.report import _pyplot

    plt = _pyplot()
    fig, (ax_tok, ax_rank, ax_own) = plt.subplots(1, 3, figsize=(16, 4.6), gridspec_kw={"width_ratios": [4, 3, 4]})
    for series in ("1 SAE", "3 SAEs"):
        pts = curves[series]
        ax_tok.plot([c["tokens"] for c in pts], [100 * c["ce_gap_closed"] for c in pts], marker="o", color=COLORS[series],
                    label=f"{series} ({', '.join(f'L{layer}' for layer in (s['layers'] if series == '3 SAEs' else (s['main_layer'],)))})")
    ax_tok.set_xscale("log")
    ax_tok.set_xlabel("LoRA training tokens")
    ax_tok.set_title(f"CE gap closed by training tokens (rank {s['rank']})")
    ranks = curves["rank"]
    ax_rank.plot([c["rank"] for c in ranks], [100 * c["ce_gap_closed"] for c in ranks], marker="o", color=COLORS["rank"],
                 label=f"1 SAE (L{s['main_layer']})")
    ax_rank.set_xscale("log", base=2)
    ax_rank.set_xticks([c["rank"] for c in ranks], [str(c["rank"]) for c in ranks])
    ax_rank.set_xlabel("LoRA rank")
    ax_rank.set_title(f"CE gap closed by rank ({s['rank_tokens']:,} tokens)")
    for ax in (ax_tok, ax_rank):
        ax.axhspan(100 * PAPER["ce_gap_closed"][0], 100 * PAPER["ce_gap_closed"][1], color="k", alpha=0.08,
                   label="paper: 30-55% (Gemma-2-2B, 15M tokens)")
        ax.set_ylabel("CE gap closed (%)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    labels = [f"{p['series'] if p['series'] != 'rank' else '1 SAE'}\nr{p['rank']} {p['tokens']:,}" for p in points]
    changes = [p["ce_adapted_change"] for p in points]
    bars = ax_own.bar(range(len(points)), changes, color=[COLORS[p["series"]] for p in points])
    for bar, p in zip(bars, points, strict=True):
        ax_own.annotate(f"{p['ce_adapted_change_rel']:+.3%}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom" if bar.get_height() >= 0 else "top", fontsize=7)
    ax_own.axhline(0, color="k", lw=0.8)
    ax_own.set_xticks(range(len(points)), labels, fontsize=7, rotation=45, ha="right")
    ax_own.set_ylabel("CE adapted (nothing spliced) - CE clean, nats")
    ax_own.set_title("the adapted model's own CE change")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def show(console: Console, points: list[dict[str, Any]], timings: Cache) -> None:
    """Every point; CE and KL in nats, ``own`` the adapted model's CE with nothing spliced minus the clean CE."""
    t = Table(title="LoRA around frozen SAEs: held-out figures at every point (nats)", title_justify="left")
    for col in ("SAEs", "rank", "tokens", "CE clean", "CE SAE before", "after", "gap closed", "KL before", "after", "own",
                "own %", "run s"):
        t.add_column(col, justify="left" if col == "SAEs" else "right")
    for p in points:
        seconds = (timings.get(p["run"]) or {}).get("seconds")
        t.add_row("+".join(f"L{h.split('.')[1]}" for h in p["hooks"]), str(p["rank"]), f"{p['tokens']:,}", f"{p['ce_clean']:.3f}",
                  f"{p['ce_spliced_before']:.3f}", f"{p['ce_spliced_after']:.3f}", f"{p['ce_gap_closed']:.1%}",
                  f"{p['kl_before']:.3f}", f"{p['kl_after']:.3f}", f"{p['ce_adapted_change']:+.4f}",
                  f"{p['ce_adapted_change_rel']:+.3%}", "-" if seconds is None else f"{seconds:.0f}")
    console.print(t)


def main() -> None:
    args, paths = parse(__doc__.split("\n")[0], "lora", add_arguments)
    try:
        s = settings(paths.quick, args.lora_tokens)
    except ValueError as e:  # one line, exit 2, nothing run (the project's rule for bad input)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    console = Console(width=None if sys.stdout.isatty() else 130)  # a log file keeps the table's columns whole
    t_all = time.perf_counter()
    store = shared_store(paths.store, paths.quick, log=console.print)
    timings = Cache(paths.out / "timings.json")
    saes = train_saes(store, paths.out, s, timings, console)
    results = train_loras(paths.out, s, saes, timings, console)
    points, curves = gather(s, results)
    show(console, points, timings)
    rows = headline(s, points, curves)
    for figure, measured, goal in rows:
        console.print(f"{figure}: [bold]{measured}[/bold] (goal {goal})")
    title = (f"SmolLM2-135M: LoRA (rank {s['rank']}, lr {s['lr']:g}) around frozen TopK SAEs (k {s['k']}, {s['expansion']}x) "
             f"at resid_post, {s['eval_tokens']:,} held-out tokens{' [quick]' if paths.quick else ''}")
    figures = {
        "model": MODEL, "settings": {**s, "context_size": CONTEXT, "runs": lora_plan(s)}, "saes": saes,
        "points": points, "curves": curves,
        "checks": {"increasing_with_tokens": {k: increasing([c["ce_gap_closed"] for c in curves[k]]) for k in ("1 SAE", "3 SAEs")},
                   "increasing_with_rank": increasing([c["ce_gap_closed"] for c in curves["rank"]]),
                   "all_finite": all(math.isfinite(p["ce_gap_closed"]) for p in points)},
        "paper": PAPER,
        "seconds": {**{k: timings.get(k) for k in timings.data}, "this_run": time.perf_counter() - t_all},
        "headline": rows,
    }
    png, js = write_figures(paths, "lora", figures, plot(points, curves, s, title))
    console.print(f"wrote {png} and {js} ({time.perf_counter() - t_all:.0f} s)")


if __name__ == "__main__":
    main()
