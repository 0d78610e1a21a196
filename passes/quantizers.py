"""The one table from a scheme to its quantizer, and outlier reservation for any of them.

``quantize_weight(weights, spec, clip, gram, gptq)``:
1. refuses non-2-D or non-finite weights and schemes without a quantizer;
2. a row-mix quantizes each part's rows as a sub-matrix by 3. to 6., the same Gram matrix
   for all (GPTQ's error feedback runs within a row);
3. with ``spec.outliers = f > 0``: the floor(f * size) weights farthest from the matrix mean
   are reserved (ties: lower flat index first) and set to the mean for the base quantizer;
4. ``clip`` chooses group ranges: ``minmax`` (the full range), ``mse`` (the least squared
   weight error of the shrink grid), ``output`` (the least output error of uncorrelated
   inputs: squared errors weighted by each input's mean square, the diagonal of the input
   Gram matrix ``gram``); codebooks have no range to choose;
5. quantizes with the scheme's quantizer, or with GPTQ (``passes/gptq.py``) when ``gptq``
   settings are given (needs ``gram``);
6. stores each reserved weight as its float16 residual over the dequantized base (a residual
   beyond the float16 range is refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from lwqc.ir.errors import NonFiniteWeightError, PlanError
from lwqc.ir.formats import RowMixWeight, SparseOutliers, WeightFormat
from lwqc.ir.formats.row_mix import row_order
from lwqc.ir.spec import QuantSpec, RowMixSpec
from lwqc.passes.float_offset import quantize_float_offset, quantize_float_offset_dq
from lwqc.passes.gptq import GptqSettings, gptq
from lwqc.passes.kmeans import quantize_codebook
from lwqc.passes.rtn import quantize_rtn

CLIP_MODES = ("mse", "minmax", "output")
# The quantizer the sensitivity analysis predicts for, and its policy plans for, unless told
# otherwise: float-offset groups with 6-bit scales and offsets, the best of lwqc's formats on
# SmolLM2-135M within 4.5 bits (bench/quality-smollm2.md); ONNX Runtime runs them on
# MatMulNBits (backends/offset_nbits.py). Groups of 32: offered 32, 64 and 128 to choose per
# site, the policy measured worse at 4.5 bits (ΔPPL +2.25 % against +2.08 %) and no better at
# 3.5 (KLD 0.332 against 0.331; bench/quality-smollm2-defaults.md).
SENSITIVITY_SCHEME = "float-offset-dq"
SENSITIVITY_GROUP_SIZES = (32,)


def quantizer_label(scheme: str, group_sizes: tuple[int, ...] | None) -> str:
    """The name of a scheme at its group sizes, e.g. ``float-offset-dq g32`` or
    ``float-offset-dq g32+64`` (per row: the scheme alone)."""
    return scheme if group_sizes is None else f"{scheme} g{'+'.join(map(str, group_sizes))}"

# A quantizer takes weights [out, in], the spec and per-input-column error weights (None:
# no range search).
Quantizer = Callable[[np.ndarray, QuantSpec, "np.ndarray | None"], WeightFormat]
QUANTIZERS: dict[str, Quantizer] = {
    "rtn-asym": quantize_rtn,
    "rtn-sym": quantize_rtn,
    "float-offset": quantize_float_offset,
    "float-offset-dq": quantize_float_offset_dq,
    "codebook": lambda weights, spec, column_weights: quantize_codebook(weights, spec),
}


def column_weights(clip: str, in_features: int, gram: np.ndarray | None) -> np.ndarray | None:
    """The per-input-column weights of a clip mode's error (None: no search)."""
    if clip == "minmax":
        return None
    if clip == "mse":
        return np.ones(in_features)
    if clip == "output":
        if gram is None:
            raise PlanError("clip=output needs the input Gram matrices of a calibration pass")
        return np.diag(gram).astype(np.float64)
    raise PlanError(f"unknown clip mode {clip!r} (modes: {', '.join(CLIP_MODES)})")


def reserved_positions(weights: np.ndarray, count: int) -> np.ndarray:
    """Flat indices (sorted) of the ``count`` weights farthest from the mean."""
    if count == 0:
        return np.zeros(0, np.int32)
    distance = np.abs(weights.astype(np.float64) - weights.mean(dtype=np.float64)).ravel()
    order = np.argsort(-distance, kind="stable")[:count]
    return np.sort(order).astype(np.int32)


def quantize_weight(weights: np.ndarray, spec: QuantSpec, clip: str = "mse",
                    gram: np.ndarray | None = None,
                    gptq_settings: GptqSettings | None = None) -> WeightFormat:
    """The packed weight of ``weights`` ``[out, in]`` under ``spec``."""
    if weights.ndim != 2:
        raise ValueError(f"expected a 2-D weight, got shape {weights.shape}")
    if not np.all(np.isfinite(weights)):
        raise NonFiniteWeightError("cannot quantize a weight holding NaN or Inf values")
    if isinstance(spec, RowMixSpec):  # each part's rows as a sub-matrix of the site
        if len(spec.rows) != weights.shape[0]:
            raise PlanError(f"row-mix assigns {len(spec.rows)} rows, the weight has "
                            f"{weights.shape[0]}")
        parts = tuple(quantize_weight(weights[rows], part, clip, gram, gptq_settings)
                      for part, rows in zip(spec.parts, spec.part_rows(), strict=True))
        return RowMixWeight(spec, parts, row_order(spec))
    quantizer = QUANTIZERS.get(spec.scheme)
    if quantizer is None:
        raise PlanError(f"no quantizer for scheme {spec.scheme!r} (schemes: "
                        f"{', '.join(QUANTIZERS)})")
    positions = reserved_positions(weights, SparseOutliers.count_for(weights.shape,
                                                                     spec.outliers))
    weighting = column_weights(clip, weights.shape[1], gram)
    if gptq_settings is not None:
        if gram is None:
            raise PlanError("GPTQ needs the input Gram matrices of a calibration pass")
        return _checked(gptq(weights, spec, gram, weighting, positions, gptq_settings))
    if len(positions) == 0:
        return quantizer(weights, spec, weighting)
    base_input = weights.copy()
    base_input.reshape(-1)[positions] = weights.mean(dtype=np.float64)
    base = quantizer(base_input, spec, weighting)
    residual = weights.reshape(-1)[positions] - base.dequantize().reshape(-1)[positions]
    return _checked(dataclasses.replace(
        base, outliers=SparseOutliers(positions, residual.astype(np.float16))))


def _checked(weight: WeightFormat) -> WeightFormat:
    """Refuse outlier residuals that float16 cannot hold."""
    if weight.outliers is not None and not np.all(np.isfinite(weight.outliers.values)):
        raise PlanError("an outlier lies beyond the float16 range of reserved values; "
                        "quantize this site without outliers")
    return weight
