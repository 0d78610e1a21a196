"""GPTQ (arXiv 2210.17323): quantize column by column, feeding each column's error forward.

For one site with weights W ``[out, in]`` and input Gram matrix G (the Hessian H = 2 G up to
a scale, which nothing below depends on):
1. Dead inputs (G[j, j] = 0) get W[:, j] = 0 and H[j, j] = 1.
2. With act-order, columns are processed by descending H[j, j].
3. H += damp * mean(diag H) * I; U = the upper Cholesky factor of H^-1.
4. For each column j in order (in blocks of ``block`` columns, later blocks updated lazily):
   q_j = Q(w_j), err = (w_j - q_j) / U[j, j], and the not yet processed columns of the block
   get W[:, k] -= err * U[j, k].
5. Q: affine or float-offset groups take their scale and zero point (or offset) when the
   first of their columns is reached, from the current (updated) weights of the whole group,
   by the same rule and range search as round-to-nearest; storage keeps contiguous groups
   whatever the processing order. ``float-offset-dq`` fixes its parameter steps from the
   original weights first (reserved outliers at the fill value), then snaps each group's.
   Codebooks fit each column's k-means codebook to its current values (CLAQ runs inside GPTQ
   this way, arXiv 2405.17233).
6. Reserved outliers are exact: their error is zero, and the value stored is the weight as
   updated when its column was processed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import scipy.linalg

from lwqc.ir.formats import CodebookWeight, SparseOutliers, WeightFormat
from lwqc.ir.formats.codebook import column_slots
from lwqc.ir.spec import CodebookSpec, FloatOffsetDqSpec, GroupSpec, QuantSpec
from lwqc.passes.float_offset import DqParameters, FloatOffset, pack_float_offset
from lwqc.passes.kmeans import ITERATIONS, high_columns, lloyd, nearest
from lwqc.passes.rtn import Asymmetric, Symmetric, grouped, pack_affine, search

Current = Callable[[np.ndarray], np.ndarray]  # original column indices -> current [out, n]


@dataclasses.dataclass(frozen=True)
class GptqSettings:
    damp: float = 0.01
    act_order: bool = True
    block: int = 128


class _GroupColumns:
    """Columns quantized with per-group parameters fixed at the group's first column."""

    RULES = {"rtn-asym": (Asymmetric, pack_affine), "rtn-sym": (Symmetric, pack_affine),
             "float-offset": (FloatOffset, pack_float_offset)}

    def __init__(self, spec: GroupSpec, weights: np.ndarray,
                 column_weights: np.ndarray | None) -> None:
        shape = weights.shape
        self.spec, self.shape = spec, shape
        if isinstance(spec, FloatOffsetDqSpec):  # parameter steps from the original weights
            parameters = DqParameters(grouped(weights, spec, FloatOffset.pad), spec.bits)
            self.pad, self.pack = FloatOffset.pad, parameters.pack
            self.make_rule = lambda values, group: parameters.rule(values, spec.bits, group)
        else:
            rule_class, self.pack = self.RULES[spec.scheme]
            self.pad = rule_class.pad
            self.make_rule = lambda values, group: rule_class(values, spec.bits)
        self.width = spec.block(shape[1])
        self.column_weights = column_weights
        groups = spec.groups(shape[1])
        self.scales = np.zeros((shape[0], groups), np.float32)
        self.second = np.zeros((shape[0], groups))
        self.rules: dict[int, object] = {}
        self.codes = np.zeros(shape)

    def quantize(self, column: int, w: np.ndarray, current: Current) -> np.ndarray:
        group = column // self.width
        if group not in self.rules:
            columns = np.arange(group * self.width, min((group + 1) * self.width, self.shape[1]))
            values = current(columns)
            mode = {"zero": "constant", "edge": "edge"}[self.pad]
            padded = np.pad(values, ((0, 0), (0, self.width - len(columns))), mode=mode)
            rule = self.make_rule(padded[:, None, :], group)
            weights = None
            if self.column_weights is not None:
                weights = np.zeros(self.width)
                weights[: len(columns)] = self.column_weights[columns]
                weights = weights[None, None, :]
            scales, second = search(rule, padded[:, None, :], weights)
            self.rules[group] = rule
            self.scales[:, group], self.second[:, group] = scales[:, 0], second[:, 0]
        rule = self.rules[group]
        scales, second = self.scales[:, group : group + 1], self.second[:, group : group + 1]
        codes = rule.codes(w[:, None, None], scales, second)
        self.codes[:, column] = codes[:, 0, 0]
        return rule.dequantize(codes, scales, second)[:, 0, 0]

    def result(self) -> WeightFormat:
        return self.pack(self.spec, self.codes, self.scales, self.second.astype(np.float32))


class _CodebookColumns:
    """Each column's codebook fitted to its current values when it is reached (high columns,
    chosen from the original weights, get 2^high_bits centroids)."""

    def __init__(self, spec: CodebookSpec, weights: np.ndarray) -> None:
        self.spec = spec
        self.high = high_columns(weights, spec)
        widest = spec.high_bits if len(self.high) else spec.bits
        self.codebooks = np.zeros((weights.shape[1], 2**widest), np.float16)
        self.codes = np.zeros(weights.shape, np.uint8)

    def quantize(self, column: int, w: np.ndarray, current: Current) -> np.ndarray:
        bits = self.spec.high_bits if column in self.high else self.spec.bits
        values = current(np.array([column]))
        centroids = lloyd(values, 2**bits, ITERATIONS).astype(np.float16)
        centroids.sort(axis=1)
        stored = centroids.astype(np.float64)
        codes = nearest(w[:, None], stored)[:, 0]
        self.codebooks[column, : 2**bits], self.codes[:, column] = centroids[0], codes
        return stored[0, codes]

    def result(self) -> WeightFormat:
        slots = column_slots(self.high, self.codes.shape[1]) if len(self.high) else None
        return CodebookWeight(self.spec, self.codes, self.codebooks, slots)


def _inverse_cholesky(hessian: np.ndarray) -> np.ndarray:
    """The upper Cholesky factor of ``hessian``'s inverse."""
    factor = scipy.linalg.cho_factor(hessian, lower=True)
    inverse = scipy.linalg.cho_solve(factor, np.eye(len(hessian)))
    return scipy.linalg.cholesky(inverse, lower=False)


def gptq(weights: np.ndarray, spec: QuantSpec, gram: np.ndarray,
         column_weights: np.ndarray | None, reserved: np.ndarray,
         settings: GptqSettings = GptqSettings()) -> WeightFormat:
    """GPTQ of ``weights`` ``[out, in]`` under ``spec`` with input Gram matrix ``gram``;
    ``reserved`` flat positions are kept exact as sparse outliers."""
    out_features, in_features = weights.shape
    w = weights.astype(np.float64).copy()
    hessian = gram.astype(np.float64).copy()
    dead = np.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    w[:, dead] = 0.0
    if settings.act_order:
        order = np.argsort(-np.diag(hessian), kind="stable")
    else:
        order = np.arange(in_features)
    position = np.empty_like(order)
    position[order] = np.arange(in_features)
    hessian = hessian[np.ix_(order, order)]
    hessian[np.diag_indices(in_features)] += settings.damp * np.mean(np.diag(hessian))
    upper = _inverse_cholesky(hessian)
    fill = weights.mean(dtype=np.float64)
    is_reserved = np.zeros(weights.shape, bool)
    is_reserved.reshape(-1)[reserved] = True
    work = w[:, order]  # columns in processing order, updated as GPTQ goes
    targets = np.zeros(weights.shape)

    def current(columns: np.ndarray) -> np.ndarray:
        values = work[:, position[columns]].copy()
        values[is_reserved[:, columns]] = fill
        return values

    initial = w.copy()
    initial[is_reserved] = fill
    columns = (_CodebookColumns(spec, weights) if isinstance(spec, CodebookSpec)
               else _GroupColumns(spec, initial, column_weights))
    for start in range(0, in_features, settings.block):
        stop = min(start + settings.block, in_features)
        errors = np.zeros((out_features, stop - start))
        for i in range(start, stop):
            column = order[i]
            value = work[:, i]
            exact = is_reserved[:, column]
            quantized = columns.quantize(column, np.where(exact, fill, value), current)
            quantized[exact] = value[exact]
            targets[exact, column] = value[exact]
            error = (value - quantized) / upper[i, i]
            work[:, i + 1 : stop] -= np.outer(error, upper[i, i + 1 : stop])
            errors[:, i - start] = error
        work[:, stop:] -= errors @ upper[start:stop, stop:]
    base = columns.result()
    if len(reserved) == 0:
        return base
    residual = targets.reshape(-1)[reserved] - base.dequantize().reshape(-1)[reserved]
    return dataclasses.replace(base, outliers=SparseOutliers(reserved,
                                                             residual.astype(np.float16)))
