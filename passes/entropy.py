"""EWQ entropy of weight matrices (arXiv 2503.04704).

1. Softmax entropy (default): p = softmax(flatten(W)), H = -sum p log p, computed in float64
   with the max subtracted as H = log Z - sum(e * x) / Z, x = W - max W, e = exp(x), Z = sum e.
   Block differences are ~1e-4 nats on top of ln n, so the precision matters.
2. Histogram entropy (``method=histogram``, a different score some re-implementations use):
   entropy of the 256-bin histogram of W's values.
3. Block entropy = parameter-weighted mean of its matmuls' H.
4. Importance = H - H_max (H_max = ln n, or ln bins): how close W is to a uniform
   distribution, comparable across matrices of different sizes; higher = keep more bits.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from lwqc.ir.annotations import Annotation
from lwqc.ir.graph import Graph
from lwqc.passes.base import Option, Pass, PassContext, PassKind, choice

HISTOGRAM_BINS = 256


def softmax_entropy(weights: np.ndarray) -> float:
    """Entropy in nats of softmax over all entries of ``weights``."""
    x = np.asarray(weights, dtype=np.float64).ravel()
    x = x - x.max()
    e = np.exp(x)
    z = e.sum()
    return float(math.log(z) - np.dot(e, x) / z)


def histogram_entropy(weights: np.ndarray, bins: int = HISTOGRAM_BINS) -> float:
    """Entropy in nats of the ``bins``-bin histogram of the entries of ``weights``."""
    counts, _ = np.histogram(np.asarray(weights, dtype=np.float64).ravel(), bins=bins)
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log(p)))


@dataclasses.dataclass(frozen=True)
class EntropyStat(Annotation):
    key = "entropy"
    entropy: float
    max_entropy: float
    method: str

    def importance(self) -> float:
        return self.entropy - self.max_entropy


class EntropyPass(Pass):
    """Annotate every site and block with its EWQ entropy."""

    name = "entropy"
    kind = PassKind.ANALYSIS
    provides = ("site.entropy", "block.entropy")
    options = {
        "method": Option(choice("softmax", "histogram"), "softmax", "entropy estimator"),
    }

    def run(self, graph: Graph, context: PassContext) -> None:
        method = self.values["method"]
        for site in context.progress(graph, total=len(graph.sites), desc=self.name):
            weight = graph.weight(site.id)
            if method == "softmax":
                value, ceiling = softmax_entropy(weight), math.log(weight.size)
            else:
                value, ceiling = histogram_entropy(weight), math.log(HISTOGRAM_BINS)
            graph.annotate_site(site.id, EntropyStat(self.name, value, ceiling, method))
        for block in graph.blocks:
            stats = [graph.sites[s].stats["entropy"] for s in block.sites]
            params = np.array([graph.sites[s].params for s in block.sites], dtype=np.float64)
            value = float(np.dot(params, [s.entropy for s in stats]) / params.sum())
            ceiling = float(np.dot(params, [s.max_entropy for s in stats]) / params.sum())
            graph.annotate_block(block.index, EntropyStat(self.name, value, ceiling, method))
