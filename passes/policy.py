"""The policy contract: a policy is a scorer; the budget driver turns scores into a plan.

A policy says how important each unit is (``importance``, by default its ``score_key``
annotation), may offer a loss per (unit, width) for the exact solver (``loss_function``; for a
rank score, w * params * 4^-bits, the RTN error model, w rising linearly from 1 for the least
important unit to 2 for the most), and may offer a budget-free rule (``rule``). Everything
about budgets lives in ``passes/budget.py``.
"""

from __future__ import annotations

import math
from typing import ClassVar

from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.passes.base import PassContext, PlanningPass
from lwqc.passes.budget import BUDGET_OPTIONS, Budget
from lwqc.passes.solver import Unit, ranked


class PolicyPass(PlanningPass):
    """Base of policies: subclasses set ``name``, ``score_key`` or implement ``importance``."""

    options = BUDGET_OPTIONS
    score_key: ClassVar[str | None] = None

    def validate(self) -> None:
        v = self.values
        if v["bits"] is not None and v["ratio"] is not None:
            raise PipelineError(f"{self.name}: give either bits= or ratio=, not both")
        if v["bits"] is not None and not (math.isfinite(v["bits"]) and v["bits"] > 0):
            raise PipelineError(f"{self.name}: bits must be a positive number, got {v['bits']}")
        if v["ratio"] is not None and not 0 <= v["ratio"] <= 1:  # also rejects nan
            raise PipelineError(f"{self.name}: ratio must lie in [0, 1], got {v['ratio']}")
        if v["hi"] is not None and v["lo"] is not None and v["lo"] >= v["hi"]:
            raise PipelineError(f"{self.name}: lo ({v['lo']}) must be below hi ({v['hi']})")

    def required(self) -> tuple[str, ...]:
        if self.score_key is None:
            return ()
        return (f"site.{self.score_key}", f"block.{self.score_key}")

    def importance(self, graph: Graph, units: list[Unit]) -> list[float]:
        """Importance per unit from the policy's annotation (block stat for whole blocks)."""
        assert self.score_key is not None
        scores = []
        for unit in units:
            whole_block = unit.block is not None and unit.name == graph.blocks[unit.block].module
            stats = graph.blocks[unit.block].stats if whole_block else graph.sites[unit.name].stats
            scores.append(stats[self.score_key].importance())
        return scores

    def default_granularity(self) -> str:
        return "matmul"

    @property
    def rule_widths(self) -> tuple[int, int]:
        """(lo, hi) of a budget-free rule or a ratio: ``lo``/``hi`` if given, else 4 and 8."""
        return self.values["lo"] or 4, self.values["hi"] or 8

    def rungs(self, ladder: list[int]) -> list[int]:
        """The widths the greedy solver may use from the budget's ladder (all of them)."""
        return ladder

    def group_sizes(self) -> tuple[int, ...]:
        """The group sizes the budget may choose from (the exact solver picks one per unit)."""
        return (self.values["group_size"],)

    def loss_function(self, graph: Graph, units: list[Unit], importance: list[float]):
        """loss(unit, bits, group_size) for the exact solver: rank weight * params * 4^-bits
        (one group size: it is not consulted)."""
        order = ranked(units, importance)
        weight = {units[i].name: 2.0 - position / max(len(units) - 1, 1)
                  for position, i in enumerate(order)}
        return lambda unit, bits, group_size: weight[unit.name] * unit.params * 4.0 ** -bits

    def row_loss_function(self, graph: Graph):
        """row_loss(site, bits, group_size) -> the loss of each output row (``granularity=row``);
        only policies with a per-row loss plan per row."""
        raise PipelineError(f"policy '{self.name}' has no per-row loss: granularity=row is "
                            "policy sensitivity's")

    def rule(self, graph: Graph, units: list[Unit], importance: list[float]) -> list[int]:
        """Widths without a budget; policies that have no such rule need bits= or ratio=."""
        raise PipelineError(
            f"policy '{self.name}' needs a budget: pass --bits B or --ratio R"
        )

    def rule_notes(self) -> list[str]:
        return []

    def run(self, graph: Graph, context: PassContext) -> None:
        graph.plan = Budget(self, graph).plan()
