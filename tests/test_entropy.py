import math

import networkx as nx
import numpy as np
import pytest

from conftest import ArrayWeights
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.passes.base import PassContext
from lwqc.passes.entropy import (
    HISTOGRAM_BINS,
    EntropyPass,
    EntropyStat,
    histogram_entropy,
    softmax_entropy,
)


def _two_value_entropy(n, k, a):
    """Softmax entropy of n entries, k of them equal to a and the rest 0.

    p_a = e^a / Z, p_0 = 1 / Z with Z = k e^a + (n - k), so
    H = -k p_a log p_a - (n - k) p_0 log p_0 = log Z - k a e^a / Z.
    """
    z = k * math.exp(a) + (n - k)
    return math.log(z) - k * a * math.exp(a) / z


@pytest.mark.parametrize("shape", [(1, 1), (3, 4), (16, 64), (7, 1)])
def test_entropy_of_zero_matrix_is_log_n(shape):
    m, n = shape
    assert softmax_entropy(np.zeros(shape)) == pytest.approx(math.log(m * n), abs=1e-12)


@pytest.mark.parametrize("n, k, a", [(4, 1, 1.0), (10, 3, -2.0), (5, 4, 0.5), (100, 50, 3.0)])
def test_entropy_of_two_valued_matrix_matches_closed_form(n, k, a):
    w = np.zeros(n)
    w[:k] = a
    assert softmax_entropy(w) == pytest.approx(_two_value_entropy(n, k, a), abs=1e-12)


def test_entropy_of_two_point_distribution_by_hand():
    # [0, log 3]: p = [1/4, 3/4], H = log 4 - (3/4) log 3
    w = np.array([0.0, math.log(3.0)])
    assert softmax_entropy(w) == pytest.approx(math.log(4.0) - 0.75 * math.log(3.0), abs=1e-12)


def test_entropy_is_invariant_to_adding_a_constant():
    w = np.random.default_rng(1).standard_normal((8, 8))
    base = softmax_entropy(w)
    for shift in (-100.0, 3.5, 1000.0):
        assert softmax_entropy(w + shift) == pytest.approx(base, abs=1e-10)


def test_entropy_is_stable_for_huge_values():
    w = np.full(20, 1.0e4)
    w[:5] += 2.0
    value = softmax_entropy(w)
    assert math.isfinite(value)
    assert value == pytest.approx(_two_value_entropy(20, 5, 2.0), abs=1e-12)


def test_entropy_is_stable_for_huge_negative_values():
    w = np.full(12, -1.0e4)
    w[:3] -= 1.0
    value = softmax_entropy(w)
    assert math.isfinite(value)
    assert value == pytest.approx(_two_value_entropy(12, 3, -1.0), abs=1e-12)


def test_entropy_of_one_dominant_entry_tends_to_zero():
    w = np.zeros(50)
    w[7] = 1.0e4
    assert softmax_entropy(w) == pytest.approx(0.0, abs=1e-12)


def test_entropy_of_small_weights_is_log_n_minus_half_variance():
    # cumulant expansion: H = log n - k2 / 2 - k3 / 3 - k4 / 8 - ...; for std 1e-2 Gaussian
    # weights the terms after k2 / 2 = 5e-5 are below 1e-8
    w = np.random.default_rng(2).standard_normal((64, 256)) * 1e-2
    expected = math.log(w.size) - w.var() / 2
    assert softmax_entropy(w) == pytest.approx(expected, abs=1e-8)
    assert softmax_entropy(w) != pytest.approx(math.log(w.size), abs=1e-5)


def test_entropy_accepts_float32_input_and_flattens():
    w = np.array([[0.0, 1.0], [0.0, 0.0]], dtype=np.float32)
    assert softmax_entropy(w) == pytest.approx(_two_value_entropy(4, 1, 1.0), abs=1e-12)


def test_histogram_entropy_of_one_value_per_bin_is_log_bins():
    assert histogram_entropy(np.arange(4.0), bins=4) == pytest.approx(math.log(4), abs=1e-12)
    values = np.arange(float(HISTOGRAM_BINS)).reshape(16, 16)
    assert histogram_entropy(values) == pytest.approx(math.log(HISTOGRAM_BINS), abs=1e-12)


def test_histogram_entropy_of_uniform_bins_with_repeats_is_log_bins():
    values = np.repeat(np.arange(8.0), 5)
    assert histogram_entropy(values, bins=8) == pytest.approx(math.log(8), abs=1e-12)


@pytest.mark.parametrize("value", [0.0, 0.37, -5.0])
def test_histogram_entropy_of_constant_array_is_zero(value):
    assert histogram_entropy(np.full((5, 7), value)) == 0.0


def test_histogram_entropy_of_two_unequal_bins():
    # 1 entry in the low bin, 3 in the high bin: H = -(1/4) log(1/4) - (3/4) log(3/4)
    values = np.array([0.0, 1.0, 1.0, 1.0])
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert histogram_entropy(values, bins=2) == pytest.approx(expected, abs=1e-12)


def test_entropy_importance_is_distance_below_the_ceiling():
    assert EntropyStat("entropy", 2.0, 3.0, "softmax").importance() == pytest.approx(-1.0)


def _graph():
    arrays = {
        "layers.0.q": np.zeros((2, 3), dtype=np.float32),
        "layers.0.k": np.array([[0.0, 1.0]], dtype=np.float32),
    }
    sites = {
        site_id: MatmulSite(site_id, "attn", 0, array.shape, site_id, order)
        for order, (site_id, array) in enumerate(arrays.items())
    }
    blocks = [Block(0, "layers.0", list(arrays))]
    return Graph("m", "toy", sites, blocks, nx.DiGraph(), source=ArrayWeights(arrays))


def test_entropy_pass_block_value_is_parameter_weighted_mean():
    graph = _graph()
    EntropyPass().run(graph, PassContext())
    q = graph.sites["layers.0.q"].stats["entropy"]
    k = graph.sites["layers.0.k"].stats["entropy"]
    assert q.entropy == pytest.approx(math.log(6), abs=1e-12)
    assert q.max_entropy == pytest.approx(math.log(6), abs=1e-12)
    assert k.entropy == pytest.approx(_two_value_entropy(2, 1, 1.0), abs=1e-12)
    assert k.max_entropy == pytest.approx(math.log(2), abs=1e-12)
    block = graph.blocks[0].stats["entropy"]
    expected = (6 * math.log(6) + 2 * _two_value_entropy(2, 1, 1.0)) / 8
    assert block.entropy == pytest.approx(expected, abs=1e-12)
    assert block.max_entropy == pytest.approx((6 * math.log(6) + 2 * math.log(2)) / 8, abs=1e-12)
    assert block.method == "softmax"


def test_entropy_pass_histogram_method_uses_bins_ceiling():
    graph = _graph()
    EntropyPass(method="histogram").run(graph, PassContext())
    q = graph.sites["layers.0.q"].stats["entropy"]
    k = graph.sites["layers.0.k"].stats["entropy"]
    assert q.entropy == 0.0
    assert k.entropy == pytest.approx(math.log(2), abs=1e-12)
    assert q.max_entropy == pytest.approx(math.log(256), abs=1e-12)
    assert q.method == "histogram"
