"""Sensitivity policy: the exact solver minimises the summed predicted damage.

The loss of a unit at b bits is the sum of its sites' sensitivity at b (by default the
Fisher-weighted output error, a second-order estimate of the KL each site's quantization costs;
or the relative output error, or measured delta-KL); kept sites cost nothing. Its quantizer
defaults to the one the sensitivity analysis predicts for (float-offset-dq, groups of 32);
a pipeline that names another scheme or group size names it in both (a mismatch is an
error).
"""

from __future__ import annotations

from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.ir.spec import SCHEMES
from lwqc.passes.base import Option, choice, positive_int
from lwqc.passes.budget import BUDGET_OPTIONS
from lwqc.passes.policy import PolicyPass
from lwqc.passes.quantizers import SENSITIVITY_GROUP_SIZE, SENSITIVITY_SCHEME, quantizer_label
from lwqc.passes.solver import Unit


class SensitivityPolicy(PolicyPass):
    name = "policy-sensitivity"
    score_key = "sensitivity"
    options = {**BUDGET_OPTIONS,
               "group_size": Option(positive_int, SENSITIVITY_GROUP_SIZE,
                                    "group size along the input dimension"),
               "scheme": Option(choice(*SCHEMES), SENSITIVITY_SCHEME, "quantization scheme"),
               "solver": Option(choice("greedy", "exact"), "exact", "exact: optimal knapsack")}

    def loss_function(self, graph: Graph, units: list[Unit], importance: list[float]):
        planned = quantizer_label(self.values["scheme"], self.values["group_size"])
        predicted = sorted({graph.sites[s].stats["sensitivity"].quantizer
                            for unit in units for s in unit.sites})
        if predicted != [planned]:
            raise PipelineError(
                f"sensitivity predicted the damage of {', '.join(predicted)} and "
                f"policy-sensitivity plans {planned}: give both the same scheme and group_size "
                "(sensitivity{scheme=...,group_size=...})")

        def loss(unit: Unit, bits: int) -> float:
            return sum(graph.sites[s].stats["sensitivity"].error(bits) for s in unit.sites)

        return loss
