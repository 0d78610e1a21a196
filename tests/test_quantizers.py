"""The quantizers behind every scheme: float offsets, k-means codebooks and outlier reservation."""

import dataclasses

import numpy as np
import pytest

from lwqc.ir.errors import NonFiniteWeightError, PlanError
from lwqc.ir.formats import CodebookWeight, FloatOffsetWeight
from lwqc.ir.spec import (
    SCHEMES,
    AsymmetricSpec,
    CodebookSpec,
    FloatOffsetDqSpec,
    FloatOffsetSpec,
    KeepSpec,
    SymmetricSpec,
)
from lwqc.passes import float_offset, rtn
from lwqc.passes.kmeans import quantize_codebook
from lwqc.passes.quantizers import QUANTIZERS, quantize_weight, reserved_positions


def quantize_float_offset(w, spec, clip_search=False):
    """Float-offset groups, with the squared-error range search or with min/max."""
    return float_offset.quantize_float_offset(w, spec, np.ones(w.shape[1]) if clip_search
                                              else None)


def quantize_rtn(w, spec, clip_search=False):
    return rtn.quantize_rtn(w, spec, np.ones(w.shape[1]) if clip_search else None)


def _heavy_tailed(shape, seed):
    return np.random.default_rng(seed).standard_t(2, size=shape).astype(np.float32)


def _group_sse(weight, w, group):
    error = (weight.dequantize().astype(np.float64) - w.astype(np.float64)) ** 2
    return error.reshape(w.shape[0], -1, group).sum(axis=2)


# --------------------------------------------------------------------------- float offset


def _q4_1_grid(out_features, n_groups, seed):
    """Weights w = d * q + m per group of 32, q in 0..15 with 0 and 15 in every group."""
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (out_features, n_groups, 32))
    q[:, :, 5], q[:, :, 17] = 0, 15
    d = rng.uniform(0.005, 0.05, (out_features, n_groups, 1)).astype(np.float32)
    # a non-integer offset / scale, which no integer zero point can match
    m = (d * rng.uniform(-12.0, -3.0, (out_features, n_groups, 1))).astype(np.float32)
    w = (d.astype(np.float64) * q + m).astype(np.float32).reshape(out_features, -1)
    return w, q.reshape(out_features, -1), d[..., 0]


@pytest.mark.parametrize("clip_search", [False, True])
def test_float_offset_reproduces_weights_on_a_q4_1_grid(clip_search):
    w, q, d = _q4_1_grid(8, 4, seed=0)
    weight = quantize_float_offset(w, FloatOffsetSpec(4, 32), clip_search)
    np.testing.assert_array_equal(weight.codes, q)
    error = np.abs(weight.dequantize() - w).reshape(8, 4, 32).max(axis=2)
    # float32 rounding only: a few ulps of the group's largest magnitude (<= 27 d)
    magnitude = np.abs(w).reshape(8, 4, 32).max(axis=2)
    assert np.all(error <= 4 * np.finfo(np.float32).eps * magnitude)
    assert np.all(error / d <= 2e-6)


def test_rtn_asym_is_measurably_worse_than_float_offset_on_a_q4_1_grid():
    w, _, d = _q4_1_grid(8, 4, seed=0)
    offset = quantize_float_offset(w, FloatOffsetSpec(4, 32), clip_search=True)
    asym = quantize_rtn(w, AsymmetricSpec(4, 32), clip_search=True)
    offset_error = np.abs(offset.dequantize() - w).reshape(8, 4, 32).max(axis=2) / d
    asym_error = np.abs(asym.dequantize() - w).reshape(8, 4, 32).max(axis=2) / d
    assert asym_error.max() > 0.1  # a tenth of a grid step somewhere
    assert ((asym.dequantize() - w) ** 2).sum() > 1e6 * ((offset.dequantize() - w) ** 2).sum()
    assert offset_error.max() < 1e-5


# --------------------------------------------------------------------------- float offset, dq


def _dq_grid(out_features, n_supers, seed):
    """Weights on a float-offset-dq grid of groups of 16 (4-bit codes, 0 and 15 in every
    group): scale = s * step, offset = -o * step, with 63 the largest s and o of every
    super-group (so the steps are what the quantizer derives)."""
    rng = np.random.default_rng(seed)
    groups = 8 * n_supers
    q = rng.integers(0, 16, (out_features, groups, 16))
    q[:, :, 3], q[:, :, 11] = 0, 15
    s = rng.integers(1, 64, (out_features, groups))
    o = rng.integers(0, 64, (out_features, groups))
    s[:, ::8], o[:, 1::8] = 63, 63
    scale_steps = np.float16(2.0**-12) * rng.integers(1, 9, (out_features, n_supers))
    offset_steps = np.float16(2.0**-11) * rng.integers(1, 9, (out_features, n_supers))
    scales = s.astype(np.float32) * np.repeat(scale_steps.astype(np.float32), 8, axis=1)
    magnitudes = o.astype(np.float32) * np.repeat(offset_steps.astype(np.float32), 8, axis=1)
    w = q.astype(np.float32) * scales[..., None] - magnitudes[..., None]
    return w.reshape(out_features, -1), q.reshape(out_features, -1), s, o, scale_steps, \
        offset_steps


@pytest.mark.parametrize("clip_search", [False, True])
def test_float_offset_dq_reproduces_weights_on_its_own_grid(clip_search):
    w, q, s, o, scale_steps, offset_steps = _dq_grid(6, 2, seed=3)
    weight = float_offset.quantize_float_offset_dq(
        w, FloatOffsetDqSpec(4, 16), np.ones(w.shape[1]) if clip_search else None)
    np.testing.assert_array_equal(weight.scale_steps, scale_steps)
    np.testing.assert_array_equal(weight.offset_steps, offset_steps)
    np.testing.assert_array_equal(weight.scale_codes, s)
    np.testing.assert_array_equal(weight.offset_codes, o)
    np.testing.assert_array_equal(weight.codes, q)
    np.testing.assert_array_equal(weight.dequantize(), w)


def test_float_offset_dq_parameters_stay_in_range_and_cost_little():
    w = _heavy_tailed((32, 200), seed=4) * 0.02
    w[3] = 0.0  # an all-zero row
    w[5, :40] = 0.37  # constant positive groups
    dq = float_offset.quantize_float_offset_dq(w, FloatOffsetDqSpec(4, 16))
    plain = quantize_float_offset(w, FloatOffsetSpec(4, 16))
    assert dq.scale_codes.max() <= 63 and dq.offset_codes.max() <= 63
    assert dq.codes.max() <= 15
    np.testing.assert_array_equal(dq.dequantize()[3], 0.0)
    np.testing.assert_allclose(dq.dequantize()[5, :40], 0.37, rtol=0.02)
    # the steps are rounded up: the largest full-range scale of a super-group fits in 63 steps
    # (13 groups: two super-groups, of 7 and 6 groups)
    grouped = np.pad(w, ((0, 0), (0, 8)), mode="edge").reshape(32, 13, 16)
    lo = np.minimum(grouped.min(axis=2), 0.0)
    full = (grouped.max(axis=2) - lo) / 15
    padded = np.pad(full, ((0, 0), (0, 1))).reshape(32, 2, 7).max(axis=2)
    assert np.all(63 * dq.scale_steps.astype(np.float64) >= padded)
    # 6-bit parameters cost little error on heavy-tailed weights (float32 parameters: plain)
    dq_error = ((dq.dequantize() - w) ** 2).sum()
    plain_error = ((plain.dequantize() - w) ** 2).sum()
    assert dq_error < 1.3 * plain_error


def test_float_offset_dq_refuses_ranges_beyond_float16_steps():
    w = np.zeros((2, 32), np.float32)
    w[0, 0] = 1e9  # a step of 1e9 / 15 / 63 exceeds float16
    with pytest.raises(PlanError, match="exceeds what float16 steps can hold; use float-offset"):
        quantize_weight(w, FloatOffsetDqSpec(4, 32), "minmax")


def test_float_offset_dq_neighbour_moves_lower_the_searched_error(monkeypatch):
    w = _heavy_tailed((48, 256), seed=6) * 0.02
    spec = FloatOffsetDqSpec(4, 32)

    def error() -> float:
        weight = float_offset.quantize_float_offset_dq(w, spec, np.ones(w.shape[1]))
        return float(((weight.dequantize() - w) ** 2).sum())

    refined = error()
    monkeypatch.setattr(rtn, "REFINE_ROUNDS", 0)
    shrink_only = error()
    assert refined < 0.95 * shrink_only


def test_float_offset_by_hand_on_one_group():
    # [min, max] = [-1, 2] at 2 bits: scale 1, offset -1; 0.4 -> code round(1.4) = 1 -> 0
    w = np.array([[-1.0, 0.4, 1.6, 2.0]], dtype=np.float32)
    weight = quantize_float_offset(w, FloatOffsetSpec(2, None))
    np.testing.assert_array_equal(weight.scales, [[1.0]])
    np.testing.assert_array_equal(weight.offsets, [[-1.0]])
    np.testing.assert_array_equal(weight.codes, [[0, 1, 3, 3]])
    np.testing.assert_array_equal(weight.dequantize(), [[-1.0, 0.0, 2.0, 2.0]])


@pytest.mark.parametrize("spec", [FloatOffsetSpec(2, 16), FloatOffsetSpec(4, 32),
                                  AsymmetricSpec(3, 16), AsymmetricSpec(4, 32),
                                  SymmetricSpec(4, 32)], ids=lambda s: s.label())
def test_clip_search_never_has_more_squared_error_per_group(spec):
    w = _heavy_tailed((16, 128), seed=1)
    group = spec.group_size
    quantize = quantize_float_offset if spec.scheme == "float-offset" else quantize_rtn
    minmax = _group_sse(quantize(w, spec, False), w, group)
    searched = _group_sse(quantize(w, spec, True), w, group)
    assert np.all(searched <= minmax * (1 + 1e-6) + 1e-12)
    assert np.sum(searched < 0.9 * minmax) > 0  # heavy tails: shrinking helps somewhere


@pytest.mark.parametrize("clip_search", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_float_offset_constant_groups_dequantize_exactly(bits, clip_search):
    values = np.array([0.0, -3.7, 1e-3, 12345.678, 0.1, -1e-7], dtype=np.float32)
    w = np.repeat(values, 8).reshape(2, 24)  # groups of 8, each constant
    weight = quantize_float_offset(w, FloatOffsetSpec(bits, 8), clip_search)
    np.testing.assert_array_equal(weight.dequantize(), w)
    np.testing.assert_array_equal(weight.codes, 0)
    np.testing.assert_array_equal(weight.scales, 1.0)


def test_float_offset_short_constant_last_group_is_exact_and_ignores_padding():
    w = np.concatenate([np.linspace(-1, 1, 32), np.full(8, 5.5)]).astype(np.float32)[None, :]
    weight = quantize_float_offset(w, FloatOffsetSpec(4, 32), clip_search=True)
    assert weight.codes.shape == (1, 40)
    assert weight.scales.shape == (1, 2)
    np.testing.assert_array_equal(weight.dequantize()[0, 32:], 5.5)


def test_float_offset_codes_stay_in_unsigned_range():
    w = _heavy_tailed((8, 64), seed=2)
    for bits in (2, 3, 4, 8):
        codes = quantize_float_offset(w, FloatOffsetSpec(bits, 16), True).codes
        assert codes.dtype == np.uint8
        assert codes.min() == 0 and codes.max() == 2**bits - 1


# --------------------------------------------------------------------------- k-means


@pytest.mark.parametrize("bits", [2, 3])
def test_kmeans_column_with_evenly_spread_distinct_values_is_exact(bits):
    rng = np.random.default_rng(3)
    levels = 2**bits
    columns = []
    for j in range(6):
        values = np.sort(rng.standard_normal(levels - j % 2))  # 2^b or 2^b - 1 values
        columns.append(rng.permutation(np.resize(values, 40)))
    w = np.stack(columns, axis=1).astype(np.float32)  # [40, 6]
    weight = quantize_codebook(w, CodebookSpec(bits))
    expected = w.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(weight.dequantize(), expected)


@pytest.mark.parametrize("column", [
    [0.0] * 10 + [1.0, 2.0],  # 3 values, one dominant
    [0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0, 3.0],  # 4 values, uneven counts
], ids=["dominant", "uneven"])
def test_kmeans_column_with_few_skewed_distinct_values_is_exact(column):
    # the documented guarantee holds whatever the counts of the distinct values
    w = np.array(column, dtype=np.float32)[:, None]
    weight = quantize_codebook(w, CodebookSpec(2))
    np.testing.assert_array_equal(weight.dequantize(), w)


def test_kmeans_values_not_representable_in_float16_are_exact_up_to_float16():
    w = np.array([[0.1], [0.2], [0.3], [0.7]] * 3, dtype=np.float32)
    weight = quantize_codebook(w, CodebookSpec(2))
    np.testing.assert_array_equal(weight.dequantize(), w.astype(np.float16).astype(np.float32))
    assert np.any(weight.dequantize() != w)


def test_kmeans_is_deterministic():
    w = _heavy_tailed((48, 70), seed=4)
    first = quantize_codebook(w, CodebookSpec(3))
    second = quantize_codebook(w.copy(), CodebookSpec(3))
    np.testing.assert_array_equal(first.codes, second.codes)
    np.testing.assert_array_equal(first.codebooks, second.codebooks)


def test_kmeans_codebooks_are_sorted_float16_of_shape_in_by_levels():
    w = np.random.default_rng(5).standard_normal((32, 70)).astype(np.float32)
    weight = quantize_codebook(w, CodebookSpec(3))
    assert weight.codebooks.dtype == np.float16
    assert weight.codebooks.shape == (70, 8)
    assert weight.codes.dtype == np.uint8 and weight.codes.max() <= 7
    assert np.all(np.diff(weight.codebooks.astype(np.float32), axis=1) >= 0)


def test_kmeans_assigns_each_weight_to_its_nearest_stored_centroid():
    w = np.random.default_rng(6).standard_normal((32, 10)).astype(np.float32)
    weight = quantize_codebook(w, CodebookSpec(2))
    centroids = weight.codebooks.astype(np.float64)  # [in, K]
    nearest = np.abs(w[:, :, None] - centroids[None, :, :]).min(axis=2)
    np.testing.assert_allclose(np.abs(weight.dequantize() - w), nearest, rtol=0, atol=1e-7)


def test_kmeans_quantizes_each_column_independently_across_chunks():
    # 70 columns span two chunks of 64: each column's codebook is its own
    w = _heavy_tailed((24, 70), seed=7)
    whole = quantize_codebook(w, CodebookSpec(2))
    for j in (0, 63, 64, 69):
        alone = quantize_codebook(w[:, j : j + 1], CodebookSpec(2))
        np.testing.assert_array_equal(whole.codebooks[j], alone.codebooks[0])
        np.testing.assert_array_equal(whole.codes[:, j], alone.codes[:, 0])


def test_kmeans_error_decreases_with_bits():
    w = np.random.default_rng(8).standard_normal((64, 16)).astype(np.float32)
    errors = [((quantize_codebook(w, CodebookSpec(b)).dequantize() - w) ** 2).sum()
              for b in (2, 3, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[1] < 0.5 * errors[0]


def test_kmeans_2bit_codebook_of_a_two_cluster_column_lands_on_the_cluster_means():
    # values near -1 and near +1, 8 each: quantile start, Lloyd steps keep them apart
    column = np.array([-1.1, -1.0, -0.9, -1.0] * 2 + [0.9, 1.0, 1.1, 1.0] * 2, np.float32)
    weight = quantize_codebook(column[:, None], CodebookSpec(2))
    deq = weight.dequantize()[:, 0]
    assert np.all(deq[:8] < 0) and np.all(deq[8:] > 0)
    assert np.abs(deq - column).max() <= 0.1 + 1e-3


# --------------------------------------------------------------------------- outliers


def test_reserved_positions_are_the_entries_farthest_from_the_mean():
    # mean 2.5 / 6; distances 0.42, 9.58, 1.42, 1.58, 9.42, 0.08 -> order 1, 4, 3, 2, 0, 5
    w = np.array([[0.0, 10.0, -1.0], [2.0, -9.0, 0.5]], dtype=np.float32)
    assert reserved_positions(w, 1).tolist() == [1]
    assert reserved_positions(w, 2).tolist() == [1, 4]
    assert reserved_positions(w, 3).tolist() == [1, 3, 4]
    assert reserved_positions(w, 4).tolist() == [1, 2, 3, 4]
    assert reserved_positions(w, 2).dtype == np.int32
    empty = reserved_positions(w, 0)
    assert empty.dtype == np.int32 and empty.size == 0


def test_reserved_positions_break_ties_by_lower_flat_index():
    w = np.array([[1.0, -1.0], [1.0, -1.0]], dtype=np.float32)  # all at distance 1 from 0
    assert reserved_positions(w, 2).tolist() == [0, 1]
    assert reserved_positions(w, 3).tolist() == [0, 1, 2]


@pytest.mark.parametrize("spec", [
    AsymmetricSpec(4, 16, 0.02), SymmetricSpec(3, None, 0.02), FloatOffsetSpec(2, 16, 0.02),
    CodebookSpec(2, 0.02),
], ids=lambda s: s.label())
def test_outliers_restore_the_reserved_weights_up_to_float16_residuals(spec):
    w = _heavy_tailed((20, 48), seed=9)
    weight = quantize_weight(w, spec)
    count = int(np.floor(0.02 * 20 * 48))
    positions = reserved_positions(w, count)
    assert weight.outliers is not None
    np.testing.assert_array_equal(weight.outliers.positions, positions)
    assert weight.outliers.values.dtype == np.float16
    # the base is the quantization of W with the reserved weights set to the mean
    base_input = w.copy()
    base_input.reshape(-1)[positions] = w.mean(dtype=np.float64)
    base = quantize_weight(base_input, dataclasses.replace(spec, outliers=0.0)).dequantize()
    np.testing.assert_array_equal(dataclasses.replace(weight, outliers=None).dequantize(), base)
    # the residual is stored in float16 (relative rounding 2^-11)
    residual = w.reshape(-1)[positions].astype(np.float64) - base.reshape(-1)[positions]
    stored = weight.outliers.values.astype(np.float64)
    assert np.all(np.abs(stored - residual) <= 2.0**-11 * np.abs(residual) + 1e-12)
    deq = weight.dequantize().reshape(-1)
    original = w.reshape(-1)
    error = np.abs(deq[positions] - original[positions])
    bound = 2.0**-11 * np.abs(residual) + 2 * np.finfo(np.float32).eps * np.abs(original[positions])
    assert np.all(error <= bound)
    # everywhere else the weight is the base
    others = np.setdiff1d(np.arange(w.size), positions)
    np.testing.assert_array_equal(deq[others], base.reshape(-1)[others])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_outliers_reduce_total_error_on_heavy_tailed_weights(scheme):
    w = _heavy_tailed((32, 64), seed=10)
    spec = {"rtn-asym": AsymmetricSpec(3, 32), "rtn-sym": SymmetricSpec(3, 32),
                           "float-offset": FloatOffsetSpec(3, 32),
                           "float-offset-dq": FloatOffsetDqSpec(3, 32),
                           "codebook": CodebookSpec(2)}[scheme]
    plain = ((quantize_weight(w, spec).dequantize() - w) ** 2).sum()
    reserved = dataclasses.replace(spec, outliers=0.01)
    with_outliers = ((quantize_weight(w, reserved).dequantize() - w) ** 2).sum()
    assert with_outliers < plain


def test_a_fraction_below_one_weight_reserves_nothing():
    w = _heavy_tailed((4, 8), seed=11)  # floor(0.03 * 32) = 0
    weight = quantize_weight(w, AsymmetricSpec(4, 8, outliers=0.03))
    assert weight.outliers is None
    np.testing.assert_array_equal(weight.dequantize(),
                                  quantize_weight(w, AsymmetricSpec(4, 8)).dequantize())


# --------------------------------------------------------------------------- quantize_weight


def test_every_scheme_has_a_quantizer_producing_its_format():
    assert set(QUANTIZERS) == set(SCHEMES)
    w = np.random.default_rng(12).standard_normal((4, 16)).astype(np.float32)
    assert isinstance(quantize_weight(w, FloatOffsetSpec(4, 8)), FloatOffsetWeight)
    assert isinstance(quantize_weight(w, CodebookSpec(2)), CodebookWeight)


def test_clip_mode_minmax_turns_the_search_off():
    w = _heavy_tailed((8, 64), seed=13)
    spec = FloatOffsetSpec(3, 32)
    np.testing.assert_array_equal(quantize_weight(w, spec, "minmax").scales,
                                  quantize_float_offset(w, spec, False).scales)
    np.testing.assert_array_equal(quantize_weight(w, spec, "mse").scales,
                                  quantize_float_offset(w, spec, True).scales)


@pytest.mark.parametrize("shape", [(16,), (2, 4, 4), ()])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_quantize_weight_refuses_weights_that_are_not_2d(shape, scheme):
    spec = {"rtn-asym": AsymmetricSpec(4, 4), "rtn-sym": SymmetricSpec(4, 4),
            "float-offset": FloatOffsetSpec(4, 4), "float-offset-dq": FloatOffsetDqSpec(4, 4),
            "codebook": CodebookSpec(2)}[scheme]
    with pytest.raises(ValueError, match="expected a 2-D weight"):
        quantize_weight(np.zeros(shape, np.float32), spec)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("spec", [AsymmetricSpec(4, 4), FloatOffsetSpec(4, 4, 0.1),
                                  CodebookSpec(2)], ids=lambda s: s.label())
def test_quantize_weight_refuses_non_finite_weights(bad, spec):
    w = np.ones((4, 8), np.float32)
    w[2, 3] = bad
    with pytest.raises(NonFiniteWeightError, match="NaN or Inf"):
        quantize_weight(w, spec)


def test_quantize_weight_refuses_a_kept_spec():
    with pytest.raises(PlanError, match="no quantizer for scheme 'keep'"):
        quantize_weight(np.ones((2, 2), np.float32), KeepSpec())
