"""The LIM policy on a hand-built graph: LIM scores in, widths within the budget out.

Four blocks (q 8x128 and up 24x128 each) and an lm_head (8x128) outside them; group size
128 = the whole input row, so a site of ``out`` rows at ``b`` bits (rtn-asym) stores
``out * 128 * b / 8`` code bytes, ``out`` float32 scales and ``out`` b-bit zero points.
"""

from __future__ import annotations

from fractions import Fraction

import networkx as nx
import pytest

from lwqc.ir.accounting import totals
from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.passes.base import MissingRequirementError
from lwqc.passes.lim import LimStat
from lwqc.passes.manager import PassManager
from lwqc.registry import parse

IN = 128
BLOCK_LIM = [0.10, 0.40, 0.25, 0.05]  # most to least: block 1, 2, 0, 3
HEAD_LIM = 0.40  # as the lim pass sets it: the highest block LIM (ties with block 1)
BLOCK_PARAMS = (8 + 24) * IN  # 4096
HEAD_PARAMS = 8 * IN  # 1024
TOTAL_PARAMS = 4 * BLOCK_PARAMS + HEAD_PARAMS  # 17408


def rtn_asym_bytes(out: int, bits: int) -> int:
    """Closed form for one site of ``out`` rows x 128 inputs, one group per row (16 bits:
    kept as the graph's float32)."""
    if bits == 16:
        return out * IN * 4
    codes = -(-out * IN * bits // 8)
    scales = 4 * out
    zero_points = -(-out * bits // 8)
    return codes + scales + zero_points


def block_bytes(bits: int) -> int:
    return rtn_asym_bytes(8, bits) + rtn_asym_bytes(24, bits)


def test_closed_form_sizes_by_hand():
    # 2 bits: 32 rows * 32 B codes + 32 * 4 B scales + 8 B zero points = 1024 + 128 + 8
    assert block_bytes(2) == 1160
    # 3 bits, packed: 32 rows * 48 B codes + 128 B scales + 8 rows * 3 bits -> 3 B and
    # 24 rows * 3 bits -> 9 B of zero points
    assert block_bytes(3) == 1536 + 128 + 3 + 9
    assert rtn_asym_bytes(8, 3) == 384 + 32 + 3
    assert block_bytes(4) == 2048 + 128 + 16
    assert rtn_asym_bytes(8, 2) == 256 + 32 + 2
    # uniform plans (4 blocks + lm_head), in bits: the automatic ladder's rungs
    assert 8 * (4 * block_bytes(2) + rtn_asym_bytes(8, 2)) == 8 * (4640 + 290) == 39440
    assert 8 * (4 * block_bytes(3) + rtn_asym_bytes(8, 3)) == 8 * (6704 + 419) == 56984
    assert 8 * (4 * block_bytes(4) + rtn_asym_bytes(8, 4)) == 8 * (8768 + 548) == 74528
    assert 8 * (4 * block_bytes(8) + rtn_asym_bytes(8, 8)) == 8 * (17024 + 1064) == 144704


def lim_graph(block_lim=BLOCK_LIM, head_lim=HEAD_LIM, site_lim=None) -> Graph:
    """The graph, annotated: blocks with ``block_lim``, sites with their block's LIM unless
    ``site_lim`` (site id -> LIM) says otherwise."""
    sites, blocks = {}, []
    order = 0
    for index in range(len(block_lim)):
        ids = []
        for role, rows in (("q", 8), ("up", 24)):
            site_id = f"layers.{index}.{role}"
            sites[site_id] = MatmulSite(site_id, role, index, (rows, IN), site_id, order)
            ids.append(site_id)
            order += 1
        blocks.append(Block(index, f"layers.{index}", ids))
    sites["lm_head"] = MatmulSite("lm_head", "lm_head", None, (8, IN), "lm_head", order)
    dataflow = nx.DiGraph()
    dataflow.add_edges_from(zip(list(sites), list(sites)[1:], strict=False))
    graph = Graph("toy", "llama", sites, blocks, dataflow)
    for block in blocks:
        graph.annotate_block(block.index, LimStat("lim", block_lim[block.index], 100))
    for site in graph:
        value = head_lim if site.block is None else block_lim[site.block]
        value = (site_lim or {}).get(site.id, value)
        graph.annotate_site(site.id, LimStat("lim", value, 100))
    return graph


def run(graph: Graph, pipeline: str) -> dict[str, int]:
    PassManager(parse(pipeline)).run(graph)
    return {s: spec.bits for s, spec in graph.plan.specs.items()}


def block_widths(graph: Graph, bits: dict[str, int]) -> list[int]:
    """The one width of each block (layer granularity: a block shares it)."""
    widths = []
    for block in graph.blocks:
        shared = {bits[s] for s in block.sites}
        assert len(shared) == 1, (block.module, shared)
        widths.append(shared.pop())
    return widths


def physical_bits(graph: Graph, bits: dict[str, int]) -> Fraction:
    nbytes = sum(rtn_asym_bytes(graph.sites[s].shape[0], b) for s, b in bits.items())
    return Fraction(8 * nbytes, TOTAL_PARAMS)


def test_annotating_makes_lim_available():
    graph = lim_graph()
    assert {"site.lim", "block.lim"} <= graph.available
    assert graph.total_params == TOTAL_PARAMS


# The automatic ladder: lo is the widest width whose uniform plan fits, hi the next rung of
# 2 -> 3 -> 4 -> 8 -> 16. Uniform plans need 39440 bits at 2 (2.2656 bits per weight), 56984 at
# 3 (3.2734), 74528 at 4 (4.28125), 144704 at 8 (8.3125). One rung up costs, in bits:
#   2 -> 3 and 3 -> 4: a block 8 * 516 = 4128 (512 B codes + 4 B zero points), lm_head
#     8 * 129 = 1032 (128 + 1)
#   4 -> 8: a block 8 * 2064 = 16512, lm_head 8 * 516 = 4128
# promotions go block 1 (0.40; ties with lm_head, runs first), lm_head, block 2 (0.25),
# block 0, block 3; a unit that does not fit is skipped.
@pytest.mark.parametrize(("budget", "expected_blocks", "expected_head", "ladder"), [
    (2.3, [2, 2, 2, 2], 2, [2, 3]),    # 40038.4: from 39440 block 1 needs 43568, lm_head 40472
    (2.52, [2, 3, 2, 2], 2, [2, 3]),   # 43868.16: block 1 (43568); lm_head would need 44600
    (2.6, [2, 3, 2, 2], 3, [2, 3]),    # 45260.8: + lm_head (44600); block 2 would need 48728
    (2.85, [2, 3, 3, 2], 3, [2, 3]),   # 49612.8: + block 2 (48728); block 0 would need 52856
    (3.1, [3, 3, 3, 2], 3, [2, 3]),    # 53964.8: + block 0 (52856); block 3 would need 56984
    (3.6, [3, 4, 3, 3], 4, [3, 4]),    # 62668.8: from 56984 block 1 (61112), lm_head (62144)
    (3.85, [3, 4, 4, 3], 4, [3, 4]),   # 67020.8: + block 2 (66272); block 0 would need 70400
    (4.1, [4, 4, 4, 3], 4, [3, 4]),    # 71372.8: + block 0 (70400); block 3 would need 74528
    (5.5, [4, 8, 4, 4], 8, [4, 8]),    # 95744: from 74528 block 1 (91040), lm_head (95168)
])
def test_bits_gives_the_most_lim_blocks_the_higher_width(budget, expected_blocks,
                                                          expected_head, ladder):
    graph = lim_graph()
    bits = run(graph, f"policy-lim{{bits={budget},granularity=layer}}")
    assert block_widths(graph, bits) == expected_blocks
    assert bits["lm_head"] == expected_head
    assert graph.plan.budget["widths"] == ladder
    assert graph.plan.policy == "policy-lim"


# lo=2, hi=4 by hand: every unit starts at 2 bits (39440 bits); 2 -> 4 costs 8256 bits per
# block, 2064 for lm_head; same order of promotions.
@pytest.mark.parametrize(("budget", "expected_blocks", "expected_head"), [
    (2.3, [2, 2, 2, 2], 2),    # capacity 40038.4: no promotion fits
    (2.75, [2, 4, 2, 2], 2),   # 47872: block 1 (47696); lm_head would need 49760
    (3.0, [2, 4, 2, 2], 4),    # 52224: block 1, lm_head (49760); block 2 would need 58016
    (3.5, [2, 4, 4, 2], 4),    # 60928: + block 2 (58016); block 0 would need 66272
    (4.0, [4, 4, 4, 2], 4),    # 69632: + block 0 (66272); block 3 would need 74528
])
def test_given_lo_and_hi_mix_exactly_those_two_widths(budget, expected_blocks, expected_head):
    graph = lim_graph()
    bits = run(graph, f"policy-lim{{bits={budget},granularity=layer,lo=2,hi=4}}")
    assert block_widths(graph, bits) == expected_blocks
    assert bits["lm_head"] == expected_head
    assert graph.plan.budget["widths"] == [2, 4]
    assert physical_bits(graph, bits) <= Fraction(str(budget))


@pytest.mark.parametrize("budget", [2.3, 2.6, 2.9, 3.2, 3.7, 4.3, 5.0, 6.5, 8.4, 12.0])
def test_bits_is_never_exceeded_and_more_lim_never_gets_fewer_bits(budget):
    graph = lim_graph()
    bits = run(graph, f"policy-lim{{bits={budget},granularity=layer}}")
    used = physical_bits(graph, bits)
    assert used <= Fraction(str(budget))
    assert totals(graph, graph.plan.specs).avg_bits_physical == pytest.approx(float(used))
    widths = block_widths(graph, bits)
    by_lim = [widths[i] for i in sorted(range(4), key=lambda i: -BLOCK_LIM[i])]
    assert by_lim == sorted(by_lim, reverse=True)


def test_bits_just_below_a_promotion_withholds_it_and_just_above_grants_it():
    # automatic ladder [2, 3]: blocks 1, 2 and lm_head at 3 bits need 48728 bits:
    # 2.79917279... bits per weight
    assert Fraction("2.79917") < Fraction(48728, TOTAL_PARAMS) < Fraction("2.79918")
    below = lim_graph()
    assert block_widths(below, run(below, "policy-lim{bits=2.79917,granularity=layer}")) == [
        2, 3, 2, 2]
    above = lim_graph()
    assert block_widths(above, run(above, "policy-lim{bits=2.79918,granularity=layer}")) == [
        2, 3, 3, 2]
    # lo=2, hi=4: blocks 1, 2 and lm_head at 4 bits need 58016 bits: 3.33272058... bits
    assert Fraction(58016, TOTAL_PARAMS) > Fraction("3.33272")
    assert Fraction(58016, TOTAL_PARAMS) < Fraction("3.33273")
    below = lim_graph()
    assert block_widths(
        below, run(below, "policy-lim{bits=3.33272,granularity=layer,lo=2,hi=4}")) == [
        2, 4, 2, 2]
    above = lim_graph()
    assert block_widths(
        above, run(above, "policy-lim{bits=3.33273,granularity=layer,lo=2,hi=4}")) == [
        2, 4, 4, 2]


def test_swapping_lim_scores_swaps_the_widths():
    # at 3.85 (ladder [3, 4]) blocks 1 and 2 get 4 bits (see above); swapping blocks 0 <-> 1
    # and 2 <-> 3 swaps which blocks get them
    original = lim_graph()
    assert block_widths(original, run(original, "policy-lim{bits=3.85,granularity=layer}")) == [
        3, 4, 4, 3]
    graph = lim_graph(block_lim=[0.40, 0.10, 0.05, 0.25], head_lim=0.40)
    bits = run(graph, "policy-lim{bits=3.85,granularity=layer}")
    assert block_widths(graph, bits) == [4, 3, 3, 4]
    assert bits["lm_head"] == 4


def test_layer_granularity_ranks_blocks_by_their_block_lim_not_their_sites():
    # site LIMs say the opposite of block LIMs; at layer granularity the block stat decides
    opposite = {f"layers.{i}.{r}": 1.0 - BLOCK_LIM[i] for i in range(4) for r in ("q", "up")}
    graph = lim_graph(site_lim=opposite)
    bits = run(graph, "policy-lim{bits=3.85,granularity=layer}")
    assert block_widths(graph, bits) == [3, 4, 4, 3]
    graph = lim_graph(site_lim=opposite)
    bits = run(graph, "policy-lim{bits=3.5,granularity=layer,lo=2,hi=4}")
    assert block_widths(graph, bits) == [2, 4, 4, 2]


def test_matmul_granularity_ranks_sites_by_their_own_lim():
    # the default granularity is matmul: each site is its own unit, ranked by its site LIM
    site_lim = {"layers.3.q": 0.99}  # one 8-row site of the least-LIM block jumps the queue
    # ladder [2, 3]: 2 -> 3 costs an 8-row site 8 * 129 = 1032 bits, a 24-row site
    # 8 * (1257 - 870) = 3096; capacity 2.4 * 17408 = 41779.2 from 39440: layers.3.q (40472),
    # block 1's q (41504), then block 1's up (44600), lm_head and every other 8-row site
    # (42536) no longer fit
    graph = lim_graph(site_lim=site_lim)
    bits = run(graph, "policy-lim{bits=2.4}")
    assert graph.plan.budget["granularity"] == "matmul"
    assert graph.plan.budget["widths"] == [2, 3]
    assert rtn_asym_bytes(24, 3) - rtn_asym_bytes(24, 2) == 387
    assert {s for s, b in bits.items() if b == 3} == {"layers.3.q", "layers.1.q"}
    assert physical_bits(graph, bits) == Fraction(41504, TOTAL_PARAMS)
    # lo=2, hi=4: 2 -> 4 costs an 8-row site 2064 bits, a 24-row site 6192; capacity
    # 2.5 * 17408 = 43520 from 39440: layers.3.q (41504), then block 1's q (43568) no longer
    # fits, lm_head (1024 params, 2064 bits) neither; nothing else fits
    graph = lim_graph(site_lim=site_lim)
    bits = run(graph, "policy-lim{bits=2.5,lo=2,hi=4}")
    assert {s for s, b in bits.items() if b == 4} == {"layers.3.q"}
    assert physical_bits(graph, bits) == Fraction(41504, TOTAL_PARAMS)


@pytest.mark.parametrize(("ratio", "low_blocks"), [
    # least LIM first: block 3, 0, 2, lm_head, 1 (4096 params per block of 17408)
    (0.0, []),
    (0.2, []),          # 4096 / 17408 = 0.235 > 0.2
    (0.25, [3]),        # block 0 would make 0.47
    (0.5, [0, 3]),      # block 2 would make 0.71
    (0.75, [0, 2, 3]),  # lm_head would make 0.76
    (1.0, [0, 1, 2, 3]),
])
def test_ratio_puts_the_least_lim_share_at_lo(ratio, low_blocks):
    graph = lim_graph()
    bits = run(graph, f"policy-lim{{ratio={ratio},granularity=layer,lo=2,hi=8}}")
    widths = block_widths(graph, bits)
    assert [i for i, w in enumerate(widths) if w == 2] == low_blocks
    assert all(w == 8 for i, w in enumerate(widths) if i not in low_blocks)
    low = sum(graph.sites[s].params for s, b in bits.items() if b == 2)
    assert Fraction(low, TOTAL_PARAMS) <= Fraction(str(ratio))
    assert bits["lm_head"] == (2 if ratio == 1.0 else 8)
    assert graph.plan.budget["mode"] == "ratio"


def test_ratio_without_widths_uses_4_and_8():
    graph = lim_graph()
    bits = run(graph, "policy-lim{ratio=0.5,granularity=layer}")
    assert block_widths(graph, bits) == [4, 8, 8, 4]
    assert graph.plan.budget["widths"] == [4, 8]


def test_lim_without_a_budget_asks_for_one():
    with pytest.raises(PipelineError, match="policy 'policy-lim' needs a budget"):
        run(lim_graph(), "policy-lim{granularity=layer}")


def _bare_graph() -> Graph:
    graph = lim_graph()
    for site in graph:
        site.stats.clear()
    for block in graph.blocks:
        block.stats.clear()
    graph.available.clear()
    return graph


def test_manager_refuses_lim_policy_without_the_lim_annotation():
    graph = _bare_graph()
    with pytest.raises(MissingRequirementError, match="pass 'policy-lim' needs site.lim"):
        run(graph, "policy-lim{bits=3}")
    assert graph.plan is None


def test_manager_refuses_lim_policy_with_only_block_lim():
    graph = _bare_graph()
    for block in graph.blocks:
        graph.annotate_block(block.index, LimStat("lim", 0.5, 1))
    with pytest.raises(MissingRequirementError, match="needs site.lim"):
        run(graph, "policy-lim{bits=3}")


def test_pipeline_order_decides_whether_lim_is_provided():
    PassManager(parse("calib,lim,policy-lim{bits=3}")).check(set())  # lim, then the policy
    with pytest.raises(MissingRequirementError, match="pass 'policy-lim' needs site.lim"):
        PassManager(parse("policy-lim{bits=3},calib,lim")).check(set())
    with pytest.raises(MissingRequirementError, match="pass 'lim' needs calibration"):
        PassManager(parse("lim,policy-lim{bits=3}")).check(set())
