"""Round-to-nearest groups with a float scale and a float offset (GGUF Q4_1, HQQ's format).

Groups run along the input dimension of W ``[out, in]``.
1. A group's range [lo, hi] maps onto codes 0..2^b-1: scale = (hi - lo) / (2^b - 1),
   offset = lo, code = clip(round((w - offset) / scale)); w ~ code * scale + offset.
2. The range is the group's [min, max], or with ``clip_search`` the range shrunk about its
   midpoint by alpha in CLIP_GRID whose dequantized group has the least squared error
   (alpha = 1 is in the grid, so it never does worse than min/max).
3. A constant group gets scale 1 and offset = its value: dequantizes exactly.
Scales and offsets are float32 and codes are computed against the float32 values stored.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.formats import FloatOffsetWeight
from lwqc.ir.spec import GroupSpec
from lwqc.passes.rtn import CLIP_GRID, grouped


def _params(lo: np.ndarray, hi: np.ndarray, qmax: int, alpha: float):
    mid, half = (hi + lo) / 2, (hi - lo) / 2
    scales = (2 * alpha * half / qmax).astype(np.float32)
    offsets = (mid - alpha * half).astype(np.float32)
    scales[scales == 0] = 1.0
    return scales, offsets


def _codes(groups: np.ndarray, scales: np.ndarray, offsets: np.ndarray, qmax: int) -> np.ndarray:
    shifted = groups - offsets.astype(np.float64)[..., None]
    shifted /= scales.astype(np.float64)[..., None]
    return np.clip(np.round(shifted), 0, qmax)


def _dequantized(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return codes * scales.astype(np.float64)[..., None] + offsets.astype(np.float64)[..., None]


def quantize_float_offset(
    weights: np.ndarray, spec: GroupSpec, clip_search: bool = False
) -> FloatOffsetWeight:
    """Quantize ``weights`` ``[out, in]`` to codes, float scales and float offsets."""
    qmax = 2**spec.bits - 1
    groups = grouped(weights, spec, pad="edge")
    lo, hi = groups.min(axis=2), groups.max(axis=2)
    scales, offsets = _params(lo, hi, qmax, 1.0)
    if clip_search:
        best = np.full(scales.shape, np.inf)
        for alpha in CLIP_GRID:
            trial_scales, trial_offsets = _params(lo, hi, qmax, alpha)
            codes = _codes(groups, trial_scales, trial_offsets, qmax)
            error = ((_dequantized(codes, trial_scales, trial_offsets) - groups) ** 2).sum(2)
            better = error < best
            best[better] = error[better]
            scales[better], offsets[better] = trial_scales[better], trial_offsets[better]
    codes = _codes(groups, scales, offsets, qmax).reshape(weights.shape[0], -1)
    return FloatOffsetWeight(spec, codes[:, : weights.shape[1]].astype(np.uint8), scales, offsets)
