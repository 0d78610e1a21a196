"""What every policy shares: budget options, overrides, units, and the call into the solver.

A policy is a scorer: it only says how important each unit is (``importance``), and may
offer a budget-free rule of its own (``rule``). Budgets:
1. ``bits=B``: average physical bits per quantizable weight (scales, zero points counted)
   never exceed B. Widths come from ``lo``/``hi`` if given, else ``lo`` is the widest single
   width whose uniform plan fits and ``hi`` the next rung of 2 -> 4 -> 8 -> 16 (3-bit codes
   cost a 4-bit container, so the automatic ladder skips them).
2. ``ratio=R``: share R of the parameters at ``lo`` (default 4), the rest at ``hi`` (8).
3. ``override=REGEX=BITS`` pins matching sites (first matching override wins); pinned sites
   are charged against the budget first.
4. ``solver=greedy`` (default for rank scores: the papers' "most important first") or
   ``solver=exact``: the optimal multiple-choice knapsack over ``widths`` (default 2+4+8),
   minimising the policy's ``loss``. For a rank score the loss of a unit at b bits is
   w * params * 4^-b (the RTN error model), w rising linearly from 1 (least important) to 2.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any, ClassVar

from lwqc.ir.errors import BudgetError, PipelineError
from lwqc.ir.graph import Graph
from lwqc.ir.packed import KEEP_BITS, QUANT_WIDTHS, SCHEMES
from lwqc.ir.plan import Plan, QuantSpec, site_bytes
from lwqc.passes.base import (
    Option,
    Pass,
    PassContext,
    PassKind,
    choice,
    positive_int,
    width_list,
)
from lwqc.passes.solver import (
    Unit,
    fill_by_importance,
    make_units,
    ranked,
    solve_exact,
    split_by_ratio,
)

AUTO_LADDER = (2, 4, 8, KEEP_BITS)
EXACT_WIDTHS = (2, 4, 8)
WIDTHS = (*QUANT_WIDTHS, KEEP_BITS)


def width(text: str) -> int:
    value = int(text)
    if value not in WIDTHS:
        raise ValueError(f"width must be one of {', '.join(map(str, WIDTHS))} (16 = keep float)")
    return value


def override(text: str) -> tuple[str, int]:
    pattern, sep, bits = text.rpartition("=")
    if not sep or not pattern:
        raise ValueError("expected REGEX=BITS")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"bad regular expression {pattern!r}: {exc}") from None
    return pattern, width(bits)


def _override_text(text: str) -> str:
    """Validate ``REGEX=BITS`` and keep it as written (pipeline text round-trips)."""
    override(text)
    return text


BUDGET_OPTIONS: dict[str, Option] = {
    "bits": Option(float, None, "average physical bits per weight, never exceeded"),
    "ratio": Option(float, None, "share of parameters at the low width"),
    "hi": Option(width, None, "high width"),
    "lo": Option(width, None, "low width"),
    "granularity": Option(choice("layer", "matmul"), None,
                          "unit that shares a width (matmul; EWQ's rule: layer)"),
    "group_size": Option(positive_int, 128, "group size along the input dimension"),
    "scheme": Option(choice(*SCHEMES), "rtn-asym", "quantization scheme"),
    "override": Option(_override_text, None, "REGEX=BITS pins matching sites", multiple=True),
    "solver": Option(choice("greedy", "exact"), "greedy", "how scores and budget become widths"),
    "widths": Option(width_list, None, "candidate widths of the exact solver, e.g. 2+4+8"),
}


class PolicyPass(Pass):
    """Base of policies: subclasses set ``name``, ``score_key`` and implement ``importance``."""

    kind = PassKind.POLICY
    provides = ("plan",)
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

    def loss_function(self, graph: Graph, units: list[Unit], importance: list[float]):
        """loss(unit, bits) for the exact solver: rank weight * params * 4^-bits."""
        order = ranked(units, importance)
        weight = {units[i].name: 2.0 - position / max(len(units) - 1, 1)
                  for position, i in enumerate(order)}
        return lambda unit, bits: weight[unit.name] * unit.params * 4.0 ** -bits

    def rule(self, graph: Graph, units: list[Unit], importance: list[float]) -> list[int]:
        """Widths without a budget; policies that have no such rule need bits= or ratio=."""
        raise PipelineError(
            f"policy '{self.name}' needs a budget: pass --bits B or --ratio R"
        )

    def spec(self, bits: int) -> QuantSpec:
        if bits == KEEP_BITS:
            return QuantSpec(KEEP_BITS)
        return QuantSpec(bits, self.values["group_size"], self.values["scheme"])

    def pins(self, graph: Graph) -> dict[str, int]:
        pinned: dict[str, int] = {}
        for text in self.values["override"] or []:
            pattern, bits = override(text)
            matched = [s for s in graph.sites if s not in pinned and re.search(pattern, s)]
            if not any(re.search(pattern, s) for s in graph.sites):
                raise PipelineError(f"override {text!r} matches no site; see 'lwqc show MODEL'")
            pinned.update(dict.fromkeys(matched, bits))
        return pinned

    def cost(self, graph: Graph, unit: Unit, bits: int) -> int:
        spec = self.spec(bits)
        return sum(site_bytes(graph.sites[s], spec, graph.keep_bits) for s in unit.sites)

    def ladder(
        self, graph: Graph, units: list[Unit], capacity: Fraction, pinned_bits: int
    ) -> list[int]:
        lo, hi = self.values["lo"], self.values["hi"]
        if lo is not None:
            if hi is None:
                upper = [w for w in AUTO_LADDER if w > lo]
                return [lo, upper[0]] if upper else [lo]
            return [lo, hi]
        fits = [
            w for w in AUTO_LADDER
            if pinned_bits + 8 * sum(self.cost(graph, u, w) for u in units) <= capacity
            and (hi is None or w < hi)
        ]
        if not fits:
            smallest = pinned_bits + 8 * sum(self.cost(graph, u, AUTO_LADDER[0]) for u in units)
            need = smallest / graph.total_params
            raise BudgetError(
                f"--bits {self.values['bits']:g} is infeasible: the smallest plan (2-bit, group "
                f"{self.values['group_size']}, pinned sites included) needs {need:.3f} bits per "
                "weight; raise --bits or use a larger --group-size"
            )
        low = fits[-1]
        if hi is not None:
            return [low, hi]
        upper = AUTO_LADDER[AUTO_LADDER.index(low) + 1 :]
        return [low, upper[0]] if upper else [low]

    def run(self, graph: Graph, context: PassContext) -> None:
        v = self.values
        pinned = self.pins(graph)
        granularity = v["granularity"] or self.default_granularity()
        units = make_units(graph, granularity, exclude=set(pinned))
        importance = self.importance(graph, units)
        budget: dict[str, Any] = {"granularity": granularity, "group_size": v["group_size"],
                                  "scheme": v["scheme"], "overrides": list(v["override"] or [])}
        notes: list[str] = []
        if v["bits"] is not None:
            capacity = Fraction(str(v["bits"])) * graph.total_params
            pinned_bits = 8 * sum(
                site_bytes(graph.sites[s], self.spec(b), graph.keep_bits) for s, b in pinned.items()
            )
            if pinned_bits > capacity:
                raise BudgetError(
                    f"--bits {v['bits']:g} is infeasible: the overridden sites alone need "
                    f"{pinned_bits / graph.total_params:.3f} bits per weight"
                )
            if v["solver"] == "exact":
                ladder = list(v["widths"] or [w for w in (v["lo"], v["hi"]) if w] or EXACT_WIDTHS)
                widths = solve_exact(
                    units, ladder, lambda u, b: self.cost(graph, u, b),
                    self.loss_function(graph, units, importance), capacity - pinned_bits,
                )
            else:
                ladder = self.ladder(graph, units, capacity, pinned_bits)
                widths = fill_by_importance(
                    units, importance, ladder, lambda u, b: self.cost(graph, u, b),
                    capacity - pinned_bits,
                )
            if widths is None:
                raise BudgetError(
                    f"--bits {v['bits']:g} is infeasible with widths {ladder}: even every site at "
                    f"{ladder[0]} bits exceeds it; raise --bits or lower --lo"
                )
            budget.update(mode="bits", bits=v["bits"], widths=ladder, solver=v["solver"])
        elif v["ratio"] is not None:
            lo, hi = self.rule_widths
            widths = split_by_ratio(units, importance, Fraction(str(v["ratio"])), lo, hi)
            budget.update(mode="ratio", ratio=v["ratio"], widths=[lo, hi])
        else:
            widths = self.rule(graph, units, importance)
            budget.update(mode="rule", widths=sorted(set(widths)))
            notes.extend(self.rule_notes())
        specs = {s: self.spec(b) for s, b in pinned.items()}
        for unit, bits in zip(units, widths, strict=True):
            specs.update(dict.fromkeys(unit.sites, self.spec(bits)))
        graph.plan = Plan(specs={s: specs[s] for s in graph.sites}, policy=self.name,
                          budget=budget, notes=notes)

    def rule_notes(self) -> list[str]:
        return []
