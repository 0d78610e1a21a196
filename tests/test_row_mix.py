"""Row-level mixed precision: the row-mix spec and format, its per-row solver, and planning by
rows with policy-sensitivity{granularity=row}."""

from __future__ import annotations

import itertools
from fractions import Fraction

import networkx as nx
import numpy as np
import pytest

from lwqc.backends import torch_eager
from lwqc.cli import main
from lwqc.ir.accounting import totals
from lwqc.ir.capabilities import PACKED_STORAGE
from lwqc.ir.errors import PipelineError, PlanError
from lwqc.ir.formats import RowMixWeight, load_weight
from lwqc.ir.formats.row_mix import in_row_order, order_dtype, row_order, split_row_order
from lwqc.ir.graph import Graph, MatmulSite
from lwqc.ir.hf_source import import_model
from lwqc.ir.spec import (
    AsymmetricSpec,
    CodebookSpec,
    FloatOffsetDqSpec,
    KeepSpec,
    RowMixSpec,
    SymmetricSpec,
    row_mix,
    spec_from_json,
)
from lwqc.passes.gptq import GptqSettings
from lwqc.passes.manager import PassManager
from lwqc.passes.quantizers import quantize_weight
from lwqc.passes.sensitivity import SensitivityStat
from lwqc.passes.solver import solve_rows
from lwqc.registry import parse

DQ3, DQ4 = FloatOffsetDqSpec(3, 32), FloatOffsetDqSpec(4, 32)

# ------------------------------------------------------------------------------- the spec


def test_part_rows_params_by_bits_and_label():
    spec = RowMixSpec(bits=4, parts=(DQ3, DQ4), rows="0110")
    assert [rows.tolist() for rows in spec.part_rows()] == [[0, 3], [1, 2]]
    assert spec.params_by_bits((4, 64)) == {3: 128, 4: 128}
    assert spec.code_widths() == {3, 4}
    assert spec.label() == "rows: 50% w3g32 + 50% w4g32 float-offset-dq"
    other = RowMixSpec(bits=8, parts=(DQ3, SymmetricSpec(8, None)), rows="0111")
    assert other.label() == "rows: 75% w8grow rtn-sym + 25% w3g32 float-offset-dq"
    assert not spec.kept


@pytest.mark.parametrize("fields, match", [
    ({"bits": 4, "parts": (), "rows": "0"}, "1 to 36 parts"),
    ({"bits": 3, "parts": (DQ3, CodebookSpec(3)), "rows": "01"}, "quantized group specs"),
    ({"bits": 16, "parts": (DQ3, KeepSpec()), "rows": "01"}, "quantized group specs"),
    ({"bits": 3, "parts": (DQ3, DQ3), "rows": "01"}, "differ"),
    ({"bits": 3, "parts": (DQ3, DQ4), "rows": "01"}, "widest part's, 4"),
    ({"bits": 4, "parts": (DQ3, DQ4), "rows": "012"}, r"string of part digits \(01\)"),
    ({"bits": 4, "parts": (DQ3, DQ4), "rows": ""}, "string of part digits"),
    ({"bits": 4, "parts": (DQ3, DQ4), "rows": [0, 1]}, "string of part digits"),
    ({"bits": 4, "parts": (DQ3, DQ4), "rows": "000"}, "at least one row"),
    ({"bits": 4, "parts": (DQ3, DQ4), "rows": "01", "outliers": 0.01}, "no outliers"),
])
def test_bad_row_mix_specs_are_plan_errors(fields, match):
    with pytest.raises(PlanError, match=match):
        RowMixSpec(**fields)


def test_row_mix_json_round_trips_and_bad_parts_are_plan_errors():
    spec = RowMixSpec(bits=8, parts=(SymmetricSpec(8, 16), AsymmetricSpec(2, None, 0.01)),
                      rows="1001")
    assert spec.to_json() == {"bits": 8, "parts": [
        {"bits": 8, "group_size": 16, "scheme": "rtn-sym"},
        {"bits": 2, "group_size": None, "outliers": 0.01, "scheme": "rtn-asym"}],
        "rows": "1001", "scheme": "row-mix"}
    assert spec_from_json(spec.to_json()) == spec
    with pytest.raises(PlanError, match="parts: a list"):
        spec_from_json({"bits": 4, "scheme": "row-mix", "parts": "w4", "rows": "0"})
    with pytest.raises(PlanError, match="quantized group specs"):
        spec_from_json({"bits": 4, "scheme": "row-mix", "rows": "01",
                        "parts": [{"bits": 4, "scheme": "codebook"}, DQ3.to_json()]})
    with pytest.raises(PlanError, match="unsupported width 5"):
        spec_from_json({"bits": 5, "scheme": "row-mix", "rows": "0",
                        "parts": [{"bits": 5, "group_size": 8, "scheme": "rtn-asym"}]})


def test_row_mix_of_one_choice_is_that_spec_and_unused_specs_are_left_out():
    a, b, c = DQ3, DQ4, AsymmetricSpec(8, 32)
    assert row_mix([a, b, c], np.array([1, 1, 1])) == b
    mixed = row_mix([a, b, c], np.array([2, 0, 2, 2]))
    assert mixed == RowMixSpec(bits=8, parts=(a, c), rows="1011")


# ------------------------------------------------------------------------------ the format


def test_order_puts_each_row_at_its_place_among_the_stacked_parts():
    # parts stack rows [0, 3] then [1, 2]: row 0 is stacked row 0, row 1 is 2, row 2 is 3
    order = row_order(RowMixSpec(bits=4, parts=(DQ3, DQ4), rows="0110"))
    assert order.tolist() == [0, 2, 3, 1]
    assert order.dtype == np.uint16
    assert order_dtype(65536) == np.uint16 and order_dtype(65537) == np.int32


def test_arrays_of_the_parts_go_into_row_order_and_back():
    # parts stack rows [0, 3] then [1, 2]: order [0, 2, 3, 1]
    order = row_order(RowMixSpec(bits=4, parts=(DQ3, DQ4), rows="0110"))
    parts = [{"a": np.array([[10, 0], [13, 3]]), "only_first": np.zeros(2)},
             {"a": np.array([[11, 1], [12, 2]])}]
    joined = in_row_order(parts, order)
    assert list(joined) == ["a"]  # arrays every part has
    assert joined["a"].tolist() == [[10, 0], [11, 1], [12, 2], [13, 3]]
    back = split_row_order(joined, order, [2, 2])
    assert [part["a"].tolist() for part in back] == [[[10, 0], [13, 3]], [[11, 1], [12, 2]]]


@pytest.mark.parametrize("gptq", [False, True])
def test_row_mix_dequantizes_each_row_as_its_spec_quantizes_the_whole_site(gptq):
    """Rows are independent: each row equals that row of the whole site quantized by its
    part's spec (with GPTQ too: its feedback runs along a row)."""
    rng = np.random.default_rng(3)
    weight = rng.normal(size=(12, 96)).astype(np.float32)
    x = rng.normal(size=(200, 96)) * rng.uniform(0.2, 3, 96)
    gram = x.T @ x
    settings = GptqSettings() if gptq else None
    specs = [DQ3, FloatOffsetDqSpec(4, 64), AsymmetricSpec(2, 32)]
    choice = np.array([0, 1, 2, 2, 0, 1, 1, 0, 2, 0, 0, 1])
    mixed = quantize_weight(weight, row_mix(specs, choice), "output", gram, settings)
    whole = [quantize_weight(weight, s, "output", gram, settings).dequantize() for s in specs]
    expected = np.stack([whole[c][r] for r, c in enumerate(choice)])
    np.testing.assert_array_equal(mixed.dequantize(), expected)
    back = load_weight(mixed.spec, mixed.arrays())
    np.testing.assert_array_equal(back.dequantize(), expected)


def test_row_mix_bytes_are_its_parts_and_its_order_by_hand():
    # 10 rows of 64 inputs: 6 rows at 3 bits g32 (384 codes = 144 bytes; 12 groups of two
    # 6-bit codes = 2 x 9 bytes; one super-group per row: 6 x 2 float16 steps = 24 bytes),
    # 4 rows at 4 bits g32 (128 + 2 x 6 + 16 bytes), and 10 uint16 positions
    spec = row_mix([DQ3, DQ4], np.array([0, 1, 1, 0, 0, 1, 0, 0, 0, 1]))
    expected = (144 + 18 + 24) + (128 + 12 + 16) + 20
    assert PACKED_STORAGE.bytes((10, 64), spec, 32) == expected
    weight = quantize_weight(np.ones((10, 64), np.float32), spec)
    assert weight.nbytes(PACKED_STORAGE.code_bits) == expected
    assert weight.arrays()["order"].nbytes == 20


def test_row_mix_format_and_quantizer_refuse_inconsistent_input():
    spec = RowMixSpec(bits=4, parts=(DQ3, DQ4), rows="0110")
    weight = quantize_weight(np.ones((4, 32), np.float32), spec)
    with pytest.raises(PlanError, match="permutation"):
        RowMixWeight(spec, weight.parts, np.array([0, 0, 1, 2], np.uint16))
    with pytest.raises(PlanError, match="match the spec's parts"):
        RowMixWeight(spec, weight.parts[::-1], weight.order)
    with pytest.raises(PlanError, match="assigns 4 rows, the weight has 5"):
        quantize_weight(np.ones((5, 32), np.float32), spec)


def test_torch_buffers_and_packed_file_hold_a_row_mix(tmp_path):
    spec = row_mix([DQ3, DQ4, AsymmetricSpec(8, 32)], np.array([2, 0, 1, 2, 0]))
    weight = quantize_weight(np.random.default_rng(0).normal(size=(5, 64)).astype(np.float32),
                             spec)
    linear = torch_eager.PackedLinear(weight, None)
    np.testing.assert_array_equal(linear.dequantized_weight().numpy(), weight.dequantize())
    path = tmp_path / "packed.safetensors"
    torch_eager.save_packed({"a.b": weight}, path)
    back = torch_eager.read_packed(path, {"a.b"})["a.b"]
    assert back.spec == spec
    np.testing.assert_array_equal(back.dequantize(), weight.dequantize())


# ------------------------------------------------------------------------------- the solver


def _brute_force(losses, costs, mixing, capacity):
    """The least loss of any per-row assignment whose exact cost fits (exhaustive)."""
    best = None
    per_unit = [list(itertools.product(range(c.size), repeat=rows.shape[0]))
                for rows, c in zip(losses, costs, strict=True)]
    for assignment in itertools.product(*per_unit):
        cost = loss = 0.0
        for rows, c, extra, picks in zip(losses, costs, mixing, assignment, strict=True):
            cost += sum(c[p] / len(picks) for p in picks) + (extra if len(set(picks)) > 1 else 0)
            loss += sum(rows[r, p] for r, p in enumerate(picks))
        if cost <= capacity + 1e-9 and (best is None or loss < best):
            best = loss
    return best


def _exact_cost(costs, mixing):
    def cost(picks):
        return sum(c[p].sum() / len(p) + (extra if len(np.unique(p)) > 1 else 0)
                   for c, extra, p in zip(costs, mixing, picks, strict=True))
    return cost


@pytest.mark.parametrize("seed", range(6))
def test_solve_rows_is_optimal_for_the_budget_it_spends(seed):
    """Against exhaustive search over every row assignment of two units: the solver's plan
    fits, and no plan spending at most as much has a lower loss."""
    rng = np.random.default_rng(seed)
    costs = [np.array([30.0, 40.0, 80.0]), np.array([45.0, 60.0, 120.0])]
    losses = [rng.uniform(0, 1, (3, 3)) * [4, 1, 0.1], rng.uniform(0, 1, (3, 3)) * [3, 1, 0]]
    mixing = [2, 3]
    cost = _exact_cost(costs, mixing)
    for capacity in (75, 90, 110, 150, 200):
        picks = solve_rows(losses, costs, mixing, lambda p: int(np.ceil(cost(p))),
                           Fraction(8 * capacity))
        spent = int(np.ceil(cost(picks)))
        assert spent <= capacity
        loss = sum(rows[np.arange(3), p].sum() for rows, p in zip(losses, picks, strict=True))
        assert loss == pytest.approx(_brute_force(losses, costs, mixing, spent), abs=1e-12)


def test_solve_rows_takes_the_best_plan_when_it_fits_and_refuses_an_infeasible_budget():
    losses = [np.array([[3.0, 1.0], [2.0, 0.5]])]
    costs = [np.array([10.0, 20.0])]

    def cost(picks):
        return int(sum(costs[0][p].sum() / 2 for p in picks) + 4 * (len(set(picks[0])) > 1))

    assert solve_rows(losses, costs, [4], cost, Fraction(8 * 20))[0].tolist() == [1, 1]
    assert solve_rows(losses, costs, [4], cost, Fraction(8 * 10))[0].tolist() == [0, 0]
    assert solve_rows(losses, costs, [4], cost, Fraction(8 * 9)) is None
    assert solve_rows([], [], [], cost, Fraction(0)) == []


# ------------------------------------------------------------------------ planning by rows

ROW_ANALYSES = "gram,sensitivity{metric=output-error,group_size=32+64}"


def _analysed(tiny_llama_dir):
    graph = import_model(str(tiny_llama_dir))
    graph.calibration = np.random.default_rng(3).integers(0, 128, (6, 24))  # token windows
    graph.available.add("calibration")
    PassManager(parse(ROW_ANALYSES)).run(graph)
    return graph


def _planned(tiny_llama_dir, policy: str):
    graph = _analysed(tiny_llama_dir)
    PassManager(parse(policy)).run(graph)
    return graph


def _predicted_loss(graph) -> float:
    total = 0.0
    for site_id, spec in graph.plan.specs.items():
        parts = spec.parts if isinstance(spec, RowMixSpec) else (spec,)
        rows = spec.part_rows() if isinstance(spec, RowMixSpec) else [slice(None)]
        for part, index in zip(parts, rows, strict=True):
            total += graph.row_damage[site_id][part.bits, part.group_size][index].sum()
    return total


def test_planning_by_rows_fits_the_budget_and_never_predicts_more_damage_than_by_matmuls(
        tiny_llama_dir):
    policy = "policy-sensitivity{bits=3.6,group_size=32+64"
    by_rows = _planned(tiny_llama_dir, f"{policy},granularity=row}}")
    by_matmuls = _planned(tiny_llama_dir, f"{policy}}}")
    for graph in (by_rows, by_matmuls):
        assert totals(graph, graph.plan.specs).avg_bits_physical <= 3.6
    assert by_rows.plan.budget["granularity"] == "row"
    assert _predicted_loss(by_rows) <= _predicted_loss(by_matmuls) * (1 + 1e-12)
    # the sums of the analysis' per-row damage are its per-matmul damage
    for site_id in by_matmuls.sites:
        stat = by_matmuls.sites[site_id].stats["sensitivity"]
        for bits, group_size in itertools.product((2, 3, 4, 8), (32, 64)):
            assert by_matmuls.row_damage[site_id][bits, group_size].sum() == pytest.approx(
                stat.error(bits, group_size), rel=1e-12)


def _two_site_graph() -> Graph:
    """Two 64 x 256 matmuls; the first 8 rows of ``a`` are 100 times as sensitive as its
    others, ``b``'s rows all alike; 4 bits cost a quarter of 3 bits' damage."""
    sites = {name: MatmulSite(name, name, None, (64, 256), name, order)
             for order, name in enumerate(("a", "b"))}
    graph = Graph("toy", "Toy", sites, [], nx.DiGraph())
    damage = {"a": np.r_[np.full(8, 100.0), np.ones(56)], "b": np.full(64, 2.0)}
    for name, rows in damage.items():
        graph.row_damage[name] = {(3, 32): rows, (4, 32): rows / 4}
        errors = [0.0, rows.sum(), rows.sum() / 4, 0.0]
        graph.annotate_site(name, SensitivityStat("sensitivity", "fisher",
                                                  "float-offset-dq g32", 32, *errors))
    graph.available.add("block.sensitivity")
    return graph


def test_planning_by_rows_spends_the_budget_on_the_sensitive_rows():
    """By hand: 3 bits in groups of 32 cost 3.5 bits a weight (7168 bytes a site), 4 bits
    4.5 (9216 bytes); 3.6 bits leave 409.6 bytes over all at 3 bits: a row at 4 bits costs 32
    more, mixing a site 128 (its order), so 8 rows of one site fit: the sensitive ones. By
    matmuls no site fits at 4 bits."""
    graph = _two_site_graph()
    PassManager(parse("policy-sensitivity{bits=3.6,granularity=row,widths=3+4}")).run(graph)
    spec = graph.plan.specs["a"]
    assert spec == RowMixSpec(bits=4, parts=(DQ3, DQ4), rows="1" * 8 + "0" * 56)
    assert graph.plan.specs["b"] == DQ3
    assert totals(graph, graph.plan.specs).bytes == 2 * 7168 + 8 * 32 + 128
    by_matmuls = _two_site_graph()
    PassManager(parse("policy-sensitivity{bits=3.6,widths=3+4}")).run(by_matmuls)
    assert by_matmuls.plan.specs == {"a": DQ3, "b": DQ3}
    assert _predicted_loss(graph) == _predicted_loss(by_matmuls) - 8 * 75


@pytest.mark.parametrize("policy, match", [
    ("policy-sensitivity{bits=3.6,granularity=row,solver=greedy,group_size=32}",
     "plans with the exact solver"),
    ("policy-sensitivity{ratio=0.5,granularity=row,group_size=32}", "needs bits=B"),
    ("policy-lim{bits=4,granularity=row}", "granularity='row'"),
])
def test_planning_by_rows_refuses_what_it_cannot_plan(tiny_llama_dir, policy, match):
    with pytest.raises(PipelineError, match=match):
        _planned(tiny_llama_dir, policy)


def test_planning_by_rows_needs_per_row_damage(tiny_llama_dir):
    graph = _analysed(tiny_llama_dir)
    graph.row_damage = {}  # as after a measured metric, which has one number per matmul
    with pytest.raises(PipelineError, match="needs the damage of each row"):
        PassManager(parse("policy-sensitivity{bits=3.6,granularity=row,group_size=32+64}")
                    ).run(graph)


def test_compile_granularity_row_with_another_policy_is_one_clear_error(capsys, tiny_llama_dir,
                                                                         tmp_path):
    out = tmp_path / "out"
    code = main(["compile", str(tiny_llama_dir), "--policy", "lim", "--bits", "4",
                 "--granularity", "row", "-o", str(out), "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "granularity='row'" in err[0], err
    assert not out.exists()
