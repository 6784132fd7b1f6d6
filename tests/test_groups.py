"""``actstore groups``: layer distances against a plain reference, complete-linkage groups,
the AMAD curve, the CLI's files and its one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import actstore
from pipelines.groups import (
    GroupsConfig,
    LayerGroups,
    LayerSampled,
    amad,
    complete_linkage_partitions,
    find_groups,
)
from tests.helpers import make_config, write_shards

LAYERS = tuple(f"blocks.{i}.hook_resid_post" for i in range(5))


def make_layer_store(path, noise=(0.3, 0.35, 0.3, 0.4, 0.3), hook_dims=None) -> actstore.Store:
    """Five layers: 0 and 1 share one direction per token, 2, 3 and 4 another (with noise of
    their own, and a large mean offset the distance must ignore)."""
    cfg = make_config(hooks=LAYERS, n_tokens_target=768, hook_dims=hook_dims or {}, dtype="float32")
    rng = np.random.default_rng(0)
    n, d = cfg.n_tokens_target, cfg.model.d_model
    a, b = rng.standard_normal((n, d)), rng.standard_normal((n, d))
    data = {"tokens": rng.integers(0, 1000, n), "positions": np.arange(n) % cfg.context_size}
    for i, hook in enumerate(LAYERS):
        base = a if i < 2 else b
        x = base[:, : cfg.width(hook)] + noise[i] * rng.standard_normal((n, cfg.width(hook))) + 5.0
        data[hook] = x.astype(np.float32)
    with actstore.open_store(str(path), "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards))
    return actstore.open_store(str(path))


def reference_distances(store: actstore.Store, min_position: int = 1) -> np.ndarray:
    keep = store.positions() >= min_position
    unit = []
    for hook in LAYERS:
        x = store.read(hook)[keep].astype(np.float64)
        x -= x.mean(0)
        unit.append(x / np.linalg.norm(x, axis=1, keepdims=True))
    d = np.zeros((len(LAYERS), len(LAYERS)))
    for i in range(len(LAYERS)):
        for j in range(len(LAYERS)):
            d[i, j] = np.mean(np.arccos(np.clip((unit[i] * unit[j]).sum(1), -1, 1))) / np.pi
    np.fill_diagonal(d, 0)
    return d


def test_distances_groups_and_amad_match_a_plain_reference(tmp_path):
    store = make_layer_store(tmp_path / "s")
    result = find_groups(GroupsConfig(store=store.url, tokens=10**6))
    want = reference_distances(store)
    assert result.tokens == int((store.positions() >= 1).sum())
    np.testing.assert_allclose(result.distances, want, atol=1e-5)
    # the two families are far apart (independent directions: about 0.5), within each close
    assert want[0, 2] > 0.4 and want[0, 1] < 0.2 and want[2, 4] < 0.2
    assert result.groups == [list(LAYERS[:2]), list(LAYERS[2:])]
    assert result.chosen == 2 and result.rule == "smallest G with AMAD <= 0.2"
    assert result.amad[5] == 0.0
    assert result.amad[1] == pytest.approx(want.max(), abs=1e-5)
    assert result.amad[2] == pytest.approx((want[0, 1] + want[2:, 2:].max()) / 2, abs=1e-5)
    assert list(result.amad) == [1, 2, 3, 4, 5] and all(len(result.partitions[g]) == g for g in result.amad)
    # through JSON and back (reproduce_groups caches it so): the same result, G keys ints again
    assert LayerGroups.from_json(json.loads(json.dumps(result.to_json()))) == result


def test_complete_linkage_merges_by_the_largest_distance():
    # 0-1 close, 2 nearer to 1 than to 0: complete linkage joins 2 with 3 (0.3) before with {0,1} (max 0.5)
    d = np.array([[0, 0.1, 0.5, 0.9], [0.1, 0, 0.2, 0.9], [0.5, 0.2, 0, 0.3], [0.9, 0.9, 0.3, 0]])
    parts = complete_linkage_partitions(d)
    assert parts[4] == [[0], [1], [2], [3]]
    assert parts[3] == [[0, 1], [2], [3]]
    assert parts[2] == [[0, 1], [2, 3]]
    assert parts[1] == [[0, 1, 2, 3]]
    assert amad(d, parts[2]) == pytest.approx((0.1 + 0.3) / 2)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "cli", *args], capture_output=True, text=True)


def test_cli_writes_json_and_heatmap(tmp_path):
    store = make_layer_store(tmp_path / "s")
    out = run_cli("groups", "--store", store.url, "--out", str(tmp_path / "g"), "--json")
    assert out.returncode == 0, out.stderr
    printed = json.loads(out.stdout)
    saved = json.loads((tmp_path / "g" / "groups.json").read_text())
    assert printed == saved and saved["chosen"] == 2 and saved["groups"] == [list(LAYERS[:2]), list(LAYERS[2:])]
    assert (tmp_path / "g" / "groups_heatmap.png").read_bytes()[:4] == b"\x89PNG"
    table = run_cli("groups", "--store", store.url, "--out", str(tmp_path / "g3"), "--groups", "3", "--hooks", ",".join(LAYERS))
    assert table.returncode == 0, table.stderr
    assert "3 groups (--groups 3)" in table.stdout and "AMAD" in table.stdout


@pytest.mark.parametrize(("args", "message"), [
    (["--hooks", LAYERS[0]], "at least two layers"),
    (["--groups", "6"], "more than the 5 layers"),
    (["--hooks", "blocks.9.hook_resid_post,blocks.0.hook_resid_post"], "no hook 'blocks.9.hook_resid_post'"),
    (["--amad-threshold", "2"], "in [0, 1]"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    store = make_layer_store(tmp_path / "s")
    out = run_cli("groups", "--store", store.url, "--out", str(tmp_path / "g"), *args)
    assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def test_layers_of_different_widths_are_refused(tmp_path):
    store = make_layer_store(tmp_path / "s", hook_dims={LAYERS[4]: 32})
    out = run_cli("groups", "--store", store.url, "--out", str(tmp_path / "g"))
    assert out.returncode == 2 and "different widths" in out.stderr and "blocks.4.hook_resid_post (32)" in out.stderr


def test_layer_sampled_draws_each_layer_uniformly_and_resumes_exactly(tmp_path):
    cfg = make_config(hooks=LAYERS[:3], n_tokens_target=1024, dtype="float32")
    n = cfg.n_tokens_target
    data = {"tokens": np.zeros(n, dtype=np.int64), "positions": np.arange(n) % cfg.context_size}
    for i, hook in enumerate(cfg.hooks):  # layer i's activations are all i + 1: a row shows its layer
        data[hook] = np.full((n, cfg.model.d_model), i + 1.0, dtype=np.float32)
    with actstore.open_store(str(tmp_path / "s"), "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards))

    def sampled():
        return LayerSampled(actstore.stream(str(tmp_path / "s"), list(cfg.hooks), 128, epochs=None), seed=3)

    first = sampled()
    it = iter(first)
    batches = [next(it) for _ in range(12)]
    layer = torch.cat([b[:, 0] for b in batches]).long() - 1
    assert all(torch.equal(b, b[:, :1].expand_as(b)) for b in batches)  # whole rows of one layer
    counts = torch.bincount(layer, minlength=3).float() / len(layer)
    assert torch.all((counts - 1 / 3).abs() < 0.05), counts
    state = first.state_dict()  # after 12 batches: a fresh sampler continues with the same draws
    want = [next(it) for _ in range(3)]
    it.close()
    resumed = sampled()
    resumed.load_state_dict(state)
    got = [b for _, b in zip(range(3), resumed, strict=False)]
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))


def test_train_sae_on_groups_saves_each_layer_and_evaluates_it(tmp_path):
    from trainers.saelens_format import load_saelens

    store = make_layer_store(tmp_path / "s")
    groups = [list(LAYERS[:2]), list(LAYERS[2:])]
    (tmp_path / "groups.json").write_text(json.dumps({"groups": groups}))
    out = tmp_path / "o"
    args = ["train-sae", "--store", store.url, "--groups", str(tmp_path / "groups.json"), "--out", str(out), "--tokens", "2k",
            "--arch", "topk", "--k", "4", "--expansion", "2", "--batch-size", "128", "--eval-tokens", "256", "--no-progress"]
    res = run_cli(*args, "--json")
    assert res.returncode == 0, res.stderr
    rows = json.loads(res.stdout)["experiments"]
    assert [r["name"].split("/")[0] for r in rows] == ["group0", "group1"]
    for i, group in enumerate(groups):
        row = rows[i]
        assert sorted(row["eval_layers"]) == sorted(group)
        assert row["eval_fvu"] == pytest.approx(np.mean([m["fvu"] for m in row["eval_layers"].values()]))
        summary = json.loads((out / f"group{i}" / "summary.json").read_text())
        name = summary["experiments"][0]["name"]
        saes = {h: load_saelens(out / f"group{i}" / name / h)[0] for h in group}
        scales = summary["scales"]
        # one SAE, each layer's scale folded in: W_dec * s is the same for every member layer
        ref = group[0]
        for h in group[1:]:
            torch.testing.assert_close(saes[h].W_dec * scales[h], saes[ref].W_dec * scales[ref])
    bad = run_cli("train-sae", "--store", store.url, "--hook", LAYERS[0], "--groups", str(tmp_path / "groups.json"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "not both" in bad.stderr
    (tmp_path / "bad.json").write_text(json.dumps([[LAYERS[0], "blocks.9.hook_resid_post"]]))
    bad = run_cli("train-sae", "--store", store.url, "--groups", str(tmp_path / "bad.json"), "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "blocks.9.hook_resid_post" in bad.stderr


def test_per_layer_comparison_pairs_every_layer(tmp_path):
    store = make_layer_store(tmp_path / "s")
    groups = [list(LAYERS[:2]), list(LAYERS[2:4]), [LAYERS[4]]]
    (tmp_path / "groups.json").write_text(json.dumps(groups))
    out = tmp_path / "o"
    res = run_cli("train-sae", "--store", store.url, "--groups", str(tmp_path / "groups.json"), "--per-layer", "--out", str(out),
                  "--tokens", "1k", "--arch", "topk", "--k", "4", "--expansion", "2", "--batch-size", "128", "--eval-tokens", "256",
                  "--no-progress", "--json")
    assert res.returncode == 0, res.stderr
    s = json.loads(res.stdout)
    assert (s["layers"], s["groups"]) == (5, 3) and s["time_saved"] > 0
    rows = {r["layer"]: r for r in s["rows"]}
    assert list(rows) == list(LAYERS) and [rows[h]["group"] for h in LAYERS] == [0, 0, 1, 1, 2]
    for h in LAYERS:
        own = json.loads((out / "per_layer" / h / "summary.json").read_text())["experiments"][0]
        assert rows[h]["fvu_own"] == pytest.approx(own["eval_fvu"])
        assert rows[h]["change"] == pytest.approx(rows[h]["fvu_group"] / rows[h]["fvu_own"] - 1)
    # a one-layer group is trained like its per-layer SAE (same settings, seed and tokens)
    assert rows[LAYERS[4]]["fvu_group"] == pytest.approx(rows[LAYERS[4]]["fvu_own"], rel=1e-5)
    bad = run_cli("train-sae", "--store", store.url, "--hook", LAYERS[0], "--per-layer", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "--groups" in bad.stderr
