"""Sensitivity policy: the exact solver minimises the summed predicted damage.

The loss of a unit at b bits in groups of g is the sum of its sites' sensitivity at (b, g)
(by default the Fisher-weighted output error, a second-order estimate of the KL each site's
quantization costs; or the relative output error, or measured delta-KL); kept sites cost
nothing. Its quantizer defaults to the one the sensitivity analysis predicts for
(float-offset-dq in groups of 32); given several group sizes (``group_size=32+64+128``, in both
passes) the exact solver chooses each unit's group size with its width. A pipeline that names
another scheme names it in both, and the policy's group sizes must be among those predicted (a
mismatch is an error).

With ``granularity=row`` each output row of a matmul takes its own (width, group size): the
loss of a row is the damage the analysis predicts for it (``Graph.row_damage``: the Fisher- or
Gram-weighted error of that row alone; measured metrics have none), and ``solve_rows`` chooses
per row. Rows are exact sub-matrices (every output reads only its own row of weights, and
every group format keeps its parameters within a row), so a matmul whose rows differ is a
row-mix (``ir/spec.py``): each part stored in its format, plus the row order, charged.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.ir.spec import SCHEMES
from lwqc.passes.base import Option, choice, group_size_list
from lwqc.passes.budget import BUDGET_OPTIONS
from lwqc.passes.policy import PolicyPass
from lwqc.passes.quantizers import SENSITIVITY_GROUP_SIZES, SENSITIVITY_SCHEME, quantizer_label
from lwqc.passes.solver import Unit


class SensitivityPolicy(PolicyPass):
    name = "policy-sensitivity"
    score_key = "sensitivity"
    options = {**BUDGET_OPTIONS,
               "granularity": Option(choice("layer", "matmul", "row"), None,
                                     "unit that shares a width (matmul; row: each output row "
                                     "its own width and group size)"),
               "group_size": Option(group_size_list, SENSITIVITY_GROUP_SIZES,
                                    "group size(s) along the input dimension, one chosen per "
                                    "unit by the exact solver, e.g. 32+64+128"),
               "scheme": Option(choice(*SCHEMES), SENSITIVITY_SCHEME, "quantization scheme"),
               "solver": Option(choice("greedy", "exact"), "exact", "exact: optimal knapsack")}

    def validate(self) -> None:
        super().validate()
        if self.values["solver"] == "greedy" and len(self.values["group_size"]) > 1:
            raise PipelineError("policy-sensitivity{solver=greedy} plans one group size: give "
                                "group_size=G, or solver=exact to choose among several")
        if self.values["solver"] == "greedy" and self.values["granularity"] == "row":
            raise PipelineError("policy-sensitivity{granularity=row} plans with the exact "
                                "solver: drop solver=greedy")

    def group_sizes(self) -> tuple[int, ...]:
        return self.values["group_size"]

    def _check_predicted(self, graph: Graph, site_ids: list[str]) -> None:
        """The analysis predicted the damage of the policy's scheme at its group sizes."""
        scheme, sizes = self.values["scheme"], self.values["group_size"]
        stats = [graph.sites[s].stats["sensitivity"] for s in site_ids]
        if not all(stat.predicts(scheme, sizes) for stat in stats):
            predicted = sorted({stat.quantizer for stat in stats})
            raise PipelineError(
                f"sensitivity predicted the damage of {', '.join(predicted)} and "
                f"policy-sensitivity plans {quantizer_label(scheme, sizes)}: give both the same "
                "scheme, and the analysis at least the policy's group sizes "
                "(sensitivity{scheme=...,group_size=...})")

    def loss_function(self, graph: Graph, units: list[Unit], importance: list[float]):
        self._check_predicted(graph, [s for unit in units for s in unit.sites])

        def loss(unit: Unit, bits: int, group_size: int) -> float:
            return sum(graph.sites[s].stats["sensitivity"].error(bits, group_size)
                       for s in unit.sites)

        return loss

    def row_loss_function(self, graph: Graph):
        self._check_predicted(graph, list(graph.sites))
        if set(graph.row_damage) != set(graph.sites):
            raise PipelineError("policy-sensitivity{granularity=row} needs the damage of each "
                                "row: sensitivity{metric=fisher} or metric=output-error (a "
                                "measured metric gives one number per matmul)")

        def row_loss(site_id: str, bits: int, group_size: int) -> np.ndarray:
            return graph.row_damage[site_id][bits, group_size]

        return row_loss
