"""Crosscoders (trainers.crosscoder): the saved layout against the formula written per layer,
the loader, per-layer FVU and shared latents against brute force, and train-sae's crosscoder runs.
Shape letters: B batch, L layers, D one layer's width, F latents.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import actstore
from tests.helpers import HOOKS, make_config, make_data, sparse_data, write_shards
from tests.helpers import run_cli_process as run_cli
from trainers import make_sae, sae_config
from trainers.crosscoder import (
    WEIGHTS_FILE,
    layer_fvus,
    load_crosscoder,
    save_crosscoder,
    shared_latents,
)
from trainers.trainer import Experiment, TrainConfig, Trainer

L, D, F = 3, 8, 40


def crosscoder(seed: int = 0):
    sae = make_sae(sae_config("crosscoder", d_in=L * D, d_sae=F, k=5, n_layers=L, seed=seed))
    gen = torch.Generator().manual_seed(seed + 3)
    with torch.no_grad():
        sae.b_enc.copy_(0.1 * torch.randn(F, generator=gen))
        sae.b_dec.copy_(0.3 * torch.randn(L * D, generator=gen))
    return sae


def per_layer_formula(state: dict, x_BLD: torch.Tensor, k: int) -> torch.Tensor:
    """The module docstring's crosscoder, layer by layer, on the saved tensors."""
    pre_BF = sum((x_BLD[:, i] - state["b_dec"][i]) @ state["W_enc"][i] for i in range(x_BLD.shape[1])) + state["b_enc"]
    top = pre_BF.topk(k, dim=-1)
    f_BF = torch.zeros_like(pre_BF).scatter(-1, top.indices, torch.relu(top.values))
    return torch.stack([f_BF @ state["W_dec"][:, i] + state["b_dec"][i] for i in range(x_BLD.shape[1])], 1)


def test_the_saved_layout_is_the_formula_per_layer_on_raw_activations_and_loads_back(tmp_path):
    sae = crosscoder()
    scales = [0.5, 2.0, 1.5]  # layer l trained on scales[l] * x_l
    hooks = [f"blocks.{i}.hook_resid_post" for i in range(L)]
    save_crosscoder(sae, tmp_path / "cc", hooks, scales, "tiny", 16)
    state = load_file(str(tmp_path / "cc" / WEIGHTS_FILE))
    assert {n: tuple(t.shape) for n, t in state.items()} == {"W_enc": (L, D, F), "b_enc": (F,), "W_dec": (F, L, D), "b_dec": (L, D)}
    cfg = json.loads((tmp_path / "cc" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["n_layers"], cfg["d_sae"], cfg["k"], cfg["hook_names"]) == ("crosscoder", D, L, F, 5, hooks)
    x_BLD = torch.randn(64, L, D) * 2
    s_1L1 = torch.tensor(scales).view(1, L, 1)
    with torch.no_grad():
        want_BLD = sae((x_BLD * s_1L1).reshape(64, -1)).view(64, L, D) / s_1L1  # the trained SAE on scaled inputs, unscaled
    torch.testing.assert_close(per_layer_formula(state, x_BLD, 5), want_BLD, atol=1e-5, rtol=1e-5)
    loaded, got_hooks, _ = load_crosscoder(tmp_path / "cc")
    assert got_hooks == hooks
    with torch.no_grad():
        torch.testing.assert_close(loaded(x_BLD.reshape(64, -1)).view(64, L, D), want_BLD, atol=1e-5, rtol=1e-5)


def test_a_bad_crosscoder_folder_is_a_clear_error(tmp_path):
    save_crosscoder(crosscoder(), tmp_path / "cc", [f"blocks.{i}.hook_resid_post" for i in range(L)], [1.0] * L, "tiny", 16)
    cfg = json.loads((tmp_path / "cc" / "cfg.json").read_text())
    (tmp_path / "cc" / "cfg.json").write_text(json.dumps({**cfg, "d_in": D + 1}))
    with pytest.raises(ValueError, match="W_enc is \\(3, 8, 40\\), but cfg.json \\(L 3, D 9, F 40\\) needs \\(3, 9, 40\\)"):
        load_crosscoder(tmp_path / "cc")
    with pytest.raises(FileNotFoundError, match="not a crosscoder folder"):
        load_crosscoder(tmp_path)


def test_layer_fvus_and_shared_latents_match_brute_force():
    sae = crosscoder()
    with torch.no_grad():
        norms = torch.ones(F, L) * 1e-3  # every latent writes one layer, latents 0-9 two, 10-14 three
        norms[torch.arange(F), torch.arange(F) % L] = 1.0
        norms[:10, (torch.arange(10) + 1) % L] = 0.5
        norms[10:15] = 0.3
        W_FLD = torch.nn.functional.normalize(torch.randn(F, L, D), dim=-1) * norms[..., None]
        sae.W_dec.copy_(W_FLD.reshape(F, L * D))
    assert shared_latents(sae) == 15
    x = [torch.randn(50, L * D) + 1 for _ in range(3)]
    got = layer_fvus(sae, x)
    X = torch.cat(x).view(-1, L, D).double()
    with torch.no_grad():
        R = sae(torch.cat(x)).view(-1, L, D).double()
    want = [float(((X[:, i] - R[:, i]) ** 2).sum() / ((X[:, i] - X[:, i].mean(0)) ** 2).sum()) for i in range(L)]
    np.testing.assert_allclose(got, want, rtol=1e-6)  # float32 reconstructions, sums in float64 both ways


def test_a_crosscoder_learns_features_shared_by_its_layers():
    codes = sparse_data(256 * 200, seed=1, d=8, n_features=32, active=2)  # one sparse code, seen by 3 layers
    mix = [torch.linalg.qr(torch.randn(8, 8, generator=torch.Generator().manual_seed(i)))[0] for i in range(L)]
    data = torch.cat([codes @ m for m in mix], 1)  # [N, L D]: each layer a rotation of the same code
    cfg = sae_config("crosscoder", d_in=L * D, d_sae=64, k=2, n_layers=L)
    trainer = Trainer(TrainConfig(tokens=len(data), lr_warmup_steps=20, log_every=50), [Experiment("cc", cfg, 1e-2)],
                      data.split(256)).fit()
    sae = trainer.runs[0].sae
    held = sparse_data(2048, seed=2, d=8, n_features=32, active=2)
    fvus = layer_fvus(sae, [torch.cat([held @ m for m in mix], 1)])
    assert max(fvus) < 0.25, fvus
    assert shared_latents(sae) >= 20  # the features live in every layer: their latents write all three


def store_with_widths(url):
    cfg = make_config(dtype="float32", n_tokens_target=4096, shard_tokens=1024, hook_dims={HOOKS[2]: 32})
    with actstore.open_store(url, "w", config=cfg) as w:
        write_shards(w, cfg, make_data(cfg), range(cfg.n_shards))
    return url


def test_crosscoders_train_from_the_cli(tmp_path):
    from tests.helpers import dense_store

    store = dense_store(tmp_path / "s")
    out = tmp_path / "cc"
    args = ["train-sae", "--store", store, "--hook", ",".join(HOOKS[:2]), "--arch", "crosscoder", "--k", "8", "--expansion", "4",
            "--out", str(out), "--tokens", "3k", "--batch-size", "256", "--eval-tokens", "1k", "--json"]
    res = run_cli(*args)
    assert res.returncode == 0, res.stderr
    (row,) = json.loads(res.stdout)["experiments"]
    assert row["name"] == "crosscoder-192-k8-lr0.0002" and row["d_sae"] == 192
    assert set(row["eval_layers"]) == set(HOOKS[:2]) and all(np.isfinite(m["fvu"]) for m in row["eval_layers"].values())
    assert 0 <= row["shared_latents"] <= 192 and row["eval_l0"] == pytest.approx(8) and row["eval_tokens"] > 0
    sae, hooks, cfg = load_crosscoder(out / row["name"])
    assert hooks == list(HOOKS[:2]) and cfg["actstore"]["scales_folded"] and sae.cfg.n_layers == 2 and sae.cfg.d_in == 96
    summary = json.loads((out / "summary.json").read_text())
    assert summary["crosscoder"] == list(HOOKS[:2]) and summary["group"] is None
    again = run_cli(*args)
    assert again.returncode == 0 and json.loads(again.stdout)["finished_before"]


@pytest.mark.parametrize("hooks, arch, message", [
    (HOOKS[:1], "crosscoder", "a crosscoder reads several layers: give --hook as a comma list of 2 or more hooks"),
    (HOOKS[:2], "crosscoder,topk", "a crosscoder run trains crosscoders only; train topk in a run of its own"),
    (HOOKS, "crosscoder", "a crosscoder's layers must share one width: .*blocks.1.hook_mlp_out \\(32\\)"),
])
def test_crosscoder_bad_input_is_one_line_exit_2(tmp_path, hooks, arch, message):
    import re

    store = store_with_widths(str(tmp_path / "s"))
    res = run_cli("train-sae", "--store", store, "--hook", ",".join(hooks), "--arch", arch, "--out", str(tmp_path / "o"),
                  "--tokens", "1k", "--batch-size", "128")
    assert res.returncode == 2, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert re.search(message, res.stderr), res.stderr




def perfect_crosscoder(d: int = 64, layers: int = 2):
    """Each layer's coordinates read by their own [I, -I] latents: relu(x) - relu(-x) = x exactly,
    with k the number of positive pre-activations (d per layer)."""
    F_ = 2 * d * layers
    sae = make_sae(sae_config("crosscoder", d_in=layers * d, d_sae=F_, k=d * layers, n_layers=layers))
    block = torch.cat([torch.eye(d), -torch.eye(d)])  # [2d, d]
    with torch.no_grad():
        sae.W_dec.copy_(torch.block_diag(*[block] * layers))
        sae.W_enc_FD.copy_(torch.block_diag(*[block] * layers))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def test_a_perfect_crosscoder_changes_nothing_and_a_constant_one_is_the_reference_splice(tmp_path, tiny_llama):
    from pipelines.evaluate import EvalConfig, evaluate
    from pipelines.models import load_model
    from pipelines.text import TextConfig, take_windows

    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    text = TextConfig(split="test", context_size=32)
    save_crosscoder(perfect_crosscoder(), tmp_path / "perfect", hooks, [1.0, 1.0], "tiny", 32)
    r = evaluate(EvalConfig(model=str(tiny_llama), saes=(str(tmp_path / "perfect"),), text=text, tokens=256,
                            model_dtype="float32", progress=False))
    assert [s.hook for s in r.splices] == [f"{h} (crosscoder of 2)" for h in hooks]
    assert r.ce_spliced == pytest.approx(r.ce_clean, abs=1e-5) and all(s.fvu < 1e-10 for s in r.splices)
    # no latent fires: every layer becomes its b_dec; the reference writes those constants with plain hooks
    const = make_sae(sae_config("crosscoder", d_in=128, d_sae=32, k=4, n_layers=2))
    with torch.no_grad():
        const.b_enc.fill_(-1e4)
        const.b_dec.copy_(torch.randn(128))
    save_crosscoder(const, tmp_path / "const", hooks, [1.0, 1.0], "tiny", 32)
    r = evaluate(EvalConfig(model=str(tiny_llama), saes=(str(tmp_path / "const"),), text=text, tokens=256,
                            model_dtype="float32", progress=False))
    lm = load_model(str(tiny_llama), model_dtype="float32", device="cpu")
    b_dec_LD = const.b_dec.detach().view(2, 64)

    def overwrite(i):
        return lambda m, args, out: (torch.cat([out[0][:, :1], b_dec_LD[i].expand_as(out[0][:, 1:])], 1), *out[1:]) \
            if isinstance(out, tuple) else torch.cat([out[:, :1], b_dec_LD[i].expand_as(out[:, 1:])], 1)

    handles = [lm.model.model.layers[i + 1].register_forward_hook(overwrite(i)) for i in range(2)]
    ids_BT = torch.from_numpy(np.stack(take_windows(text, lm.tokenizer, 256)))
    with torch.no_grad():
        logits = lm.model(ids_BT).logits
    for h in handles:
        h.remove()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids_BT[:, 1:].reshape(-1))
    assert r.ce_spliced == pytest.approx(float(ce), abs=1e-5) and r.ce_spliced > r.ce_clean + 1e-3


def test_lora_adapts_after_a_crosscoder(tmp_path, tiny_llama):
    from pipelines.lora import LoRAConfig, train_lora
    from pipelines.text import TextConfig

    sae = perfect_crosscoder()
    with torch.no_grad():  # an imperfect one: half the latents zeroed, so there is a gap to close
        sae.W_dec[::2] = 0
    hooks = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_post"]
    save_crosscoder(sae, tmp_path / "cc", hooks, [1.0, 1.0], "tiny", 32)
    result = train_lora(LoRAConfig(model=str(tiny_llama), saes=(str(tmp_path / "cc"),), out=str(tmp_path / "lora"), rank=8,
                                   tokens=8 * 4 * 32, eval_tokens=128, lr=2e-3, text=TextConfig(split="train", context_size=32),
                                   checkpoint_every=0, model_dtype="float32", device="cpu", progress=False))
    assert result.layers == (3,) and result.steps == 8  # after its deepest layer: block 2's output is overwritten
    assert result.after.kl < result.before.kl and result.ce_gap_closed > 0
    assert [s.hook for s in result.before.splices] == [f"{h} (crosscoder of 2)" for h in hooks]
