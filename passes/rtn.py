"""Round-to-nearest group-wise quantization: the numerics behind every PackedWeight.

Groups run along the input dimension of W ``[out, in]`` (the last group may be short).
1. ``rtn-asym``: the group's range [min(w_min, 0), max(w_max, 0)] (zero is always exact)
   maps onto codes 0..2^b-1: scale = range / (2^b - 1), zero point = round(-lo / scale),
   code = clip(round(w / scale) + zero point).
2. ``rtn-sym``: scale = max |w| / (2^(b-1) - 1), code = clip(round(w / scale)), signed.
3. A group of zeros gets scale 1 (its codes, and zero point, are 0): dequantizes exactly.
Scales are float32 and codes are computed against the float32 scale actually stored.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.errors import NonFiniteWeightError
from lwqc.ir.packed import QUANT_WIDTHS, SCHEMES, PackedWeight, n_groups


def _grouped(weights: np.ndarray, group_size: int) -> np.ndarray:
    """``[out, groups, group_size]`` view of W, the short last group padded with zeros.

    Zero padding changes no group statistic used here: every range already includes zero.
    """
    out_features, in_features = weights.shape
    padded = n_groups(in_features, group_size) * group_size
    w = np.zeros((out_features, padded), dtype=np.float64)
    w[:, :in_features] = weights
    return w.reshape(out_features, -1, group_size)


def quantize_rtn(weights: np.ndarray, bits: int, group_size: int, scheme: str) -> PackedWeight:
    """Quantize ``weights`` ``[out, in]`` to ``bits`` with groups of ``group_size`` inputs."""
    if bits not in QUANT_WIDTHS:
        raise ValueError(f"RTN widths are {QUANT_WIDTHS}, got {bits}")
    if scheme not in SCHEMES:
        raise ValueError(f"RTN schemes are {SCHEMES}, got {scheme!r}")
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)):
        raise NonFiniteWeightError("cannot quantize a weight holding NaN or Inf values")
    in_features = weights.shape[1]
    groups = _grouped(weights, group_size)
    if scheme == "rtn-asym":
        qmax = 2**bits - 1
        lo = np.minimum(groups.min(axis=2), 0.0)
        hi = np.maximum(groups.max(axis=2), 0.0)
        scales = ((hi - lo) / qmax).astype(np.float32)
        scales[scales == 0] = 1.0
        scale64 = scales.astype(np.float64)
        zero_points = np.clip(np.round(-lo / scale64), 0, qmax)
        codes = np.clip(np.round(groups / scale64[..., None]) + zero_points[..., None], 0, qmax)
        codes_dtype, zeros = np.uint8, zero_points.astype(np.uint8)
    else:
        qmax = 2 ** (bits - 1) - 1
        scales = (np.abs(groups).max(axis=2) / qmax).astype(np.float32)
        scales[scales == 0] = 1.0
        codes = np.clip(np.round(groups / scales.astype(np.float64)[..., None]), -qmax - 1, qmax)
        codes_dtype, zeros = np.int8, None
    codes = codes.reshape(weights.shape[0], -1)[:, :in_features].astype(codes_dtype)
    return PackedWeight(bits, group_size, scheme, codes, scales, zeros)
