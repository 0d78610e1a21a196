"""Per-column codebooks by 1-D k-means (CLAQ, arXiv 2405.17233), deterministic.

For each input column j of W ``[out, in]``:
1. Start the 2^b centroids at the column's quantiles (k + 1/2) / 2^b; a column with at most
   2^b distinct values starts at those values (and is then represented exactly).
2. Lloyd iterations: assign each weight to its nearest centroid, move each centroid to the
   mean of its weights (an empty centroid stays), until no assignment changes or
   ``iterations`` rounds; ties go to the lower centroid.
3. Centroids are stored as float16 and codes are assigned against the stored values.
A column with at most 2^b distinct values is represented exactly (up to float16).
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.formats import CodebookWeight
from lwqc.ir.spec import CodebookSpec

ITERATIONS = 30
CHUNK = 64  # columns per vectorised step: bounds the [out, chunk, K] distance array


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
    """Quantize ``weights`` ``[out, in]`` to per-column codebooks of 2^bits centroids."""
    levels = 2**spec.bits
    w = weights.astype(np.float64)
    codebooks = np.zeros((w.shape[1], levels), np.float16)
    codes = np.zeros(w.shape, np.uint8)
    for start in range(0, w.shape[1], CHUNK):
        chunk = w[:, start : start + CHUNK]
        stored = lloyd(chunk, levels, iterations).astype(np.float16)
        stored.sort(axis=1)
        codebooks[start : start + CHUNK] = stored
        codes[:, start : start + CHUNK] = nearest(chunk, stored.astype(np.float64))
    return CodebookWeight(spec, codes, codebooks)
