"""``benchmarks/reproduce_jumprelu.py``: the matched-L0 arithmetic against hand values, the shared
spliced-CE evaluation against ``actstore eval``'s :func:`pipelines.evaluate.measure`, and the
``--quick`` run end to end on SmolLM2-135M (figure, JSON, a rerun that trains nothing)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

from tests.helpers import run_reproduce

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

from reproduce_common import interpolate  # noqa: E402
from reproduce_jumprelu import ARCHS, MATCHED_L0, QUICK, matched, orderings  # noqa: E402


def test_interpolation_by_hand():
    pts = [(10.0, 0.4), (40.0, 0.1)]
    # log-log: FVU ~ L0^-1 here, so at L0 20 it is 0.2
    assert interpolate(pts, 20.0) == pytest.approx(0.2)
    assert interpolate(pts, 10.0) == pytest.approx(0.4)
    assert interpolate(pts, 5.0) is None and interpolate(pts, 41.0) is None
    # linear in log L0: halfway in log between 10 and 40 is 20
    assert interpolate([(10.0, 1.0), (40.0, -1.0)], 20.0, log_y=False) == pytest.approx(0.0)
    assert interpolate([(40.0, 0.1), (10.0, 0.4), (20.0, 0.3)], 15.0) == pytest.approx(
        math.exp(math.log(0.4) + math.log(1.5) / math.log(2) * math.log(0.3 / 0.4)))


def test_orderings_against_the_paper():
    def curve(scale: float):
        return [{"l0": l0, "fvu": scale / l0, "delta_ce": scale} for l0 in (8.0, 200.0)]

    good = {"jumprelu": curve(1.0), "topk": curve(1.1), "gated": curve(1.5), "relu": curve(2.0), "batchtopk": curve(1.05),
            "matryoshka": curve(1.3)}
    order = orderings(matched(good))
    assert set(order) == {str(x) for x in MATCHED_L0}
    for o in order.values():
        assert o["by_fvu"] == ["jumprelu", "batchtopk", "topk", "matryoshka", "gated", "relu"]
        assert o["matches_paper"]
    swapped = {**good, "gated": curve(0.9)}
    assert not any(o["matches_paper"] for o in orderings(matched(swapped)).values())
    # an architecture whose points do not reach an L0 is left out there, not guessed
    short = {**good, "relu": [{"l0": 50.0, "fvu": 0.1, "delta_ce": 0.1}, {"l0": 90.0, "fvu": 0.05, "delta_ce": 0.05}]}
    table = matched(short)
    assert table["16"]["relu"]["fvu"] is None and table["64"]["relu"]["fvu"] is not None


@pytest.mark.slow
def test_quick_run_end_to_end(reproduce_store, tmp_path):
    out = tmp_path / "out"
    first, t_first = run_reproduce("jumprelu", out, reproduce_store)
    assert first.returncode == 0, first.stderr[-3000:]
    figures = out / "figures"
    assert (figures / "jumprelu.png").stat().st_size > 10_000
    doc = json.loads((figures / "jumprelu.json").read_text())
    assert doc["quick"] is True and set(doc["curves"]) == set(ARCHS)
    for arch, pts in doc["curves"].items():
        assert len(pts) == len(QUICK["sparsity"][arch])
        for p in pts:
            assert 0 < p["fvu"] < 1.5 and p["l0"] > 0 and math.isfinite(p["delta_ce"])
    for arch in ("topk", "batchtopk", "matryoshka"):  # k sets L0 (BatchTopK's on average), and more latents reconstruct better
        by_k = sorted(doc["curves"][arch], key=lambda p: p["setting"])
        assert by_k[0]["l0"] < by_k[-1]["l0"] and by_k[0]["fvu"] > by_k[-1]["fvu"]
    topk = sorted(doc["curves"]["topk"], key=lambda p: p["setting"])
    assert [p["l0"] for p in topk] == pytest.approx([p["setting"] for p in topk], rel=0.02)
    assert set(doc["fvu_at_l0"]) == {str(x) for x in MATCHED_L0} and set(doc["order"]) == set(doc["fvu_at_l0"])
    assert doc["clean_ce"] > 1.0

    # the shared spliced CE is actstore eval's, on the same windows
    from reproduce_common import MODEL, held_out_windows, spliced_ce

    from pipelines.evaluate import load_saes, measure
    from pipelines.models import load_model
    from pipelines.splice import Splicer

    lm = load_model(MODEL, device="cpu")
    windows = held_out_windows(lm.tokenizer, QUICK["ce_tokens"])
    sae = str(out / "jumprelu" / "sweep" / "topk-16")
    clean, (row,) = spliced_ce(lm, windows, [[sae]])
    with Splicer(lm.model, load_saes([sae], lm.model, MODEL), lm.tokenizer.bos_token_id) as splicer:
        ref = measure(lm.model, splicer, windows, batch_size=4, zero=False)
    assert clean == pytest.approx(ref.ce_clean, rel=1e-5) and row["ce_spliced"] == pytest.approx(ref.ce_spliced, rel=1e-5)
    assert row["delta_ce"] == pytest.approx(doc["curves"]["topk"][0]["delta_ce"], rel=1e-5)
    assert row["l0"] == pytest.approx(16, abs=0.5)

    # a rerun finds the finished sweep and the cached evaluations: nothing trained, same numbers
    summary = out / "jumprelu" / "sweep" / "summary.json"
    stamp = summary.stat().st_mtime_ns
    again, t_again = run_reproduce("jumprelu", out, reproduce_store)
    assert again.returncode == 0, again.stderr[-3000:]
    redo = json.loads((figures / "jumprelu.json").read_text())
    assert redo["curves"] == doc["curves"] and redo["fvu_at_l0"] == doc["fvu_at_l0"]
    assert summary.stat().st_mtime_ns == stamp and t_again < t_first
