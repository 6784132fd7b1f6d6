"""What the commands print and draw: rich tables for the terminal, matplotlib figures on disk.

The stages (:mod:`pipelines.info`, :mod:`pipelines.train`, :mod:`pipelines.evaluate`, ...)
return results and print nothing; the command line (``cli.py``), the demo and the benchmarks
turn those results into tables here. The figures a stage writes beside its outputs
(``training_curves.png``, ``l0_vs_fvu.png``, ``lora_curve.png``, ``groups_heatmap.png``) are
drawn here too, called by the stage so a run's folder is the same whoever started it.

matplotlib is heavy, so the plot functions import it on first use (:func:`_pyplot`):
importing this module needs only rich and numpy. Shape letters: H layers (hooks).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from pipelines.demo import DemoResult
    from pipelines.evaluate import EvalResult
    from pipelines.group_eval import GroupComparison
    from pipelines.groups import LayerGroups
    from pipelines.latents import LatentsResult
    from pipelines.lora import LoRAResult
    from pipelines.train import TrainResult


def show(tables: Iterable[Table], console: Console | None = None) -> None:
    """Print ``tables`` one after the other (on a new console when none is given)."""
    console = console or Console()
    for table in tables:
        console.print(table)


def short_hook(hook: str) -> str:
    """``blocks.12.hook_resid_post`` -> ``12 post``."""
    parts = hook.split(".")
    if len(parts) == 3 and parts[0] == "blocks":
        return f"{parts[1]} {parts[2].removeprefix('hook_resid_')}"
    return hook


def layer_span(layers: tuple[int, ...]) -> str:
    """``(3, 4, 5)`` -> ``3-5``; anything else as a comma list."""
    contiguous = list(layers) == list(range(layers[0], layers[-1] + 1))
    return f"{layers[0]}-{layers[-1]}" if contiguous and len(layers) > 1 else ",".join(map(str, layers))


# ---- tables -------------------------------------------------------------------------------
def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def store_tables(summary: dict[str, Any]) -> list[Table]:
    """``actstore info``: the store (``Store.summary``), then one row per hook."""
    model, dataset = summary["model"], summary["dataset"]
    top = Table(title=f"actstore {summary['url']}", show_header=False, title_justify="left")
    top.add_column(style="bold cyan")
    top.add_column()
    revision = f" @ {model['revision']}" if model.get("revision") else ""
    top.add_row("model", f"{model['name']}{revision}  (d_model {model['d_model']}, {model['n_layers']} layers)")
    ds = dataset["name"] + "".join(f"  {k}={dataset[k]}" for k in ("split", "text_column") if dataset.get(k))
    top.add_row("dataset", ds)
    top.add_row("context", f"{summary['context_size']} tokens, BOS {'prepended' if summary['prepend_bos'] else 'not prepended'}")
    pct = 100 * summary["n_tokens"] / summary["n_tokens_target"]
    top.add_row("tokens", f"{summary['n_tokens']:,} committed of {summary['n_tokens_target']:,} targeted ({pct:.1f}%)")
    top.add_row("shards", f"{summary['shards_committed']} of {summary['n_shards']} committed  ({summary['shard_tokens']:,} tokens each, chunks of {summary['chunk_tokens']:,})")
    top.add_row("dtype / codec", f"{summary['dtype']} / {summary['codec']}{', crc32c' if summary['checksums'] else ''}")
    ratio = summary["compression_ratio"]
    top.add_row("on disk", f"{_bytes(summary['bytes_on_disk'])}  (activations {_bytes(summary['acts_bytes_stored'])}, "
                f"compression {f'{ratio:.2f}x' if ratio else 'n/a'})")
    top.add_row("format", f"version {summary['format_version']}")
    hooks = Table(title="hooks", title_justify="left")
    hooks.add_column("hook", style="cyan")
    hooks.add_column("width", justify="right")
    hooks.add_column("tokens", justify="right")
    hooks.add_column("mean ‖x‖", justify="right")
    hooks.add_column("E‖x‖²", justify="right")
    for name, h in summary["hooks"].items():
        hooks.add_row(name, str(h["width"]), f"{h['count']:,}", f"{h['mean_norm']:.3f}", f"{h['mean_sq_norm']:.3f}")
    return [top, hooks]


def _cell(row: dict[str, Any], col: str) -> str:
    value = row.get(col)
    if col in ("name", "layer"):
        return str(value or "")
    return "-" if value is None else f"{value:.4g}"


def train_table(named: Sequence[tuple[str, TrainResult]], what: str) -> Table:
    """``actstore train-sae``: one row per experiment (its name prefixed, e.g. ``group0/``) with
    its last training and held-out figures; a Group-SAE's mean row is followed by one row per
    member layer. ``what`` names the hooks or the groups file in the title."""
    results = [r for _, r in named]
    finished = all(r.finished_before for r in results)
    rate = sum(r.tokens_per_s for r in results) / len(results)
    speed = "finished earlier" if finished else f"{rate:,.0f} tokens/s, all experiments together"
    table = Table(title=f"train-sae: {what} ({speed})")
    cols = ["name", "layer", "train_fvu", "train_l0", "eval_fvu", "eval_l0", "eval_dead"]
    for col in cols:
        table.add_column(col, justify="left" if col in ("name", "layer") else "right")
    for prefix, r in named:
        for row in r.rows:
            per_layer = row.get("eval_layers") or {}
            cells = {**row, "name": prefix + row["name"], "layer": "mean of group" if per_layer else ""}
            table.add_row(*[_cell(cells, c) for c in cols])
            for layer, m in per_layer.items():
                table.add_row("", layer, "", "", *[_cell({f"eval_{k}": v for k, v in m.items()}, c) for c in cols[4:]])
    return table


def groups_tables(result: LayerGroups) -> list[Table]:
    """``actstore groups``: the AMAD curve, then the chosen groups."""
    curve = Table(title=f"AMAD by number of groups ({len(result.hooks)} layers, {result.tokens:,} tokens)", title_justify="left")
    curve.add_column("G", justify="right")
    curve.add_column("AMAD", justify="right")
    curve.add_column("groups")
    for g, value in result.amad.items():
        mark = "  <- chosen" if g == result.chosen else ""
        curve.add_row(str(g), f"{value:.4f}", " | ".join(",".join(short_hook(h).split()[0] for h in grp) for grp in result.partitions[g]) + mark)
    chosen = Table(title=f"{result.chosen} groups ({result.rule})", title_justify="left")
    chosen.add_column("group", justify="right")
    chosen.add_column("layers")
    chosen.add_column("largest distance inside", justify="right")
    index = {h: i for i, h in enumerate(result.hooks)}
    d_HH = np.asarray(result.distances)
    for n, grp in enumerate(result.groups):
        idx = [index[h] for h in grp]
        chosen.add_row(str(n), ", ".join(grp), f"{d_HH[np.ix_(idx, idx)].max():.4f}")
    return [curve, chosen]


def comparison_tables(result: GroupComparison) -> tuple[Table, Table]:
    """``train-sae --groups --per-layer``: per layer (FVU and L0, its own SAE beside its
    group's), then the totals."""
    experiments = sorted({r.experiment for r in result.rows})
    title = "held-out FVU and L0 per layer: its own SAE vs its group's SAE (same settings and tokens)"
    per_layer = Table(title=title + (f", {experiments[0]}" if len(experiments) == 1 else ""))
    cols = (["experiment"] if len(experiments) > 1 else []) + ["layer", "group", "FVU own", "FVU group", "change", "L0 own", "L0 group"]
    for col in cols:
        per_layer.add_column(col, justify="left" if col in ("experiment", "layer") else "right")
    for r in result.rows:
        cells = [r.experiment] if len(experiments) > 1 else []
        per_layer.add_row(*cells, short_hook(r.layer), str(r.group), f"{r.fvu_own:.4f}", f"{r.fvu_group:.4f}", f"{r.change:+.1%}",
                          f"{r.l0_own:.1f}", f"{r.l0_group:.1f}")
    s = result.summary()
    totals = Table(title="Group-SAEs against per-layer SAEs")
    totals.add_column("")
    totals.add_column("value", justify="right")
    for name, value in [
        ("layers L, groups G", f"{s['layers']}, {s['groups']}"),
        ("training time, per-layer SAEs", f"{s['seconds_per_layer_saes']:.0f} s"),
        ("training time, group SAEs", f"{s['seconds_group_saes']:.0f} s"),
        ("compute saved", f"{s['time_saved']:.1f}x (L/G = {s['layers'] / s['groups']:.1f})"),
        ("mean held-out FVU, per-layer SAEs", f"{s['mean_fvu_per_layer']:.4f}"),
        ("mean held-out FVU, group SAEs", f"{s['mean_fvu_group']:.4f}"),
        ("FVU change per layer", f"mean {s['mean_fvu_change']:+.1%}, median {s['median_fvu_change']:+.1%}"),
    ]:
        totals.add_row(name, value)
    return per_layer, totals


def eval_tables(result: EvalResult, title: str) -> list[Table]:
    """``actstore eval``: the loss figures, then L0 and FVU per splice."""
    losses = Table(title=f"{title} ({result.tokens:,} predicted positions)", title_justify="left")
    losses.add_column("figure")
    losses.add_column("value", justify="right")
    rows = [("CE clean", result.ce_clean), ("CE with SAEs spliced", result.ce_spliced), ("delta loss", result.delta_loss),
            ("CE zero-ablated", result.ce_zero), ("loss recovered", result.loss_recovered),
            ("KL(p_clean || p_spliced)", result.kl), ("CE adapted, nothing spliced", result.ce_adapted)]
    for name, value in rows:
        if value is not None:
            losses.add_row(name, f"{value:.4f}")
    splices = Table(title="at each splice (non-BOS tokens)", title_justify="left")
    for col in ("hook", "L0", "FVU", "tokens"):
        splices.add_column(col, justify="left" if col == "hook" else "right")
    for s in result.splices:
        splices.add_row(s.hook, f"{s.l0:.1f}", f"{s.fvu:.4f}", f"{s.tokens:,}")
    return [losses, splices]


def latents_table(result: LatentsResult) -> Table:
    """``actstore latents``: one row per dashboard."""
    how = f"{result.tokens:,} tokens, {result.seconds:.1f} s" + (f", resumed at token {result.resumed_from:,}" if result.resumed_from else "")
    table = Table(title=f"latent dashboards in {result.out} ({how}); open {result.out / 'index.html'}", title_justify="left")
    for col in ("dashboard", "reads", "latents", "dead", "page"):
        table.add_column(col, justify="right" if col in ("latents", "dead") else "left")
    for v in result.views:
        table.add_row(v["name"], v["hook"], f"{v['d_sae']:,}", f"{v['dead']:,}", v["path"])
    return table


def before_after_table(result: LoRAResult, title: str) -> Table:
    """``actstore lora``: the held-out figures before and after the finetune, with a column
    for each ``--eval-at`` evaluation during it and the CE gap closed at each."""
    before = result.before
    during = [(f"after {e.tokens:,}", e.after, e.ce_gap_closed) for e in result.evals[:-1]]
    columns = [*during, ("after", result.after, result.ce_gap_closed)]
    table = Table(title=f"{title} ({before.tokens:,} held-out positions)", title_justify="left")
    for col in ("", "before", *(name for name, _, _ in columns)):
        table.add_column(col, justify="left" if not col else "right")
    afters = [a for _, a, _ in columns]
    rows = [("CE clean", before.ce_clean, [a.ce_clean for a in afters]),
            ("CE with SAEs", before.ce_spliced, [a.ce_spliced for a in afters]),
            ("CE gap", before.delta_loss, [a.delta_loss for a in afters]),
            ("KL(p_clean || p_SAE)", before.kl, [a.kl for a in afters]),
            ("CE adapted, no SAE", before.ce_clean, [a.ce_adapted for a in afters])]
    for i, s_before in enumerate(before.splices):
        rows += [(f"L0 at {s_before.hook}", s_before.l0, [a.splices[i].l0 for a in afters]),
                 (f"FVU at {s_before.hook}", s_before.fvu, [a.splices[i].fvu for a in afters])]
    for name, b, values in rows:
        table.add_row(name, f"{b:.4f}", *("-" if v is None else f"{v:.4f}" for v in values))
    if during:
        table.add_row("CE gap closed", "", *(f"{gap:.1%}" for _, _, gap in columns))
    return table


def demo_table(result: DemoResult) -> Table:
    """``actstore demo``: seconds and outcome of each stage."""
    table = Table(title="actstore demo", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    table.add_column("result")
    for name, seconds, what in result.stages:
        table.add_row(name, f"{seconds:.0f}", what)
    table.add_row("total", f"{sum(s for _, s, _ in result.stages):.0f}", "")
    return table


# ---- figures ------------------------------------------------------------------------------
def _pyplot() -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend (a runtime dependency, imported on
    first use because it is heavy)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(out: Path, histories: Mapping[str, Sequence[Mapping[str, float]]]) -> None:
    """``train-sae``: ``training_curves.png`` (FVU, L0 and dead fraction of each experiment by
    tokens) and, for several experiments, ``l0_vs_fvu.png`` (their final training batch) in
    ``out``. ``histories``: each experiment's recorded steps (``tokens``, ``fvu``, ``l0``,
    ``dead``) by its name."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for name, h in histories.items():
        tokens = [r["tokens"] for r in h]
        for ax, key in zip(axes, ("fvu", "l0", "dead"), strict=True):
            ax.plot(tokens, [r[key] for r in h], label=name)
    for ax, title in zip(axes, ("FVU (train batch)", "L0", "dead fraction"), strict=True):
        ax.set_title(title)
        ax.set_xlabel("tokens")
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "training_curves.png", dpi=110)
    plt.close(fig)
    if len(histories) > 1:
        fig, ax = plt.subplots(figsize=(5, 4))
        for name, h in histories.items():
            last = h[-1]
            ax.scatter(last["l0"], last["fvu"], label=name)
        ax.set_xlabel("L0")
        ax.set_ylabel("FVU")
        ax.set_title("L0 vs FVU (final train batch)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / "l0_vs_fvu.png", dpi=110)
        plt.close(fig)


def plot_lora_curve(path: Path, curve: Sequence[tuple[int, float]], result: LoRAResult) -> None:
    """``lora``'s ``lora_curve.png``. Left: training KL per step (and its running mean) with the
    held-out KL before and after. Right: held-out CE clean and with the SAEs, before and after
    (the CE gap closed)."""
    plt = _pyplot()
    if not curve:
        return
    steps, kl = np.array([s for s, _ in curve]), np.array([v for _, v in curve])
    window = max(1, len(kl) // 20)
    smooth = np.convolve(kl, np.ones(window) / window, mode="valid")
    fig, (ax, bars) = plt.subplots(1, 2, figsize=(11, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    ax.plot(steps, kl, alpha=0.3, label="training KL (per step)")
    ax.plot(steps[window - 1:], smooth, label=f"running mean ({window} steps)")
    ax.axhline(result.before.kl, color="C3", ls="--", label=f"held-out KL before ({result.before.kl:.3f})")
    ax.axhline(result.after.kl, color="C2", ls="--", label=f"held-out KL after ({result.after.kl:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("KL(p_base || p_adapted+SAE), nats")
    ax.set_title("LoRA training")
    ax.legend(fontsize=8)
    names = ["clean", "with SAEs\nbefore", "with SAEs\nafter"]
    values = [result.before.ce_clean, result.before.ce_spliced, result.after.ce_spliced]
    bars.bar(names, values, color=["C7", "C3", "C2"])
    for i, v in enumerate(values):
        bars.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    bars.set_ylim(min(values) * 0.9, max(values) * 1.05)
    bars.set_ylabel("held-out CE loss, nats")
    bars.set_title(f"CE gap closed: {result.ce_gap_closed:.0%}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_heatmap(result: LayerGroups, path: Path) -> None:
    """``groups``' ``groups_heatmap.png``: the distance matrix (hook order) with the chosen groups
    outlined, beside the AMAD curve."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()

    d_HH = np.asarray(result.distances)
    H = len(result.hooks)
    labels = [short_hook(h) for h in result.hooks]
    fig, (ax, ax_curve) = plt.subplots(1, 2, figsize=(12, 5.2), gridspec_kw={"width_ratios": [1.25, 1]})
    im = ax.imshow(d_HH, cmap="viridis", vmin=0)
    fig.colorbar(im, ax=ax, label="angular distance / pi")
    ticks = range(H) if H <= 32 else range(0, H, max(1, H // 16))
    ax.set_xticks(list(ticks), [labels[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_yticks(list(ticks), [labels[i] for i in ticks], fontsize=7)
    index = {h: i for i, h in enumerate(result.hooks)}
    colors = plt.get_cmap("tab10")
    for n, grp in enumerate(result.groups):
        idx = sorted(index[h] for h in grp)
        runs = np.split(idx, np.where(np.diff(idx) != 1)[0] + 1)  # a group may be several runs of layers
        for run in runs:
            a, b = run[0] - 0.5, run[-1] + 0.5
            ax.add_patch(Rectangle((a, a), b - a, b - a, fill=False, edgecolor=colors(n % 10), linewidth=2))
    ax.set_title(f"layer distances, {result.chosen} groups ({result.tokens:,} tokens)")
    gs, vs = zip(*sorted(result.amad.items()), strict=True)
    ax_curve.plot(gs, vs, marker="o", markersize=3)
    ax_curve.axvline(result.chosen, color="tab:red", linestyle="--", label=f"chosen G = {result.chosen}")
    ax_curve.set_xlabel("number of groups G")
    ax_curve.set_ylabel("AMAD")
    ax_curve.set_title("AMAD by number of groups")
    ax_curve.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
