"""Gemma Scope ``params.npz`` import: same latents and reconstruction as the release's formula."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.helpers import run_cli_process as run_cli
from trainers.gemma_scope import hook_from_path, load_gemma_scope
from trainers.saelens_format import load_saelens

D, F = 16, 48


def write_params(path, seed: int = 0, **override) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    params = {
        "W_enc": rng.normal(size=(D, F)).astype(np.float32) / 4,
        "W_dec": rng.normal(size=(F, D)).astype(np.float32) / 4,
        "b_enc": rng.normal(size=F).astype(np.float32) / 2,
        "b_dec": rng.normal(size=D).astype(np.float32),
        "threshold": rng.uniform(0.0, 0.6, size=F).astype(np.float32),
    }
    params["threshold"][:3] = 0.0  # Gemma Scope has latents with a zero threshold
    params.update(override)
    params = {k: v for k, v in params.items() if v is not None}
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **params)
    return params


def reference(params: dict[str, np.ndarray], x_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Gemma Scope's JumpReLU SAE as released: no b_dec subtracted before the encoder."""
    pre = x_ND.astype(np.float64) @ params["W_enc"] + params["b_enc"]
    f = pre * (pre > params["threshold"]) * (pre > 0)
    return f, f @ params["W_dec"] + params["b_dec"]


def test_import_gives_the_release_latents_and_reconstruction(tmp_path):
    path = tmp_path / "layer_7" / "width_16k" / "average_l0_50" / "params.npz"
    params = write_params(path)
    sae = load_gemma_scope(path)
    x_ND = np.random.default_rng(1).normal(size=(200, D)).astype(np.float32) * 2
    f_ref, recon_ref = reference(params, x_ND)
    with torch.no_grad():
        f = sae.encode(torch.from_numpy(x_ND)).double().numpy()
        recon = sae.decode(torch.from_numpy(f).float()).double().numpy()
    assert 0 < (f_ref != 0).mean() < 1  # the thresholds actually cut
    np.testing.assert_array_equal(f != 0, f_ref != 0)
    np.testing.assert_allclose(f, f_ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(recon, recon_ref, atol=1e-4, rtol=1e-4)
    assert hook_from_path(path) == "blocks.7.hook_resid_post" and hook_from_path(tmp_path / "x.npz") is None


def test_import_sae_cli_writes_a_folder_saelens_and_actstore_load(tmp_path):
    sae_lens = pytest.importorskip("sae_lens")
    path = tmp_path / "gemma-scope-2b-pt-res" / "layer_12" / "width_16k" / "average_l0_82" / "params.npz"
    params = write_params(path, seed=3)
    out = tmp_path / "imported"
    res = run_cli("import-sae", str(path), "--out", str(out))
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.12.hook_resid_post" and cfg["metadata"]["model_name"] == "gemma-2-2b"
    x_ND = np.random.default_rng(4).normal(size=(64, D)).astype(np.float32)
    f_ref, recon_ref = reference(params, x_ND)
    theirs = sae_lens.SAE.load_from_disk(str(out))
    ours, hook = load_saelens(out)
    x = torch.from_numpy(x_ND)
    with torch.no_grad():
        for sae in (theirs, ours):
            f = sae.encode(x)
            np.testing.assert_allclose(f.double().numpy(), f_ref, atol=1e-4, rtol=1e-4)
            np.testing.assert_allclose(sae.decode(f).double().numpy(), recon_ref, atol=1e-4, rtol=1e-4)
    assert hook.hook_name == "blocks.12.hook_resid_post"
    again = run_cli("import-sae", str(path), "--out", str(out))  # never overwrites
    assert again.returncode == 2 and "not empty" in again.stderr


@pytest.mark.parametrize("override, message", [
    ({"threshold": None}, "lacks threshold"),
    ({"b_enc": np.zeros(F + 1, np.float32)}, "b_enc has shape"),
])
def test_import_rejects_files_that_are_not_gemma_scope_params(tmp_path, override, message):
    path = tmp_path / "layer_1" / "params.npz"
    write_params(path, **override)
    res = run_cli("import-sae", str(path), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "o").exists()


def test_import_errors_for_a_missing_file_or_unknown_hook(tmp_path):
    res = run_cli("import-sae", str(tmp_path / "nope.npz"), "--out", str(tmp_path / "o"), "--hook", "blocks.0.hook_resid_post")
    assert res.returncode == 2 and "does not exist" in res.stderr
    write_params(tmp_path / "p.npz")
    res = run_cli("import-sae", str(tmp_path / "p.npz"), "--out", str(tmp_path / "o"))
    assert res.returncode == 2 and "--hook" in res.stderr
