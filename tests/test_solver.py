import itertools
import random
from fractions import Fraction

import networkx as nx
import pytest

from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.passes.solver import Unit, fill_by_importance, make_units, ranked, split_by_ratio


def _graph():
    shapes = {
        "layers.0.q": (4, 8),
        "layers.0.up": (16, 8),
        "layers.1.q": (4, 8),
        "layers.1.up": (16, 8),
        "lm_head": (10, 8),
    }
    sites = {}
    for order, (site_id, shape) in enumerate(shapes.items()):
        block = int(site_id.split(".")[1]) if site_id.startswith("layers") else None
        sites[site_id] = MatmulSite(site_id, "r", block, shape, site_id, order)
    blocks = [
        Block(0, "layers.0", ["layers.0.q", "layers.0.up"]),
        Block(1, "layers.1", ["layers.1.q", "layers.1.up"]),
    ]
    dataflow = nx.DiGraph()
    dataflow.add_edges_from(zip(list(shapes), list(shapes)[1:], strict=False))
    return Graph("m", "toy", sites, blocks, dataflow)


def _units(params, orders=None):
    orders = range(len(params)) if orders is None else orders
    return [
        Unit(f"u{i}", (f"u{i}",), p, None, order)
        for i, (p, order) in enumerate(zip(params, orders, strict=True))
    ]


def _linear_cost(unit, bits):
    """Bytes of ``params`` codes of ``bits`` each (params are multiples of 8, so exact)."""
    assert unit.params % 8 == 0
    return unit.params * bits // 8


def test_make_units_at_layer_granularity_groups_blocks():
    units = make_units(_graph(), "layer")
    assert [u.name for u in units] == ["layers.0", "layers.1", "lm_head"]
    assert [u.sites for u in units] == [
        ("layers.0.q", "layers.0.up"),
        ("layers.1.q", "layers.1.up"),
        ("lm_head",),
    ]
    assert [u.params for u in units] == [32 + 128, 32 + 128, 80]
    assert [u.block for u in units] == [0, 1, None]
    assert [u.order for u in units] == [0, 2, 4]  # execution order of each unit's first site


def test_make_units_at_matmul_granularity_has_one_unit_per_site():
    units = make_units(_graph(), "matmul")
    assert [u.name for u in units] == [
        "layers.0.q", "layers.0.up", "layers.1.q", "layers.1.up", "lm_head"
    ]
    assert [u.sites for u in units] == [(u.name,) for u in units]
    assert [u.params for u in units] == [32, 128, 32, 128, 80]
    assert [u.block for u in units] == [0, 0, 1, 1, None]
    assert [u.order for u in units] == [0, 1, 2, 3, 4]


def test_make_units_leaves_out_excluded_sites():
    units = make_units(_graph(), "layer", exclude={"layers.0.up", "lm_head"})
    assert [(u.name, u.sites, u.params) for u in units] == [
        ("layers.0", ("layers.0.q",), 32),
        ("layers.1", ("layers.1.q", "layers.1.up"), 160),
    ]
    assert [u.order for u in units] == [0, 2]


def test_ranked_orders_by_importance_then_execution_order():
    units = _units([1, 1, 1, 1], orders=[3, 0, 2, 1])
    assert ranked(units, [0.5, 0.5, 0.9, 0.5]) == [2, 1, 3, 0]


def test_fill_promotes_most_important_units_first():
    units = _units([8, 8, 8])
    # lowest: 3 * 16 = 48 bits; each 2 -> 4 step costs 16 bits, each 4 -> 8 step 32 bits
    importance = [0.1, 0.9, 0.5]
    ladder = [2, 4, 8]
    expectations = {
        48: [2, 2, 2],
        63: [2, 2, 2],
        64: [2, 4, 2],
        79: [2, 4, 2],
        80: [2, 4, 4],
        96: [4, 4, 4],
        127: [4, 4, 4],
        128: [4, 8, 4],
        160: [4, 8, 8],
        192: [8, 8, 8],
        10**6: [8, 8, 8],
    }
    for capacity, expected in expectations.items():
        widths = fill_by_importance(units, importance, ladder, _linear_cost, Fraction(capacity))
        assert widths == expected, capacity


def test_fill_skips_an_important_unit_that_does_not_fit_and_promotes_a_smaller_one():
    units = _units([96, 8])
    # lowest 208 bits; promoting unit 0 costs 192 more, unit 1 costs 16 more
    widths = fill_by_importance(units, [1.0, 0.0], [2, 4], _linear_cost, Fraction(230))
    assert widths == [2, 4]


def test_fill_moves_only_units_that_reached_the_previous_rung():
    units = _units([96, 8])
    # 2 -> 4 fits for unit 1 only (224 bits); its 4 -> 8 step costs 32 more (256 bits);
    # unit 0 stays at 2 bits: it never jumps straight to 8
    widths = fill_by_importance(units, [1.0, 0.0], [2, 4, 8], _linear_cost, Fraction(260))
    assert widths == [2, 8]


def test_fill_returns_none_when_lowest_rung_does_not_fit():
    units = _units([8, 8])
    assert fill_by_importance(units, [0, 1], [2, 4], _linear_cost, Fraction(31)) is None
    assert fill_by_importance(units, [0, 1], [2, 4], _linear_cost, Fraction(32)) == [2, 2]


def test_fill_breaks_ties_by_execution_order():
    units = _units([8, 8, 8], orders=[2, 0, 1])
    # 48 bits at 2 bits, room for exactly one 16-bit promotion: the unit run first gets it
    widths = fill_by_importance(units, [0.5, 0.5, 0.5], [2, 4], _linear_cost, Fraction(64))
    assert widths == [2, 4, 2]
    widths = fill_by_importance(units, [0.5, 0.5, 0.5], [2, 4], _linear_cost, Fraction(80))
    assert widths == [2, 4, 4]


def test_fill_accepts_fractional_capacity():
    units = _units([8, 8])
    # lowest 32 bits, one promotion costs 16: 47.5 fits none, 48.5 fits one, not two
    widths = fill_by_importance(units, [0, 1], [2, 4], _linear_cost, Fraction(95, 2))
    assert widths == [2, 2]
    widths = fill_by_importance(units, [0, 1], [2, 4], _linear_cost, Fraction(97, 2))
    assert widths == [2, 4]
    assert fill_by_importance(units, [0, 1], [2, 4], _linear_cost, Fraction(64)) == [4, 4]


def test_fill_with_single_rung_keeps_everyone_at_it():
    units = _units([8, 16])
    assert fill_by_importance(units, [1, 0], [4], _linear_cost, Fraction(10**6)) == [4, 4]


def _reference_fill(params, importance, orders, ladder, cost, capacity):
    """The documented rule, written out directly over (importance, order) keys."""
    n = len(params)
    level = [0] * n
    used = sum(8 * cost(params[i], ladder[0]) for i in range(n))
    if used > capacity:
        return None
    walk = sorted(range(n), key=lambda i: (-importance[i], orders[i]))
    for rung in range(1, len(ladder)):
        for i in walk:
            if level[i] != rung - 1:
                continue
            step = 8 * (cost(params[i], ladder[rung]) - cost(params[i], ladder[rung - 1]))
            if used + step <= capacity:
                level[i] = rung
                used += step
    return [ladder[lv] for lv in level]


def _bytes(params, bits):
    container = 4 if bits == 3 else bits
    return -(-params * container // 8) + (0 if bits == 16 else 4 * -(-params // 16))


@pytest.mark.parametrize("seed", range(6))
def test_fill_never_exceeds_capacity_and_follows_the_documented_rule(seed):
    rng = random.Random(seed)
    for _ in range(150):
        n = rng.randint(1, 5)
        params = [rng.choice([16, 32, 48, 64, 100, 128]) for _ in range(n)]
        orders = rng.sample(range(n), n)
        importance = [rng.choice([0.0, 0.5, 1.0, 2.0]) for _ in range(n)]
        ladder = sorted(rng.sample([2, 3, 4, 8, 16], rng.randint(1, 4)))
        units = [Unit(f"u{i}", (f"u{i}",), p, None, o) for i, (p, o) in
                 enumerate(zip(params, orders, strict=True))]

        def cost(unit, bits):
            return _bytes(unit.params, bits)

        lowest = sum(8 * _bytes(p, ladder[0]) for p in params)
        highest = sum(8 * _bytes(p, ladder[-1]) for p in params)
        capacity = Fraction(rng.randint(lowest - 20, highest + 20), rng.choice([1, 2, 3]))
        widths = fill_by_importance(units, importance, ladder, cost, capacity)
        expected = _reference_fill(params, importance, orders, ladder, _bytes, capacity)
        assert widths == expected
        if widths is None:
            assert lowest > capacity
            continue
        used = sum(8 * _bytes(p, w) for p, w in zip(params, widths, strict=True))
        assert used <= capacity
        assert all(w in ladder for w in widths)
        # greedy is maximal: no unit below the top can take one more step
        for i, w in enumerate(widths):
            if w != ladder[-1]:
                step = _bytes(params[i], ladder[ladder.index(w) + 1]) - _bytes(params[i], w)
                assert used + 8 * step > capacity


def test_fill_plan_is_within_capacity_against_exhaustive_enumeration():
    rng = random.Random(7)
    ladder = [2, 4, 8]
    for _ in range(100):
        n = rng.randint(1, 4)
        params = [rng.choice([8, 16, 24, 40]) for _ in range(n)]
        units = _units(params)
        importance = [rng.random() for _ in range(n)]
        capacity = Fraction(rng.randint(0, 8 * sum(params)))
        widths = fill_by_importance(units, importance, ladder, _linear_cost, capacity)
        feasible = [
            combo for combo in itertools.product(ladder, repeat=n)
            if sum(p * w for p, w in zip(params, combo, strict=True)) <= capacity
        ]
        if not feasible:
            assert widths is None
        else:
            assert tuple(widths) in feasible


@pytest.mark.parametrize("seed", range(4))
def test_fill_with_equal_costs_never_gives_a_more_important_unit_fewer_bits(seed):
    rng = random.Random(100 + seed)
    for _ in range(100):
        n = rng.randint(2, 7)
        units = _units([32] * n, orders=rng.sample(range(n), n))
        importance = [rng.random() for _ in range(n)]
        ladder = sorted(rng.sample([2, 3, 4, 8, 16], rng.randint(2, 4)))
        lowest = n * 32 * ladder[0]
        capacity = Fraction(rng.randint(lowest, n * 32 * ladder[-1]))
        widths = fill_by_importance(units, importance, ladder, _linear_cost, capacity)
        for i in range(n):
            for j in range(n):
                if importance[i] > importance[j]:
                    assert widths[i] >= widths[j]


def test_split_by_ratio_puts_least_important_units_low():
    units = _units([10, 20, 30, 40])
    importance = [4.0, 3.0, 2.0, 1.0]
    # least important first: 40 (share 0.4), then 30 (share 0.7), then 20 (0.9), then 10
    assert split_by_ratio(units, importance, Fraction(1, 2), 4, 8) == [8, 8, 8, 4]
    assert split_by_ratio(units, importance, Fraction(7, 10), 4, 8) == [8, 8, 4, 4]
    assert split_by_ratio(units, importance, Fraction(9, 10), 2, 8) == [8, 2, 2, 2]


def test_split_by_ratio_zero_keeps_every_unit_high():
    units = _units([10, 20, 30])
    assert split_by_ratio(units, [1.0, 2.0, 3.0], Fraction(0), 4, 8) == [8, 8, 8]


def test_split_by_ratio_one_puts_every_unit_low():
    units = _units([10, 20, 30])
    assert split_by_ratio(units, [1.0, 2.0, 3.0], Fraction(1), 4, 8) == [4, 4, 4]


def test_split_by_ratio_stops_at_first_unit_that_overflows():
    units = _units([10, 20, 30, 40])
    # 40 fits under 0.45; 30 would take it to 0.7; the more important 10 stays high too
    assert split_by_ratio(units, [4.0, 3.0, 2.0, 1.0], Fraction(45, 100), 4, 8) == [8, 8, 8, 4]


def test_split_by_ratio_share_is_inclusive():
    units = _units([25, 25, 50])
    assert split_by_ratio(units, [3.0, 2.0, 1.0], Fraction(1, 2), 4, 8) == [8, 8, 4]


def test_split_by_ratio_ties_send_later_units_low_first():
    units = _units([25, 25, 25, 25], orders=[0, 3, 1, 2])
    # equal importance: ranked by order (0, 1, 2, 3); the two run last go low
    assert split_by_ratio(units, [1.0] * 4, Fraction(1, 2), 4, 8) == [8, 4, 8, 4]


# ---------------------------------------------------------------- solve_exact


def solve_exact(*args):
    from lwqc.passes.solver import solve_exact as solve

    return solve(*args)


def _table_units(n):
    return [Unit(f"u{i}", (f"u{i}",), 8, None, i) for i in range(n)]


def _brute_force(costs, losses, capacity_bits):
    """Least total loss over every width choice whose 8 * bytes fit; None if none fits."""
    best = None
    n, m = len(costs), len(costs[0]) if costs else 0
    for choice in itertools.product(range(m), repeat=n):
        if 8 * sum(costs[i][j] for i, j in enumerate(choice)) > capacity_bits:
            continue
        total = sum(losses[i][j] for i, j in enumerate(choice))
        if best is None or total < best:
            best = total
    return best


@pytest.mark.parametrize("seed", range(4))
def test_solve_exact_matches_brute_force_on_random_instances(seed):
    rng = random.Random(500 + seed)
    for _ in range(60):
        n = rng.randint(1, 5)
        widths = rng.choice([(2, 4, 8), (2, 4), (4, 8), (2, 3, 4, 8)])
        units = _table_units(n)
        costs = [[rng.randint(1, 40) for _ in widths] for _ in range(n)]
        losses = [[rng.choice([0.0, rng.random(), 10 * rng.random()]) for _ in widths]
                  for _ in range(n)]
        column = {w: j for j, w in enumerate(widths)}
        lowest = 8 * sum(min(row) for row in costs)
        highest = 8 * sum(max(row) for row in costs)
        capacity = Fraction(rng.randint(max(lowest - 40, 0), highest + 16), rng.choice([1, 3]))

        cost_of = {(u.name, w): costs[i][column[w]] for i, u in enumerate(units) for w in widths}
        loss_of = {(u.name, w): losses[i][column[w]] for i, u in enumerate(units) for w in widths}
        plan = solve_exact(units, widths, lambda u, w, table=cost_of: table[u.name, w],
                           lambda u, w, table=loss_of: table[u.name, w], capacity)
        best = _brute_force(costs, losses, capacity)
        if best is None:
            assert plan is None, (costs, capacity)
            continue
        assert plan is not None and len(plan) == n
        assert all(w in widths for w in plan)
        used = 8 * sum(costs[i][column[w]] for i, w in enumerate(plan))
        assert used <= capacity
        total = sum(losses[i][column[w]] for i, w in enumerate(plan))
        assert total == pytest.approx(best, rel=1e-9, abs=1e-12), (costs, losses, capacity)


def test_solve_exact_returns_none_exactly_when_the_cheapest_plan_does_not_fit():
    units = _table_units(2)
    costs = {2: 3, 4: 5, 8: 9}
    # cheapest plan: 2 * 3 bytes = 48 bits
    for capacity, feasible in [(Fraction(47), False), (Fraction(95, 2), False),
                               (Fraction(48), True), (Fraction(0), False)]:
        plan = solve_exact(units, (2, 4, 8), lambda u, w: costs[w], lambda u, w: 1.0 / w,
                           capacity)
        assert (plan is not None) == feasible, capacity
    assert solve_exact(units, (2, 4, 8), lambda u, w: costs[w], lambda u, w: 1.0 / w,
                       Fraction(48)) == [2, 2]


def test_solve_exact_counts_whole_bytes_of_a_fractional_capacity():
    units = _table_units(1)
    costs = {2: 1, 8: 2}
    loss = {2: 1.0, 8: 0.0}
    # 15.9 bits hold one byte, not two; 16 bits hold two
    assert solve_exact(units, (2, 8), lambda u, w: costs[w], lambda u, w: loss[w],
                       Fraction(159, 10)) == [2]
    assert solve_exact(units, (2, 8), lambda u, w: costs[w], lambda u, w: loss[w],
                       Fraction(16)) == [8]


def test_solve_exact_of_no_units_is_an_empty_plan():
    def never(unit, bits):
        raise AssertionError("no unit to ask about")

    assert solve_exact([], (2, 4, 8), never, never, Fraction(0)) == []


@pytest.mark.parametrize("n", [1, 3, 6])
def test_solve_exact_with_decreasing_losses_and_room_gives_every_unit_the_widest(n):
    units = _units([8 * (i + 1) for i in range(n)])
    capacity = Fraction(8 * sum(_linear_cost(u, 8) for u in units))
    plan = solve_exact(units, (2, 4, 8), _linear_cost,
                       lambda u, bits: u.params * 4.0 ** -bits, capacity)
    assert plan == [8] * n
    # one byte less and some unit must come down
    plan = solve_exact(units, (2, 4, 8), _linear_cost,
                       lambda u, bits: u.params * 4.0 ** -bits, capacity - 8)
    assert plan is not None and plan != [8] * n


def test_solve_exact_trades_one_big_unit_for_two_small_ones():
    # units of 8, 8 and 16 params, 160 bits = 20 bytes: (8, 8, 2) costs 8 + 8 + 4 = 20
    # bytes and (2, 2, 8) costs 2 + 2 + 16 = 20; (8, 8, 8) would cost 32
    units = _units([8, 8, 16])
    loss = {("u0", 2): 5.0, ("u0", 8): 0.0, ("u1", 2): 5.0, ("u1", 8): 0.0,
            ("u2", 2): 8.0, ("u2", 8): 0.0}
    plan = solve_exact(units, (2, 8), _linear_cost, lambda u, b: loss[u.name, b], Fraction(160))
    assert plan == [8, 8, 2]  # loss 8 beats 10
    loss["u2", 2] = 11.0
    plan = solve_exact(units, (2, 8), _linear_cost, lambda u, b: loss[u.name, b], Fraction(160))
    assert plan == [2, 2, 8]  # loss 10 beats 11
