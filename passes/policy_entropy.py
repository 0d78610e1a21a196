"""Entropy policy, EWQ (arXiv 2503.04704).

1. With a budget (``bits=`` or ``ratio=``): units ranked by entropy, higher = more bits.
2. Without one, EWQ's threshold rule over the units' entropies (mean mu, std sigma; blocks
   unless ``granularity=matmul``):
   H < mu - k*sigma -> ``lo`` (4 bits); up to mu + k*sigma -> ``hi`` (8 bits); above -> kept
   float. ``k`` defaults to 0.65.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.graph import Graph
from lwqc.ir.spec import KEEP_BITS
from lwqc.passes.base import Option
from lwqc.passes.budget import BUDGET_OPTIONS
from lwqc.passes.policy import PolicyPass
from lwqc.passes.solver import Unit


class EntropyPolicy(PolicyPass):
    name = "policy-entropy"
    score_key = "entropy"
    options = {**BUDGET_OPTIONS, "k": Option(float, 0.65, "threshold width in std units")}

    def rule(self, graph: Graph, units: list[Unit], importance: list[float]) -> list[int]:
        scores = np.asarray(importance)
        mu, sigma, k = scores.mean(), scores.std(), self.values["k"]
        lo, hi = self.rule_widths
        return [
            lo if h < mu - k * sigma else hi if h <= mu + k * sigma else KEEP_BITS
            for h in scores
        ]

    def default_granularity(self) -> str:
        """EWQ's rule ranks blocks; with a budget, each matmul is its own unit."""
        budget = self.values["bits"] is not None or self.values["ratio"] is not None
        return "matmul" if budget else "layer"

    def rule_notes(self) -> list[str]:
        k = self.values["k"]
        return [f"EWQ threshold rule: H < mu-{k:g}sd -> lo, <= mu+{k:g}sd -> hi, above -> float"]
