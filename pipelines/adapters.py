"""LoRA adapters (peft) on a HF causal LM: which modules they wrap, attaching a saved one, and
switching them off for the teacher pass.

LoRA (Hu et al. 2021, arXiv 2106.09685 §4.1) adds a low-rank update to a frozen weight,
``h = W x + (alpha / r) * B A x`` with ``A [r, in]`` random and ``B [out, r]`` zero at the start,
so the adapted model starts as the base model. actstore wraps every linear layer of the
attention and MLP sub-blocks of the chosen blocks (Chen et al. 2025, arXiv 2501.19406 §3.4 adapt
all of them). A saved adapter is peft's folder (``adapter_config.json`` +
``adapter_model.safetensors``) plus ``lora.json``, which records the model it was trained for;
attaching it to another model is refused.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from torch import nn

from .capture import decoder_layers
from .models import model_identity, model_shape

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_INFO = "lora.json"


def target_modules(model: nn.Module, layers: Sequence[int]) -> list[str]:
    """Names (last part) of the linear layers in the attention and MLP of blocks ``layers``."""
    blocks = decoder_layers(model)
    names: set[str] = set()
    for i in layers:
        for part in (blocks[i].self_attn, blocks[i].mlp):
            names.update(name.rsplit(".", 1)[-1] for name, m in part.named_modules() if isinstance(m, nn.Linear))
    if not names:
        raise ValueError("the chosen blocks hold no linear layers to adapt")
    return sorted(names)


def lora_model(model: nn.Module, layers: Sequence[int], rank: int, alpha: float, dropout: float = 0.0) -> nn.Module:
    """``model`` wrapped by peft with fresh LoRA adapters on blocks ``layers`` (trainable, the rest frozen)."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=target_modules(model, layers),
                     layers_to_transform=list(layers), layers_pattern="layers", bias="none")
    with _quiet():
        return get_peft_model(model, cfg)


def adapter_layers(adapter_dir: Path) -> list[int] | None:
    cfg = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    layers = cfg.get("layers_to_transform")
    return [layers] if isinstance(layers, int) else layers


def attach_adapter(model: nn.Module, adapter_dir: str | Path, model_name: str) -> nn.Module:
    """``model`` with the saved adapter in ``adapter_dir`` (frozen), checked to be for ``model_name``."""
    from peft import PeftModel

    root = Path(adapter_dir)
    if not (root / ADAPTER_CONFIG).is_file():
        raise FileNotFoundError(f"{root} is not a LoRA adapter folder (no {ADAPTER_CONFIG}); give the --out folder of actstore lora")
    info_path = root / ADAPTER_INFO
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        want, have = info.get("model", {}), {"identity": model_identity(model_name), **model_shape(model)}
        if want.get("identity") != have["identity"] or any(want.get(k) != v for k, v in model_shape(model).items()):
            raise ValueError(f"adapter {root} was trained for model {want.get('name')!r} ({_describe(want)}), "
                             f"not {model_name!r} ({_describe(have)}); pass --model {want.get('name')}")
    try:
        with _quiet():
            return PeftModel.from_pretrained(model, str(root), is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatch, missing target modules
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"cannot attach adapter {root} to {model_name}: {first_line}") from None


@contextmanager
def _quiet() -> Iterator[None]:
    """peft calls a transformers property that transformers 5 deprecated (a FutureWarning per call)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


def _describe(shape: dict[str, Any]) -> str:
    return f"{shape.get('model_type')}, {shape.get('num_hidden_layers')} layers, width {shape.get('hidden_size')}"


def adapters_off(model: nn.Module):
    """A context in which ``model``'s LoRA adapters are bypassed (the base model); a no-op without any."""
    from peft import PeftModel

    return model.disable_adapter() if isinstance(model, PeftModel) else nullcontext()

