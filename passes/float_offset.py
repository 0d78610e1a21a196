"""Round-to-nearest groups with a float scale and a float offset (GGUF Q4_1, HQQ's format).

Groups run along the input dimension of W ``[out, in]``.
1. A group's range [lo, hi] maps onto codes 0..2^b-1: scale = (hi - lo) / (2^b - 1),
   offset = lo, code = clip(round((w - offset) / scale)); w ~ code * scale + offset.
2. The range is the group's [min, max], or with a search (``passes/rtn.py``) the range
   shrunk about its midpoint by the alpha in CLIP_GRID with the least weighted squared error
   (alpha = 1 is in the grid, so it never does worse than min/max).
3. A constant group gets scale 1 and offset = its value: dequantizes exactly.
Scales and offsets are float32 and codes are computed against the float32 values stored.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.formats import FloatOffsetWeight
from lwqc.ir.spec import GroupSpec
from lwqc.passes.rtn import grouped, grouped_weights, search


class FloatOffset:
    """Unsigned codes with a float offset per group (``second`` = offsets)."""

    pad = "edge"

    def __init__(self, groups: np.ndarray, bits: int) -> None:
        self.qmax = 2**bits - 1
        self.lo, self.hi = groups.min(axis=2), groups.max(axis=2)

    def params(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        mid, half = (self.hi + self.lo) / 2, (self.hi - self.lo) / 2
        scales = (2 * alpha * half / self.qmax).astype(np.float32)
        offsets = (mid - alpha * half).astype(np.float32)
        scales[scales == 0] = 1.0
        return scales, offsets

    def codes(self, groups: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        shifted = groups - offsets.astype(np.float64)[..., None]
        shifted /= scales.astype(np.float64)[..., None]
        return np.clip(np.round(shifted), 0, self.qmax)

    @staticmethod
    def dequantize(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return (codes * scales.astype(np.float64)[..., None]
                + offsets.astype(np.float64)[..., None])


def pack_float_offset(spec: GroupSpec, codes: np.ndarray, scales: np.ndarray,
                      offsets: np.ndarray) -> FloatOffsetWeight:
    return FloatOffsetWeight(spec, codes.astype(np.uint8), scales, offsets)


def quantize_float_offset(weights: np.ndarray, spec: GroupSpec,
                          column_weights: np.ndarray | None = None) -> FloatOffsetWeight:
    """Quantize ``weights`` ``[out, in]`` to codes, float scales and float offsets."""
    groups = grouped(weights, spec, pad=FloatOffset.pad)
    rule = FloatOffset(groups, spec.bits)
    scales, offsets = search(rule, groups,
                             grouped_weights(column_weights, spec, weights.shape[1]))
    codes = rule.codes(groups, scales, offsets).reshape(weights.shape[0], -1)
    return pack_float_offset(spec, codes[:, : weights.shape[1]], scales, offsets)
