"""``actstore info``: describe a store (model, dataset, hooks, progress, sizes, statistics)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

import actstore


def describe_store(url: str) -> dict[str, Any]:
    """The store's summary as plain JSON values (see ``Store.summary``)."""
    return actstore.open_store(url).summary()


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    raise AssertionError("unreachable")


def render_summary(summary: dict[str, Any], console: Console) -> None:
    """Print the summary as two rich tables: the store, then one row per hook."""
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
    console.print(top)
    hooks = Table(title="hooks", title_justify="left")
    hooks.add_column("hook", style="cyan")
    hooks.add_column("width", justify="right")
    hooks.add_column("tokens", justify="right")
    hooks.add_column("mean ‖x‖", justify="right")
    hooks.add_column("E‖x‖²", justify="right")
    for name, h in summary["hooks"].items():
        hooks.add_row(name, str(h["width"]), f"{h['count']:,}", f"{h['mean_norm']:.3f}", f"{h['mean_sq_norm']:.3f}")
    console.print(hooks)
