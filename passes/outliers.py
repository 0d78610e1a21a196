"""Outlier statistics per matmul, for CLAQ's adaptive precision (arXiv 2405.17233).

1. m = mean |W| over the matrix; an outlier is an entry with |W[i, j]| >= factor * m
   (factor 13 in CLAQ); a column W[:, j] counts once per outlier it holds.
2. Per matmul: columns holding an outlier, outlier entries, max |W|, std, and the (Pearson)
   kurtosis E[(W - mean)^4] / std^4 (3 for Gaussian weights).
3. Per block: the same over the block's weights pooled, outlier counts summed.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lwqc.ir.annotations import Annotation
from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.passes.base import Option, Pass, PassContext, PassKind
from lwqc.passes.kmeans import CLAQ_FACTOR, column_outlier_counts


def kurtosis(weights: np.ndarray) -> float:
    """Pearson kurtosis of the entries (0 for a constant matrix); float32 arithmetic with
    float64 sums."""
    w = np.asarray(weights).ravel()
    if np.ptp(w) == 0.0:
        return 0.0
    squared = w - w.dtype.type(w.mean(dtype=np.float64))
    np.square(squared, out=squared)
    variance = squared.mean(dtype=np.float64)
    return float(np.square(squared).mean(dtype=np.float64) / variance**2)


@dataclasses.dataclass(frozen=True)
class OutlierStat(Annotation):
    key = "outliers"
    outlier_columns: int
    outlier_weights: int
    max_abs: float
    std: float
    kurtosis: float


def outlier_stat(source: str, weights: np.ndarray, factor: float) -> OutlierStat:
    counts = column_outlier_counts(weights, factor)
    return OutlierStat(
        source=source,
        outlier_columns=int(np.count_nonzero(counts)),
        outlier_weights=int(counts.sum()),
        max_abs=float(np.abs(weights).max()),
        std=float(np.std(weights, dtype=np.float64)),
        kurtosis=kurtosis(weights),
    )


class OutliersPass(Pass):
    """Annotate every site and block with outlier counts, max |W|, std and kurtosis."""

    name = "outliers"
    kind = PassKind.ANALYSIS
    provides = ("site.outliers", "block.outliers")
    options = {"factor": Option(float, CLAQ_FACTOR, "outlier threshold in units of mean |W|")}

    def validate(self) -> None:
        if self.values["factor"] <= 0:
            raise PipelineError("outliers: factor must be positive")

    def run(self, graph: Graph, context: PassContext) -> None:
        factor = self.values["factor"]
        for site in context.progress(graph, total=len(graph.sites), desc=self.name):
            graph.annotate_site(site.id, outlier_stat(self.name, graph.weight(site.id), factor))
        for block in graph.blocks:
            site_stats = [graph.sites[s].stats["outliers"] for s in block.sites]
            pooled = np.concatenate([graph.weight(s).ravel() for s in block.sites])
            graph.annotate_block(
                block.index,
                OutlierStat(
                    source=self.name,
                    outlier_columns=sum(s.outlier_columns for s in site_stats),
                    outlier_weights=sum(s.outlier_weights for s in site_stats),
                    max_abs=float(np.abs(pooled).max()),
                    std=float(np.std(pooled, dtype=np.float64)),
                    kurtosis=kurtosis(pooled),
                ),
            )
