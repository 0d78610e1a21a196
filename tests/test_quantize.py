"""The quantize pass: one packed weight per quantized site, by its scheme's quantizer."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest

from conftest import ArrayWeights
from lwqc.ir.formats import AffineWeight, CodebookWeight, FloatOffsetWeight
from lwqc.ir.graph import Graph, MatmulSite
from lwqc.ir.plan import Plan
from lwqc.ir.spec import AsymmetricSpec, CodebookSpec, FloatOffsetSpec, KeepSpec
from lwqc.passes.base import PassContext, PassContractError
from lwqc.passes.manager import PassManager
from lwqc.passes.quantize import QuantizePass
from lwqc.passes.quantizers import quantize_weight
from lwqc.registry import parse


def _graph(specs: dict) -> Graph:
    rng = np.random.default_rng(3)
    arrays = {s: rng.standard_t(4, size=(8, 32)).astype(np.float32) for s in specs}
    sites = {s: MatmulSite(s, "mlp", None, (8, 32), s, i) for i, s in enumerate(arrays)}
    graph = Graph("toy", "toy", sites, [], nx.DiGraph(), source=ArrayWeights(arrays))
    graph.plan = Plan(specs, policy="test", budget={})
    graph.available.add("plan")
    return graph


SPECS = {"a": AsymmetricSpec(4, 16), "b": FloatOffsetSpec(3, 8, outliers=0.05),
         "c": CodebookSpec(2), "d": KeepSpec()}


def test_each_quantized_site_gets_its_schemes_format_and_kept_sites_none():
    graph = _graph(SPECS)
    PassManager(parse("quantize")).run(graph)
    assert set(graph.packed) == {"a", "b", "c"}
    assert isinstance(graph.packed["a"], AffineWeight)
    assert isinstance(graph.packed["b"], FloatOffsetWeight)
    assert isinstance(graph.packed["c"], CodebookWeight)
    assert graph.packed["b"].outliers is not None
    assert len(graph.packed["b"].outliers.positions) == int(0.05 * 8 * 32)
    for site_id, weight in graph.packed.items():
        assert weight.spec == SPECS[site_id]


@pytest.mark.parametrize("clip", ["mse", "minmax"])
def test_the_pass_computes_what_the_quantizer_computes_with_its_clip(clip):
    graph = _graph(SPECS)
    PassManager(parse(f"quantize{{clip={clip}}}")).run(graph)
    for site_id, weight in graph.packed.items():
        expected = quantize_weight(graph.weight(site_id), SPECS[site_id], clip)
        np.testing.assert_array_equal(weight.dequantize(), expected.dequantize())


def test_clip_changes_the_ranges_of_heavy_tailed_groups():
    mse, minmax = _graph(SPECS), _graph(SPECS)
    PassManager(parse("quantize{clip=mse}")).run(mse)
    PassManager(parse("quantize{clip=minmax}")).run(minmax)
    assert not np.array_equal(mse.packed["a"].scales, minmax.packed["a"].scales)
    error = {name: float(((g.packed["a"].dequantize() - g.weight("a")) ** 2).sum())
             for name, g in (("mse", mse), ("minmax", minmax))}
    assert error["mse"] < error["minmax"]


def test_a_pass_that_packs_too_few_sites_breaks_its_contract():
    graph = _graph(SPECS)
    graph.packed = {"a": quantize_weight(graph.weight("a"), SPECS["a"])}
    with pytest.raises(PassContractError, match="did not pack every quantized site"):
        QuantizePass().ensures(graph)


def test_quantize_needs_a_plan():
    graph = _graph(SPECS)
    graph.available.discard("plan")
    with pytest.raises(Exception, match="needs plan"):
        PassManager([QuantizePass()]).run(graph)
    QuantizePass().run(_graph(SPECS), PassContext())  # with a plan it runs
