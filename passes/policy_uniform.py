"""Uniform policy: every site at one width (``width=W``), or the widest that fits ``bits=B``."""

from __future__ import annotations

from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.passes.base import Option, choice
from lwqc.passes.budget import BUDGET_OPTIONS, width
from lwqc.passes.policy import PolicyPass
from lwqc.passes.solver import Unit


class UniformPolicy(PolicyPass):
    name = "policy-uniform"
    options = {"width": Option(width, None, "the one width for every site"), **BUDGET_OPTIONS,
               "solver": Option(choice("greedy"), None, "one width needs no search")}

    def validate(self) -> None:
        super().validate()
        v = self.values
        if v["width"] is None and v["bits"] is None:
            raise PipelineError("policy-uniform needs width=W or bits=B")
        if v["width"] is not None and (v["bits"] is not None or v["ratio"] is not None):
            raise PipelineError("policy-uniform takes width=W or bits=B, not both")
        if v["ratio"] is not None or v["hi"] is not None or v["widths"] is not None:
            raise PipelineError("policy-uniform has one width: ratio=, hi= and widths= do not "
                                "apply")

    def importance(self, graph: Graph, units: list[Unit]) -> list[float]:
        return [0.0] * len(units)

    def rule(self, graph: Graph, units: list[Unit], importance: list[float]) -> list[int]:
        return [self.values["width"]] * len(units)

    def rungs(self, ladder: list[int]) -> list[int]:
        return ladder[:1]
