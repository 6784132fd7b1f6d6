"""Storage dtypes: zarr v3 data types for bfloat16 and float8, and conversions to and from them.

zarr-python 3.1 has no ``bfloat16`` data type, so this module registers one (and
``float8_e4m3fn``) under the names used by the zarr-extensions registry, backed by
``ml_dtypes``. zarr-python reads our stores once this module is imported
(``import actstore.dtypes``; zarr 3.1 does not load data types from entry points);
tensorstore reads them natively.

The 1-byte lossy mode stores ``float8_e4m3fn`` values with one float32 scale per token:
``scale_N = max_d |x_ND| / 448`` (448 is the largest finite e4m3fn value) and
``q_ND = fp8(x_ND / scale_N)``, so every token uses the full fp8 range. Decoding is
``x_ND ≈ float32(q_ND) * scale_N``; the relative error is set by the 3-bit mantissa
(about 2^-4 per element at worst, see ``docs/FORMAT.md`` for measured figures).

Shape letters: N tokens, D model width.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import ml_dtypes
import numpy as np
import torch
from zarr.core.dtype import data_type_registry
from zarr.core.dtype.npy.float import BaseFloat

from .errors import ShardError

StoreDType = Literal["bfloat16", "float16", "float32", "float8_e4m3fn"]
STORE_DTYPES: tuple[str, ...] = ("bfloat16", "float16", "float32", "float8_e4m3fn")

FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448.0


@dataclass(frozen=True, kw_only=True)
class BFloat16(BaseFloat):  # type: ignore[type-arg]
    """zarr v3 ``data_type`` "bfloat16" (zarr-extensions name), held in numpy as ml_dtypes.bfloat16."""

    dtype_cls = type(np.dtype(ml_dtypes.bfloat16))
    _zarr_v3_name = "bfloat16"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @property
    def item_size(self) -> int:
        return 2


@dataclass(frozen=True, kw_only=True)
class Float8E4M3FN(BaseFloat):  # type: ignore[type-arg]
    """zarr v3 ``data_type`` "float8_e4m3fn" (zarr-extensions name), held as ml_dtypes.float8_e4m3fn."""

    dtype_cls = type(np.dtype(ml_dtypes.float8_e4m3fn))
    _zarr_v3_name = "float8_e4m3fn"
    _zarr_v2_names: ClassVar[tuple[str, ...]] = ()

    @property
    def item_size(self) -> int:
        return 1


def register_zarr_dtypes() -> None:
    """Make zarr-python understand our dtypes (idempotent; done when this module is imported)."""
    data_type_registry.register(BFloat16._zarr_v3_name, BFloat16)
    data_type_registry.register(Float8E4M3FN._zarr_v3_name, Float8E4M3FN)


register_zarr_dtypes()


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype that holds values of store dtype ``name`` (or ``int32``, for tokens)."""
    table = {
        "int32": np.dtype(np.int32),
        "bfloat16": np.dtype(ml_dtypes.bfloat16),
        "float16": np.dtype(np.float16),
        "float32": np.dtype(np.float32),
        "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    }
    if name not in table:
        raise ValueError(f"unknown store dtype {name!r}; choose one of {', '.join(STORE_DTYPES)}")
    return table[name]


def zarr_dtype(name: str) -> object:
    """The zarr data type object used to create arrays of store dtype ``name``."""
    if name == "bfloat16":
        return BFloat16()
    if name == "float8_e4m3fn":
        return Float8E4M3FN()
    return numpy_dtype(name)


def itemsize(name: str) -> int:
    return numpy_dtype(name).itemsize


def to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    """A numpy view (or copy, if it must leave an accelerator) of an array or tensor.

    torch bfloat16 has no numpy dtype, so it is viewed bit-for-bit as ml_dtypes.bfloat16.
    """
    if isinstance(x, np.ndarray):
        return x
    t = x.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def to_torch(x: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing memory with ``x``; ml_dtypes.bfloat16 becomes torch.bfloat16."""
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(np.ascontiguousarray(x).view(np.int16)).view(torch.bfloat16)
    if x.dtype == np.dtype(ml_dtypes.float8_e4m3fn):
        return torch.from_numpy(np.ascontiguousarray(x).view(np.uint8)).view(torch.float8_e4m3fn)
    return torch.from_numpy(x)


def fp8_quantize(acts_ND: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token scaled float8_e4m3fn: returns ``(q_ND, scale_N)`` as defined in the module docstring."""
    x_ND = np.asarray(acts_ND, dtype=np.float32)
    absmax_N = np.abs(x_ND).max(axis=1) if x_ND.shape[1] else np.zeros(len(x_ND), np.float32)
    scale_N = (absmax_N / FP8_MAX).astype(np.float32)
    scale_N[scale_N == 0] = 1.0  # an all-zero token: any scale decodes to zeros
    q_ND = (x_ND / scale_N[:, None]).astype(ml_dtypes.float8_e4m3fn)
    return q_ND, scale_N


def fp8_dequantize(q_ND: np.ndarray, scale_N: np.ndarray) -> np.ndarray:
    """Inverse of :func:`fp8_quantize` (up to fp8 rounding): float32 ``q_ND * scale_N``."""
    return q_ND.astype(np.float32) * scale_N.astype(np.float32)[:, None]


def encode_acts(acts_ND: np.ndarray | torch.Tensor, dtype: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Convert activations to the store dtype: ``(stored_ND, scale_N or None)``.

    Float rounding is round-to-nearest-even, as torch's ``.to()`` does, so a value computed in
    torch and cast there, or cast here, stores the same bits.
    """
    x = to_numpy(acts_ND)
    if dtype == "float8_e4m3fn":
        return fp8_quantize(x)
    target = numpy_dtype(dtype)
    if x.dtype == target:
        return np.ascontiguousarray(x), None
    if x.dtype == np.dtype(ml_dtypes.bfloat16) or x.dtype == np.float16:
        x = x.astype(np.float32)
    return np.ascontiguousarray(x.astype(target)), None


def int32_column(x: np.ndarray | torch.Tensor, n: int, name: str) -> np.ndarray:
    """``x`` as an int32 ``[n]`` array (a :class:`ShardError` when it is not integers of that shape or range)."""
    arr = to_numpy(x)
    if arr.shape != (n,) or arr.dtype.kind not in "iu":
        raise ShardError(f"{name} must be an integer [{n}] array, got {arr.dtype} {list(arr.shape)}")
    if n and (arr.min() < np.iinfo(np.int32).min or arr.max() > np.iinfo(np.int32).max):
        raise ShardError(f"{name} values do not fit int32")
    return arr.astype(np.int32, copy=False)
