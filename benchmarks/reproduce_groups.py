"""Reproduce Group-SAE's headline (Ghilardi et al. 2024, arXiv 2410.21508; EMNLP 2025): group
similar layers by AMAD and train one SAE per group; training compute falls by about L/G at a
small cost in reconstruction and in the model's loss.

On the shared store of ``reproduce_common`` (SmolLM2-135M, ``hook_resid_post`` of its L = 30
blocks), with one set of SAE settings throughout (TopK, k 32, expansion 8, lr 1e-3, batches of
4,096, as ``bench_groups.py``):

1. **Layer groups** (:mod:`pipelines.groups`). §3.1: the distance of layers i and j is the mean
   angular distance of their mean-centred activations of the same token,
   ``d(i, j) = E_t[arccos(cos(a_i(t) - mu_i, a_j(t) - mu_j)) / pi]``. §3.2: complete-linkage
   agglomerative clustering cut into G groups for every G, and
   ``AMAD(G) = (1/G) sum_g max_{i, j in g} d(i, j)`` (Average Maximum Angular Distance).
   G_amad is the smallest G with ``AMAD(G) <= 0.2`` (``actstore groups``' rule; the paper reads
   G off the AMAD curve); two more G, about G_amad / 2 and 2 G_amad (:func:`g_values`), show the
   trade-off on either side.
2. **SAEs at three budgets** T (training tokens per SAE; two with ``--quick``): the L per-layer SAEs, and for each G
   its G group SAEs (§3.3: each training token takes the activation of one member layer drawn
   uniformly, every layer scaled to ``E||x||^2 = D`` by its own factor). Every layer's held-out
   FVU, ``sum ||x - x_hat||^2 / sum ||x - mean(x)||^2`` over the store's last shards, and L0, by
   its own SAE and by its group's. Compute of a set of n SAEs: n T training tokens, and
   ``FLOPs = n * T * 6 * (2 * d_in * d_sae)``, the 6N rule (Kaplan et al. 2020, arXiv
   2001.08361, §2.1: 2N forward, 4N backward per token) with N = 2 d_in d_sae, the encoder's and
   decoder's weights; dense, so an upper bound for TopK's sparse decode, and the same factor for
   both sets, so per-layer / group = L / G. Wall clock: the set's ``train_sae`` calls (training
   and the held-out evaluation of every member layer), timed when a run trains and cached, so a
   rerun reports the same seconds. The trend of the group SAEs' FVU cost across budgets tells
   whether that cost is the small budget (it shrinks as T grows) or the method (it stays).
3. **Delta CE loss** at the largest budget (``reproduce_common.spliced_ce``; Rajamanoharan et
   al. 2024, arXiv 2407.14435, §5.1): the mean next-token CE with one layer's activation
   replaced by its SAE's reconstruction, minus the clean CE, on held-out windows of the corpus'
   test split; each layer spliced alone, with its own SAE and with its group's SAE of each G.

Written: ``groups.png`` (a: AMAD by G, with the compute ratios; b: mean held-out FVU by budget;
c: FVU per layer and d: delta CE per layer at the largest budget) and ``groups.json``
(everything measured, a ``paper`` entry with what the paper reports and a ``headline`` list).
Every SAE run has its own resumable folder under OUT (``budget<T>/per_layer/<hook>``,
``budget<T>/G<g>/group<i>``; a one-layer group is its layer's per-layer run, which it would
repeat bit for bit); seconds, delta CE and the groups are cached in OUT's ``cache.json``, so an
interrupted run continues and a finished one redoes nothing.

    python benchmarks/reproduce_groups.py [--quick] [--out DIR] [--store URL] [--figures DIR]

``--quick``: the same stages on every third layer, budgets of 4,096 / 8,192 tokens,
expansion 2, batches of 1,024, 2,048 held-out tokens, AMAD on 4,096 tokens, delta CE on 512.
"""

from __future__ import annotations

import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from reproduce_common import (  # noqa: E402
    MODEL,
    N_LAYERS,
    Cache,
    DeltaCE,
    Paths,
    parse,
    resid_post,
    shared_store,
    write_figures,
)
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from pipelines.groups import GroupsConfig, LayerGroups, find_groups  # noqa: E402
from pipelines.train import TrainSAEConfig, train_sae  # noqa: E402
from trainers.trainer import CHECKPOINT_DIR  # noqa: E402

PER_LAYER = "per_layer"


@dataclass(frozen=True)
class Settings:
    """The sizes of one mode (full or ``--quick``)."""

    budgets: tuple[int, ...]
    """Training tokens per SAE, ascending; delta CE is measured at the last."""
    eval_tokens: int
    """Held out from training at the store's end (whole shards, at least this many)."""
    expansion: int
    """d_sae = expansion x d_in."""
    batch_size: int
    amad_tokens: int
    """Tokens sampled for the layer distances."""
    ce_tokens: int
    """Held-out tokens of the delta CE."""
    layer_stride: int
    """Every this-many-th block's ``hook_resid_post`` (1: all 30)."""
    k: int = 32
    lr: float = 1e-3
    amad_threshold: float = 0.2


FULL = Settings(budgets=(24_576, 49_152, 98_304), eval_tokens=8192, expansion=8, batch_size=4096, amad_tokens=32_768,
                ce_tokens=2048, layer_stride=1)
QUICK = Settings(budgets=(4096, 8192), eval_tokens=2048, expansion=2, batch_size=1024, amad_tokens=4096,
                 ce_tokens=512, layer_stride=3)

PAPER: dict[str, Any] = {
    "source": "Ghilardi et al. 2024, arXiv 2410.21508 (EMNLP 2025). Abstract (v1): 'a speedup of up to 6x without "
              "compromising the reconstruction quality and performance on downstream tasks' (Pythia-160M). The "
              "FVU and delta CE below are computed from the authors' released evaluation of Pythia-160M "
              "(github.com/ghidav/group-sae, eval/pythia-160m_baseline.csv and eval/pythia-160m_cluster.csv: "
              "resid_post layers 0-10, TopK k 128; FVU = 1 - explained_variance, delta CE = ce_loss_with_sae - "
              "ce_loss_without_sae, means over the 11 layers); their AMAD grouping of Pythia-160M "
              "(group_sae/groups/pythia-160m_sequential.json) is G = 6 of 11 layers at AMAD 0.192.",
    "model": "Pythia-160M", "layers": 11, "chosen_groups": 6, "amad_at_chosen": 0.192,
    "how_g_is_chosen": "AMAD of the hierarchical-clustering partition for every G, read off its curve: the "
                       "smallest G whose AMAD meets the threshold (0.192 at the released G = 6), trading "
                       "reconstruction against a training cost the authors' README models as A + T G",
    "speedup_max": 6.0,  # the abstract's "up to 6x" (training time, Pythia-160M)
    "compute_ratio_at_chosen": round(11 / 6, 3),
    "mean_fvu": {"per_layer": 0.0970, "G1": 0.1537, "G3": 0.1223, "G6": 0.1078},
    "mean_fvu_change": {"G1": 0.627, "G3": 0.277, "G6": 0.122},
    "delta_ce": {"per_layer": 0.1395, "G1": 0.2506, "G3": 0.1840, "G6": 0.1574},
}


@dataclass
class SetResult:
    """One set of SAEs trained at one budget: the per-layer SAEs or one G's group SAEs."""

    name: str
    """``per_layer`` or ``G<g>``."""
    groups: list[list[str]]
    """Each SAE's layers (one each for the per-layer set)."""
    layers: dict[str, dict[str, Any]]
    """By hook: held-out ``fvu``, ``l0``, the ``group`` index and the ``sae`` folder (relative to OUT)."""
    seconds: float | None
    """Wall clock of the set's ``train_sae`` calls (a run resumed after an interruption: its resumed
    part); None when a run was finished by something else, untimed."""
    tokens: int
    flops: float

    def to_json(self) -> dict[str, Any]:
        shared = [h for h, r in self.layers.items() if self.name != PER_LAYER and f"/{PER_LAYER}/" in r["sae"]]
        return {"n_saes": len(self.groups), "tokens": self.tokens, "flops": self.flops, "seconds": self.seconds,
                "groups": self.groups, "layers": self.layers, "one_layer_groups_from_per_layer": shared}


def add_arguments(p) -> None:
    p.add_argument("--amad-threshold", type=float, default=None, help="the chosen G: smallest with AMAD at most this (0.2)")


def hooks_of(s: Settings) -> list[str]:
    return [resid_post(i) for i in range(0, N_LAYERS, s.layer_stride)]


def layer_groups(paths: Paths, s: Settings, hooks: list[str], cache: Cache) -> LayerGroups:
    """Distances, AMAD curve and partitions (cached: the same sample gives the same figures)."""
    identity = {"store": paths.store, "hooks": hooks, "tokens": s.amad_tokens, "threshold": s.amad_threshold}
    saved = cache.get("groups")
    if saved and saved["identity"] == identity:
        return LayerGroups.from_json(saved["result"])
    result = find_groups(GroupsConfig(store=paths.store, hooks=tuple(hooks), tokens=s.amad_tokens,
                                      amad_threshold=s.amad_threshold))
    cache.put("groups", {"identity": identity, "result": result.to_json()})
    return result


def g_values(chosen: int, n_layers: int) -> list[int]:
    """G_amad and two others, about half and twice it, within [2, L - 1]; where one of those
    coincides with G_amad (G_amad 2, or near L), the next candidate further out instead. Ascending."""
    candidates = [round(chosen / 2), 2 * chosen, round(chosen / 4), 4 * chosen, chosen - 1, chosen + 1, 2, n_layers - 1]
    others: list[int] = []
    for g in candidates:
        if 2 <= g <= n_layers - 1 and g != chosen and g not in others:
            others.append(g)
        if len(others) == 2:
            break
    return sorted([chosen, *others])


def sae_folder(run: Path, experiment: str, members: list[str], hook: str) -> Path:
    """A group run saves one SAELens folder per member layer; a one-layer run one folder."""
    return run / experiment / hook if len(members) > 1 else run / experiment


def train_set(base: TrainSAEConfig, name: str, groups: list[list[str]], out: Path, root: Path, cache: Cache,
              d_in: int, d_sae: int, log, own: SetResult | None = None) -> SetResult:
    """Train (or find finished) one run per group: ``out/<hook>`` for the per-layer set, else
    ``out/group<i>`` (``pipelines.train.train_groups``' layout, one call per group so each run
    is timed and cached on its own). A one-layer group's run has the per-layer run's settings,
    seed and data, so the same weights (checked: byte-identical files); it is taken from ``own``,
    the per-layer set, with its seconds, instead of being trained twice. A finished run's
    ``checkpoint/`` (three times the SAE's size) is removed: ``summary.json`` marks it finished."""
    layers: dict[str, dict[str, Any]] = {}
    seconds: float | None = 0.0
    for i, members in enumerate(groups):
        if own is not None and len(members) == 1:
            hook = members[0]
            layers[hook] = {**own.layers[hook], "group": i}
            took = cache.get(f"seconds/{Path(own.layers[hook]['sae']).parent}")
        else:
            run = out / (members[0] if own is None else f"group{i}")
            cfg = replace(base, hook=members[0], group=tuple(members) if len(members) > 1 else (), out=str(run))
            key = f"seconds/{run.relative_to(root)}"
            t = time.perf_counter()
            result = train_sae(cfg)
            if not result.finished_before:
                cache.put(key, time.perf_counter() - t)
                shutil.rmtree(run / CHECKPOINT_DIR, ignore_errors=True)  # weights + Adam moments, for resuming only
            took = cache.get(key)
            row = result.rows[0]
            for hook in members:
                figures = row["eval_layers"][hook] if len(members) > 1 else {"fvu": row["eval_fvu"], "l0": row["eval_l0"]}
                layers[hook] = {"fvu": figures["fvu"], "l0": figures["l0"], "group": i,
                                "sae": str(sae_folder(run, row["name"], members, hook).relative_to(root))}
        seconds = None if seconds is None or took is None else seconds + took
    n = len(groups)
    log(f"  {name}: {n} SAEs, {base.tokens:,} tokens each" + (f", {seconds:.0f} s" if seconds is not None else ""))
    return SetResult(name, groups, layers, seconds, n * base.tokens, n * base.tokens * 6.0 * 2 * d_in * d_sae)


def measure_delta_ce(sets: dict[str, SetResult], hooks: list[str], delta: DeltaCE) -> dict[str, Any]:
    """Every layer spliced with its own SAE and with each G's group SAE (the largest budget's sets)."""
    out: dict[str, Any] = {"clean_ce": delta.clean(), "tokens": delta.tokens}
    for name, result in sets.items():
        t = time.perf_counter()
        out[name] = {h: delta(result.layers[h]["sae"]) for h in hooks}
        delta.log(f"  delta CE, {name}: mean {statistics.fmean(r['delta_ce'] for r in out[name].values()):.4f} "
                  f"({time.perf_counter() - t:.0f} s)")
    return out


def summarize(runs: dict[int, dict[str, SetResult]], ce: dict[str, Any], hooks: list[str], gs: list[int]) -> dict[str, Any]:
    """Means over layers and the group sets' changes against the per-layer set."""
    top = max(runs)
    mean_fvu = {str(t): {n: statistics.fmean(r.layers[h]["fvu"] for h in hooks) for n, r in sets.items()}
                for t, sets in runs.items()}
    fvu_change = {str(t): {f"G{g}": statistics.fmean(sets[f"G{g}"].layers[h]["fvu"] / sets[PER_LAYER].layers[h]["fvu"] - 1
                                                    for h in hooks) for g in gs} for t, sets in runs.items()}
    mean_dce = {n: statistics.fmean(ce[n][h]["delta_ce"] for h in hooks) for n in runs[top]}
    compute = {}
    for g in gs:
        own, grp = runs[top][PER_LAYER], runs[top][f"G{g}"]
        compute[f"G{g}"] = {
            "tokens": own.tokens / grp.tokens, "flops": own.flops / grp.flops,
            "seconds": {str(t): (sets[PER_LAYER].seconds / sets[f"G{g}"].seconds
                                 if sets[PER_LAYER].seconds and sets[f"G{g}"].seconds else None) for t, sets in runs.items()},
        }
    return {
        "mean_fvu": mean_fvu, "mean_fvu_change": fvu_change, "mean_delta_ce": mean_dce,
        "delta_ce_change": {f"G{g}": statistics.fmean(ce[f"G{g}"][h]["delta_ce"] - ce[PER_LAYER][h]["delta_ce"] for h in hooks)
                            for g in gs},
        "delta_ce_ratio": {f"G{g}": mean_dce[f"G{g}"] / mean_dce[PER_LAYER] for g in gs},
        "compute_ratio": compute,
    }


def headline(summary: dict[str, Any], groups: LayerGroups, gs: list[int], s: Settings) -> list[tuple[str, str, str]]:
    """``(figure, measured, goal)`` rows as ``benchmarks/report.py``'s ``write_json`` takes them; the goal is the paper's."""
    g, top = groups.chosen, str(s.budgets[-1])
    name = f"G{g}"
    ratio = summary["compute_ratio"][name]
    sec = ratio["seconds"][top]
    dce = summary["mean_delta_ce"]
    return [
        (f"groups chosen (AMAD <= {s.amad_threshold:g})", f"G = {g} of {len(groups.hooks)} layers (AMAD {groups.amad[g]:.3f})",
         f"paper: G = {PAPER['chosen_groups']} of {PAPER['layers']} (Pythia-160M, AMAD {PAPER['amad_at_chosen']})"),
        (f"compute, per-layer / G = {g} group SAEs (tokens; wall clock at {int(top):,})",
         f"{ratio['tokens']:.1f}x; " + (f"{sec:.1f}x" if sec else "n/a"), f"L/G; paper: up to {PAPER['speedup_max']:g}x"),
        (f"held-out FVU change, G = {g} vs per-layer, mean per layer, by budget",
         " / ".join(f"{summary['mean_fvu_change'][str(t)][name]:+.1%}" for t in s.budgets),
         f"paper: {PAPER['mean_fvu_change']['G6']:+.1%} (G = 6)"),
        (f"delta CE (nats), per-layer -> G = {g}, mean over layers at {int(top):,} tokens",
         f"{dce[PER_LAYER]:.3f} -> {dce[name]:.3f} ({summary['delta_ce_ratio'][name] - 1:+.0%})",
         f"paper: {PAPER['delta_ce']['per_layer']:.3f} -> {PAPER['delta_ce']['G6']:.3f} "
         f"({PAPER['delta_ce']['G6'] / PAPER['delta_ce']['per_layer'] - 1:+.0%})"),
    ] + [(f"FVU change / delta CE change at G = {o}", f"{summary['mean_fvu_change'][top][f'G{o}']:+.1%} / "
          f"{summary['delta_ce_ratio'][f'G{o}'] - 1:+.0%}", "") for o in gs if o != g]


def plot(groups: LayerGroups, runs: dict[int, dict[str, SetResult]], ce: dict[str, Any], summary: dict[str, Any],
         hooks: list[str], gs: list[int], s: Settings) -> Any:
    """The four panels (see the module docstring)."""
    from pipelines.report import _pyplot

    plt = _pyplot()
    fig, ((ax_a, ax_b), (ax_c, ax_d)) = plt.subplots(2, 2, figsize=(13, 9.5))
    colors = {PER_LAYER: "black", **{f"G{g}": plt.get_cmap("tab10")(i) for i, g in enumerate(gs)}}
    labels = {PER_LAYER: f"per-layer ({len(hooks)} SAEs)", **{f"G{g}": f"G = {g}" + (" (AMAD)" if g == groups.chosen else "")
                                                               for g in gs}}
    g_all, amad_all = zip(*sorted(groups.amad.items()), strict=True)
    ax_a.plot(g_all, amad_all, marker="o", markersize=3, color="tab:gray")
    ax_a.axhline(s.amad_threshold, color="tab:red", linestyle=":", label=f"threshold {s.amad_threshold:g}")
    ax_a.axvline(groups.chosen, color="tab:red", linestyle="--", label=f"chosen G = {groups.chosen}")
    for g in gs:
        ax_a.plot([g], [groups.amad[g]], marker="s", markersize=8, color=colors[f"G{g}"], linestyle="none")
    ax_a.set(xlabel="number of groups G", ylabel="AMAD (angular distance / pi)", title="(a) AMAD by number of groups")
    ax_a.legend(fontsize=8, loc="upper right")

    budgets = sorted(runs)
    for name in runs[budgets[0]]:
        ax_b.plot(budgets, [summary["mean_fvu"][str(t)][name] for t in budgets], marker="o", color=colors[name], label=labels[name])
    ax_b.set(xscale="log", xlabel="training tokens per SAE", ylabel=f"mean held-out FVU ({len(hooks)} layers)",
             title="(b) FVU by token budget")
    ax_b.set_xticks(budgets, [f"{t:,}" for t in budgets])
    ax_b.minorticks_off()
    ax_b.legend(fontsize=8)

    top = budgets[-1]
    index = [int(h.split(".")[1]) for h in hooks]
    for name, result in runs[top].items():
        ax_c.plot(index, [result.layers[h]["fvu"] for h in hooks], marker=".", color=colors[name], label=labels[name])
        ax_d.plot(index, [ce[name][h]["delta_ce"] for h in hooks], marker=".", color=colors[name], label=labels[name])
    ax_c.set(xlabel="layer", ylabel="held-out FVU", title=f"(c) FVU per layer, {top:,} tokens per SAE")
    ax_d.set(xlabel="layer", ylabel="delta CE loss (nats)",
             title=f"(d) delta CE per layer, {top:,} tokens per SAE, {ce['tokens']:,} held-out tokens")
    ax_c.legend(fontsize=8)
    lines = [f"compute, per-layer / group SAEs, {top:,} tokens each"] + [
        f"G = {g}: tokens and FLOPs {summary['compute_ratio'][f'G{g}']['tokens']:.1f}x, wall clock "
        + (f"{sec:.1f}x" if (sec := summary["compute_ratio"][f"G{g}"]["seconds"][str(top)]) else "n/a") for g in gs]
    ax_a.text(0.97, 0.6, "\n".join(lines), transform=ax_a.transAxes, ha="right", va="center", fontsize=8,
              bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85})
    fig.suptitle(f"Group-SAEs on {MODEL} (arXiv 2410.21508): TopK k {s.k}, expansion {s.expansion}, "
                 f"held-out FVU on {s.eval_tokens:,}+ tokens")
    fig.tight_layout()
    return fig


def print_tables(console: Console, runs: dict[int, dict[str, SetResult]], summary: dict[str, Any], gs: list[int],
                 hooks: list[str], ce: dict[str, Any]) -> None:
    budgets = sorted(runs)
    table = Table(title="Group-SAEs against per-layer SAEs: mean over layers (held-out FVU; compute per set)")
    for col in ("budget", "set", "SAEs", "mean FVU", "FVU change", "tokens", "TFLOPs", "seconds"):
        table.add_column(col, justify="left" if col == "set" else "right")
    for t in budgets:
        for name, r in runs[t].items():
            change = "" if name == PER_LAYER else f"{summary['mean_fvu_change'][str(t)][name]:+.1%}"
            table.add_row(f"{t:,}", name, str(len(r.groups)), f"{summary['mean_fvu'][str(t)][name]:.4f}", change,
                          f"{r.tokens:,}", f"{r.flops / 1e12:.1f}", f"{r.seconds:.0f}" if r.seconds is not None else "n/a")
    console.print(table)
    top = budgets[-1]
    per = Table(title=f"per layer at {top:,} tokens per SAE: held-out FVU / delta CE (nats)")
    per.add_column("layer")
    for name in runs[top]:
        per.add_column(name, justify="right")
    for h in hooks:
        per.add_row(h.split(".")[1], *(f"{runs[top][n].layers[h]['fvu']:.3f} / {ce[n][h]['delta_ce']:.3f}" for n in runs[top]))
    console.print(per)
    totals = Table(title=f"summary at {top:,} tokens per SAE (paper: Pythia-160M, G = 6 of 11)")
    for col in ("set", "mean delta CE", "change (nats)", "compute ratio (tokens)", "wall clock ratio"):
        totals.add_column(col, justify="left" if col == "set" else "right")
    totals.add_row(PER_LAYER, f"{summary['mean_delta_ce'][PER_LAYER]:.4f}", "", "1.0x", "1.0x")
    for g in gs:
        c = summary["compute_ratio"][f"G{g}"]
        sec = c["seconds"][str(top)]
        totals.add_row(f"G{g}", f"{summary['mean_delta_ce'][f'G{g}']:.4f}", f"{summary['delta_ce_change'][f'G{g}']:+.4f}",
                       f"{c['tokens']:.1f}x", f"{sec:.1f}x" if sec else "n/a")
    totals.add_row("paper G6", f"{PAPER['delta_ce']['G6']:.4f}", f"{PAPER['delta_ce']['G6'] - PAPER['delta_ce']['per_layer']:+.4f}",
                   f"{PAPER['compute_ratio_at_chosen']:.1f}x", f"up to {PAPER['speedup_max']:g}x")
    console.print(totals)


def main() -> None:
    args, paths = parse(__doc__.split("\n")[0], "groups", add_arguments)
    s = QUICK if paths.quick else FULL
    if args.amad_threshold is not None:
        s = replace(s, amad_threshold=args.amad_threshold)
    console = Console()
    log = console.print
    t_start = time.perf_counter()
    shared_store(paths.store, paths.quick, log=log)
    import actstore

    hooks = hooks_of(s)
    d_in = actstore.open_store(paths.store).config.width(hooks[0])
    d_sae = d_in * s.expansion
    cache = Cache(paths.out / "cache.json")

    groups = layer_groups(paths, s, hooks, cache)
    gs = g_values(groups.chosen, len(hooks))
    log("AMAD by G: " + ", ".join(f"{g}: {v:.3f}" for g, v in groups.amad.items()))
    log(f"chosen G = {groups.chosen} ({groups.rule}); also G = {', '.join(str(g) for g in gs if g != groups.chosen)}")

    runs: dict[int, dict[str, SetResult]] = {}
    for budget in s.budgets:
        log(f"budget {budget:,} tokens per SAE:")
        base = TrainSAEConfig(store=paths.store, hook=hooks[0], out="", tokens=budget, archs=("topk",), expansions=(s.expansion,),
                              lrs=(s.lr,), sparsity={"topk": (s.k,)}, batch_size=s.batch_size, eval_tokens=s.eval_tokens,
                              progress=False, log_every=10**9)
        folder = paths.out / f"budget{budget}"
        own = train_set(base, PER_LAYER, [[h] for h in hooks], folder / PER_LAYER, paths.out, cache, d_in, d_sae, log)
        runs[budget] = {PER_LAYER: own}
        for g in gs:
            runs[budget][f"G{g}"] = train_set(base, f"G{g}", groups.partitions[g], folder / f"G{g}", paths.out, cache,
                                              d_in, d_sae, log, own=own)

    top = s.budgets[-1]
    ce = measure_delta_ce(runs[top], hooks, DeltaCE(paths.out, cache, s.ce_tokens, log))
    summary = summarize(runs, ce, hooks, gs)
    figures = {
        "headline": headline(summary, groups, gs, s),
        "model": MODEL, "store": paths.store, "settings": asdict(s), "layers": hooks, "d_in": d_in, "d_sae": d_sae,
        "flops_per_token_per_sae": 6 * 2 * d_in * d_sae,
        "amad": {str(g): v for g, v in groups.amad.items()}, "amad_threshold": s.amad_threshold, "chosen": groups.chosen,
        "rule": groups.rule, "amad_tokens": groups.tokens, "distances": groups.distances, "g_values": gs,
        "partitions": {str(g): groups.partitions[g] for g in gs},
        "runs": {str(t): {n: r.to_json() for n, r in sets.items()} for t, sets in runs.items()},
        "delta_ce": ce, "summary": summary, "paper": PAPER,
    }
    fig = plot(groups, runs, ce, summary, hooks, gs, s)
    png, js = write_figures(paths, "groups", figures, fig)
    print_tables(console, runs, summary, gs, hooks, ce)
    for figure, measured, goal in figures["headline"]:
        log(f"{figure}: [bold]{measured}[/bold]" + (f"  ({goal})" if goal else ""))
    log(f"wrote {png} and {js} in {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
