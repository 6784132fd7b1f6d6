"""``actstore eval`` on the real SmolLM2-135M (slow: about half a minute on 2 CPU cores).

The clean CE is checked against transformers' own loss on the same windows, and a perfect SAE
(exact reconstruction) at a middle layer must leave the loss unchanged, so the splice sits on
the real model's residual stream and nowhere else.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines import smollm2
from pipelines.evaluate import EvalConfig, evaluate
from pipelines.text import TextConfig, take_windows
from tests.helpers import perfect_sae
from trainers.saelens_format import HookInfo, save_saelens

pytestmark = pytest.mark.slow


def test_eval_on_smollm2_matches_transformers_loss_and_a_perfect_sae_changes_nothing(tmp_path):
    save_saelens(perfect_sae(576), tmp_path / "perfect", HookInfo("blocks.15.hook_resid_post", smollm2.NAME, 128))
    text = TextConfig(split="test", context_size=128)
    r = evaluate(EvalConfig(model=smollm2.NAME, saes=(str(tmp_path / "perfect"),), text=text, tokens=1024,
                            device="cpu", progress=False))
    model, tokenizer = smollm2.load(torch.float32)
    ids_BT = torch.from_numpy(np.stack(take_windows(text, tokenizer, 1024)))
    with torch.no_grad():
        reference = float(model(ids_BT, labels=ids_BT).loss)
    assert r.ce_clean == pytest.approx(reference, rel=1e-5)
    assert 1.0 < r.ce_clean < 6.0  # a trained model on English prose
    assert r.ce_spliced == pytest.approx(r.ce_clean, abs=1e-4) and abs(r.kl) < 1e-4
    assert r.ce_zero > r.ce_clean + 1.0 and r.loss_recovered == pytest.approx(1.0, abs=1e-3)
