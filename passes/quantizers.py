"""The one table from a scheme to its quantizer, and outlier reservation for any of them.

``quantize_weight(weights, spec, clip)``:
1. refuses non-2-D or non-finite weights and schemes without a quantizer;
2. with ``spec.outliers = f > 0``: the floor(f * size) weights farthest from the matrix mean
   are reserved (ties: lower flat index first) and set to the mean for the base quantizer;
3. quantizes with the scheme's quantizer (``clip`` = ``mse`` or ``minmax`` where the scheme
   has a range to choose);
4. stores each reserved weight as its float16 residual over the dequantized base (a residual
   beyond the float16 range is refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lwqc.ir.errors import NonFiniteWeightError, PlanError
from lwqc.ir.formats import SparseOutliers, WeightFormat
from lwqc.ir.spec import QuantSpec
from lwqc.passes.float_offset import quantize_float_offset
from lwqc.passes.kmeans import quantize_codebook
from lwqc.passes.rtn import quantize_rtn

CLIP_MODES = ("mse", "minmax")

Quantizer = Callable[[np.ndarray, QuantSpec, bool], WeightFormat]
QUANTIZERS: dict[str, Quantizer] = {
    "rtn-asym": quantize_rtn,
    "rtn-sym": quantize_rtn,
    "float-offset": quantize_float_offset,
    "codebook": lambda weights, spec, clip_search: quantize_codebook(weights, spec),
}


def reserved_positions(weights: np.ndarray, count: int) -> np.ndarray:
    """Flat indices (sorted) of the ``count`` weights farthest from the mean."""
    if count == 0:
        return np.zeros(0, np.int32)
    distance = np.abs(weights.astype(np.float64) - weights.mean(dtype=np.float64)).ravel()
    order = np.argsort(-distance, kind="stable")[:count]
    return np.sort(order).astype(np.int32)


def quantize_weight(weights: np.ndarray, spec: QuantSpec, clip: str = "mse") -> WeightFormat:
    """The packed weight of ``weights`` ``[out, in]`` under ``spec``."""
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)):
        raise NonFiniteWeightError("cannot quantize a weight holding NaN or Inf values")
    quantizer = QUANTIZERS.get(spec.scheme)
    if quantizer is None:
        raise PlanError(f"no quantizer for scheme {spec.scheme!r} (schemes: "
                        f"{', '.join(QUANTIZERS)})")
    positions = reserved_positions(weights, SparseOutliers.count_for(weights.shape,
                                                                     spec.outliers))
    if len(positions) == 0:
        return quantizer(weights, spec, clip == "mse")
    base_input = weights.copy()
    base_input.reshape(-1)[positions] = weights.mean(dtype=np.float64)
    base = quantizer(base_input, spec, clip == "mse")
    residual = weights.reshape(-1)[positions] - base.dequantize().reshape(-1)[positions]
    if np.abs(residual).max() > np.finfo(np.float16).max:
        raise PlanError("an outlier lies beyond the float16 range of reserved values; "
                        "quantize this site without outliers")
    return dataclasses.replace(base, outliers=SparseOutliers(positions,
                                                             residual.astype(np.float16)))
