"""Policies on the real ref-llama-6L weights: each is a scorer feeding the shared solver."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from lwqc.ir.accounting import site_bytes, totals
from lwqc.ir.errors import BudgetError, PipelineError
from lwqc.ir.hf_source import import_model
from lwqc.ir.spec import make_spec
from lwqc.passes.manager import PassManager
from lwqc.passes.policy_llamacpp import use_more_bits
from lwqc.passes.solver import make_units
from lwqc.registry import parse


@pytest.fixture(scope="module")
def analysed(ref_llama_dir):
    graph = import_model(str(ref_llama_dir))
    PassManager(parse("zd,entropy")).run(graph)
    return graph


def plan(graph, policy: str) -> dict[str, int]:
    graph.plan = None
    graph.available.discard("plan")
    PassManager(parse(policy)).run(graph)
    return {s: spec.bits for s, spec in graph.plan.specs.items()}


def physical_bits(graph) -> float:
    return totals(graph, graph.plan.specs).avg_bits_physical


def test_llamacpp_rule_on_six_layers_picks_v_and_down_of_layers_2_and_5(analysed):
    # n = 6: n//8 = 0, 7n//8 = 5, (i - 0) % 3 == 2 -> layers 2 and 5
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]
    bits = plan(analysed, "policy-llamacpp")
    high = {s for s, b in bits.items() if b == 8}
    assert high == {f"model.layers.{i}.{m}" for i in (2, 5)
                    for m in ("self_attn.v_proj", "mlp.down_proj")}
    assert set(bits.values()) == {4, 8}
    # closed form: 4-bit = 4 + (32 + 4)/128 per weight, 8-bit = 8 + (32 + 8)/128
    n8 = 2 * (128 * 256 + 256 * 768)
    n4 = analysed.total_params - n8
    expected = (n4 * (4 + 36 / 128) + n8 * (8 + 40 / 128)) / analysed.total_params
    assert physical_bits(analysed) == pytest.approx(expected)


def test_llamacpp_rule_for_32_layers_matches_llama_cpp():
    # llama.cpp: i < 4, i >= 28, or (i - 4) % 3 == 2
    chosen = [i for i in range(32) if use_more_bits(i, 32)]
    assert chosen == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]


# every input dimension is a multiple of 128, so a uniform b-bit plan (group 128, rtn-asym)
# stores b + (32 + b) / 128 bits per weight: 2.265625, 3.2734375, 4.28125, 8.3125
@pytest.mark.parametrize(("budget", "width"), [
    (4.3, 4), (4.2, 3), (3.28, 3), (3.27, 2), (8.32, 8), (40.0, 16)])
def test_uniform_bits_takes_the_widest_width_that_fits(analysed, budget, width):
    assert set(plan(analysed, f"policy-uniform{{bits={budget}}}").values()) == {width}
    assert physical_bits(analysed) <= budget
    if width != 16:
        assert physical_bits(analysed) == width + (32 + width) / 128


@pytest.mark.parametrize("policy", ["policy-zd{", "policy-entropy{", "policy-random{seed=1,",
                                    "policy-llamacpp{"])
@pytest.mark.parametrize("budget", [2.5, 3.5, 4.5, 6.0])
def test_budget_is_never_exceeded_and_little_is_left(analysed, policy, budget):
    plan(analysed, f"{policy}bits={budget}}}")
    specs, graph = analysed.plan.specs, analysed
    capacity = Fraction(str(budget)) * graph.total_params  # in bits
    used = 8 * totals(graph, specs).bytes
    assert used <= capacity
    ladder = graph.plan.budget["widths"]
    # the low width is the widest whose uniform plan fits: the next automatic rung does not,
    # and that next rung is the high width
    above = [w for w in (2, 3, 4, 8, 16) if w > ladder[0]]
    if above:
        uniform = {s: make_spec(above[0], "rtn-asym", group_size=128) for s in graph.sites}
        assert 8 * totals(graph, uniform).bytes > capacity
        assert ladder == [ladder[0], above[0]]
    # and no unit could still move up one rung within the budget (greedy is maximal)
    for unit in make_units(graph, graph.plan.budget["granularity"]):
        (width,) = {specs[s].bits for s in unit.sites}
        if width == ladder[-1]:
            continue
        higher = make_spec(ladder[ladder.index(width) + 1], "rtn-asym", group_size=128)
        extra = sum(site_bytes(graph, s, higher) - site_bytes(graph, s, specs[s])
                    for s in unit.sites)
        assert used + 8 * extra > capacity, unit.name


# 5767168 weights: 6 blocks of 786432, lm_head 1048576 (lowest ZD of all: promoted first).
# One rung up at group 128 costs (hi - lo) * (1 + 1/128) bits per weight:
#   bits=3.8 (ladder 3 -> 4): slack (3.8 - 3.2734375) * 5767168 = 3036774.4 bits; lm_head
#     takes 1056768, each block 792576: two blocks fit (1585152), a third does not
#   bits=3.5, lo=2, hi=4: slack (3.5 - 2.265625) * 5767168 = 7118848 bits; lm_head takes
#     2113536, each block 1585152: three blocks fit (4755456), a fourth does not
@pytest.mark.parametrize(("options", "lo", "hi", "high_blocks"), [
    ("bits=3.8", 3, 4, 2),
    ("bits=3.5,lo=2,hi=4", 2, 4, 3),
])
def test_zd_layer_granularity_keeps_the_lowest_zd_blocks_high(analysed, options, lo, hi,
                                                              high_blocks):
    bits = plan(analysed, f"policy-zd{{{options},granularity=layer}}")
    assert analysed.plan.budget["widths"] == [lo, hi]
    block_bits = {}
    for block in analysed.blocks:
        widths = {bits[s] for s in block.sites}
        assert len(widths) == 1  # a block shares one width
        block_bits[block.index] = widths.pop()
    by_zd = sorted(analysed.blocks, key=lambda b: b.stats["zd"].zd)
    ordered = [block_bits[b.index] for b in by_zd]
    assert ordered == sorted(ordered, reverse=True)  # lower ZD never gets fewer bits
    assert set(ordered) == {lo, hi}
    assert ordered.count(hi) == high_blocks
    assert bits["lm_head"] == hi
    assert all(b.stats["zd"].zd > analysed.sites["lm_head"].stats["zd"].zd
               for b in analysed.blocks)


def test_entropy_threshold_rule_without_budget(analysed):
    bits = plan(analysed, "policy-entropy{granularity=layer,k=0.5}")
    scores = {b.index: b.stats["entropy"].entropy - b.stats["entropy"].max_entropy
              for b in analysed.blocks}
    head = analysed.sites["lm_head"].stats["entropy"]
    values = np.array([*scores.values(), head.entropy - head.max_entropy])
    mu, sd = values.mean(), values.std()
    for index, h in scores.items():
        expected = 4 if h < mu - 0.5 * sd else 8 if h <= mu + 0.5 * sd else 16
        assert {bits[s] for s in analysed.blocks[index].sites} == {expected}
    assert analysed.plan.budget["mode"] == "rule"
    assert "EWQ threshold rule" in analysed.plan.notes[0]


def test_ratio_puts_at_most_that_share_at_the_low_width(analysed):
    bits = plan(analysed, "policy-zd{ratio=0.5,lo=2,hi=4}")
    low = sum(analysed.sites[s].params for s, b in bits.items() if b == 2)
    assert Fraction(low, analysed.total_params) <= Fraction(1, 2)
    # the next least important unit would have crossed the ratio
    assert low / analysed.total_params > 0.5 - 768 * 256 / analysed.total_params


def test_random_policy_is_seeded(analysed):
    first = plan(analysed, "policy-random{bits=3.5,seed=7}")
    assert plan(analysed, "policy-random{bits=3.5,seed=7}") == first
    assert any(plan(analysed, f"policy-random{{bits=3.5,seed={s}}}") != first for s in range(3))


def test_overrides_are_charged_first_and_can_make_the_budget_infeasible(analysed):
    with pytest.raises(BudgetError, match="infeasible"):
        plan(analysed, 'policy-zd{bits=3,override="lm_head=16"}')


def test_override_that_matches_nothing_is_an_error(analysed):
    with pytest.raises(PipelineError, match="matches no site"):
        plan(analysed, 'policy-zd{bits=4,override="no_such_layer=8"}')


def test_policy_without_budget_or_rule_asks_for_one(analysed):
    with pytest.raises(PipelineError, match="needs a budget"):
        plan(analysed, "policy-zd")


def test_exact_solver_refuses_pins_that_alone_break_the_budget(analysed):
    with pytest.raises(BudgetError, match="overridden sites alone"):
        plan(analysed, 'policy-zd{bits=3,solver=exact,override=".*=16"}')


# hi is the next rung of 2 -> 3 -> 4 -> 8 above lo; each budget lies between the uniform
# plans of lo and hi (2.265625 < 2.8 < 3.2734375 < 3.5 < 4.28125 < 5 < 8.3125), so both appear
@pytest.mark.parametrize(("budget", "lo", "hi"), [(2.8, 2, 3), (3.5, 3, 4), (5.0, 4, 8)])
def test_lo_alone_climbs_to_the_next_rung(analysed, budget, lo, hi):
    bits = plan(analysed, f"policy-zd{{bits={budget},lo={lo}}}")
    assert set(bits.values()) == {lo, hi}
    assert analysed.plan.budget["widths"] == [lo, hi]
    assert physical_bits(analysed) <= budget


# the exact solver, like the greedy one, mixes the two rungs around the budget unless told the
# widths: its plan fills the budget from below, and a given width list is taken as it is
@pytest.mark.parametrize(("options", "ladder"), [
    ("bits=2.8", [2, 3]), ("bits=3.5", [3, 4]), ("bits=5.0", [4, 8]),
    ("bits=3.5,lo=2", [2, 3]), ("bits=3.5,hi=8", [3, 8]), ("bits=3.5,widths=2+4+8", [2, 4, 8])])
def test_exact_solver_widths_are_the_rungs_around_the_budget_unless_given(analysed, options,
                                                                           ladder):
    bits = plan(analysed, f"policy-zd{{{options},solver=exact}}")
    assert analysed.plan.budget["widths"] == ladder
    assert set(bits.values()) <= set(ladder)
    budget = float(options.split(",")[0].removeprefix("bits="))
    assert 8 * totals(analysed, analysed.plan.specs).bytes <= Fraction(str(budget)) * (
        analysed.total_params)
    if options == f"bits={budget}":  # the lower rung alone fits, the upper one alone does not
        assert set(bits.values()) == set(ladder)


def test_ewq_rule_ranks_blocks_unless_told_otherwise(analysed):
    bits = plan(analysed, "policy-entropy")
    assert analysed.plan.budget["granularity"] == "layer"
    for block in analysed.blocks:
        assert len({bits[s] for s in block.sites}) == 1


def test_options_given_from_python_pass_the_same_checks_as_text():
    from lwqc.passes.calibration import CalibrationPass
    from lwqc.passes.policy_zd import ZDPolicy

    with pytest.raises(PipelineError, match="expected REGEX=BITS"):
        ZDPolicy(bits=4.0, override=["no-equals-sign"])
    with pytest.raises(PipelineError, match="positive integer"):
        CalibrationPass(samples=0)
    with pytest.raises(PipelineError, match="non-negative"):
        CalibrationPass(seed=-1)
