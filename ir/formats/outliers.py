"""Sparse outliers: a few weights kept in float16, added to any format's dequantized base.

Stored as flat int32 positions into the ``[out, in]`` weight (row-major, sorted, unique) and
float16 residuals: 6 bytes per outlier, charged at that real cost.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import numpy as np
import torch

BYTES_PER_OUTLIER = 4 + 2  # int32 position + float16 value


@dataclasses.dataclass(frozen=True, eq=False)
class SparseOutliers:
    positions: np.ndarray  # [n] int32, flat index into [out, in]
    values: np.ndarray  # [n] float16, added to the base weight

    ARRAYS: ClassVar[tuple[str, str]] = ("outlier_positions", "outlier_values")

    @staticmethod
    def count_for(shape: tuple[int, int], fraction: float) -> int:
        """How many weights a fraction reserves (rounded down)."""
        return math.floor(fraction * shape[0] * shape[1])

    @staticmethod
    def bytes_for(count: int) -> int:
        return count * BYTES_PER_OUTLIER

    def arrays(self) -> dict[str, np.ndarray]:
        return dict(zip(self.ARRAYS, (self.positions, self.values), strict=True))

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> SparseOutliers | None:
        if cls.ARRAYS[0] not in arrays:
            return None
        positions, values = (arrays[name] for name in cls.ARRAYS)
        return cls(positions.astype(np.int32), values.astype(np.float16))

    @classmethod
    def add_to(cls, weight: torch.Tensor, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """``weight`` with the stored residuals added at their positions (a copy)."""
        if cls.ARRAYS[0] not in tensors:
            return weight
        flat = weight.reshape(-1).clone()
        positions = tensors[cls.ARRAYS[0]].to(torch.int64)
        flat[positions] = flat[positions] + tensors[cls.ARRAYS[1]].to(torch.float32)
        return flat.reshape(weight.shape)
