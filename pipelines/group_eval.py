"""Group-SAEs against per-layer SAEs (Ghilardi et al. 2024, arXiv 2410.21508, §4): the same
settings and token budget for every SAE, G group SAEs and one SAE per member layer, each layer's
held-out FVU and L0 side by side, the training time of each set (the compute saved, about L/G)
and the FVU cost. ``actstore train-sae --groups groups.json --per-layer`` and
``benchmarks/bench_groups.py`` print it (:func:`pipelines.report.comparison_tables`).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipelines.train import TrainResult, TrainSAEConfig, train_groups, train_sae


@dataclass
class LayerRow:
    layer: str
    group: int
    experiment: str
    fvu_own: float
    fvu_group: float
    l0_own: float
    l0_group: float

    @property
    def change(self) -> float:
        """Relative FVU change of the group SAE over the layer's own."""
        return self.fvu_group / self.fvu_own - 1


@dataclass
class GroupComparison:
    rows: list[LayerRow]
    seconds_per_layer: float
    """Training (and evaluating) the per-layer SAEs, wall clock."""
    seconds_groups: float
    """The same for the group SAEs."""
    n_layers: int
    n_groups: int
    group_results: list[TrainResult]

    @property
    def time_saved(self) -> float:
        return self.seconds_per_layer / self.seconds_groups

    def summary(self) -> dict[str, Any]:
        changes = [r.change for r in self.rows]
        return {
            "layers": self.n_layers, "groups": self.n_groups, "seconds_per_layer_saes": self.seconds_per_layer,
            "seconds_group_saes": self.seconds_groups, "time_saved": self.time_saved,
            "mean_fvu_per_layer": statistics.fmean(r.fvu_own for r in self.rows),
            "mean_fvu_group": statistics.fmean(r.fvu_group for r in self.rows),
            "mean_fvu_change": statistics.fmean(changes), "median_fvu_change": statistics.median(changes),
            "rows": [{**r.__dict__, "change": r.change} for r in self.rows],
        }


def compare_groups(cfg: TrainSAEConfig, groups: list[list[str]]) -> GroupComparison:
    """Train ``cfg``'s experiments once per group (``<out>/group<i>``) and once per member layer
    (``<out>/per_layer/<hook>``), timing each set, and pair every layer's held-out figures."""
    if cfg.eval_tokens <= 0:
        raise ValueError("comparing group and per-layer SAEs needs held-out tokens; set --eval-tokens above 0")
    t = time.perf_counter()
    group_results = train_groups(cfg, groups)
    seconds_groups = time.perf_counter() - t
    layers = [h for g in groups for h in g]
    t = time.perf_counter()
    own = {h: train_sae(replace(cfg, hook=h, group=(), out=str(Path(cfg.out) / "per_layer" / h))) for h in layers}
    seconds_layers = time.perf_counter() - t
    rows = []
    for i, (members, result) in enumerate(zip(groups, group_results, strict=True)):
        for exp_row in result.rows:
            for h in members:
                mine = next(r for r in own[h].rows if r["name"] == exp_row["name"])
                theirs = exp_row["eval_layers"][h] if len(members) > 1 else {"fvu": exp_row["eval_fvu"], "l0": exp_row["eval_l0"]}
                rows.append(LayerRow(h, i, exp_row["name"], mine["eval_fvu"], theirs["fvu"], mine["eval_l0"], theirs["l0"]))
    rows.sort(key=lambda r: (r.experiment, layers.index(r.layer)))
    return GroupComparison(rows, seconds_layers, seconds_groups, len(layers), len(groups), group_results)

