"""Per-hook running statistics, kept exact across shards, writers and resumes.

Each commit adds a shard's sums, so a trainer can normalise without a warm-up pass:

- ``count``: tokens seen;
- ``sum_D``: sum of activation vectors (float64), giving the mean vector ``mean_D = sum_D / count``;
- ``sum_sq_norm``: sum of ``||x||_2^2``, giving ``E||x||^2``, the scale SAELens normalises by
  (``x * sqrt(D / E||x||^2)``, as in Anthropic's April 2024 update and SAELens'
  ``normalize_activations="expected_average_only_in"``);
- ``sum_norm``: sum of ``||x||_2``, for the mean norm that ``actstore info`` shows.

Statistics are computed on the values as stored (after dtype rounding): per-token squared
norms in float32, per-block sums of 1024 tokens in float32, and every running total in float64
(relative error ~1e-7, deterministic for the same data).
Shape letters: N tokens, D width.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

_BLOCK = 1024


@dataclass
class RunningStats:
    """Additive sums over tokens of one hook; merge by adding."""

    count: int
    sum_D: np.ndarray
    sum_sq_norm: float
    sum_norm: float

    @classmethod
    def zeros(cls, width: int) -> RunningStats:
        return cls(0, np.zeros(width, np.float64), 0.0, 0.0)

    @classmethod
    def of(cls, acts_ND: np.ndarray) -> RunningStats:
        """Sums over the tokens of ``acts_ND`` (any float dtype); see the module docstring.

        Works through blocks of 1024 tokens converted to float32 one at a time, so each block
        stays in cache instead of a whole float32 copy of the shard going through memory.
        """
        sum_D = np.zeros(acts_ND.shape[1], np.float64)
        sum_sq = sum_norm = 0.0
        for first in range(0, len(acts_ND), _BLOCK):
            x_ND = np.asarray(acts_ND[first : first + _BLOCK], dtype=np.float32)  # exact for bf16, fp16, fp8
            sq_N = np.einsum("nd,nd->n", x_ND, x_ND)
            sum_D += x_ND.sum(axis=0)
            sum_sq += float(sq_N.sum(dtype=np.float64))
            sum_norm += float(np.sqrt(sq_N).sum(dtype=np.float64))
        return cls(len(acts_ND), sum_D, sum_sq, sum_norm)

    def merged(self, other: RunningStats) -> RunningStats:
        return RunningStats(
            self.count + other.count,
            self.sum_D + other.sum_D,
            self.sum_sq_norm + other.sum_sq_norm,
            self.sum_norm + other.sum_norm,
        )

    def minus(self, other: RunningStats) -> RunningStats:
        """These sums without ``other``'s tokens (a shard taken back out of a commit record); the
        float64 totals land within rounding (~1e-16 relative) of never having added them."""
        return RunningStats(
            self.count - other.count,
            self.sum_D - other.sum_D,
            self.sum_sq_norm - other.sum_sq_norm,
            self.sum_norm - other.sum_norm,
        )

    @property
    def mean_D(self) -> np.ndarray:
        return self.sum_D / max(self.count, 1)

    @property
    def mean_sq_norm(self) -> float:
        return self.sum_sq_norm / max(self.count, 1)

    @property
    def mean_norm(self) -> float:
        return self.sum_norm / max(self.count, 1)

    def to_json(self) -> dict[str, Any]:
        # the vector is float64 little-endian, base64: exact and compact (JSON floats are 3x larger)
        return {
            "count": self.count,
            "sum": base64.b64encode(self.sum_D.astype("<f8").tobytes()).decode("ascii"),
            "sum_encoding": "base64 float64 little-endian",
            "sum_sq_norm": self.sum_sq_norm,
            "sum_norm": self.sum_norm,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RunningStats:
        sum_D = np.frombuffer(base64.b64decode(data["sum"]), dtype="<f8").astype(np.float64)
        return cls(int(data["count"]), sum_D, float(data["sum_sq_norm"]), float(data["sum_norm"]))

    def summary(self) -> dict[str, Any]:
        """Scalar view for the root attributes and ``actstore info``."""
        return {"count": self.count, "mean_norm": self.mean_norm, "mean_sq_norm": self.mean_sq_norm}
