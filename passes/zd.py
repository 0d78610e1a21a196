"""ZD, the z-score distribution score (arXiv 2406.17415), data-free.

1. For a weight W: z = (W - mean W) / std W; ZD(W) = fraction of entries with |z| > 1.
2. Block ZD = mean of its matmuls' ZD (``block=mean``, the paper's reading) or ZD of the
   block's weights pooled into one population (``block=pooled``).
3. Smaller ZD = more important; Gaussian weights give ZD ~ 0.317.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from lwqc.ir.annotations import Annotation
from lwqc.ir.graph import Graph
from lwqc.passes.base import Option, Pass, PassContext, PassKind, choice


def zscore_fraction(weights: np.ndarray) -> float:
    """Fraction of entries more than one standard deviation from the mean (0 if constant)."""
    w = np.asarray(weights, dtype=np.float64).ravel()
    std = w.std()
    if std == 0.0:
        return 0.0
    return float(np.count_nonzero(np.abs(w - w.mean()) > std) / w.size)


@dataclasses.dataclass(frozen=True)
class ZDStat(Annotation):
    key = "zd"
    zd: float

    def importance(self) -> float:
        return -self.zd


class ZDPass(Pass):
    """Annotate every site and block with its ZD score."""

    name = "zd"
    kind = PassKind.ANALYSIS
    provides = ("site.zd", "block.zd")
    options = {"block": Option(choice("mean", "pooled"), "mean", "block aggregate")}

    def run(self, graph: Graph, context: PassContext) -> None:
        for site in context.progress(graph, total=len(graph.sites), desc=self.name):
            graph.annotate_site(site.id, ZDStat(self.name, zscore_fraction(graph.weight(site.id))))
        for block in graph.blocks:
            if self.values["block"] == "pooled":
                pooled = np.concatenate([graph.weight(s).ravel() for s in block.sites])
                value = zscore_fraction(pooled)
            else:
                value = float(np.mean([graph.sites[s].stats["zd"].zd for s in block.sites]))
            graph.annotate_block(block.index, ZDStat(self.name, value))
