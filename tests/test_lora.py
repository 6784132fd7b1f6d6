"""Splicing SAEs into live models, ``actstore eval`` and ``actstore lora`` on tiny random models.

The spliced figures are checked against a plain reference (a hand-written forward hook and
torch's own cross-entropy and KL), perfect SAEs must change nothing at every hook site (Llama
and Gemma-2 wiring), LoRA must train only the blocks after the SAE, lower the KL, save an
adapter that ``eval --adapter`` reproduces, and resume exactly from a checkpoint; ``eval_at``'s
evaluations during training must equal a shorter run's final ones and survive a resume.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipelines.evaluate import EvalConfig, evaluate
from pipelines.lora import LoRAConfig, LoRATrainer, train_lora
from pipelines.models import load_model
from pipelines.saes import load_sae
from pipelines.text import TextConfig, take_windows
from tests.helpers import folder_bytes, perfect_sae, run_cli_here
from trainers import make_sae, sae_config
from trainers.saelens_format import HookInfo, save_saelens

D = 64  # tiny models' width (tests/conftest.py TINY)
TEXT = TextConfig(split="test", context_size=32)


def save_sae(path, hook, sae=None, d_in=D, seed=0):
    sae = sae or make_sae(sae_config("topk", d_in=d_in, d_sae=4 * d_in, k=8, seed=seed))
    save_saelens(sae, path, HookInfo(hook, "tiny", 32))
    return str(path)


run_cli = run_cli_here


def one_line_error(run, *fragments):
    assert run.exit_code == 2, (run.exit_code, run.stderr[-2000:], run.exception)
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr, run.stderr
    for f in fragments:
        assert f in run.stderr, run.stderr


# ---- splicing and eval ---------------------------------------------------------------------
@pytest.mark.parametrize("site", ["resid_post", "resid_pre", "attn_out", "mlp_in", "mlp_out"])
@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_perfect_sae_changes_nothing(tmp_path, tiny_llama, tiny_gemma2, arch, site):
    model = tiny_llama if arch == "llama" else tiny_gemma2
    sae_dir = save_sae(tmp_path / "sae", f"blocks.2.hook_{site}", perfect_sae())
    r = evaluate(EvalConfig(model=str(model), saes=(sae_dir,), text=TEXT, tokens=256, model_dtype="float32", progress=False))
    assert r.tokens == 8 * 31
    assert r.ce_spliced == pytest.approx(r.ce_clean, abs=1e-5) and abs(r.kl) < 1e-5
    assert r.splices[0].fvu < 1e-10 and r.splices[0].tokens == 8 * 31  # BOS left out
    assert r.ce_zero != pytest.approx(r.ce_clean, abs=1e-4)  # zeroing the hook does change the loss
    assert r.loss_recovered == pytest.approx(1.0, abs=1e-3)


def linear_transcoder(seed: int = 0):
    """A skip-transcoder whose latents never fire: it predicts ``mlp_in @ L^T + c`` (L, c random)."""
    tc = make_sae(sae_config("jumprelu-transcoder", d_in=D, d_sae=2 * D, d_out=D, skip=True, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tc.b_enc.fill_(-1e4)
        tc.W_skip.copy_(0.2 * torch.randn(D, D, generator=gen))
        tc.b_dec.copy_(0.1 * torch.randn(D, generator=gen))
    return tc


@pytest.mark.parametrize("arch", ["llama", "gemma2"])
def test_a_transcoder_replaces_the_mlp_output_from_the_live_mlp_input(tmp_path, tiny_llama, tiny_gemma2, arch):
    model_dir = tiny_llama if arch == "llama" else tiny_gemma2
    tc = linear_transcoder()
    save_saelens(tc, tmp_path / "tc", HookInfo("blocks.2.hook_mlp_in", "tiny", 32, hook_name_out="blocks.2.hook_mlp_out"))
    r = evaluate(EvalConfig(model=str(model_dir), saes=(str(tmp_path / "tc"),), text=TEXT, tokens=256, model_dtype="float32",
                            progress=False))
    assert r.splices[0].hook == "blocks.2.hook_mlp_in -> blocks.2.hook_mlp_out" and r.splices[0].l0 == 0
    # the reference: plain hooks, the MLP's input kept by a pre-hook, the output site overwritten at every position but 0
    lm = load_model(str(model_dir), model_dtype="float32", device="cpu")
    block = lm.model.model.layers[2]
    out_module = block.post_feedforward_layernorm if arch == "gemma2" else block.mlp
    seen = {}
    handles = [block.mlp.register_forward_pre_hook(lambda m, args: seen.__setitem__("x", args[0])),
               out_module.register_forward_hook(lambda m, args, out: torch.cat(
                   [out[:, :1], seen["x"][:, 1:] @ tc.W_skip.T.detach() + tc.b_dec.detach()], 1))]
    ids_BT = torch.from_numpy(np.stack(take_windows(TEXT, lm.tokenizer, 256)))
    with torch.no_grad():
        logits = lm.model(ids_BT).logits
    for h in handles:
        h.remove()
    ce = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids_BT[:, 1:].reshape(-1))
    assert r.ce_spliced == pytest.approx(float(ce), abs=1e-5)
    assert abs(r.ce_spliced - r.ce_clean) > 1e-3  # it did replace something


def test_transcoders_that_do_not_fit_the_model_are_one_line_errors(tmp_path, tiny_llama):
    wide = make_sae(sae_config("topk-transcoder", d_in=D, d_sae=128, d_out=2 * D, k=4))
    save_saelens(wide, tmp_path / "wide", HookInfo("blocks.1.hook_mlp_in", "tiny", 32, hook_name_out="blocks.1.hook_mlp_out"))
    save_saelens(linear_transcoder(), tmp_path / "tc", HookInfo("blocks.1.hook_mlp_in", "tiny", 32, hook_name_out="blocks.1.hook_mlp_out"))
    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_mlp_out")
    base = ["eval", "--model", str(tiny_llama), "--tokens", "64", "--model-dtype", "float32", "--no-progress"]
    one_line_error(run_cli(*base, "--sae", str(tmp_path / "wide")), "has d_out 128, but blocks.1.hook_mlp_out", "is 64 wide")
    one_line_error(run_cli(*base, "--sae", sae_dir, "--sae", str(tmp_path / "tc")), "both replace blocks.1.hook_mlp_out")


def test_spliced_figures_match_a_plain_reference(tmp_path, tiny_llama):
    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    r = evaluate(EvalConfig(model=str(tiny_llama), saes=(sae_dir,), text=TEXT, tokens=128, batch_size=3,
                            model_dtype="float32", progress=False))
    lm = load_model(str(tiny_llama), model_dtype="float32", device="cpu")
    sae = load_sae(sae_dir).sae
    ids_BT = torch.from_numpy(np.stack(take_windows(TEXT, lm.tokenizer, 128)))
    state = {"mode": "clean"}

    def hook(module, args, output):  # the reference splice: every position but 0
        if state["mode"] == "clean":
            return None
        new = output.clone()
        x_ND = output[:, 1:].reshape(-1, D)
        new[:, 1:] = (sae(x_ND) if state["mode"] == "sae" else torch.zeros_like(x_ND)).reshape(output[:, 1:].shape)
        return new

    handle = lm.model.model.layers[1].register_forward_hook(hook)
    logits = {}
    with torch.no_grad():
        for mode in ("clean", "sae", "zero"):
            state["mode"] = mode
            logits[mode] = lm.model(ids_BT).logits[:, :-1].reshape(-1, lm.model.config.vocab_size)
    handle.remove()
    labels = ids_BT[:, 1:].reshape(-1)
    ce = {m: float(F.cross_entropy(v, labels)) for m, v in logits.items()}
    kl = float(F.kl_div(F.log_softmax(logits["sae"], -1), F.log_softmax(logits["clean"], -1), log_target=True, reduction="batchmean"))
    assert r.ce_clean == pytest.approx(ce["clean"], rel=1e-5)
    assert r.ce_spliced == pytest.approx(ce["sae"], rel=1e-5)
    assert r.ce_zero == pytest.approx(ce["zero"], rel=1e-5)
    assert r.kl == pytest.approx(kl, rel=1e-4) and r.kl > 0
    assert r.loss_recovered == pytest.approx((ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]), rel=1e-4)
    assert r.splices[0].l0 == pytest.approx(8.0)


def test_two_saes_splice_together(tmp_path, tiny_llama):
    a = save_sae(tmp_path / "a", "blocks.0.hook_resid_post", seed=1)
    b = save_sae(tmp_path / "b", "blocks.2.hook_mlp_out", seed=2)
    both = evaluate(EvalConfig(model=str(tiny_llama), saes=(a, b), text=TEXT, tokens=128, progress=False))
    only_a = evaluate(EvalConfig(model=str(tiny_llama), saes=(a,), text=TEXT, tokens=128, progress=False))
    assert [s.hook for s in both.splices] == ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    assert both.splices[0].fvu == pytest.approx(only_a.splices[0].fvu)  # the first splice sees the clean input
    assert both.kl != pytest.approx(only_a.kl)


def test_eval_cli_json_and_bad_input(tmp_path, tiny_llama, tiny_gemma2):
    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    run = run_cli("eval", "--model", str(tiny_llama), "--sae", sae_dir, "--tokens", "64", "--context-size", "32", "--json")
    assert run.exit_code == 0, (run.stderr[-2000:], run.exception)
    out = json.loads(run.stdout)
    assert out["tokens"] == 62 and out["splices"][0]["hook"] == "blocks.1.hook_resid_post"
    assert out["delta_loss"] == pytest.approx(out["ce_spliced"] - out["ce_clean"])
    narrow = save_sae(tmp_path / "narrow", "blocks.1.hook_resid_post", d_in=32)
    one_line_error(run_cli("eval", "--model", str(tiny_llama), "--sae", narrow), "has d_in 32", "64 wide")
    deep = save_sae(tmp_path / "deep", "blocks.9.hook_resid_post")
    one_line_error(run_cli("eval", "--model", str(tiny_llama), "--sae", deep), "blocks.9.hook_resid_post", "has 4 layers")
    z = save_sae(tmp_path / "z", "blocks.1.attn.hook_z")
    one_line_error(run_cli("eval", "--model", str(tiny_llama), "--sae", z), "cannot splice")
    one_line_error(run_cli("eval", "--model", str(tiny_llama), "--sae", str(tmp_path / "nothing")), "does not exist")
    one_line_error(run_cli("eval", "--model", str(tiny_llama), "--sae", sae_dir, "--sae", sae_dir), "both replace")
    one_line_error(run_cli("eval", "--model", str(tiny_llama), "--sae", "saelens:no-such-release/x"), "cannot fetch")


def test_sae_sources(tmp_path):
    from trainers.gemma_scope import KEYS

    folder = tmp_path / "gemma-scope" / "layer_3" / "width_16k" / "average_l0_10"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    shapes = {"W_enc": (D, 128), "W_dec": (128, D), "b_enc": (128,), "b_dec": (D,), "threshold": (128,)}
    np.savez(folder / "params.npz", **{k: rng.standard_normal(shapes[k]).astype(np.float32) for k in KEYS})
    for spec in (folder, folder / "params.npz"):
        loaded = load_sae(str(spec))
        assert loaded.hook == "blocks.3.hook_resid_post" and loaded.sae.cfg.d_sae == 128
    (tmp_path / "flat").mkdir()
    np.savez(tmp_path / "flat" / "params.npz", **{k: rng.standard_normal(shapes[k]).astype(np.float32) for k in KEYS})
    with pytest.raises(ValueError, match="import-sae"):
        load_sae(str(tmp_path / "flat"))


@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_saelens_saved_saes_splice_with_their_own_latents(tmp_path, arch, apply_b_dec):
    sae_lens = pytest.importorskip("sae_lens")
    classes = {"standard": (sae_lens.StandardSAE, sae_lens.StandardSAEConfig, {}),
               "topk": (sae_lens.TopKSAE, sae_lens.TopKSAEConfig, {"k": 12}),
               "jumprelu": (sae_lens.JumpReLUSAE, sae_lens.JumpReLUSAEConfig, {}),
               "gated": (sae_lens.GatedSAE, sae_lens.GatedSAEConfig, {})}
    cls, cfg_cls, extra = classes[arch]
    torch.manual_seed(0)
    theirs = cls(cfg_cls(d_in=D, d_sae=96, apply_b_dec_to_input=apply_b_dec, **extra))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            p.copy_(0.3 * torch.randn_like(p).abs() if name == "threshold" else 0.3 * torch.randn_like(p))
    theirs.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    theirs.save_model(str(tmp_path / arch))
    mine = load_sae(str(tmp_path / arch))
    assert mine.hook == "blocks.1.hook_resid_post"
    x = torch.randn(16, D) * 2
    with torch.no_grad():
        torch.testing.assert_close(mine.sae.encode(x), theirs.encode(x), atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.sae(x), theirs(x), atol=1e-5, rtol=1e-4)


def test_builtin_corpus_splits_are_disjoint():
    from pipelines import corpus

    train, test = set(corpus.python_docs("train")), set(corpus.python_docs("test"))
    assert not train & test and len(test) > 100 and len(train) > 8 * len(test)
    assert train | test == set(corpus.python_docs("all"))


# ---- lora ----------------------------------------------------------------------------------
def lora_cfg(model, sae_dir, out, **changes):
    base = dict(model=str(model), saes=(sae_dir,), out=str(out), rank=8, tokens=8 * 4 * 32, eval_tokens=128, lr=2e-3,
                text=TextConfig(split="train", context_size=32), checkpoint_every=0, model_dtype="float32",
                device="cpu", progress=False)
    return LoRAConfig(**{**base, **changes})


def test_lora_adapts_the_blocks_after_the_sae_and_closes_part_of_the_gap(tmp_path, tiny_llama):
    from safetensors.torch import load_file

    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    result = train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "lora"))
    assert result.layers == (2, 3) and result.steps == 8
    assert result.after.kl < result.before.kl and result.ce_gap_closed > 0
    assert result.after.ce_clean == result.before.ce_clean and result.after.ce_adapted is not None
    weights = load_file(str(tmp_path / "lora" / "adapter_model.safetensors"))
    adapted = {int(k.split(".layers.")[1].split(".")[0]) for k in weights}
    assert adapted == {2, 3}
    modules = {k.split(".layers.")[1].split(".")[2] for k in weights}
    assert modules == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    info = json.loads((tmp_path / "lora" / "lora.json").read_text())
    assert info["ce_gap_closed"] == pytest.approx(result.ce_gap_closed) and len(info["curve"]) == 8
    assert (tmp_path / "lora" / "lora_curve.png").stat().st_size > 0 and not (tmp_path / "lora" / "checkpoint").exists()

    # eval --adapter reproduces the after figures on the same held-out windows
    again = evaluate(EvalConfig(model=str(tiny_llama), saes=(sae_dir,), adapter=str(tmp_path / "lora"), text=TEXT,
                                tokens=128, model_dtype="float32", device="cpu", progress=False))
    assert again.ce_spliced == pytest.approx(result.after.ce_spliced, rel=1e-6)
    assert again.kl == pytest.approx(result.after.kl, rel=1e-5)
    assert again.ce_adapted == pytest.approx(result.after.ce_adapted, rel=1e-6)


def test_lora_adapts_around_a_transcoder(tmp_path, tiny_llama):
    save_saelens(linear_transcoder(), tmp_path / "tc", HookInfo("blocks.1.hook_mlp_in", "tiny", 32, hook_name_out="blocks.1.hook_mlp_out"))
    result = train_lora(lora_cfg(tiny_llama, str(tmp_path / "tc"), tmp_path / "lora"))
    assert result.layers == (2, 3) and result.steps == 8
    assert result.after.kl < result.before.kl and result.ce_gap_closed > 0
    assert result.before.splices[0].hook == "blocks.1.hook_mlp_in -> blocks.1.hook_mlp_out"
    info = json.loads((tmp_path / "lora" / "lora.json").read_text())
    assert info["saes"] == [{"source": str(tmp_path / "tc"), "hook": "blocks.1.hook_mlp_in", "hook_out": "blocks.1.hook_mlp_out"}]


def test_the_teacher_is_the_base_model(tmp_path, tiny_llama):
    from pipelines.adapters import adapters_off, lora_model

    lm = load_model(str(tiny_llama), model_dtype="float32", device="cpu")
    ids_BT = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        base = lm.model(ids_BT).logits
        model = lora_model(lm.model, [2, 3], rank=4, alpha=8)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_()
        adapted = model(input_ids=ids_BT).logits
        with adapters_off(model):
            teacher = model(input_ids=ids_BT).logits
    assert not torch.allclose(adapted, base, atol=1e-3)
    torch.testing.assert_close(teacher, base)


def die_after_step(monkeypatch, step: int):
    """Make ``LoRATrainer.fit`` raise KeyboardInterrupt (a kill) right after ``step``'s
    callback; returns the real ``fit``."""
    real_fit = LoRATrainer.fit

    def fit_dying(self, on_step):
        def dying(trainer):
            on_step(trainer)
            if trainer.step == step:
                raise KeyboardInterrupt

        return real_fit(self, dying)

    monkeypatch.setattr(LoRATrainer, "fit", fit_dying)
    return real_fit


def test_lora_resumes_exactly_from_a_checkpoint(tmp_path, tiny_llama, monkeypatch):
    from safetensors.torch import load_file

    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    whole = train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "whole", checkpoint_every=3))
    real_fit = die_after_step(monkeypatch, 4)  # step 3 checkpointed, step 4 lost
    with pytest.raises(KeyboardInterrupt):
        train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "resumed", checkpoint_every=3))
    assert (tmp_path / "resumed" / "checkpoint" / "state.json").exists()
    monkeypatch.setattr(LoRATrainer, "fit", real_fit)
    with pytest.raises(ValueError, match=r"holds another run \(yours vs. saved: settings.lr"):
        train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "resumed", checkpoint_every=3, lr=1e-3))
    resumed = train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "resumed", checkpoint_every=3))
    a = load_file(str(tmp_path / "whole" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert resumed.after.ce_spliced == pytest.approx(whole.after.ce_spliced, rel=1e-5)
    curves = [np.array(json.loads((tmp_path / run / "lora.json").read_text())["curve"]) for run in ("whole", "resumed")]
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)


def test_lora_cli_and_bad_input(tmp_path, tiny_llama, tiny_gemma2):
    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    out = tmp_path / "lora"
    common = ["--sae", sae_dir, "--tokens", "256", "--eval-tokens", "64", "--context-size", "32", "--rank", "4"]
    run = run_cli("lora", "--model", str(tiny_llama), "--out", str(out), "--layers", "all", "--json", *common)
    assert run.exit_code == 0, (run.stderr[-2000:], run.exception)
    summary = json.loads(run.stdout)
    assert summary["layers"] == [0, 1, 2, 3] and summary["steps"] == 2 and "ce_gap_closed" in summary
    files = folder_bytes(out)
    again = run_cli("lora", "--model", str(tiny_llama), "--out", str(out), "--layers", "all", "--json", *common)
    assert again.exit_code == 0, (again.stderr[-2000:], again.exception)
    assert json.loads(again.stdout) == {**summary, "finished_before": True}
    assert folder_bytes(out) == files, "a finished run rerun changes nothing"
    one_line_error(run_cli("lora", "--model", str(tiny_llama), "--out", str(out), *common), "holds another run", "settings.layers")
    one_line_error(run_cli("lora", "--model", str(tiny_llama), "--out", str(tmp_path / "r0"), *common[:-2], "--rank", "0"),
                   "--rank must be at least 1")
    gemma_sae = save_sae(tmp_path / "gsae", "blocks.1.hook_resid_post")
    before = sorted(p.name for p in out.iterdir())
    one_line_error(run_cli("eval", "--model", str(tiny_gemma2), "--sae", gemma_sae, "--adapter", str(out), "--tokens", "64"),
                   "was trained for model", "--model")
    assert sorted(p.name for p in out.iterdir()) == before
    last = save_sae(tmp_path / "last", "blocks.3.hook_resid_post")
    one_line_error(run_cli("lora", "--model", str(tiny_llama), "--out", str(tmp_path / "l2"), "--sae", last), "no block comes after")
    one_line_error(run_cli("lora", "--model", str(tiny_llama), "--out", str(tmp_path / "l3"), *common, "--layers", "2-7"),
                   "has 4 layers")


@pytest.mark.parametrize(("hook", "shared"), [("blocks.1.hook_resid_post", 1), ("blocks.2.hook_resid_pre", 2)])
def test_a_shared_prefix_gives_the_same_loss_and_gradients(tmp_path, tiny_llama, hook, shared):
    from pipelines.adapters import lora_model
    from pipelines.splice import Splicer

    lm = load_model(str(tiny_llama), model_dtype="float32", device="cpu")
    sae = load_sae(save_sae(tmp_path / "sae", hook))
    torch.manual_seed(0)
    model = lora_model(lm.model, [2, 3], rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    windows = take_windows(TEXT, lm.tokenizer, 64)
    assert len(windows) == 2
    cfg = lora_cfg(tiny_llama, "-", tmp_path / "unused", lr=1e-30, batch_size=2, tokens=64)  # one step of both windows
    results = []
    with Splicer(lm.model, [sae], lm.tokenizer.bos_token_id) as splicer:
        for blocks in (0, shared):
            trainer = LoRATrainer(cfg, model, splicer, iter(windows), shared_blocks=blocks)
            trainer.fit(lambda _: None)
            assert trainer.step == 1 and not trainer.exhausted
            (_, loss), = trainer.curve
            results.append((loss, [p.grad.clone() for p in trainer.params]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6) and results[0][0] > 0
    for g0, g1 in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(g0, g1)
    assert all(type(b).__name__ != "_PassThrough" for b in lm.model.model.layers)  # blocks put back


def test_released_saelens_saes_are_fetched_and_converted(tmp_path, monkeypatch):
    sae_lens = pytest.importorskip("sae_lens")
    torch.manual_seed(0)
    released = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=D, d_sae=96, k=8))
    with torch.no_grad():
        for p in released.parameters():
            p.copy_(0.3 * torch.randn_like(p))
    released.cfg.metadata.hook_name = "blocks.2.hook_resid_post"
    asked = {}

    def from_pretrained(release, sae_id, device="cpu"):  # stands in for the hub download
        asked.update(release=release, sae_id=sae_id)
        return released

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", staticmethod(from_pretrained))
    mine = load_sae("saelens:some-release/layer_2/width_16k/canonical")
    assert asked == {"release": "some-release", "sae_id": "layer_2/width_16k/canonical"}
    assert mine.hook == "blocks.2.hook_resid_post" and mine.source.startswith("saelens:")
    x = torch.randn(8, D)
    with torch.no_grad():
        torch.testing.assert_close(mine.sae(x), released(x), atol=1e-5, rtol=1e-4)


def test_gradient_checkpointing_trains_the_same_adapter(tmp_path, tiny_llama, monkeypatch):
    from pipelines.capture import decoder_layers

    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    mlp_calls = []
    real_fit = LoRATrainer.fit

    def counting_fit(self, on_step):  # the last block's MLP starts once per pass, again when recomputed
        decoder_layers(self.model)[3].mlp.register_forward_pre_hook(lambda *_: mlp_calls.append(self.step))
        return real_fit(self, on_step)

    monkeypatch.setattr(LoRATrainer, "fit", counting_fit)
    plain = train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "plain", tokens=3 * 4 * 32))
    plain_calls, mlp_calls[:] = len(mlp_calls), []
    recomputed = train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "ckpt", tokens=3 * 4 * 32, gradient_checkpointing=True))
    assert len(mlp_calls) == plain_calls + 3  # one recompute per training step
    assert recomputed.after.ce_spliced == pytest.approx(plain.after.ce_spliced, rel=1e-5)
    curves = [np.array(json.loads((tmp_path / run / "lora.json").read_text())["curve"]) for run in ("plain", "ckpt")]
    np.testing.assert_allclose(curves[1], curves[0], rtol=1e-5)


# ---- evaluations during training (--eval-at) -------------------------------------------------
STEP = 4 * 32  # lora_cfg's tokens per step


def test_eval_at_gives_the_figures_of_a_run_with_that_many_tokens(tmp_path, tiny_llama):
    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    # LoRA dropout on: an evaluation that left the adapters in eval mode or drew random numbers would show
    long = train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "long", tokens=6 * STEP, eval_at=(3 * STEP + 1, 2 * STEP),
                               dropout=0.1))
    short = train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "short", tokens=2 * STEP, dropout=0.1))
    assert [(e.steps, e.tokens) for e in long.evals] == [(2, 2 * STEP), (4, 4 * STEP), (6, 6 * STEP)]  # 3 steps + 1 token: 4
    at_two, final = long.evals[0], long.evals[-1]
    for name in ("ce_spliced", "ce_adapted", "kl"):
        assert getattr(at_two.after, name) == pytest.approx(getattr(short.after, name), rel=1e-5), name
    assert at_two.ce_gap_closed == pytest.approx(short.ce_gap_closed, rel=1e-4)
    assert at_two.after.ce_zero == long.before.ce_zero and at_two.after.splices[0].l0 == pytest.approx(8.0)
    assert final.after == long.after and final.ce_gap_closed == long.ce_gap_closed
    assert at_two.after.kl != pytest.approx(long.after.kl, rel=1e-3)  # training went on
    assert [(e.steps, e.after) for e in short.evals] == [(2, short.after)]  # without eval_at: the final one alone

    info = json.loads((tmp_path / "long" / "lora.json").read_text())
    assert info["evals"] == json.loads(json.dumps([e.to_json() for e in long.evals]))
    assert info["settings"]["eval_at"] == [2 * STEP, 3 * STEP + 1]
    assert "eval_at" not in json.loads((tmp_path / "short" / "lora.json").read_text())["settings"]  # old runs' identity kept
    again = train_lora(lora_cfg(tiny_llama, sae_dir, tmp_path / "long", tokens=6 * STEP, eval_at=(2 * STEP, 3 * STEP + 1),
                                dropout=0.1))
    assert again.finished_before and again.evals == long.evals


def test_a_resumed_run_keeps_the_evaluations_done_before_the_kill(tmp_path, tiny_llama, monkeypatch):
    from pipelines import lora as lora_module
    from trainers import checkpoint

    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    cfg = lora_cfg(tiny_llama, sae_dir, tmp_path / "lora", tokens=6 * STEP, eval_at=(2 * STEP,), checkpoint_every=3)
    real_fit = die_after_step(monkeypatch, 4)  # evaluated at 2, checkpointed at 3, killed at 4
    with pytest.raises(KeyboardInterrupt):
        train_lora(cfg)
    saved = checkpoint.read_state(tmp_path / "lora" / "checkpoint")
    assert saved["step"] == 3 and [e["steps"] for e in saved["evals"]] == [2]
    monkeypatch.setattr(LoRATrainer, "fit", real_fit)
    steps_evaluated = []
    real_evaluate = lora_module._evaluate

    def counting(*args, **kwargs):
        result = real_evaluate(*args, **kwargs)
        steps_evaluated.append(result.steps)
        return result

    monkeypatch.setattr(lora_module, "_evaluate", counting)
    resumed = train_lora(cfg)
    assert steps_evaluated == [6]  # the evaluation at step 2 came from the checkpoint
    assert [e.steps for e in resumed.evals] == [2, 6]
    assert json.loads(json.dumps(resumed.evals[0].to_json())) == saved["evals"][0]


def test_eval_at_must_lie_inside_the_run(tmp_path, tiny_llama):
    for bad in ((0,), (STEP, 8 * STEP), (-5,)):
        with pytest.raises(ValueError, match=r"^--eval-at .*below --tokens \(1,024\); drop it or raise --tokens$"):
            lora_cfg(tiny_llama, "-", tmp_path / "x", eval_at=bad)
    assert "eval_at" not in lora_cfg(tiny_llama, "-", tmp_path / "x").settings()
    assert lora_cfg(tiny_llama, "-", tmp_path / "x", eval_at=(STEP, 2 * STEP)).settings()["eval_at"] == (STEP, 2 * STEP)
    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    base = ["lora", "--model", str(tiny_llama), "--sae", sae_dir, "--out", str(tmp_path / "l"), "--tokens", "256"]
    one_line_error(run_cli(*base, "--eval-at", "128,abc"), "--eval-at 128,abc", "cannot read a count from 'abc'")
    one_line_error(run_cli(*base, "--eval-at", "0"), "--eval-at 0", "not a positive whole count")
    one_line_error(run_cli(*base, "--eval-at", "64,256"), "--eval-at 256", "below --tokens (256)")
    assert not (tmp_path / "l").exists()


def test_lora_cli_eval_at(tmp_path, tiny_llama):
    sae_dir = save_sae(tmp_path / "sae", "blocks.1.hook_resid_post")
    args = ["lora", "--model", str(tiny_llama), "--sae", sae_dir, "--out", str(tmp_path / "lora"), "--tokens", "256",
            "--eval-at", "64", "--eval-tokens", "64", "--context-size", "32", "--rank", "4", "--model-dtype", "float32"]
    run = run_cli(*args, "--no-progress")
    assert run.exit_code == 0, (run.stderr[-2000:], run.exception)
    table = [line for line in run.stdout.splitlines() if "after 128" in line or "CE gap closed" in line]
    assert len(table) == 3 and "after 128" in table[0], run.stdout  # a column per evaluation; the gap closed at each
    again = run_cli(*args, "--json")
    assert again.exit_code == 0, (again.stderr[-2000:], again.exception)
    summary = json.loads(again.stdout)
    assert summary["finished_before"] and [(e["steps"], e["tokens"]) for e in summary["evals"]] == [(1, 128), (2, 256)]
    assert summary["evals"][-1]["after"] == summary["after"]
    assert summary["evals"][-1]["ce_gap_closed"] == pytest.approx(summary["ce_gap_closed"])
