import networkx as nx
import numpy as np
import pytest

from conftest import ArrayWeights
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.passes.base import PassContext
from lwqc.passes.zd import ZDPass, ZDStat, zscore_fraction


def test_zscore_fraction_of_single_spike_is_one_fifth():
    # mean 2, deviations [2, 2, 2, 2, 8], std sqrt((4 * 4 + 64) / 5) = 4: only the spike is > 4
    assert zscore_fraction(np.array([0.0, 0.0, 0.0, 0.0, 10.0])) == pytest.approx(0.2)


def test_zscore_fraction_of_one_to_ten_is_four_tenths():
    # mean 5.5, std sqrt(8.25) ~ 2.87: only 1, 2, 9 and 10 lie farther than that
    assert zscore_fraction(np.arange(1.0, 11.0)) == pytest.approx(0.4)


def test_zscore_fraction_ignores_matrix_shape():
    flat = np.array([0.0, 0.0, 0.0, 0.0, 10.0, 1.0])
    assert zscore_fraction(flat.reshape(2, 3)) == zscore_fraction(flat)


def test_zscore_fraction_of_two_symmetric_values_is_zero():
    # every entry lies exactly one std from the mean, and the test is strict
    assert zscore_fraction(np.array([-1.0, 1.0, -1.0, 1.0])) == 0.0


@pytest.mark.parametrize("value", [0.0, 2.5, -3.0])
def test_zscore_fraction_of_constant_is_zero(value):
    assert zscore_fraction(np.full((4, 6), value)) == 0.0


def test_zscore_fraction_of_large_gaussian_sample_is_near_0_3173():
    w = np.random.default_rng(0).standard_normal((500, 800)).astype(np.float32)
    # P(|Z| > 1) = 1 - erf(1 / sqrt 2) = 0.31731
    assert zscore_fraction(w) == pytest.approx(0.3173, abs=0.005)


def test_zd_importance_is_negative_score():
    assert ZDStat("zd", 0.25).importance() == -0.25


def _graph():
    arrays = {
        "layers.0.a": np.array([[0.0, 0.0, 0.0, 0.0, 10.0]], dtype=np.float32),
        "layers.0.b": np.arange(1.0, 11.0, dtype=np.float32).reshape(1, 10),
        "head": np.array([[-1.0, 1.0, -1.0, 1.0]], dtype=np.float32),
    }
    sites = {
        site_id: MatmulSite(site_id, "mlp", 0 if site_id.startswith("layers") else None,
                            array.shape, site_id, order)
        for order, (site_id, array) in enumerate(arrays.items())
    }
    blocks = [Block(0, "layers.0", ["layers.0.a", "layers.0.b"])]
    return Graph("m", "toy", sites, blocks, nx.DiGraph(), source=ArrayWeights(arrays))


def test_zd_pass_annotates_sites_and_block_mean():
    graph = _graph()
    ZDPass().run(graph, PassContext())
    assert graph.sites["layers.0.a"].stats["zd"].zd == pytest.approx(0.2)
    assert graph.sites["layers.0.b"].stats["zd"].zd == pytest.approx(0.4)
    assert graph.sites["head"].stats["zd"].zd == 0.0
    assert graph.blocks[0].stats["zd"].zd == pytest.approx(0.3)
    assert graph.sites["head"].stats["zd"].source == "zd"
    assert {"site.zd", "block.zd"} <= graph.available


def test_zd_pass_pooled_block_scores_the_concatenated_weights():
    graph = _graph()
    ZDPass(block="pooled").run(graph, PassContext())
    # pooled [0, 0, 0, 0, 10, 1..10]: mean 65/15, E[x^2] = 485/15, std = sqrt(3050)/15 ~ 3.68;
    # farther than that: the four zeros, 9, 10 and 10 -> 7 of 15
    assert graph.blocks[0].stats["zd"].zd == pytest.approx(7 / 15)
