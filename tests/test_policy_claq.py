"""CLAQ: per-column codebooks with outlier-guided adaptive precision sized to the budget."""

from __future__ import annotations

from fractions import Fraction

import networkx as nx
import numpy as np
import pytest

from conftest import ArrayWeights
from lwqc.ir.accounting import site_bytes
from lwqc.ir.errors import BudgetError, PipelineError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.spec import AsymmetricSpec, CodebookSpec
from lwqc.passes.kmeans import high_columns, quantize_codebook
from lwqc.passes.manager import PassManager
from lwqc.passes.policy_claq import SHARE_STEPS
from lwqc.registry import parse


def _graph() -> Graph:
    rng = np.random.default_rng(0)
    shapes = {"layers.0.a": (256, 64), "layers.0.b": (128, 96), "layers.1.a": (192, 64)}
    arrays = {s: rng.standard_normal(shape).astype(np.float32) for s, shape in shapes.items()}
    sites = {s: MatmulSite(s, "mlp", int(s.split(".")[1]), shape, s, order)
             for order, (s, shape) in enumerate(shapes.items())}
    blocks = [Block(0, "layers.0", ["layers.0.a", "layers.0.b"]),
              Block(1, "layers.1", ["layers.1.a"])]
    return Graph("toy", "toy", sites, blocks, nx.DiGraph(), source=ArrayWeights(arrays))


def _graph_with_head() -> Graph:
    """``_graph`` and a vocabulary head of 512 tokens."""
    graph = _graph()
    head = np.random.default_rng(1).standard_normal((512, 64)).astype(np.float32)
    graph.sites["lm_head"] = MatmulSite("lm_head", "lm_head", None, (512, 64), "lm_head", 3)
    graph.source = ArrayWeights({**graph.source.arrays, "lm_head": head})
    return graph


def _plan(graph: Graph, text: str) -> CodebookSpec:
    PassManager(parse(text)).run(graph)
    (spec,) = set(graph.plan.specs.values())
    return spec


def _bits(graph: Graph, spec: CodebookSpec) -> int:
    return 8 * sum(site_bytes(graph, s, spec) for s in graph.sites)


@pytest.mark.parametrize("budget", [2.6, 3.2, 3.9, 4.4, 5.5])
def test_budget_picks_the_widest_low_width_and_the_largest_share_that_fit(budget):
    graph = _graph()
    spec = _plan(graph, f"policy-claq{{bits={budget}}}")
    capacity = Fraction(str(budget)) * graph.total_params
    assert _bits(graph, spec) <= capacity
    wider = [w for w in (2, 3, 4, 8) if w > spec.bits]
    if wider:  # the next width, even without high columns, does not fit
        assert _bits(graph, CodebookSpec(wider[0])) > capacity
    if spec.high_share:  # one more step of share does not fit
        assert spec.high_bits == (4 if spec.bits < 4 else 8)
        steps = round(spec.high_share * SHARE_STEPS) + 1
        more = CodebookSpec(spec.bits, 0.0, spec.high_bits, steps / SHARE_STEPS)
        assert _bits(graph, more) > capacity
    assert graph.plan.budget["lo"] == spec.bits and graph.plan.budget["share"] == spec.high_share


def test_without_a_budget_the_papers_three_bit_setting_is_used():
    spec = _plan(_graph(), "policy-claq")
    assert (spec.bits, spec.high_bits, spec.high_share, spec.outliers) == (3, 4, 0.1, 0.0)
    spec = _plan(_graph(), "policy-claq{lo=2,share=0.05,outliers=0.01}")
    assert (spec.bits, spec.high_bits, spec.high_share, spec.outliers) == (2, 4, 0.05, 0.01)


@pytest.mark.parametrize(("text", "message"), [
    ("policy-claq{bits=3,share=0.1}", "give bits= or share="),
    ("policy-claq{lo=4,hi=3}", "must be below"),
    ("policy-claq{lo=16}", "quantized width"),
    ("policy-claq{lo=8,share=0.1}", "no width above lo=8"),
])
def test_bad_options_are_refused(text, message):
    with pytest.raises(PipelineError, match=message):
        PassManager(parse(text)).run(_graph())


def test_an_infeasible_budget_names_the_smallest_plan():
    with pytest.raises(BudgetError, match="infeasible for CLAQ"):
        PassManager(parse("policy-claq{bits=1.5}")).run(_graph())


def _spiky() -> np.ndarray:
    w = np.random.default_rng(4).standard_normal((64, 40)) * 0.1
    w[:, [3, 17, 30]] *= 1.0
    w[5, 3], w[9, 17], w[11, 17], w[2, 30] = 9.0, -8.0, 7.5, 6.0
    return w.astype(np.float32)


def test_high_columns_are_those_holding_the_most_outliers():
    w = _spiky()
    # |W| >= 13 mean |W|: column 17 holds two outliers, 3 and 30 one each
    np.testing.assert_array_equal(high_columns(w, CodebookSpec(2, 0.0, 4, 0.05)), [3, 17])
    np.testing.assert_array_equal(high_columns(w, CodebookSpec(2, 0.0, 4, 0.075)), [3, 17, 30])
    assert len(high_columns(w, CodebookSpec(2))) == 0


def test_adaptive_precision_puts_outlier_columns_at_the_high_width():
    w = _spiky()
    plain = quantize_codebook(w, CodebookSpec(2))
    adaptive = quantize_codebook(w, CodebookSpec(2, 0.0, 4, 0.075))
    np.testing.assert_array_equal(adaptive.high_columns(), [3, 17, 30])
    assert adaptive.codes[:, [3, 17, 30]].max() > 3  # 16 centroids in use
    assert adaptive.codes[:, [0, 1, 2]].max() <= 3
    error = {name: float(((q.dequantize() - w) ** 2).sum()) for name, q in
             (("plain", plain), ("adaptive", adaptive))}
    assert error["adaptive"] < error["plain"]
    # low columns are fitted exactly as without adaptive precision
    low = [0, 1, 2, 4]
    np.testing.assert_array_equal(adaptive.dequantize()[:, low], plain.dequantize()[:, low])


@pytest.mark.parametrize("text", ["policy-claq", "policy-claq{bits=3.3}", "policy-claq{lo=2}"])
def test_the_vocabulary_head_is_quantized_by_rows_within_the_budget(text):
    graph = _graph_with_head()
    PassManager(parse(text)).run(graph)
    specs = graph.plan.specs
    columns = {specs[s] for s in graph.sites if s != "lm_head"}
    (codebook,) = columns
    assert isinstance(codebook, CodebookSpec)
    assert specs["lm_head"] == AsymmetricSpec(codebook.bits, group_size=128)
    assert graph.plan.budget["head"] == "rtn-asym g128"
    assert any(note.startswith("lm_head: rtn-asym in groups of 128") for note in graph.plan.notes)
    # the head's rows are charged: 512 x 64 codes, and per row and group of 128 (one here: 64
    # inputs) an fp32 scale and a zero point of the code width
    bits = codebook.bits
    assert site_bytes(graph, "lm_head", specs["lm_head"]) == 512 * 64 * bits // 8 + 512 * 4 + (
        512 * bits + 7) // 8
    if "bits=" in text:
        used = 8 * sum(site_bytes(graph, s, spec) for s, spec in specs.items())
        assert used <= Fraction("3.3") * graph.total_params
