"""FastEWQ policy: EWQ's block decisions predicted from metadata alone (``passes/fastewq.py``).

1. Without a budget: each block gets its predicted class's width (``lo``, ``hi``, or float);
   sites outside blocks (the head) get ``hi``.
2. With ``bits=`` or ``ratio=``: units ranked by the predicted width rank P(hi) + 2 P(keep),
   sites outside blocks above every block; the solver meets the budget.
No analysis runs and no weight is read to decide.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.ir.spec import KEEP_BITS
from lwqc.passes.budget import BUDGET_OPTIONS
from lwqc.passes.fastewq import HI, KEEP, LO, expected_class, graph_features, load_forest
from lwqc.passes.policy import PolicyPass
from lwqc.passes.solver import Unit


class FastEwqPolicy(PolicyPass):
    name = "policy-fastewq"
    options = BUDGET_OPTIONS

    def _probabilities(self, graph: Graph) -> np.ndarray:
        if not graph.blocks:
            raise PipelineError("policy-fastewq decides per transformer block; this model has "
                                "none (use policy-entropy)")
        return load_forest().predict_proba(graph_features(graph))

    def importance(self, graph: Graph, units: list[Unit]) -> list[float]:
        ranks = expected_class(self._probabilities(graph))
        outside = float(ranks.max()) + 1.0
        return [outside if unit.block is None else float(ranks[unit.block]) for unit in units]

    def rule(self, graph: Graph, units: list[Unit], importance: list[float]) -> list[int]:
        lo, hi = self.rule_widths
        classes = self._probabilities(graph).argmax(axis=1)
        widths = {LO: lo, HI: hi, KEEP: KEEP_BITS}
        return [hi if unit.block is None else widths[int(classes[unit.block])] for unit in units]

    def default_granularity(self) -> str:
        return "layer"

    def rule_notes(self) -> list[str]:
        return ["FastEWQ: block classes (lo/hi/float) from a random forest on position, depth "
                "and parameter counts; no weight read"]
