"""``benchmarks/reproduce_groups.py --quick`` end to end on the shared quick store: the figure and
its JSON, consistent with each other and with the script's settings; a rerun trains nothing and
writes the same numbers."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from tests.helpers import run_reproduce


def _run(out: Path, store: str) -> subprocess.CompletedProcess:
    return run_reproduce("groups", out, store, timeout=900)[0]


def _mtimes(folder: Path) -> dict[str, int]:
    """Every SAE weights file and finished-run summary under ``folder``, by path."""
    files = [*folder.rglob("sae_weights.safetensors"), *folder.rglob("summary.json")]
    return {str(f.relative_to(folder)): f.stat().st_mtime_ns for f in files}


@pytest.mark.slow
def test_reproduce_groups_quick(tmp_path, reproduce_store):
    out = tmp_path / "out"
    first = _run(out, reproduce_store)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    png, js = out / "figures" / "groups.png", out / "figures" / "groups.json"
    assert png.stat().st_size > 10_000
    doc = json.loads(js.read_text())
    assert doc["quick"] is True

    layers, gs = doc["layers"], doc["g_values"]
    assert len(gs) == 3 == len(set(gs)) and doc["chosen"] in gs
    assert all(2 <= g < len(layers) for g in gs)
    assert doc["amad"][str(doc["chosen"])] <= doc["amad_threshold"] + 1e-9
    for g in gs:  # every partition covers every layer once, in g groups
        part = doc["partitions"][str(g)]
        assert len(part) == g and sorted(h for grp in part for h in grp) == sorted(layers)

    budgets = doc["settings"]["budgets"]
    assert sorted(int(t) for t in doc["runs"]) == budgets
    for t in budgets:
        sets = doc["runs"][str(t)]
        assert set(sets) == {"per_layer", *(f"G{g}" for g in gs)}
        for name, r in sets.items():
            assert set(r["layers"]) == set(layers), (t, name)
            assert all(0 < row["fvu"] < 2 and row["l0"] > 0 for row in r["layers"].values()), (t, name)
            assert r["tokens"] == r["n_saes"] * t
        assert sets["per_layer"]["n_saes"] == len(layers)
        for g in gs:
            assert sets[f"G{g}"]["n_saes"] == g
    for g in gs:
        ratio = doc["summary"]["compute_ratio"][f"G{g}"]
        assert ratio["tokens"] == pytest.approx(len(layers) / g)
        assert ratio["flops"] == pytest.approx(len(layers) / g)
        assert all(v is not None and v > 0 for v in ratio["seconds"].values())

    ce = doc["delta_ce"]
    assert math.isfinite(ce["clean_ce"]) and ce["clean_ce"] > 0
    for name in ("per_layer", *(f"G{g}" for g in gs)):
        assert set(ce[name]) == set(layers)
        assert all(math.isfinite(row["delta_ce"]) for row in ce[name].values())
    assert doc["paper"]["chosen_groups"] == 6
    assert all(len(row) == 3 for row in doc["headline"])

    trained = _mtimes(out / "groups")
    assert trained
    second = _run(out, reproduce_store)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "loading" not in second.stdout  # every delta CE came from the cache: no model load
    assert _mtimes(out / "groups") == trained  # nothing trained or rewritten
    assert json.loads(js.read_text()) == doc
