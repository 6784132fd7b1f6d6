"""Run every benchmark, one after the other, and print their headline figures in one table.

Each ``bench_*.py`` runs as its own process (its full output shown as it goes) with ``--json``
into a temporary folder; the table at the end gathers each one's headline (figure, measured,
goal; see ``report.py``) and notes the machine. ``make bench`` runs this. Benchmarks run one
at a time: on a small machine two at once would measure each other.

    python benchmarks/run_all.py [--only stream,lora] [--json all.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("store", "harvest", "stream", "train", "groups", "lora", "latents")


def machine() -> str:
    """CPU model, cores, and the GPU if torch sees one."""
    cpu = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    text = f"{cpu}, {os.cpu_count()} cores"
    import torch

    if torch.cuda.is_available():
        text += f", {torch.cuda.get_device_name(0)}"
    return text + f", torch {torch.__version__}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", help=f"comma list of {', '.join(BENCHMARKS)}")
    p.add_argument("--json", help="also write every benchmark's figures to this JSON file")
    args = p.parse_args()
    chosen = [b.strip() for b in args.only.split(",")] if args.only else list(BENCHMARKS)
    unknown = sorted(set(chosen) - set(BENCHMARKS))
    if unknown:
        sys.exit(f"error: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    console = Console()
    results: dict[str, dict] = {}
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="actstore-bench-all-") as tmp:
        for name in chosen:
            console.rule(f"[bold]bench_{name}")
            out = Path(tmp) / f"{name}.json"
            t = time.perf_counter()
            run = subprocess.run([sys.executable, str(HERE / f"bench_{name}.py"), "--json", str(out)])
            seconds = time.perf_counter() - t
            if run.returncode != 0 or not out.exists():
                failed.append(name)
                continue
            results[name] = {**json.loads(out.read_text()), "seconds": seconds}
    table = Table(title=f"actstore benchmarks on {machine()}", title_justify="left")
    for col in ("benchmark", "figure", "measured", "goal"):
        table.add_column(col, justify="right" if col in ("measured", "goal") else "left")
    for name, r in results.items():
        for i, (figure, measured, goal) in enumerate(r["headline"]):
            table.add_row(f"bench_{name} ({r['seconds'] / 60:.1f} min)" if i == 0 else "", figure, measured, goal)
        table.add_section()
    console.rule("[bold]summary")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "results": results}, indent=2, default=str) + "\n")
    if failed:
        console.print(f"[red]failed: {', '.join('bench_' + n for n in failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
