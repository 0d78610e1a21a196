"""The budget solver every policy shares: scores + budget -> one width per unit.

A unit is a set of sites that share a width (a block at ``layer`` granularity, one site at
``matmul`` granularity). Costs are physical bytes (codes + scales + zero points).
1. ``fill_by_importance`` (``--bits``): start every unit at the lowest width of the ladder,
   then walk units from most to least important and move each to the next width whenever
   the total still fits; repeat for each rung. The plan never exceeds the budget.
2. ``split_by_ratio`` (``--ratio``): the least important units go to the low width while the
   low-precision share of parameters stays at most the ratio.
3. ``solve_exact`` (``solver=exact``): the optimum of the multiple-choice knapsack over units x
   widths with a loss per (unit, width), e.g. measured sensitivity.
4. ``solve_rows`` (``granularity=row``): a candidate per output row of each matmul, from a
   loss per (row, candidate), by Lagrangian relaxation.
Ties in importance are broken by execution order.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from fractions import Fraction

import numpy as np

from lwqc.ir.graph import Graph


@dataclasses.dataclass(frozen=True)
class Unit:
    name: str
    sites: tuple[str, ...]
    params: int
    block: int | None
    order: int


def make_units(graph: Graph, granularity: str, exclude: set[str] = frozenset()) -> list[Unit]:
    """Units at ``layer`` (a block, or a site outside blocks) or ``matmul`` granularity."""
    groups: dict[str, list[str]] = {}  # in execution order of their first site
    blocks: dict[str, int | None] = {}
    for site in graph:
        if site.id in exclude:
            continue
        if granularity == "layer" and site.block is not None:
            name = graph.blocks[site.block].module
        else:
            name = site.id
        groups.setdefault(name, []).append(site.id)
        blocks[name] = site.block
    return [
        Unit(name, tuple(ids), sum(graph.sites[s].params for s in ids), blocks[name],
             graph.sites[ids[0]].order)
        for name, ids in groups.items()
    ]


def ranked(units: Sequence[Unit], importance: Sequence[float]) -> list[int]:
    """Unit indices from most to least important (ties: earlier in execution first)."""
    return sorted(range(len(units)), key=lambda i: (-importance[i], units[i].order))


def fill_by_importance(
    units: Sequence[Unit],
    importance: Sequence[float],
    ladder: Sequence[int],
    cost: Callable[[Unit, int], int],
    capacity_bits: Fraction,
) -> list[int] | None:
    """Widths per unit from ``ladder`` (ascending) within ``capacity_bits``; None if infeasible."""
    widths = [ladder[0]] * len(units)
    used = 8 * sum(cost(u, ladder[0]) for u in units)
    if used > capacity_bits:
        return None
    order = ranked(units, importance)
    for rung in range(1, len(ladder)):
        for i in order:
            if widths[i] != ladder[rung - 1]:
                continue
            extra = 8 * (cost(units[i], ladder[rung]) - cost(units[i], widths[i]))
            if used + extra <= capacity_bits:
                widths[i] = ladder[rung]
                used += extra
    return widths


def split_by_ratio(
    units: Sequence[Unit], importance: Sequence[float], ratio: Fraction, lo: int, hi: int
) -> list[int]:
    """Least important units at ``lo`` while their parameter share stays <= ``ratio``."""
    total = sum(u.params for u in units)
    widths = [hi] * len(units)
    low = 0
    for i in reversed(ranked(units, importance)):
        if Fraction(low + units[i].params, total) > ratio:
            break
        widths[i] = lo
        low += units[i].params
    return widths


def solve_exact(
    units: Sequence[Unit],
    widths: Sequence[int],
    cost: Callable[[Unit, int], int],
    loss: Callable[[Unit, int], float],
    capacity_bits: Fraction,
) -> list[int] | None:
    """Multiple-choice knapsack, solved exactly: one width per unit, total cost within the
    capacity, least total loss. A 0/1 program for HiGHS (``scipy.optimize.milp``, zero gap);
    the returned plan is re-checked in exact integer arithmetic. None if nothing fits."""
    from scipy.optimize import Bounds, LinearConstraint, milp

    capacity = int(capacity_bits // 8)  # whole bytes
    if capacity < 0:
        return None
    if not units:
        return []
    n, m = len(units), len(widths)
    costs = np.array([[cost(u, w) for w in widths] for u in units], dtype=np.float64)
    losses = np.array([[loss(u, w) for w in widths] for u in units], dtype=np.float64)
    scale = np.abs(losses).max() or 1.0
    if costs.min(axis=1).sum() > capacity:
        return None
    one_each = np.kron(np.eye(n), np.ones(m))
    while capacity >= 0:
        result = milp(
            losses.ravel() / scale,
            constraints=[LinearConstraint(one_each, 1, 1),
                         LinearConstraint(costs.ravel()[None, :], -np.inf, capacity)],
            integrality=np.ones(n * m), bounds=Bounds(0, 1),
            options={"mip_rel_gap": 0.0, "presolve": True},
        )
        if result.x is None:
            return None
        choice = result.x.reshape(n, m).argmax(axis=1)
        used = sum(int(costs[i, j]) for i, j in enumerate(choice))
        if used <= capacity:
            return [widths[j] for j in choice]
        capacity -= used - capacity  # tolerance slipped past the bound: tighten and re-solve
    return None


def solve_rows(
    losses: Sequence[np.ndarray],
    costs: Sequence[np.ndarray],
    mixing_costs: Sequence[int],
    plan_cost: Callable[[list[np.ndarray]], int],
    capacity_bits: Fraction,
) -> list[np.ndarray] | None:
    """One candidate per output row of each unit (a matmul), least total loss within the
    capacity: ``losses[u]`` ``[rows, candidates]`` is each row's loss under each candidate,
    ``costs[u]`` the bytes of the whole unit under each, ``mixing_costs[u]`` the bytes a unit
    pays once its rows take more than one candidate. Lagrangian relaxation: for a price
    lambda per byte, each unit takes the better of its best row-by-row choice (rows charged
    their share of a candidate's bytes, plus the mixing cost) and its best single candidate;
    lambda is bisected (geometrically) to the least price whose plan, costed exactly by
    ``plan_cost``, fits. Each plan it returns is the least loss among plans spending no more
    (up to the rounding of a candidate's bytes into row shares); None if the cheapest plan
    does not fit."""
    capacity = int(capacity_bits // 8)
    if not losses:
        return []
    cheapest = [np.full(len(rows), int(np.argmin(cost))) for rows, cost in
                zip(losses, costs, strict=True)]
    if plan_cost(cheapest) > capacity:
        return None
    scale_loss = max(float(sum(rows.max(axis=1).sum() for rows in losses)), 1e-300)
    scale_cost = max(float(sum(cost.max() for cost in costs)), 1.0)

    def choose(price: float) -> list[np.ndarray]:
        picks = []
        for rows, cost, mixing in zip(losses, costs, mixing_costs, strict=True):
            count = rows.shape[0]
            value = rows / scale_loss + price * cost[None, :] / (scale_cost * count)
            by_row = value.argmin(axis=1)
            mixed = value[np.arange(count), by_row].sum() + price * mixing / scale_cost
            single = int(value.sum(axis=0).argmin())
            uniform = np.full(count, single)
            alone = len(np.unique(by_row)) == 1
            picks.append(by_row if alone or mixed < value[:, single].sum() else uniform)
        return picks

    best = choose(0.0)
    if plan_cost(best) <= capacity:
        return best
    low, high = 1e-9, 1.0
    while plan_cost(choose(high)) > capacity:
        low, high = high, high * 16
        if high > 1e30:  # the cheapest plan fits, so a high enough price reaches it
            return cheapest
    for _ in range(80):
        middle = (low * high) ** 0.5
        if plan_cost(choose(middle)) > capacity:
            low = middle
        else:
            high = middle
    return choose(high)
