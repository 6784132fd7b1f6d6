"""The static latent dashboard ``actstore latents`` writes: files only, no server, no network.

Each SAE's folder (``OUT/<name>/``) holds

- ``index.html`` and ``latent.html`` with ``assets/dashboard.js`` and ``assets/dashboard.css``,
  copied from ``pipelines/dashboard_assets/`` (they ship in the package: nothing comes from a
  CDN);
- ``data/index.js``: ``actstoreIndex({...})``, the SAE and every latent's frequency, mean and
  max (the index table and the density histogram);
- ``data/latents-NNNNN.js``: ``actstoreLatents(N, [...])``, the records of latents
  ``N * shard_size ..``, loaded by ``latent.html`` with a script tag, which a browser also
  allows for pages opened from disk (``file://`` forbids ``fetch``);
- ``latents-NNNNN.jsonl``: the same records, one JSON object a line, for scripts.

A record: ``latent``, ``count``, ``frequency``, ``mean``, ``max``, ``histogram`` (counts over the
index's ``histogram_edges``), ``top`` (examples, highest first), ``quantiles`` (the random
sample cut at its quartiles: bands ``0-25%``, ``25-50%``, ``50-75%``, each highest first) and,
with a model, ``logits`` (``top``/``bottom``: ``[token, value]`` pairs). An example:
``token_index`` (in the store), ``activation``, ``tokens`` (decoded), ``ids``, ``acts`` (the
latent on each of them) and ``focus`` (where the example's token is). ``OUT/index.html`` lists the
SAEs' dashboards. Every file is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
from collections.abc import Iterable, Sequence
from html import escape
from pathlib import Path
from typing import Any

import numpy as np

from .files import write_text_atomic

ASSETS = Path(__file__).with_name("dashboard_assets")
PAGES = ("index.html", "latent.html")
SCRIPTS = ("dashboard.js", "dashboard.css")
BANDS = ("0-25%", "25-50%", "50-75%")
"""The lower-quantile bands of the random sample (its top quarter is what ``top`` shows better)."""


class Decoder:
    """Token id -> text with a tokenizer, each id decoded once."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.cache: dict[int, str] = {}

    def __call__(self, ids: list[int]) -> list[str]:
        cache = self.cache
        missing = [i for i in ids if i not in cache]
        for i in missing:
            cache[i] = self.tokenizer.decode([i])
        return [cache[i] for i in ids]


DIGITS = 4
"""Significant digits of the activations written: the files stay small, the shading the same."""


def _round(x: float) -> float:
    return float(f"{x:.{DIGITS}g}")


def _example(e: dict[str, Any], decode: Decoder) -> dict[str, Any]:
    """An example of :meth:`~pipelines.latent_stats.LatentStats.records` (rounded there) with its text."""
    return {"token_index": e["token_index"], "activation": e["activation"], "focus": e["focus"],
            "tokens": decode(e["ids"]), "acts": e["acts"], "ids": e["ids"]}


def quantile_bands(sample: list[dict[str, Any]]) -> list[tuple[str, list[dict[str, Any]]]]:
    """The random sample (highest first) cut into quarters by activation, the lowest three."""
    ascending = sample[::-1]
    quarters = np.array_split(np.arange(len(ascending)), 4)
    return [(band, [ascending[i] for i in q[::-1]]) for band, q in zip(BANDS, quarters[:3], strict=True)]


def latent_record(rec: dict[str, Any], decode: Decoder, logits: Sequence[list] | None = None) -> dict[str, Any]:
    """A :meth:`pipelines.latent_stats.LatentStats.records` entry as the dashboard shows it;
    ``logits``: the latent's logit-lens ``(top values, top ids, bottom values, bottom ids)``."""
    out = {"latent": rec["latent"], "count": rec["count"], "frequency": rec["frequency"], "mean": _round(rec["mean"]),
           "max": _round(rec["max"]), "histogram": rec["histogram"],
           "top": [_example(e, decode) for e in rec["top"]],
           "quantiles": [{"band": band, "examples": [_example(e, decode) for e in examples]}
                         for band, examples in quantile_bands(rec["sample"])]}
    if logits is not None:
        top_vals, top_ids, bottom_vals, bottom_ids = logits
        out["logits"] = {"top": [[t, _round(v)] for t, v in zip(decode(top_ids), top_vals, strict=True)],
                         "bottom": [[t, _round(v)] for t, v in zip(decode(bottom_ids), bottom_vals, strict=True)]}
    return out


def _dumps(doc: Any) -> str:
    return json.dumps(doc, ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def write_dashboard(folder: Path, index: dict[str, Any], shards: Iterable[tuple[int, list[dict[str, Any]]]]) -> None:
    """One SAE's dashboard (see the module docstring)."""
    for sub in ("assets", "data"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for name in PAGES:
        shutil.copyfile(ASSETS / name, folder / name)
    for name in SCRIPTS:
        shutil.copyfile(ASSETS / name, folder / "assets" / name)
    write_text_atomic(folder / "data" / "index.js", f"actstoreIndex({_dumps(index)});\n")
    for k, records in shards:
        lines = [_dumps(r) for r in records]
        write_text_atomic(folder / f"latents-{k:05d}.jsonl", "".join(line + "\n" for line in lines))
        write_text_atomic(folder / "data" / f"latents-{k:05d}.js", f"actstoreLatents({k},[{','.join(lines)}]);\n")


def write_home(out: Path, views: list[dict[str, Any]]) -> None:
    """``out/index.html``: a link to each SAE's dashboard."""
    rows = "\n".join(
        f'<tr><td><a href="{escape(v["name"])}/index.html">{escape(v["name"])}</a></td><td>{escape(v["hook"])}</td>'
        f'<td>{v["d_sae"]:,}</td><td>{v["dead"]:,}</td><td>{v["tokens"]:,}</td><td>{escape(v["sae"])}</td></tr>'
        for v in views)
    write_text_atomic(out / "index.html", f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>actstore latents</title>
<link rel="stylesheet" href="{escape(views[0]["name"])}/assets/dashboard.css"></head>
<body><main><h1>actstore latents</h1>
<table class="latents"><thead><tr><th>dashboard</th><th>hook</th><th>latents</th><th>dead</th><th>tokens</th><th>SAE</th></tr></thead>
<tbody>
{rows}
</tbody></table></main></body></html>
""")


def make_server(folder: Path, port: int = 8000, host: str = "127.0.0.1") -> http.server.ThreadingHTTPServer:
    """A static HTTP server of ``folder`` (not started; port 0 picks a free one)."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    return http.server.ThreadingHTTPServer((host, port), handler)


def serve(folder: Path, port: int = 8000, host: str = "127.0.0.1") -> None:
    """Serve ``folder`` over HTTP until interrupted (any static server does the same)."""
    with make_server(folder, port, host) as httpd:
        print(f"serving {folder} at http://{host}:{httpd.server_address[1]}/ (Ctrl-C stops)", flush=True)
        httpd.serve_forever()
