"""Model loading: the attention implementation chosen from the config, float16 refused for
Gemma-2, weights loaded on the requested device in the requested dtype."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pipelines.models import ModelLoadError, load_model, model_spec

GEMMA2_FP16 = ("gemma-2 overflows in float16 (its activations exceed 65504); "
               "use --model-dtype bfloat16 or float32")


def test_spec_picks_eager_for_softcapped_gemma2_and_sdpa_for_llama(tiny_gemma2, tiny_llama):
    assert model_spec(str(tiny_gemma2), model_dtype="float32", device="cpu").attn_implementation == "eager"
    assert model_spec(str(tiny_llama), model_dtype="float32", device="cpu").attn_implementation == "sdpa"


@pytest.mark.parametrize("fixture, want", [("tiny_gemma2", "eager"), ("tiny_llama", "sdpa")])
def test_loaded_model_runs_the_specs_attention_on_the_device_in_the_dtype(request, fixture, want):
    path = request.getfixturevalue(fixture)
    lm = load_model(str(path), model_dtype="bfloat16", device="cpu")
    assert lm.attn_implementation == want
    assert lm.spec.attn_implementation == want
    assert lm.model.config._attn_implementation == want
    params = list(lm.model.parameters())
    assert params and all(p.device == torch.device("cpu") for p in params)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert not any(p.requires_grad for p in params)
    assert not lm.model.training


def test_float16_refused_for_gemma2(tiny_gemma2):
    with pytest.raises(ModelLoadError) as e:
        model_spec(str(tiny_gemma2), model_dtype="float16", device="cpu")
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == f"cannot load {str(tiny_gemma2)!r} in float16: {GEMMA2_FP16}"


def test_float16_accepted_for_llama(tiny_llama):
    assert model_spec(str(tiny_llama), model_dtype="float16", device="cpu").dtype == torch.float16


@pytest.mark.parametrize("fixture", ["tiny_gemma2", "tiny_llama"])
def test_auto_dtype_never_float16(request, fixture):
    spec = model_spec(str(request.getfixturevalue(fixture)), model_dtype="auto", device="cpu")
    assert spec.dtype in (torch.float32, torch.bfloat16)


def test_gemma2_logits_match_a_plain_eager_float32_load(tiny_gemma2):
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    lm = load_model(str(tiny_gemma2), model_dtype="float32", device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(tiny_gemma2, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        got, want = lm.model(ids).logits, ref(ids).logits
    assert torch.equal(got, want)
