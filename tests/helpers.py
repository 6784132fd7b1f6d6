"""Helpers shared by test modules (fixtures stay in ``conftest.py``)."""

from __future__ import annotations

import hashlib
import socket
from pathlib import Path
from typing import Any

import numpy as np

from actstore import DatasetInfo, ModelInfo, StoreConfig

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post", "blocks.1.hook_mlp_out")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_config(**changes) -> StoreConfig:
    """A small store: 3 hooks of width 48, 1000 tokens in shards of 256 (the last one short)."""
    base = dict(
        model=ModelInfo(name="tiny-llama", d_model=48, n_layers=2),
        dataset=DatasetInfo(name="synthetic"),
        hooks=HOOKS,
        n_tokens_target=1000,
        context_size=16,
        chunk_tokens=64,
        shard_tokens=256,
    )
    base.update(changes)
    return StoreConfig(**base)


def make_data(cfg: StoreConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Synthetic activations with an offset mean and per-token scale, like real residual streams."""
    rng = np.random.default_rng(seed)
    n = cfg.n_tokens_target
    data = {
        "tokens": rng.integers(0, 50_000, n),
        "positions": np.arange(n) % cfg.context_size,
    }
    for i, hook in enumerate(cfg.hooks):
        scale_N = rng.uniform(0.5, 3.0, size=(n, 1))
        data[hook] = ((rng.standard_normal((n, cfg.width(hook))) + 0.3 * i) * scale_N).astype(np.float32)
    return data


def write_shards(writer, cfg: StoreConfig, data: dict[str, np.ndarray], shards) -> None:
    """Write the given shards of ``data`` (from ``make_data``) through ``writer``."""
    for s in shards:
        a, b = cfg.shard_range(s)
        writer.write_shard(
            s,
            tokens=data["tokens"][a:b],
            positions=data["positions"][a:b],
            acts={h: data[h][a:b] for h in cfg.hooks},
        )


def run_cli_here(*args: object) -> Any:
    """The CLI in this process (typer's runner: the same option parsing and error handling as
    ``actstore ...``, without a fresh interpreter importing torch and transformers for each
    call); the result has ``exit_code``, ``stdout``, ``stderr`` and ``exception``."""
    from typer.testing import CliRunner

    from cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def folder_bytes(root: str | Path) -> dict[str, str]:
    """Every file under ``root`` (relative path -> SHA-256 of its bytes), symlinks by target:
    two calls compare equal exactly when nothing in the folder changed."""
    root = Path(root)
    if not root.exists():
        return {}
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        if p.is_symlink():
            out[rel] = f"-> {p.readlink()}"
        elif p.is_file():
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[rel] = "dir"
    return out


def run_cli_process(*args: object) -> Any:
    """``python -m cli ARGS`` in a fresh interpreter (a ``CompletedProcess`` with text output):
    for what only a real process shows, such as import-time behaviour or exit codes."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "cli", *map(str, args)], capture_output=True, text=True)


def dense_store(path: str | Path) -> str:
    """A float32 store of 8192 synthetic tokens in shards of 1024, every shard committed."""
    import actstore

    cfg = make_config(dtype="float32", n_tokens_target=8192, shard_tokens=1024, chunk_tokens=128)
    with actstore.open_store(str(path), "w", config=cfg) as w:
        write_shards(w, cfg, make_data(cfg), range(cfg.n_shards))
    return str(path)


def sparse_data(n: int, seed: int = 0, d: int = 24, n_features: int = 64, active: int = 3):
    """Activations (an ``n x d`` tensor) made of a few of ``n_features`` random directions each
    (a known sparse code)."""
    import torch

    dirs = torch.nn.functional.normalize(torch.randn(n_features, d, generator=torch.Generator().manual_seed(1234)), dim=1)
    gen = torch.Generator().manual_seed(seed)  # samples vary with the seed, the features do not
    idx = torch.rand(n, n_features, generator=gen).argsort(1)[:, :active]
    mags = torch.rand(n, active, generator=gen) * 2 + 0.5
    return torch.zeros(n, n_features).scatter(1, idx, mags) @ dirs * np.sqrt(d / (active * 2.2))


def perfect_sae(d: int = 64):
    """ReLU SAE with W_enc = [I, -I], W_dec = [I; -I]: relu(x) - relu(-x) = x exactly
    (``d`` defaults to the tiny test models' width)."""
    import torch

    from trainers import make_sae, sae_config

    sae = make_sae(sae_config("relu", d_in=d, d_sae=2 * d))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


def assert_same_arrays(url_a: str | Path, url_b: str | Path) -> None:
    """Two complete stores with one configuration hold byte-identical arrays."""
    import actstore
    from actstore.layout import array_specs

    a, b = actstore.open_store(str(url_a)), actstore.open_store(str(url_b))
    assert a.config == b.config and a.is_complete and b.is_complete
    for spec in array_specs(a.config):
        x, y = a.zarr_array(spec.path)[:], b.zarr_array(spec.path)[:]
        assert x.tobytes() == y.tobytes(), spec.path


def arch_configs(d_in: int, d_sae: int) -> dict[str, Any]:
    """One small config of every SAE architecture, as the trainer tests use them."""
    from trainers import sae_config

    return {
        "relu": sae_config("relu", d_in=d_in, d_sae=d_sae, l1_coeff=1.0),
        "topk": sae_config("topk", d_in=d_in, d_sae=d_sae, k=4, aux_k=16),
        "batchtopk": sae_config("batchtopk", d_in=d_in, d_sae=d_sae, k=4, aux_k=16),
        "matryoshka": sae_config("matryoshka", d_in=d_in, d_sae=d_sae, k=4, aux_k=16, widths=(8, 32, d_sae)),
        "gated": sae_config("gated", d_in=d_in, d_sae=d_sae, l1_coeff=1.0),
        "jumprelu": sae_config("jumprelu", d_in=d_in, d_sae=d_sae, l0_coeff=0.1, bandwidth=0.1, init_threshold=0.3),
        # transcoders reproducing their own input here (pairs: tests/test_transcoders.py)
        "topk-transcoder": sae_config("topk-transcoder", d_in=d_in, d_sae=d_sae, k=4, aux_k=16, skip=True),
        "batchtopk-transcoder": sae_config("batchtopk-transcoder", d_in=d_in, d_sae=d_sae, k=4, aux_k=16),
        "jumprelu-transcoder": sae_config("jumprelu-transcoder", d_in=d_in, d_sae=d_sae, l0_coeff=0.1, bandwidth=0.1,
                                          init_threshold=0.3, skip=True),
        "crosscoder": sae_config("crosscoder", d_in=d_in, d_sae=d_sae, k=4, aux_k=16, n_layers=2),  # two layers of d_in / 2
    }


def twin_saes(cfg: Any, random_biases: bool = False) -> tuple[Any, Any]:
    """Two SAEs of ``cfg`` with the same weights (a fast path and its dense reference);
    ``random_biases``: normal ``b_enc`` and ``b_dec`` instead of zeros."""
    import torch

    from trainers import make_sae

    fast = make_sae(cfg)
    if random_biases:
        with torch.no_grad():
            fast.b_enc.normal_()
            fast.b_dec.normal_()
    ref = make_sae(cfg)
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def check_topk_sparse_step(d_in: int, d_sae: int, recon_tol: dict | None = None, arch: str = "topk", **settings: Any) -> None:
    """A TopK-family SAE's fast training step (:mod:`trainers.sparse`, whichever backend is
    active; ``arch`` topk, batchtopk, matryoshka or their transcoders) against its dense
    reference on one batch, a third of the latents dead (AuxK on): loss and every loss term,
    reconstruction (``recon_tol``: assert_close's tolerances, default its own), fired latents,
    L0, every parameter's gradient and buffer (BatchTopK's threshold)."""
    import torch

    from trainers import sae_config

    torch.manual_seed(0)
    x_BD = torch.randn(64, d_in)
    fast, ref = twin_saes(sae_config(arch, d_in=d_in, d_sae=d_sae, k=5, aux_k=7, **settings), random_biases=True)
    dead_F = torch.zeros(d_sae, dtype=torch.bool)
    dead_F[::3] = True
    a, b = fast.training_step(x_BD, dead_F=dead_F), ref.dense_training_step(x_BD, dead_F=dead_F)
    assert float(a.terms["aux"]) > 0
    a.loss.backward()
    b.loss.backward()
    torch.testing.assert_close(a.loss, b.loss)
    assert a.terms.keys() == b.terms.keys()
    for name in a.terms:
        torch.testing.assert_close(a.terms[name], b.terms[name], msg=name)
    torch.testing.assert_close(a.recon_BD, b.recon_BD, **(recon_tol or {}))
    assert torch.equal(a.fired_F, b.fired_F) and float(a.l0) == float(b.l0)
    for (name, p), q in zip(fast.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=name, atol=1e-5, rtol=1e-4)
    for (name, p), q in zip(fast.named_buffers(), ref.buffers(), strict=True):
        torch.testing.assert_close(p, q, msg=name)


def run_reproduce(name: str, out: str | Path, store: str, timeout: float | None = None) -> tuple[Any, float]:
    """``benchmarks/reproduce_<name>.py --quick --out OUT --store STORE`` in a fresh interpreter
    from the repository root: the ``CompletedProcess`` (text output) and its wall-clock seconds."""
    import subprocess
    import sys
    import time

    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, str(root / "benchmarks" / f"reproduce_{name}.py"), "--quick", "--out", str(out), "--store", store]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=timeout)
    return done, time.perf_counter() - t
