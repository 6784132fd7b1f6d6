"""What the three ``reproduce_*.py`` scripts share: one harvested store of SmolLM2-135M, the
spliced-CE evaluation of many SAEs on one loaded model, log-log interpolation, and their
command-line skeleton.

The store: ``hook_resid_post`` of all 30 blocks of SmolLM2-135M over the built-in corpus' train
split, 256-token windows, bf16, uncompressed (it is read many times), in shards of 4,096 tokens
so the last shards can be held out. Every script harvests it when it is missing and reuses it
when it is there (``harvest`` resumes a partial store and does nothing to a finished one), so
``make reproduce`` harvests once for the three figures. ``--quick`` asks for a small store
(``QUICK_TOKENS``), which the full scripts' larger store also serves.

Delta CE loss (``actstore eval``'s figure; Rajamanoharan et al. 2024, arXiv 2407.14435, §5.1):
the mean next-token CE on held-out windows (the corpus' test split) with the SAE's
reconstruction spliced in for its activation, minus the model's own CE on the same windows.
:func:`spliced_ce` computes the clean CE once and one spliced pass per SAE (:class:`DeltaCE`
caches them by SAE folder)
(:class:`pipelines.splice.Splicer`: the BOS position keeps its activation, as in ``actstore
eval``); it is tested equal to :func:`pipelines.evaluate.measure`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("TQDM_DISABLE", "1")  # the model loader's bars

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from pipelines import smollm2  # noqa: E402
from pipelines.files import write_json_atomic  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
MODEL = smollm2.NAME
N_LAYERS = 30
CONTEXT = 256
SHARD_TOKENS = 4096
FULL_TOKENS = 131_072
"""Tokens of the full store (all 30 layers: 4.5 GB in bf16)."""
QUICK_TOKENS = 16_384
DEFAULT_OUT = ROOT / "runs" / "reproduce"
FIGURES = ROOT / "docs" / "figures"


@dataclass(frozen=True)
class Paths:
    out: Path
    """This script's folder: its train-sae / lora runs and its cached evaluations."""
    store: str
    figures: Path
    """Where the PNG and the JSON go."""
    quick: bool


def parse(description: str, name: str, add_arguments=None) -> tuple[argparse.Namespace, Paths]:
    """The common options (``--out --store --figures --quick``) and the script's own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="a few-minute run of the same stages (the test suite runs it)")
    p.add_argument("--out", help=f"working folder (default {DEFAULT_OUT}, or {DEFAULT_OUT}-quick with --quick)")
    p.add_argument("--store", help="the shared store (default OUT/../store): harvested when missing, reused when there")
    p.add_argument("--figures", help=f"where the PNG and JSON go (default {FIGURES}; OUT/figures with --quick)")
    if add_arguments is not None:
        add_arguments(p)
    args = p.parse_args()
    base = Path(args.out) if args.out else Path(f"{DEFAULT_OUT}-quick" if args.quick else DEFAULT_OUT)
    store = args.store or str(base / "store")
    figures = Path(args.figures) if args.figures else (base / "figures" if args.quick else FIGURES)
    paths = Paths(base / name, store, figures, args.quick)
    paths.out.mkdir(parents=True, exist_ok=True)
    paths.figures.mkdir(parents=True, exist_ok=True)
    return args, paths


def shared_store(url: str, quick: bool, model=None, log=print) -> str:
    """Harvest the shared store into ``url`` unless it already holds at least the tokens asked
    for (``QUICK_TOKENS`` or ``FULL_TOKENS``, all 30 layers); returns ``url``."""
    import actstore
    from pipelines.harvest import HarvestConfig, harvest
    from pipelines.text import TextConfig

    tokens = QUICK_TOKENS if quick else FULL_TOKENS
    try:
        store = actstore.open_store(url)
        held = store.config.tokens_in(sorted(store.committed_shards))
        if held >= tokens and len(store.hooks) == N_LAYERS:
            return url
    except Exception:  # missing or partial: harvest resumes it
        pass
    log(f"harvesting {tokens:,} tokens of {MODEL} at all {N_LAYERS} layers into {url} ...")
    harvest(HarvestConfig(model=MODEL, out=url, layers=tuple(range(N_LAYERS)), tokens=tokens,
                          text=TextConfig(context_size=CONTEXT), codec="none", shard_tokens=SHARD_TOKENS, progress=False),
            model=model)
    return url


def resid_post(layer: int) -> str:
    """The store's hook of block ``layer``'s residual stream."""
    from pipelines.capture import hook_name

    return hook_name(layer, "resid_post")


def held_out_windows(tokenizer: Any, tokens: int) -> list[np.ndarray]:
    """The first ``tokens`` of the corpus' test split in windows of ``CONTEXT`` (``actstore eval``'s text)."""
    from pipelines.text import TextConfig, take_windows

    return take_windows(TextConfig(split="test", context_size=CONTEXT), tokenizer, tokens)


@torch.no_grad()
def mean_ce(model: torch.nn.Module, windows: Sequence[np.ndarray], batch_size: int = 4, splicer: Any = None) -> float:
    """Mean next-token CE of ``model`` on ``windows``: as it is, or with ``splicer``'s SAEs spliced in."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for start in range(0, len(windows), batch_size):
        ids_BT = torch.from_numpy(np.stack(windows[start:start + batch_size])).to(device)
        if splicer is None:
            logits_BTV = model(input_ids=ids_BT, use_cache=False).logits
        else:
            splicer.set_inputs(ids_BT)
            with splicer.mode("sae", measure=True):
                logits_BTV = model(input_ids=ids_BT, use_cache=False).logits
        total += float(F.cross_entropy(logits_BTV[:, :-1].flatten(0, 1).float(), ids_BT[:, 1:].reshape(-1), reduction="sum"))
        n += ids_BT[:, 1:].numel()
    return total / n


def spliced_ce(lm: Any, windows: Sequence[np.ndarray], splices: Sequence[Sequence[str]], batch_size: int = 4,
               clean: float | None = None) -> tuple[float, list[dict[str, float]]]:
    """The clean CE (once; or ``clean`` when given) and, for each entry of ``splices`` (SAE specs
    spliced together), the spliced CE, delta CE and the splices' L0 and FVU on ``windows``."""
    from pipelines.evaluate import load_saes
    from pipelines.splice import Splicer

    ce0 = mean_ce(lm.model, windows, batch_size) if clean is None else clean
    rows = []
    for specs in splices:
        saes = load_saes(list(specs), lm.model, MODEL)
        with Splicer(lm.model, saes, lm.tokenizer.bos_token_id) as splicer:
            ce = mean_ce(lm.model, windows, batch_size, splicer)
            stats = list(splicer.stats.values())
        rows.append({"ce_spliced": ce, "delta_ce": ce - ce0, "l0": float(np.mean([s.l0 for s in stats])),
                     "fvu": float(np.mean([s.fvu for s in stats]))})
        del saes
    return ce0, rows


class Cache:
    """A JSON file of finished measurements by key, so a rerun (or a resumed run) skips them."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> Any:
        self.data[key] = value
        write_json_atomic(self.path, self.data)
        return value


class DeltaCE:
    """Delta CE of SAEs spliced one at a time on ``tokens`` held-out tokens, cached in ``cache`` by
    SAE folder (relative to ``root``) with the clean CE; the model loads on the first figure not
    in the cache, so a finished rerun loads nothing."""

    def __init__(self, root: Path, cache: Cache, tokens: int, log=print):
        self.root, self.cache, self.tokens, self.log = root, cache, tokens, log
        self.lm: Any = None
        self.windows: list[Any] = []

    def _model(self) -> Any:
        if self.lm is None:
            from pipelines.models import load_model

            self.log(f"loading {MODEL} for delta CE on {self.tokens:,} held-out tokens ...")
            self.lm = load_model(MODEL)
            self.windows = held_out_windows(self.lm.tokenizer, self.tokens)
        return self.lm

    def clean(self) -> float:
        key = f"clean_ce/{self.tokens}"
        if self.cache.get(key) is None:
            self.cache.put(key, mean_ce(self._model().model, self.windows))
        return self.cache.get(key)

    def __call__(self, sae: str) -> dict[str, float]:
        """``spliced_ce``'s figures of the SAE in ``root / sae``."""
        key = f"delta_ce/{self.tokens}/{sae}"
        if self.cache.get(key) is None:
            clean = self.clean()
            self.cache.put(key, spliced_ce(self._model(), self.windows, [[str(self.root / sae)]], clean=clean)[1][0])
        return self.cache.get(key)


def interpolate(points: Sequence[tuple[float, float]], x: float, log_y: bool = True) -> float | None:
    """y at ``x`` on the piecewise line through ``points`` in (log x, log y), or in (log x, y)
    with ``log_y=False`` for figures that may be zero or negative (delta CE); None outside their
    x range."""
    pts = sorted((px, py) for px, py in points if px > 0 and (py > 0 or not log_y))
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if x0 <= x <= x1:
            if x1 == x0:
                return y0
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            if log_y:
                return math.exp(math.log(y0) + t * (math.log(y1) - math.log(y0)))
            return y0 + t * (y1 - y0)
    return None


def write_figures(paths: Paths, name: str, figures: dict[str, Any], fig: Any) -> tuple[Path, Path]:
    """``<figures>/<name>.png`` from the matplotlib figure and ``<name>.json`` from ``figures``."""
    png, js = paths.figures / f"{name}.png", paths.figures / f"{name}.json"
    fig.savefig(png, dpi=130, bbox_inches="tight")
    write_json_atomic(js, {**figures, "quick": paths.quick})
    return png, js
