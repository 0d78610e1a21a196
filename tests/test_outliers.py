import networkx as nx
import numpy as np
import pytest

from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.passes.base import PassContext
from lwqc.passes.kmeans import CLAQ_FACTOR, column_outlier_counts
from lwqc.passes.outliers import OutliersPass, kurtosis, outlier_stat


def _spiky():
    w = np.ones((4, 4))
    w[2, 3] = 20.0
    w[3, 0] = -20.0
    w[0, 3] = 20.0
    return w


def test_column_outlier_counts_hand_matrix():
    # mean |W| = (13 * 1 + 3 * 20) / 16 = 4.5625; factor 4 -> threshold 18.25
    np.testing.assert_array_equal(column_outlier_counts(_spiky(), factor=4.0), [1, 0, 0, 2])


def test_column_outlier_counts_with_high_factor_finds_none():
    # factor 5 -> threshold 22.8: no entry reaches it
    np.testing.assert_array_equal(column_outlier_counts(_spiky(), factor=5.0), [0, 0, 0, 0])


def test_column_outlier_threshold_is_inclusive():
    # mean |W| = 8 / 4 = 2; factor 2.5 -> threshold 5, and the 5 counts
    w = np.array([[1.0, 1.0], [1.0, 5.0]])
    np.testing.assert_array_equal(column_outlier_counts(w, factor=2.5), [0, 1])


def test_column_outlier_counts_default_factor_is_claq_13():
    assert CLAQ_FACTOR == 13.0
    w = np.zeros((10, 10))
    w[4, 6] = 1.0
    # mean |W| = 0.01: the single 1 is 100 x the mean
    np.testing.assert_array_equal(column_outlier_counts(w), np.eye(10, dtype=int)[6])


def test_kurtosis_of_plus_minus_one_is_one():
    assert kurtosis(np.array([-1.0, 1.0, -1.0, 1.0])) == pytest.approx(1.0)


def test_kurtosis_of_single_spike_by_hand():
    # centered [-2, -2, -2, -2, 8]: var 16, E[c^4] = (4 * 16 + 4096) / 5 = 832 -> 832 / 256
    assert kurtosis(np.array([0.0, 0.0, 0.0, 0.0, 10.0])) == pytest.approx(3.25)


@pytest.mark.parametrize("value", [0.0, 2.5, -4.0])
def test_kurtosis_of_exactly_representable_constant_is_zero(value):
    assert kurtosis(np.full((3, 5), value)) == 0.0


def test_kurtosis_of_float32_constant_is_zero():
    assert kurtosis(np.full((64, 64), 0.1, dtype=np.float32)) == 0.0


def test_kurtosis_of_large_gaussian_sample_is_near_three():
    w = np.random.default_rng(0).standard_normal(400_000)
    assert kurtosis(w) == pytest.approx(3.0, abs=0.05)


def test_outlier_stat_fields_by_hand():
    stat = outlier_stat("outliers", _spiky(), factor=4.0)
    assert stat.outlier_columns == 2
    assert stat.outlier_weights == 3
    assert stat.max_abs == 20.0
    mean = 13 / 16 + 20 / 16
    var = (13 * (1 - mean) ** 2 + 2 * (20 - mean) ** 2 + (-20 - mean) ** 2) / 16
    assert stat.std == pytest.approx(var**0.5)
    assert stat.source == "outliers"


def test_outliers_pass_sums_block_counts_and_pools_stats():
    arrays = {
        "layers.0.a": _spiky(),
        "layers.0.b": np.array([[1.0, -3.0], [1.0, 1.0]]),
    }
    sites = {
        site_id: MatmulSite(site_id, "mlp", 0, array.shape, site_id, order)
        for order, (site_id, array) in enumerate(arrays.items())
    }

    class Source:
        def weight(self, site_id):
            return arrays[site_id]

    graph = Graph("m", "toy", sites, [Block(0, "layers.0", list(arrays))], nx.DiGraph(),
                  source=Source())
    OutliersPass(factor=4.0).run(graph, PassContext())
    a = graph.sites["layers.0.a"].stats["outliers"]
    b = graph.sites["layers.0.b"].stats["outliers"]
    assert (a.outlier_columns, a.outlier_weights) == (2, 3)
    # b: mean |W| = 6 / 4 = 1.5, threshold 6: no outlier
    assert (b.outlier_columns, b.outlier_weights) == (0, 0)
    block = graph.blocks[0].stats["outliers"]
    assert (block.outlier_columns, block.outlier_weights) == (2, 3)
    assert block.max_abs == 20.0
    pooled = [1.0] * 13 + [20.0, -20.0, 20.0] + [1.0, -3.0, 1.0, 1.0]
    mean = sum(pooled) / 20
    var = sum((x - mean) ** 2 for x in pooled) / 20
    assert block.std == pytest.approx(var**0.5)
    fourth = sum((x - mean) ** 4 for x in pooled) / 20
    assert block.kurtosis == pytest.approx(fourth / var**2)


@pytest.mark.parametrize("factor", [0.0, -1.0])
def test_outliers_pass_rejects_non_positive_factor(factor):
    with pytest.raises(PipelineError, match="factor must be positive"):
        OutliersPass(factor=factor)


def test_kurtosis_of_float64_constant_with_rounding_mean_is_zero():
    # mean(0.1, 0.1, 0.1) is not exactly 0.1 in float64; a constant is still a constant
    assert kurtosis(np.full(3, 0.1)) == 0.0
    assert kurtosis(np.full((64, 64), 0.3)) == 0.0


def test_an_all_zero_matrix_has_no_outliers():
    assert column_outlier_counts(np.zeros((3, 4))).tolist() == [0, 0, 0, 0]
