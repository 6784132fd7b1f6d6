"""Captured activations against an independent forward pass (output_hidden_states), and early exit."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipelines.capture import SITES, ActivationCapture, HookPoint, hook_name


@pytest.fixture(params=["tiny_llama", "tiny_gemma2"])
def model(request):
    path = request.getfixturevalue(request.param)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def test_every_site_matches_hidden_states_and_adds_up(model):
    ids = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))
    n = model.config.num_hidden_layers
    hooks = [hook_name(layer, site) for layer in range(n) for site in SITES]
    with ActivationCapture(model, hooks) as cap:
        acts = cap.run(ids)
    with torch.no_grad():
        hidden = model(ids, output_hidden_states=True).hidden_states
    d = model.config.hidden_size
    for layer in range(n):
        pre, post = acts[hook_name(layer, "resid_pre")], acts[hook_name(layer, "resid_post")]
        assert pre.shape == (64, d)
        torch.testing.assert_close(pre, hidden[layer].reshape(-1, d), rtol=0, atol=0)
        if layer < n - 1:  # the last hidden state has the final norm applied
            torch.testing.assert_close(post, hidden[layer + 1].reshape(-1, d), rtol=0, atol=0)
        parts = pre + acts[hook_name(layer, "attn_out")] + acts[hook_name(layer, "mlp_out")]
        torch.testing.assert_close(post, parts, rtol=1e-6, atol=1e-5)


def test_mlp_in_is_what_the_mlp_reads_the_residual_after_attention_through_its_norm(model):
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    layers = model.get_decoder().layers
    d = model.config.hidden_size
    hooks = [hook_name(layer, site) for layer in range(len(layers)) for site in ("resid_pre", "attn_out", "mlp_in")]
    with ActivationCapture(model, hooks) as cap:
        acts = cap.run(ids)
    seen = {}  # an independent forward hook on each MLP, in a full forward pass
    handles = [block.mlp.register_forward_hook(lambda m, args, out, i=i: seen.__setitem__(i, args[0].detach()))
               for i, block in enumerate(layers)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    gemma = hasattr(layers[0], "pre_feedforward_layernorm")
    for layer, block in enumerate(layers):
        got = acts[hook_name(layer, "mlp_in")]
        torch.testing.assert_close(got, seen[layer].reshape(-1, d), rtol=0, atol=0)
        norm = block.pre_feedforward_layernorm if gemma else block.post_attention_layernorm  # the pre-MLP norm
        with torch.no_grad():
            want = norm(acts[hook_name(layer, "resid_pre")] + acts[hook_name(layer, "attn_out")])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_capturing_mlp_in_stops_before_that_mlp_runs(model):
    ran = []
    model.get_decoder().layers[0].mlp.register_forward_hook(lambda *_: ran.append("mlp0"))
    with ActivationCapture(model, ["blocks.0.hook_mlp_in"]) as cap:
        acts = cap.run(torch.randint(0, 49152, (1, 8)))
    assert list(acts) == ["blocks.0.hook_mlp_in"] and ran == []


def test_gemma2_layer0_resid_pre_is_the_scaled_embedding(tiny_gemma2):
    model = AutoModelForCausalLM.from_pretrained(tiny_gemma2, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (1, 16))
    with ActivationCapture(model, ["blocks.0.hook_resid_pre"]) as cap:
        pre = cap.run(ids)["blocks.0.hook_resid_pre"]
    raw = model.get_input_embeddings().weight[ids[0]]
    scale = model.config.hidden_size**0.5
    torch.testing.assert_close(pre, raw * torch.tensor(scale, dtype=raw.dtype), rtol=1e-6, atol=1e-6)


def test_early_exit_runs_no_later_block_and_no_lm_head(model):
    ran = []
    for i, block in enumerate(model.get_decoder().layers):
        block.register_forward_pre_hook(lambda *_, i=i: ran.append(i))
    model.lm_head.register_forward_pre_hook(lambda *_: ran.append("lm_head"))
    model.get_decoder().norm.register_forward_pre_hook(lambda *_: ran.append("norm"))
    with ActivationCapture(model, ["blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"]) as cap:
        acts = cap.run(torch.randint(0, 49152, (1, 8)))
    assert set(acts) == {"blocks.1.hook_resid_post", "blocks.0.hook_mlp_out"}
    assert ran == [0, 1]
    ran.clear()
    with ActivationCapture(model, ["blocks.2.hook_resid_pre"]) as cap:
        cap.run(torch.randint(0, 49152, (1, 8)))
    assert ran == [0, 1, 2]  # block 2's input is recorded, its body never runs


def test_hooks_are_removed_after_capture(model):
    """After the context the model runs as if never captured: a whole forward pass with the same
    logits (a stop hook left behind would cut it short), and nothing in the model refers to the
    capture any more (a recorder left behind would keep it alive)."""
    ids = torch.randint(0, 49152, (1, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(ids).logits
    with ActivationCapture(model, ["blocks.1.hook_resid_pre", "blocks.3.hook_attn_out"]) as cap:
        assert set(cap.run(ids)) == {"blocks.1.hook_resid_pre", "blocks.3.hook_attn_out"}
    alive = weakref.ref(cap)
    del cap
    gc.collect()
    assert alive() is None, "a hook left on the model still refers to the capture"
    with torch.no_grad():
        after = model(ids).logits
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("bad, message", [("blocks.x.hook_resid_post", "unknown hook"), ("blocks.1.hook_resid_mid", "unknown hook")])
def test_bad_hook_names(bad, message):
    with pytest.raises(ValueError, match=message):
        HookPoint.parse(bad)


def test_layer_past_depth_names_the_depth(model):
    with pytest.raises(ValueError, match="has 4 layers"):
        ActivationCapture(model, ["blocks.4.hook_resid_post"])


def test_cast_while_capturing_equals_cast_after(model):
    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(1))
    hooks = [hook_name(layer, site) for layer in (0, 2) for site in SITES]
    with ActivationCapture(model, hooks) as cap:
        full = cap.run(ids)
    with ActivationCapture(model, hooks, dtype=torch.bfloat16) as cap:
        cast = cap.run(ids)
    for h in hooks:
        assert cast[h].dtype == torch.bfloat16
        assert torch.equal(cast[h], full[h].to(torch.bfloat16)), h
