"""The budget driver every policy shares: options, overrides, units, candidates, the solver.

A policy only scores (``passes/policy.py``); this module turns scores into widths:
1. ``bits=B``: average physical bits per quantizable weight (everything a site stores
   counted, at the sizes of the pipeline's target backend) never exceed B. Widths come from
   ``widths`` (exact solver) or ``lo``/``hi`` if given, else ``lo`` is the widest single width
   whose uniform plan fits and ``hi`` the next rung of 2 -> 3 -> 4 -> 8 -> 16 (rungs the
   target does not store are skipped): the two rungs around the budget.
2. ``ratio=R``: share R of the parameters at ``lo`` (default 4), the rest at ``hi`` (8).
3. ``override=REGEX=BITS`` pins matching sites (first matching override wins); pinned sites
   are charged against the budget first.
4. ``solver=greedy`` (default for rank scores: the papers' "most important first") or
   ``solver=exact``: the optimal multiple-choice knapsack over those widths (at each of the
   policy's group sizes, if it offers several), minimising the policy's ``loss``. Two rungs by
   default, not all four: the losses are per-site estimates that add, while the damage of many
   low-width sites compounds, so on SmolLM2 a plan that keeps every site near the budget
   measures better than the one the summed estimates favour (README, "Benchmarks"). The rungs
   are those around the budget at the policy's cheapest (largest) group size.
   ``granularity=row`` (a policy with a per-row loss): every output row of a matmul chooses
   among the same candidates (``solve_rows``), a matmul whose rows differ becoming a row-mix
   charged its row order; the exact plan by matmuls is kept where it predicts less damage.
5. Candidates are only specs the target backend stores; a width the user names that the
   target cannot store is refused before any work.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np

from lwqc.ir.accounting import site_bytes
from lwqc.ir.errors import BudgetError, PipelineError
from lwqc.ir.formats.row_mix import order_bytes
from lwqc.ir.graph import Graph
from lwqc.ir.plan import Plan
from lwqc.ir.spec import KEEP_BITS, SCHEMES, WIDTHS, QuantSpec, make_spec, row_mix
from lwqc.passes.base import Option, choice, positive_int, width_list
from lwqc.passes.solver import (
    Unit,
    fill_by_importance,
    make_units,
    solve_exact,
    solve_rows,
    split_by_ratio,
)

if TYPE_CHECKING:
    from lwqc.passes.policy import PolicyPass

AUTO_LADDER = (2, 3, 4, 8, KEEP_BITS)


def width(text: str) -> int:
    value = int(text)
    if value not in WIDTHS:
        raise ValueError(f"width must be one of {', '.join(map(str, WIDTHS))} (16 = keep float)")
    return value


def group_size(text: str) -> int:
    if "+" in text:
        raise ValueError("one group size; choosing among several (e.g. 32+64+128) is policy "
                         "sensitivity's")
    return positive_int(text)


def fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 0.5:  # also rejects nan
        raise ValueError("a fraction of weights in [0, 0.5)")
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
    "group_size": Option(group_size, 128, "group size along the input dimension"),
    "scheme": Option(choice(*SCHEMES), "rtn-asym", "quantization scheme"),
    "outliers": Option(fraction, None, "share of weights kept sparse in float16 (0)"),
    "override": Option(_override_text, None, "REGEX=BITS pins matching sites", multiple=True),
    "solver": Option(choice("greedy", "exact"), "greedy", "how scores and budget become widths"),
    "widths": Option(width_list, None, "candidate widths of the exact solver, e.g. 2+3+4+8 "
                     "(default: the two rungs around the budget)"),
}


class Budget:
    """One policy's budget over one graph: specs, costs, pins, ladders, and the solve."""

    def __init__(self, policy: PolicyPass, graph: Graph) -> None:
        self.policy, self.graph, self.values = policy, graph, policy.values

    @property
    def group_sizes(self) -> tuple[int, ...]:
        """The policy's group sizes; the first is used wherever one is chosen for all."""
        return self.policy.group_sizes()

    def spec(self, bits: int, group_size: int | None = None) -> QuantSpec:
        v = self.values
        return make_spec(bits, v["scheme"], group_size=group_size or self.group_sizes[0],
                         outliers=v["outliers"] or 0.0)

    def supported(self, bits: int) -> bool:
        return self.graph.target.supports(self.spec(bits))

    def require(self, bits: int, where: str) -> int:
        """``bits`` if the target stores it, else a clear error naming the option."""
        self.graph.target.check(self.spec(bits), where)
        return bits

    def cost(self, unit: Unit, bits: int, group_size: int | None = None) -> int:
        spec = self.spec(bits, group_size)
        return sum(site_bytes(self.graph, s, spec) for s in unit.sites)

    def pins(self) -> dict[str, int]:
        pinned: dict[str, int] = {}
        for text in self.values["override"] or []:
            pattern, bits = override(text)
            self.require(bits, f"override {text!r}")
            matched = [s for s in self.graph.sites if s not in pinned and re.search(pattern, s)]
            if not any(re.search(pattern, s) for s in self.graph.sites):
                raise PipelineError(f"override {text!r} matches no site; see 'lwqc show MODEL'")
            pinned.update(dict.fromkeys(matched, bits))
        return pinned

    def ladder(self, units: list[Unit], capacity: Fraction, pinned_bits: int) -> list[int]:
        lo, hi = self.values["lo"], self.values["hi"]
        auto = [w for w in AUTO_LADDER if self.supported(w)]
        if lo is not None:
            if hi is None:
                upper = [w for w in auto if w > lo]
                return [lo, upper[0]] if upper else [lo]
            return [lo, hi]
        cheapest = self.group_sizes[-1]
        fits = [
            w for w in auto
            if pinned_bits + 8 * sum(self.cost(u, w, cheapest) for u in units) <= capacity
            and (hi is None or w < hi)
        ]
        if not fits:
            smallest = pinned_bits + 8 * sum(self.cost(u, auto[0], cheapest) for u in units)
            need = smallest / self.graph.total_params
            raise BudgetError(
                f"--bits {self.values['bits']:g} is infeasible: the smallest plan ({auto[0]}-bit, "
                f"group {self.values['group_size']}, pinned sites included) needs {need:.3f} bits "
                "per weight; raise --bits or use a larger --group-size"
            )
        low = fits[-1]
        if hi is not None:
            return [low, hi]
        upper = auto[auto.index(low) + 1 :]
        return [low, upper[0]] if upper else [low]

    def plan(self) -> Plan:
        """Pins, units, scores and the budget's mode -> a plan within the budget."""
        v, graph, policy = self.values, self.graph, self.policy
        for name in ("lo", "hi"):
            if v[name] is not None:
                self.require(v[name], f"--{name} {v[name]}")
        pinned = self.pins()
        granularity = v["granularity"] or policy.default_granularity()
        units = make_units(graph, "matmul" if granularity == "row" else granularity,
                           exclude=set(pinned))
        importance = policy.importance(graph, units)
        budget: dict[str, Any] = {"granularity": granularity, "group_size": v["group_size"],
                                  "scheme": v["scheme"], "overrides": list(v["override"] or [])}
        if v["outliers"]:
            budget["outliers"] = v["outliers"]
        notes: list[str] = []
        if granularity == "row" and v["bits"] is None:
            raise PipelineError(f"{policy.name}{{granularity=row}} needs bits=B")
        if v["bits"] is not None:
            choices, extra = self._within_bits(units, importance, pinned, granularity)
            budget.update(extra)
        elif v["ratio"] is not None:
            lo, hi = (self.require(w, "ratio widths") for w in policy.rule_widths)
            widths = split_by_ratio(units, importance, Fraction(str(v["ratio"])), lo, hi)
            choices = [self.spec(w) for w in widths]
            budget.update(mode="ratio", ratio=v["ratio"], widths=[lo, hi])
        else:
            widths = [self.require(w, f"policy {policy.name}'s rule")
                      for w in policy.rule(graph, units, importance)]
            choices = [self.spec(w) for w in widths]
            budget.update(mode="rule", widths=sorted(set(widths)))
            notes.extend(policy.rule_notes())
        specs = {s: self.spec(b) for s, b in pinned.items()}
        for unit, spec in zip(units, choices, strict=True):
            specs.update(dict.fromkeys(unit.sites, spec))
        return Plan(specs={s: specs[s] for s in graph.sites}, policy=policy.name,
                    budget=budget, notes=notes)

    def _within_bits(self, units: list[Unit], importance: list[float], pinned: dict[str, int],
                     granularity: str) -> tuple[list[QuantSpec], dict[str, Any]]:
        """The spec of each unit, and the budget record."""
        v, graph = self.values, self.graph
        capacity = Fraction(str(v["bits"])) * graph.total_params
        pinned_bits = 8 * sum(site_bytes(graph, s, self.spec(b)) for s, b in pinned.items())
        if pinned_bits > capacity:
            raise BudgetError(
                f"--bits {v['bits']:g} is infeasible: the overridden sites alone need "
                f"{pinned_bits / graph.total_params:.3f} bits per weight"
            )
        if v["solver"] == "exact":
            if v["widths"]:
                ladder = [self.require(w, f"width {w}") for w in v["widths"]]
            else:
                ladder = self.ladder(units, capacity, pinned_bits)
            candidates = [(w, g) for w in ladder for g in self.group_sizes]
            if granularity == "row":
                choices = self._by_rows(units, candidates, capacity - pinned_bits)
            else:
                loss = self.policy.loss_function(graph, units, importance)
                pairs = solve_exact(units, candidates, lambda u, c: self.cost(u, *c),
                                    lambda u, c: loss(u, *c), capacity - pinned_bits)
                choices = None if pairs is None else [self.spec(*c) for c in pairs]
        else:
            ladder = self.policy.rungs(self.ladder(units, capacity, pinned_bits))
            widths = fill_by_importance(units, importance, ladder, self.cost,
                                        capacity - pinned_bits)
            choices = None if widths is None else [self.spec(w) for w in widths]
        if choices is None:
            raise BudgetError(
                f"--bits {v['bits']:g} is infeasible with widths {ladder}: even every site at "
                f"{ladder[0]} bits exceeds it; raise --bits or lower --lo"
            )
        return choices, {"mode": "bits", "bits": v["bits"], "widths": ladder,
                         "solver": v["solver"]}

    def _by_rows(self, units: list[Unit], candidates: list[tuple[int, int]],
                 capacity_bits: Fraction) -> list[QuantSpec] | None:
        """Each unit's spec with a candidate per output row (``solve_rows``); rows take
        quantized widths only (a row-mix has no float part). A plan by matmuls is a plan by
        rows too: the exact one over the same candidates is taken instead where it predicts
        less damage (the relaxation may leave budget unspent, which tells on small models)."""
        graph = self.graph
        row_loss = self.policy.row_loss_function(graph)
        # by group size, then width: parts of one group size are neighbours, and a backend
        # may run them on one kernel (``offset_nbits.lower_rows``)
        candidates = sorted((c for c in candidates if c[0] != KEEP_BITS), key=lambda c: c[::-1])
        specs = [self.spec(*c) for c in candidates]
        losses, costs, mixing = [], [], []
        for unit in units:
            (site_id,) = unit.sites
            losses.append(np.stack([row_loss(site_id, *c) for c in candidates], axis=1))
            costs.append(np.array([self.cost(unit, *c) for c in candidates], dtype=np.float64))
            mixing.append(order_bytes(graph.sites[site_id].shape[0]))

        def unit_specs(picks: list[np.ndarray]) -> list[QuantSpec]:
            return [row_mix(specs, pick) for pick in picks]

        def plan_cost(picks: list[np.ndarray]) -> int:
            return sum(site_bytes(graph, u.sites[0], spec)
                       for u, spec in zip(units, unit_specs(picks), strict=True))

        picks = solve_rows(losses, costs, mixing, plan_cost, capacity_bits)
        if picks is None:
            return None
        def predicted(picks: list[np.ndarray]) -> float:
            return sum(rows[np.arange(len(p)), p].sum() for rows, p in zip(losses, picks,
                                                                           strict=True))

        index = {unit.name: i for i, unit in enumerate(units)}
        whole = solve_exact(units, range(len(candidates)),
                            lambda u, c: int(costs[index[u.name]][c]),
                            lambda u, c: float(losses[index[u.name]][:, c].sum()), capacity_bits)
        if whole is not None:
            by_matmuls = [np.full(len(rows), c) for rows, c in zip(losses, whole, strict=True)]
            if predicted(by_matmuls) < predicted(picks):
                picks = by_matmuls
        return unit_specs(picks)
