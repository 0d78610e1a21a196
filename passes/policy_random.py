"""Random-order policy: a seeded random importance, the baseline every ranking must beat."""

from __future__ import annotations

import numpy as np

from lwqc.ir.graph import Graph
from lwqc.passes.base import Option, seed
from lwqc.passes.budget import BUDGET_OPTIONS
from lwqc.passes.policy import PolicyPass
from lwqc.passes.solver import Unit


class RandomPolicy(PolicyPass):
    name = "policy-random"
    options = {**BUDGET_OPTIONS, "seed": Option(seed, 0, "random seed")}

    def importance(self, graph: Graph, units: list[Unit]) -> list[float]:
        return list(np.random.default_rng(self.values["seed"]).permutation(len(units)) * 1.0)
