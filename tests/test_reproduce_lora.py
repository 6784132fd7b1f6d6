"""``benchmarks/reproduce_lora.py``: its LoRA budgets by hand, and the ``--quick`` run end to end on
SmolLM2-135M (figure, JSON with every point, a rerun that trains nothing and gives the same numbers)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import folder_bytes, run_reproduce

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from reproduce_lora import lora_plan, settings  # noqa: E402


def test_budgets_are_whole_steps_of_the_lora_tokens():
    full = settings(quick=False, lora_tokens=None)
    assert (full["lora_tokens"], full["eval_at"], full["rank_tokens"]) == (65_536, (16_384, 32_768), 32_768)
    paper_plan = settings(quick=False, lora_tokens=98_304)
    assert (paper_plan["eval_at"], paper_plan["rank_tokens"]) == ((24_576, 49_152), 49_152)
    quick = settings(quick=True, lora_tokens=None)
    assert (quick["lora_tokens"], quick["eval_at"], quick["rank_tokens"]) == (3072, (1024, 2048), 2048)
    assert settings(quick=True, lora_tokens=3000)["lora_tokens"] == 3072  # rounded up to whole 1,024-token steps
    with pytest.raises(ValueError, match="--lora-tokens 2048: give at least 3,072"):
        settings(quick=True, lora_tokens=2048)
    plan = lora_plan(full)
    assert [(r["series"], r["layers"], r["rank"], r["tokens"], r["eval_at"]) for r in plan.values()] == [
        ("1 SAE", (15,), 64, 65_536, (16_384, 32_768)), ("rank", (15,), 4, 32_768, ()), ("rank", (15,), 16, 32_768, ()),
        ("3 SAEs", (6, 15, 24), 64, 65_536, (16_384, 32_768))]
    assert len(set(plan)) == 4 and len(set(lora_plan(paper_plan)) & set(plan)) == 0  # another budget: other folders


def test_too_small_a_budget_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "reproduce_lora.py"), "--quick", "--lora-tokens", "2048",
                           "--out", str(tmp_path), "--store", str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: --lora-tokens 2048: give at least 3,072 (3 steps of 1,024 tokens)"]
    assert not (tmp_path / "none").exists()  # nothing harvested


@pytest.mark.slow
def test_quick_run_end_to_end(reproduce_store, tmp_path):
    out = tmp_path / "out"
    first, t_first = run_reproduce("lora", out, reproduce_store)
    assert first.returncode == 0, first.stderr[-3000:]
    figures = out / "figures"
    assert (figures / "lora.png").stat().st_size > 10_000
    doc = json.loads((figures / "lora.json").read_text())
    assert doc["quick"] is True and doc["paper"]["ce_gap_closed"] == [0.30, 0.55] and len(doc["headline"]) == 5
    curves, points = doc["curves"], doc["points"]
    for series in ("1 SAE", "3 SAEs"):
        assert [c["tokens"] for c in curves[series]] == [1024, 2048, 3072]  # three budgets from one run each
    assert [c["rank"] for c in curves["rank"]] == [1, 4, 8]
    assert len(points) == 3 + 2 + 3
    clean = points[0]["ce_clean"]
    for p in points:
        assert math.isfinite(p["ce_gap_closed"]) and -1 < p["ce_gap_closed"] < 1
        assert p["ce_clean"] == clean and p["ce_spliced_before"] > clean  # one held-out text, and every SAE costs loss
        assert math.isfinite(p["ce_adapted"]) and p["ce_adapted_change"] == pytest.approx(p["ce_adapted"] - clean)
        assert abs(p["ce_adapted_change_rel"]) < 0.05  # a few steps barely move the model's own loss
        assert p["ce_gap_closed"] == pytest.approx(
            (p["ce_spliced_before"] - p["ce_spliced_after"]) / (p["ce_spliced_before"] - p["ce_clean"]))
    one = {c["tokens"]: c["ce_gap_closed"] for c in curves["1 SAE"]}
    assert {c["rank"]: c["ce_gap_closed"] for c in curves["rank"]}[8] == one[2048]  # rank 8's point is the budget run's
    assert one[3072] > one[1024] > 0 and curves["3 SAEs"][-1]["ce_gap_closed"] > 0
    assert [s["l0"] for s in doc["saes"].values()] == pytest.approx([32, 32, 32])

    # a rerun finds every run finished: nothing trained or written, the same numbers
    files = folder_bytes(out / "lora")
    again, t_again = run_reproduce("lora", out, reproduce_store)
    assert again.returncode == 0, again.stderr[-3000:]
    redo = json.loads((figures / "lora.json").read_text())
    assert redo["points"] == points and redo["curves"] == curves and redo["headline"] == doc["headline"]
    assert folder_bytes(out / "lora") == files and t_again < t_first / 2
