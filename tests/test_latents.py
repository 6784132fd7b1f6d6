"""``actstore latents``: the per-latent statistics and examples against brute force over the store,
every kind of dictionary, logit lens, resume after kill -9, and bad input.

The stores here are synthetic (tests.helpers) with the tiny random Llama as their model (its
folder holds SmolLM2's tokenizer), so the tokenizer and the unembedding are real.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

import actstore
from actstore import ModelInfo
from pipelines.dashboard import make_server
from pipelines.latent_stats import Batch, Latents, LatentStats, StatsConfig, sample_keys
from pipelines.latents import LatentsConfig, run_latents
from tests.browser import dump_dom, need_chromium, screenshot
from tests.helpers import folder_bytes, make_config, make_data, run_cli_here, write_shards
from trainers.crosscoder import CrosscoderConfig, CrosscoderSAE, save_crosscoder
from trainers.jumprelu import JumpReLUConfig, JumpReLUSAE
from trainers.saelens_format import HookInfo, save_saelens
from trainers.topk import TopKConfig, TopKSAE
from trainers.transcoder import TopKTranscoder, TopKTranscoderConfig

D = 64  # the tiny Llama's width
H0, H1, M1 = "blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out"
_MASK = (1 << 62) - 1


# ---- brute force ------------------------------------------------------------------------------
def np_keys(index: np.ndarray, latent: int, seed: int = 0) -> np.ndarray:
    """The sampling hash written again in numpy's wrapping uint64 arithmetic."""
    with np.errstate(over="ignore"):
        x = (index.astype(np.uint64) * np.uint64(0x1E3779B97F4A7C15) + np.uint64(latent) * np.uint64(0x42B2AE3D27D4EB4F)
             + np.uint64(seed)) & np.uint64(_MASK)
        x ^= x >> np.uint64(31)
        x = (x * np.uint64(0x3F58476D1CE4E5B9)) & np.uint64(_MASK)
        x ^= x >> np.uint64(29)
        x = (x * np.uint64(0x14D049BB133111EB)) & np.uint64(_MASK)
        return x ^ (x >> np.uint64(32))


def brute_force(acts_NF: np.ndarray, tokens: np.ndarray, positions: np.ndarray, cfg: StatsConfig, f: int,
                min_position: int = 0) -> dict:
    """One latent's record computed directly from every token's activation."""
    col = np.where(positions >= min_position, acts_NF[:, f], 0.0)
    fired = np.nonzero(col > 0)[0]
    top = sorted(fired.tolist(), key=lambda i: (-col[i], i))[:cfg.top]
    keys = np_keys(fired, f, cfg.seed) >> np.uint64(22)  # the sample ranks by the hash's top 40 bits
    sample = [int(i) for i in fired[np.argsort(keys, kind="stable")][:cfg.samples]]
    bins = np.clip(np.floor((np.log10(col[fired]) - cfg.lo_exp) * cfg.bins_per_decade), 0, cfg.bins - 1).astype(int)

    def context(i: int) -> dict:
        start = i - positions[i]
        later_starts = np.nonzero(positions[start + 1:] == 0)[0]
        end = start + 1 + later_starts[0] if len(later_starts) else len(tokens)
        lo, hi = max(i - cfg.before, start), min(i + cfg.after + 1, end)
        return {"ids": tokens[lo:hi].tolist(), "acts": col[lo:hi], "focus": i - lo}

    return {"count": len(fired), "sum": float(col[fired].astype(np.float64).sum()), "max": float(col.max()) if len(fired) else 0.0,
            "hist": np.bincount(bins, minlength=cfg.bins), "top": top, "sample": sorted(sample), "context": context,
            "tokens": int((positions >= min_position).sum())}


def feed(acts_NF: np.ndarray, tokens: np.ndarray, positions: np.ndarray, cfg: StatsConfig, windows: int, window: int
         ) -> LatentStats:
    stats = LatentStats(acts_NF.shape[1], cfg)
    for s in range(0, len(tokens), windows * window):
        e = min(s + windows * window, len(tokens))
        start_B, end_B = Batch.windows(torch.from_numpy(positions[s:e]))
        stats.update(Batch(Latents.dense(torch.from_numpy(acts_NF[s:e].copy())), torch.arange(s, e),
                           torch.from_numpy(tokens[s:e]), start_B, end_B, e - s))
    return stats


def check_record(rec: dict, want: dict, atol: float = 0.0) -> None:
    assert rec["count"] == want["count"]
    assert rec["frequency"] == want["count"] / want["tokens"]
    assert rec["max"] == pytest.approx(want["max"], abs=atol or 1e-6, rel=1e-3 if atol else 1e-6)
    assert rec["histogram"] == want["hist"].tolist()
    assert [e["token_index"] for e in rec["top"]] == want["top"]
    for e in rec["top"]:
        ctx = want["context"](e["token_index"])
        assert e["ids"] == ctx["ids"] and e["focus"] == ctx["focus"]
        np.testing.assert_allclose(e["acts"], ctx["acts"], rtol=1e-3 if atol else 1e-6, atol=atol or 1e-6)


# ---- the accumulator ----------------------------------------------------------------------------
def test_streaming_stats_equal_brute_force_whatever_the_batches():
    rng = np.random.default_rng(0)
    window, n, F = 16, 16 * 45 + 7, 40  # a last window cut short
    acts = np.maximum(rng.standard_normal((n, F)).astype(np.float32) * 2 - 2.5, 0)
    acts[:, 3] = 0  # dead
    acts[:, 4] = (rng.random(n) < 0.4).astype(np.float32)  # ties everywhere: the earlier token wins
    acts[:, 5] = rng.random(n).astype(np.float32) * 1e5  # beyond the histogram's last edge
    tokens = rng.integers(0, 1000, n)
    positions = np.arange(n) % window
    cfg = StatsConfig(top=5, samples=6, before=3, after=2)
    a, b = feed(acts, tokens, positions, cfg, 3, window), feed(acts, tokens, positions, cfg, 7, window)
    records = a.records(0, F)
    assert records == b.records(0, F)  # batch boundaries change nothing: what makes resume exact
    for f in range(F):
        want = brute_force(acts, tokens, positions, cfg, f)
        check_record(records[f], want)
        assert sorted(e["token_index"] for e in records[f]["sample"]) == want["sample"]
        assert records[f]["mean"] == pytest.approx(want["sum"] / want["count"] if want["count"] else 0.0, rel=1e-9)
    assert records[3]["top"] == [] and records[3]["count"] == 0
    assert [e["token_index"] for e in records[4]["top"]] == list(np.nonzero(acts[:, 4])[0][:5])


def test_topk_latents_without_the_dense_matrix_give_the_same_records():
    """The fast path of TopK SAEs (each token's k values and latents) against the dense matrix."""
    torch.manual_seed(0)
    sae = TopKSAE(TopKConfig(d_in=D, d_sae=80, k=5))
    torch.nn.init.normal_(sae.b_enc, -0.5, 0.5)  # some of the k largest are negative: ReLU'd to zero
    window, n = 16, 16 * 30
    x_ND = torch.randn(n, D)
    positions_N = torch.arange(n) % window
    tokens_N = torch.randint(0, 1000, (n,))
    cfg = StatsConfig(top=4, samples=5, before=3, after=2)
    dense, sparse = LatentStats(80, cfg), LatentStats(80, cfg)
    with torch.no_grad():
        for s in range(0, n, 4 * window):
            sl = slice(s, s + 4 * window)
            counted_B = positions_N[sl] >= 1
            start_B, end_B = Batch.windows(positions_N[sl])
            args = (torch.arange(s, s + 4 * window), tokens_N[sl], start_B, end_B, int(counted_B.sum()))
            dense.update(Batch(Latents.dense(sae.encode(x_ND[sl]), counted_B), *args))
            sparse.update(Batch(Latents.sparse(*sae.encode_sparse(x_ND[sl]), 80, counted_B), *args))
    assert sparse.records(0, 80) == dense.records(0, 80)
    assert sum(len(r["top"]) for r in dense.records(0, 80)) > 100


def test_sample_hash_is_uniform_enough_and_device_free():
    keys = sample_keys(torch.arange(200_000), torch.full((200_000,), 7))
    assert torch.equal(keys, torch.from_numpy(np_keys(np.arange(200_000), 7).astype(np.int64)))
    # the smallest tenth of the keys falls evenly over the tokens (a uniform sample)
    chosen = torch.argsort(keys)[:20_000]
    counts = torch.bincount(chosen // 20_000, minlength=10)
    assert counts.min() > 1700 and counts.max() < 2300


# ---- the pass over a store ---------------------------------------------------------------------
@pytest.fixture
def store(tmp_path, tiny_llama) -> str:
    """1,000 tokens, windows of 16, three hooks of width 64, the tiny Llama as the model."""
    cfg = make_config(model=ModelInfo(name=str(tiny_llama), d_model=D, n_layers=4), dtype="float32")
    data = make_data(cfg)
    data["tokens"] = data["tokens"] % 49152
    url = str(tmp_path / "store")
    with actstore.open_store(url, "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards))
    return url


def topk_sae(path: Path, hook: str = H1, d_sae: int = 96, seed: int = 0) -> str:
    sae = TopKSAE(TopKConfig(d_in=D, d_sae=d_sae, k=6, seed=seed))
    save_saelens(sae, path, HookInfo(hook, "tiny", 16))
    return str(path)


def store_arrays(url: str, hooks: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray, dict[str, torch.Tensor]]:
    st = actstore.open_store(url)
    return (st.tokens(0, st.n_tokens).astype(np.int64), st.positions(0, st.n_tokens).astype(np.int64),
            {h: torch.from_numpy(st.read(h, 0, st.n_tokens).astype(np.float32)) for h in hooks})


def read_records(folder: Path) -> list[dict]:
    return [json.loads(line) for p in sorted(folder.glob("latents-*.jsonl")) for line in p.read_text().splitlines()]


def test_pass_equals_brute_force_over_the_store(tmp_path, store):
    sae_dir = topk_sae(tmp_path / "sae")
    cfg = StatsConfig(top=4, samples=8, before=4, after=2)
    result = run_latents(LatentsConfig(store=store, saes=(sae_dir,), out=str(tmp_path / "out"), stats=cfg,
                                       batch_tokens=100, shard_size=40, progress=False))
    tokens, positions, acts = store_arrays(store, (H1,))
    from pipelines.saes import load_sae

    with torch.no_grad():
        latents_NF = load_sae(sae_dir).sae.encode(acts[H1]).numpy()
    records = read_records(result.out / "sae")
    assert [r["latent"] for r in records] == list(range(96))
    assert sorted((result.out / "sae").glob("latents-*.jsonl"))[-1].name == "latents-00002.jsonl"
    for f, rec in enumerate(records):
        want = brute_force(latents_NF, tokens, positions, cfg, f, min_position=1)  # make_config prepends BOS
        check_record(rec, want, atol=1e-3)
        assert [len(b["examples"]) for b in rec["quantiles"]] == [len(q) for q in np.array_split(range(min(8, want["count"])), 4)[:3]]
        for e in rec["top"]:
            assert len(e["tokens"]) == len(e["ids"]) and all(isinstance(t, str) for t in e["tokens"])
    index_js = (result.out / "sae" / "data" / "index.js").read_text()
    index = json.loads(index_js.removeprefix("actstoreIndex(").rstrip().removesuffix(");"))
    assert index["tokens"] == want["tokens"] and index["d_sae"] == 96 and not index["has_logits"]
    assert index["frequency"] == [r["frequency"] for r in records]
    assert (result.out / "index.html").is_file() and (result.out / "sae" / "assets" / "dashboard.js").is_file()
    assert json.loads((result.out / "latents.json").read_text())["views"][0]["d_sae"] == 96


def test_every_kind_of_dictionary_in_one_pass(tmp_path, store, tiny_llama):
    """A Group-SAE folder gives a dashboard per member layer; a transcoder's latents are of its
    input hook; a crosscoder reads its layers together; one read of each batch serves all."""
    group = tmp_path / "group"
    for hook in (H0, H1):
        topk_sae(group / hook, hook, seed=1)
    tc = TopKTranscoder(TopKTranscoderConfig(d_in=D, d_sae=48, k=4, d_out=D))
    save_saelens(tc, tmp_path / "tc", HookInfo(H0, "tiny", 16, hook_name_out=M1))
    cc = CrosscoderSAE(CrosscoderConfig(d_in=2 * D, d_sae=80, k=8, n_layers=2))
    save_crosscoder(cc, tmp_path / "cc", [H0, H1], [1.0, 1.0], "tiny", 16, True)
    jr = JumpReLUSAE(JumpReLUConfig(d_in=D, d_sae=64))  # dense latents: the path of every non-TopK SAE
    with torch.no_grad():
        jr.set_threshold(torch.full((64,), 2.0))
    save_saelens(jr, tmp_path / "jr", HookInfo(M1, "tiny", 16))
    cfg = StatsConfig(top=3, samples=4, before=2, after=2)
    result = run_latents(LatentsConfig(store=store, saes=(str(group), str(tmp_path / "tc"), str(tmp_path / "cc"), str(tmp_path / "jr")),
                                       out=str(tmp_path / "out"), stats=cfg, batch_tokens=160, model=str(tiny_llama),
                                       logit_tokens=3, progress=False))
    names = [v["name"] for v in result.views]
    assert names == [f"group/{H0}", f"group/{H1}", "tc", "cc", "jr"]
    tokens, positions, acts = store_arrays(store, (H0, H1, M1))
    from pipelines.saes import load_sae

    inputs = {f"group/{H0}": (str(group / H0), acts[H0]), f"group/{H1}": (str(group / H1), acts[H1]),
              "tc": (str(tmp_path / "tc"), acts[H0]), "cc": (str(tmp_path / "cc"), torch.cat([acts[H0], acts[H1]], -1)), "jr": (str(tmp_path / "jr"), acts[M1])}
    for name, (spec, x) in inputs.items():
        with torch.no_grad():
            latents_NF = load_sae(spec).sae.encode(x).numpy()
        records = read_records(result.out / name)
        assert sum(r["count"] for r in records) > 0
        assert all(len(r["logits"]["top"]) == len(r["logits"]["bottom"]) == 3 for r in records)
        for f in range(0, len(records), 7):
            check_record(records[f], brute_force(latents_NF, tokens, positions, cfg, f, min_position=1), atol=1e-3)
    assert [v["hook"] for v in result.views] == [H0, H1, H0, f"{H0}, {H1}", M1]
    # a crosscoder's logit lens goes through its deepest layer's decoder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    W_U_VD = AutoModelForCausalLM.from_pretrained(tiny_llama).lm_head.weight.detach()
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    deepest_FD = load_sae(str(tmp_path / "cc")).sae.W_dec.detach().view(80, 2, D)[:, 1]
    want = (deepest_FD @ W_U_VD.T).topk(3).indices
    assert [[t for t, _ in r["logits"]["top"]] for r in read_records(result.out / "cc")[:5]] == \
        [[tok.decode([i]) for i in row] for row in want[:5].tolist()]


def test_logit_lens_is_the_decoder_through_the_unembedding(tmp_path, store, tiny_llama):
    sae_dir = topk_sae(tmp_path / "sae", d_sae=32)
    result = run_latents(LatentsConfig(store=store, saes=(sae_dir,), out=str(tmp_path / "out"), model=str(tiny_llama),
                                       logit_tokens=5, stats=StatsConfig(top=2, samples=2), progress=False))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipelines.saes import load_sae

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    logits_FV = load_sae(sae_dir).sae.W_dec.detach() @ model.lm_head.weight.detach().T
    records = read_records(result.out / "sae")
    for f in (0, 13, 31):
        want_top = logits_FV[f].topk(5)
        assert [t for t, _ in records[f]["logits"]["top"]] == [tok.decode([i]) for i in want_top.indices.tolist()]
        np.testing.assert_allclose([v for _, v in records[f]["logits"]["top"]], want_top.values.numpy(), rtol=1e-3)
        assert [t for t, _ in records[f]["logits"]["bottom"]] == [tok.decode([i]) for i in logits_FV[f].topk(5, largest=False).indices.tolist()]


# ---- resume -------------------------------------------------------------------------------------
def test_kill_9_then_resume_gives_the_same_files(tmp_path, tiny_llama):
    cfg = make_config(model=ModelInfo(name=str(tiny_llama), d_model=D, n_layers=4), dtype="float32",
                      n_tokens_target=60_000, shard_tokens=4096, chunk_tokens=512)
    data = make_data(cfg)
    data["tokens"] = data["tokens"] % 49152
    url = str(tmp_path / "store")
    with actstore.open_store(url, "w", config=cfg) as w:
        write_shards(w, cfg, data, range(cfg.n_shards))
    sae_dir = topk_sae(tmp_path / "sae", d_sae=256)
    args = ["latents", "--store", url, "--sae", sae_dir, "--batch-tokens", "64", "--checkpoint-every", "0",
            "--no-progress", "--top", "5", "--samples", "6"]
    straight = run_cli_here(*args, "--out", tmp_path / "straight")
    assert straight.exit_code == 0, straight.output

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--out", str(out)], cwd=Path(__file__).parents[1],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    state = out / "checkpoint" / "state.json"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if state.is_file() and json.loads(state.read_text())["state"]["next"] > 10_000:
            break
        time.sleep(0.05)
    assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "latents.json").exists()
    resumed = run_cli_here(*args, "--out", out)
    assert resumed.exit_code == 0, resumed.output
    assert "resumed at token" in resumed.output

    def results(root: Path) -> dict[str, str]:
        return {k: v for k, v in folder_bytes(root).items() if not k.startswith("checkpoint")}

    assert results(out) == results(tmp_path / "straight")
    again = run_cli_here(*args, "--out", out)  # finished: nothing recomputed, nothing changed
    assert again.exit_code == 0 and "finished" in again.output
    assert results(out) == results(tmp_path / "straight")


# ---- bad input ----------------------------------------------------------------------------------
def test_bad_input_is_one_line_and_exit_2(tmp_path, store):
    sae_dir = topk_sae(tmp_path / "sae")
    out = tmp_path / "out"
    ok = run_cli_here("latents", "--store", store, "--sae", sae_dir, "--out", out, "--no-progress", "--top", "3")
    assert ok.exit_code == 0, ok.output
    before = folder_bytes(out)
    wide = TopKSAE(TopKConfig(d_in=32, d_sae=64, k=4))
    save_saelens(wide, tmp_path / "narrow", HookInfo(H1, "tiny", 16))
    cases = {
        "another run's settings": (("--sae", sae_dir, "--out", out, "--top", "5"), "holds another run"),
        "hook not in the store": (("--sae", topk_sae(tmp_path / "b", "blocks.3.hook_resid_post"), "--out", tmp_path / "o2"),
                                  "does not hold"),
        "width": (("--sae", tmp_path / "narrow", "--out", tmp_path / "o3"), "is this SAE for another model"),
        "top 0": (("--sae", sae_dir, "--out", tmp_path / "o4", "--top", "0"), "--top"),
        "no SAE there": (("--sae", tmp_path / "nothing", "--out", tmp_path / "o5"), "does not exist"),
        "tokenizer": (("--sae", sae_dir, "--out", tmp_path / "o6", "--model", tmp_path / "no-model"), "--model"),
    }
    for what, (extra, message) in cases.items():
        r = run_cli_here("latents", "--store", store, "--no-progress", *extra)
        assert r.exit_code == 2, (what, r.output)
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], (what, r.output)
    assert folder_bytes(out) == before
    serve = run_cli_here("latents", "--out", tmp_path / "empty", "--serve")
    assert serve.exit_code == 2 and "no finished latents run" in serve.output


# ---- the dashboard in a real browser --------------------------------------------------------------
class _Elements(HTMLParser):
    """Every element of a DOM dump with its attributes and the text directly in it."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[dict] = []
        self._open: list[dict] = []

    def handle_starttag(self, tag: str, attrs: list) -> None:
        el = {"tag": tag, **{k: v or "" for k, v in attrs}, "text": "", "parents": [e.get("id") or e.get("class", "") for e in self._open]}
        self.elements.append(el)
        if tag not in ("br", "img", "input", "meta", "link", "hr", "rect", "line", "path"):
            self._open.append(el)

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()["tag"] == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._open:
            self._open[-1]["text"] += data


def elements(dom: str) -> list[dict]:
    parser = _Elements()
    parser.feed(dom)
    return parser.elements


@need_chromium()
def test_dashboard_in_headless_chromium(tmp_path, store):
    sae_dir = topk_sae(tmp_path / "sae")
    result = run_latents(LatentsConfig(store=store, saes=(sae_dir,), out=str(tmp_path / "out"), progress=False,
                                       stats=StatsConfig(top=5, samples=8, before=4, after=3)))
    folder = result.out / "sae"
    records = read_records(folder)
    url = (folder / "index.html").as_uri()

    # the index lists every latent, each linking to its page
    index = elements(dump_dom(url))
    rows = [e for e in index if e["tag"] == "tr" and "data-latent" in e]
    assert sorted(int(r["data-latent"]) for r in rows) == list(range(96))
    assert sum(1 for e in index if e["tag"] == "a" and e.get("href", "").startswith("latent.html?i=")) >= 96
    by_max = elements(dump_dom(url + "?sort=max"))
    first = next(int(e["data-latent"]) for e in by_max if e["tag"] == "tr" and "data-latent" in e)
    assert first == max(range(96), key=lambda f: (records[f]["max"], -f))

    # a latent's page: its top context, each token shaded by its activation
    busiest = max(range(96), key=lambda f: (records[f]["count"], -f))
    page = elements(dump_dom((folder / "latent.html").as_uri() + f"?i={busiest}"))
    assert any(e.get("id") == "latent-number" and str(busiest) in e["text"] for e in page)
    examples = [e for e in page if e.get("class") == "example" and "top" in e["parents"]]
    want = records[busiest]["top"]
    assert [int(e["data-token-index"]) for e in examples] == [x["token_index"] for x in want]
    top_tokens = [e for e in page if e["tag"] == "span" and e.get("class", "").startswith("tok")
                  and "top" in e["parents"]][:len(want[0]["tokens"])]
    acts = [float(t["data-act"]) for t in top_tokens]
    assert acts == pytest.approx(want[0]["acts"], rel=1e-3)
    assert [t["text"].replace("↵", "\n") for t in top_tokens] == want[0]["tokens"]

    def shade(t: dict) -> float:
        return float(t["style"].rsplit(",", 1)[1].rstrip(")").strip()) if "style" in t else 0.0

    order_by_act = sorted(range(len(acts)), key=lambda j: acts[j])
    shades = [shade(top_tokens[j]) for j in order_by_act]
    assert shades == sorted(shades) and shades[-1] == pytest.approx(acts[order_by_act[-1]] / records[busiest]["max"], abs=2e-3)
    assert "focus" in top_tokens[want[0]["focus"]]["class"]

    # search by number: the box filters the index and its submit opens the latent's page
    filtered = elements(dump_dom(url + "?q=7"))
    shown = [int(e["data-latent"]) for e in filtered if e["tag"] == "tr" and "data-latent" in e]
    assert sorted(shown) == [f for f in range(96) if str(f).startswith("7")]
    searched = elements(dump_dom(url + "?search=42"))  # typed in the box and submitted: latent 42's page
    assert any(e.get("id") == "latent-number" and e["text"].strip() == "Latent 42" for e in searched)
    missing = elements(dump_dom((folder / "latent.html").as_uri() + "?i=9999"))
    assert any(e.get("id") == "error" and "out of range" in e["text"] for e in missing)

    png = screenshot(url, tmp_path / "index.png")
    assert png.stat().st_size > 10_000

    # served over HTTP (what --serve runs) the same page renders the same latents
    server = make_server(result.out, port=0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        served = elements(dump_dom(f"http://127.0.0.1:{server.server_address[1]}/sae/latent.html?i=5"))
        assert any(e.get("id") == "latent-number" and e["text"].strip() == "Latent 5" for e in served)
    finally:
        server.shutdown()
        server.server_close()
