"""GPTQ: column-by-column error feedback, checked against RTN and a naive reference."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from lwqc.ir.spec import (
    AsymmetricSpec,
    CodebookSpec,
    FloatOffsetDqSpec,
    FloatOffsetSpec,
    SymmetricSpec,
)
from lwqc.passes.gptq import GptqSettings, gptq
from lwqc.passes.quantizers import quantize_weight
from lwqc.passes.rtn import Asymmetric, search

SPECS = [AsymmetricSpec(3, 16), SymmetricSpec(4, 32), FloatOffsetSpec(3, 16), CodebookSpec(2),
         AsymmetricSpec(2, None), FloatOffsetDqSpec(3, 4)]


def _problem(seed: int, out: int = 24, inputs: int = 64, tokens: int = 512):
    """Weights and a Gram matrix of correlated inputs with uneven scales."""
    rng = np.random.default_rng(seed)
    mixing = rng.standard_normal((inputs, inputs)) * 0.3 + np.eye(inputs)
    x = rng.standard_normal((tokens, inputs)) @ mixing * rng.uniform(0.2, 3.0, inputs)
    w = rng.standard_normal((out, inputs)).astype(np.float32)
    return w, x.T @ x


def _output_error(weight, approx, gram):
    delta = weight.astype(np.float64) - approx
    return float(np.sum((delta @ gram) * delta))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.label())
def test_gptq_has_less_output_error_than_round_to_nearest(spec):
    w, gram = _problem(0)
    rtn = quantize_weight(w, spec, "minmax").dequantize()
    compensated = quantize_weight(w, spec, "minmax", gram, GptqSettings()).dequantize()
    assert _output_error(w, compensated, gram) < 0.8 * _output_error(w, rtn, gram)


@pytest.mark.parametrize("spec", [AsymmetricSpec(3, 16), SymmetricSpec(4, 32),
                                  FloatOffsetSpec(2, 8), FloatOffsetDqSpec(3, 4)],
                         ids=lambda s: s.label())
def test_gptq_with_uncorrelated_equal_inputs_is_round_to_nearest(spec):
    # H = I: U is diagonal, no error flows between columns, group ranges see the original W
    w, _ = _problem(1)
    gram = np.eye(w.shape[1]) * 7.0
    for act_order in (False, True):
        result = quantize_weight(w, spec, "minmax", gram, GptqSettings(act_order=act_order))
        np.testing.assert_array_equal(result.dequantize(),
                                      quantize_weight(w, spec, "minmax").dequantize())


def _naive_gptq(w, gram, bits, damp=0.01):
    """Textbook GPTQ for asymmetric per-row min/max (one group per row), no act-order, no
    blocking: an independent re-statement of arXiv 2210.17323, Algorithm 1."""
    w = w.astype(np.float64).copy()
    h = gram.astype(np.float64).copy()
    h[np.diag_indices(len(h))] += damp * np.mean(np.diag(h))
    upper = scipy.linalg.cholesky(np.linalg.inv(h), lower=False)
    rule = Asymmetric(w[:, None, :], bits)  # the row's range is fixed before any update
    scales, zeros = search(rule, w[:, None, :], None)
    out = np.zeros_like(w)
    for j in range(w.shape[1]):
        codes = np.clip(np.round(w[:, j] / scales[:, 0].astype(np.float64)) + zeros[:, 0], 0,
                        2**bits - 1)
        out[:, j] = (codes - zeros[:, 0]) * scales[:, 0].astype(np.float64)
        error = (w[:, j] - out[:, j]) / upper[j, j]
        w[:, j + 1 :] -= np.outer(error, upper[j, j + 1 :])
    return out


def test_blocked_gptq_matches_the_naive_algorithm():
    w, gram = _problem(2, inputs=200)
    expected = _naive_gptq(w, gram, 3)
    result = gptq(w, AsymmetricSpec(3, None), gram, None, np.zeros(0, np.int32),
                  GptqSettings(act_order=False, block=64)).dequantize()
    assert np.mean(np.isclose(result, expected, rtol=0, atol=1e-6)) > 0.999


def test_dead_inputs_get_zero_weights():
    w, gram = _problem(3)
    gram[:, 5] = gram[5, :] = 0.0
    result = quantize_weight(w, AsymmetricSpec(4, 16), "minmax", gram, GptqSettings())
    np.testing.assert_array_equal(result.dequantize()[:, 5], 0.0)


def test_reserved_outliers_stay_exact_under_gptq():
    w, _ = _problem(4)
    w[3, 7], w[10, 40] = 25.0, -30.0
    gram = np.eye(w.shape[1])  # no feedback: the reserved values are the original weights
    result = quantize_weight(w, AsymmetricSpec(3, 16, outliers=2 / w.size), "minmax", gram,
                             GptqSettings())
    np.testing.assert_array_equal(np.sort(result.outliers.positions),
                                  [3 * w.shape[1] + 7, 10 * w.shape[1] + 40])
    restored = result.dequantize()
    assert restored[3, 7] == pytest.approx(25.0, abs=0.02)
    assert restored[10, 40] == pytest.approx(-30.0, abs=0.02)


def test_output_clip_never_has_more_output_error_of_uncorrelated_inputs_than_minmax():
    w, gram = _problem(5)
    diagonal = np.diag(np.diag(gram))
    for spec in (AsymmetricSpec(3, 16), FloatOffsetSpec(3, 16), FloatOffsetDqSpec(3, 4)):
        minmax = quantize_weight(w, spec, "minmax").dequantize()
        output = quantize_weight(w, spec, "output", gram).dequantize()
        assert _output_error(w, output, diagonal) <= _output_error(w, minmax, diagonal) + 1e-9
