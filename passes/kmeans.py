"""Per-column codebooks by 1-D k-means (CLAQ, arXiv 2405.17233), deterministic.

For each input column j of W ``[out, in]``:
1. Start the 2^b centroids at the column's quantiles (k + 1/2) / 2^b; a column with at most
   2^b distinct values starts at those values (and is then represented exactly).
2. Lloyd iterations: assign each weight to its nearest centroid, move each centroid to the
   mean of its weights (an empty centroid stays), until no assignment changes or
   ``iterations`` rounds; ties go to the lower centroid.
3. Centroids are stored as float16 and codes are assigned against the stored values.
A column with at most 2^b distinct values is represented exactly (up to float16).
With adaptive precision, the spec's share of columns holding the most outliers (|W[i, j]| >=
13 * mean |W|, CLAQ's rule; ties: larger max |W[:, j]| first, then lower index) get
2^high_bits centroids.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.formats import CodebookWeight
from lwqc.ir.formats.codebook import column_slots
from lwqc.ir.spec import CodebookSpec

CLAQ_FACTOR = 13.0
ITERATIONS = 30
CHUNK = 64  # columns per vectorised step: bounds the [out, chunk, K] distance array


def column_outlier_counts(weights: np.ndarray, factor: float = CLAQ_FACTOR) -> np.ndarray:
    """Per input column j, the number of rows i with |W[i, j]| >= factor * mean |W|."""
    magnitude = np.abs(weights)
    threshold = factor * magnitude.mean(dtype=np.float64)
    if threshold == 0.0:  # an all-zero matrix has no outliers
        return np.zeros(magnitude.shape[1], dtype=np.int64)
    return np.count_nonzero(magnitude >= threshold, axis=0)


def high_columns(weights: np.ndarray, spec: CodebookSpec) -> np.ndarray:
    """The columns given 2^high_bits centroids, ascending."""
    count = spec.high_count(weights.shape[1])
    if count == 0:
        return np.zeros(0, np.int64)
    counts = column_outlier_counts(weights)
    peaks = np.abs(weights.astype(np.float64)).max(axis=0)
    order = np.lexsort((np.arange(weights.shape[1]), -peaks, -counts))
    return np.sort(order[:count])


def nearest(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid per value: ``values [out, c]``, ``centroids [c, K]``."""
    distance = np.abs(values[:, :, None] - centroids[None, :, :])
    return distance.argmin(axis=2)


def _initial(values: np.ndarray, levels: int) -> np.ndarray:
    """Starting centroids ``[c, K]``: quantiles, or the distinct values where they fit."""
    quantiles = (np.arange(levels) + 0.5) / levels
    centroids = np.quantile(values, quantiles, axis=0).T.copy()
    ordered = np.sort(values, axis=0)
    distinct = 1 + np.count_nonzero(np.diff(ordered, axis=0), axis=0)
    for column in np.flatnonzero(distinct <= levels):
        unique = np.unique(ordered[:, column])
        centroids[column] = np.concatenate([unique, np.full(levels - len(unique), unique[-1])])
    return centroids


def lloyd(values: np.ndarray, levels: int, iterations: int) -> np.ndarray:
    """Centroids ``[c, K]`` of each column of ``values [out, c]``."""
    centroids = _initial(values, levels)
    assignment = None
    columns = np.arange(values.shape[1])[None, :]
    for _ in range(iterations):
        new = nearest(values, centroids)
        if assignment is not None and np.array_equal(new, assignment):
            break
        assignment = new
        sums = np.zeros_like(centroids)
        counts = np.zeros(centroids.shape)
        np.add.at(sums, (np.broadcast_to(columns, new.shape), new), values)
        np.add.at(counts, (np.broadcast_to(columns, new.shape), new), 1)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled]
    return centroids


def quantize_codebook(weights: np.ndarray, spec: CodebookSpec,
                      iterations: int = ITERATIONS) -> CodebookWeight:
    """Quantize ``weights`` ``[out, in]`` to per-column codebooks (adaptive precision when the
    spec has high columns)."""
    w = weights.astype(np.float64)
    high = high_columns(weights, spec)
    widest = spec.high_bits if len(high) else spec.bits
    codebooks = np.zeros((w.shape[1], 2**widest), np.float16)
    codes = np.zeros(w.shape, np.uint8)
    low = np.setdiff1d(np.arange(w.shape[1]), high)
    for columns, bits in ((low, spec.bits), (high, spec.high_bits)):
        for start in range(0, len(columns), CHUNK):
            chunk = columns[start : start + CHUNK]
            stored = lloyd(w[:, chunk], 2**bits, iterations).astype(np.float16)
            stored.sort(axis=1)
            codebooks[chunk, : 2**bits] = stored
            codes[:, chunk] = nearest(w[:, chunk], stored.astype(np.float64))
    slots = column_slots(high, w.shape[1]) if len(high) else None
    return CodebookWeight(spec, codes, codebooks, slots)
