"""Round-to-nearest group-wise quantization: the numerics behind every PackedWeight.

Groups run along the input dimension of W ``[out, in]`` (the last group may be short).
1. ``rtn-asym``: a range [lo, hi] with lo <= 0 <= hi (zero is always exact) maps onto codes
   0..2^b-1: scale = (hi - lo) / (2^b - 1), zero point = round(-lo / scale),
   code = clip(round(w / scale) + zero point).
2. ``rtn-sym``: a bound a >= 0 maps onto signed codes: scale = a / (2^(b-1) - 1),
   code = clip(round(w / scale)).
3. The range is the group's own [min(w_min, 0), max(w_max, 0)] (resp. max |w|), or with
   ``clip_search`` the shrunk range alpha * [lo, hi], alpha in CLIP_GRID, whose dequantized
   group has the least squared error (the grid includes alpha = 1, so it never does worse).
4. A group of zeros gets scale 1 (its codes, and zero point, are 0): dequantizes exactly.
Scales are float32 and codes are computed against the float32 scale actually stored.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.errors import NonFiniteWeightError
from lwqc.ir.packed import QUANT_WIDTHS, SCHEMES, PackedWeight, n_groups

CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0, 0.975, ..., 0.5


def _grouped(weights: np.ndarray, group_size: int) -> np.ndarray:
    """``[out, groups, group_size]`` view of W, the short last group padded with zeros.

    Zero padding changes no group statistic used here (every range includes zero) and adds
    no error (zero is exact).
    """
    out_features, in_features = weights.shape
    padded = n_groups(in_features, group_size) * group_size
    w = np.zeros((out_features, padded), dtype=np.float64)
    w[:, :in_features] = weights
    return w.reshape(out_features, -1, group_size)


class _Asymmetric:
    def __init__(self, groups: np.ndarray, bits: int) -> None:
        self.qmax = 2**bits - 1
        self.lo = np.minimum(groups.min(axis=2), 0.0)
        self.hi = np.maximum(groups.max(axis=2), 0.0)

    def params(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        scales = (alpha * (self.hi - self.lo) / self.qmax).astype(np.float32)
        scales[scales == 0] = 1.0
        zeros = np.clip(np.round(-alpha * self.lo / scales), 0, self.qmax)
        return scales, zeros

    def codes(self, groups: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        shifted = np.round(groups / scales.astype(np.float64)[..., None]) + zeros[..., None]
        return np.clip(shifted, 0, self.qmax)

    @staticmethod
    def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        return (codes - zeros[..., None]) * scales.astype(np.float64)[..., None]


class _Symmetric:
    def __init__(self, groups: np.ndarray, bits: int) -> None:
        self.qmax = 2 ** (bits - 1) - 1
        self.bound = np.abs(groups).max(axis=2)

    def params(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        scales = (alpha * self.bound / self.qmax).astype(np.float32)
        scales[scales == 0] = 1.0
        return scales, np.zeros(scales.shape)

    def codes(self, groups: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        scaled = np.round(groups / scales.astype(np.float64)[..., None])
        return np.clip(scaled, -self.qmax - 1, self.qmax)

    dequantize = staticmethod(_Asymmetric.dequantize)


def quantize_rtn(
    weights: np.ndarray, bits: int, group_size: int, scheme: str, clip_search: bool = False
) -> PackedWeight:
    """Quantize ``weights`` ``[out, in]`` to ``bits`` with groups of ``group_size`` inputs."""
    if bits not in QUANT_WIDTHS:
        raise ValueError(f"RTN widths are {QUANT_WIDTHS}, got {bits}")
    if scheme not in SCHEMES:
        raise ValueError(f"RTN schemes are {SCHEMES}, got {scheme!r}")
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)):
        raise NonFiniteWeightError("cannot quantize a weight holding NaN or Inf values")
    groups = _grouped(weights, group_size)
    rule = _Asymmetric(groups, bits) if scheme == "rtn-asym" else _Symmetric(groups, bits)
    scales, zeros = rule.params(1.0)
    if clip_search:
        best = np.full(scales.shape, np.inf)
        for alpha in CLIP_GRID:
            trial_scales, trial_zeros = rule.params(alpha)
            codes = rule.codes(groups, trial_scales, trial_zeros)
            error = ((rule.dequantize(codes, trial_scales, trial_zeros) - groups) ** 2).sum(2)
            better = error < best
            best[better] = error[better]
            scales[better], zeros[better] = trial_scales[better], trial_zeros[better]
    codes = rule.codes(groups, scales, zeros).reshape(weights.shape[0], -1)
    codes = codes[:, : weights.shape[1]]
    if scheme == "rtn-asym":
        return PackedWeight(bits, group_size, scheme, codes.astype(np.uint8), scales,
                            zeros.astype(np.uint8))
    return PackedWeight(bits, group_size, scheme, codes.astype(np.int8), scales, None)
