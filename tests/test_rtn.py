import numpy as np
import pytest

from lwqc.ir.errors import NonFiniteWeightError, PlanError
from lwqc.ir.spec import make_spec
from lwqc.passes.quantizers import quantize_weight
from lwqc.passes.rtn import CLIP_GRID


def quantize_rtn(w, bits, group_size, scheme, clip_search=False):
    """RTN through the quantizer table, as the quantize pass calls it."""
    spec = make_spec(bits, scheme, group_size=group_size)
    return quantize_weight(np.asarray(w), spec, "mse" if clip_search else "minmax")


def test_asym_2bit_hand_group_scale_zero_point_codes_and_values():
    w = np.array([[-0.3, 0.1, 0.5, 0.9]])
    packed = quantize_rtn(w, bits=2, group_size=4, scheme="rtn-asym")
    # range [min(-0.3, 0), max(0.9, 0)] = [-0.3, 0.9]; scale = 1.2 / 3 = 0.4
    assert packed.scales.dtype == np.float32
    assert packed.scales.shape == (1, 1)
    np.testing.assert_allclose(packed.scales, [[0.4]], rtol=1e-7)
    # zero point = round(0.3 / 0.4) = round(0.75) = 1
    assert packed.zero_points.dtype == np.uint8
    np.testing.assert_array_equal(packed.zero_points, [[1]])
    # codes = round(w / 0.4) + 1 = round([-0.75, 0.25, 1.25, 2.25]) + 1
    assert packed.codes.dtype == np.uint8
    np.testing.assert_array_equal(packed.codes, [[0, 1, 2, 3]])
    np.testing.assert_allclose(packed.dequantize(), [[-0.4, 0.0, 0.4, 0.8]], atol=1e-7)


def test_asym_range_always_contains_zero_for_all_positive_group():
    w = np.array([[0.3, 0.6, 0.9, 1.5]])
    packed = quantize_rtn(w, bits=2, group_size=4, scheme="rtn-asym")
    # lo = min(0.3, 0) = 0, hi = 1.5: scale = 0.5, zero point 0
    np.testing.assert_allclose(packed.scales, [[0.5]], rtol=1e-7)
    np.testing.assert_array_equal(packed.zero_points, [[0]])
    # round([0.6, 1.2, 1.8, 3.0]) = [1, 1, 2, 3]
    np.testing.assert_array_equal(packed.codes, [[1, 1, 2, 3]])
    np.testing.assert_allclose(packed.dequantize(), [[0.5, 0.5, 1.0, 1.5]], atol=1e-7)


def test_sym_4bit_hand_group_scale_codes_and_values():
    w = np.array([[-1.4, 0.26, 0.62, 1.0]])
    packed = quantize_rtn(w, bits=4, group_size=4, scheme="rtn-sym")
    # the largest magnitude, -1.4, maps to code -8: scale = -1.4 / -8 = 0.175
    np.testing.assert_allclose(packed.scales, [[0.175]], rtol=1e-7)
    assert packed.zero_points is None
    assert packed.signed
    assert packed.codes.dtype == np.int8
    # round([-8, 1.486, 3.543, 5.714])
    np.testing.assert_array_equal(packed.codes, [[-8, 1, 4, 6]])
    np.testing.assert_allclose(packed.dequantize(), [[-1.4, 0.175, 0.7, 1.05]], atol=1e-6)


def test_sym_positive_extreme_gets_a_negative_scale_and_the_most_negative_code():
    w = np.array([[1.6, -0.46, 0.0, -1.55]])
    packed = quantize_rtn(w, bits=4, group_size=4, scheme="rtn-sym")
    # scale = 1.6 / -8 = -0.2; codes round([-8, 2.3, 0, 7.75]) -> [-8, 2, 0, 7] (clipped)
    np.testing.assert_allclose(packed.scales, [[-0.2]], rtol=1e-7)
    np.testing.assert_array_equal(packed.codes, [[-8, 2, 0, 7]])
    np.testing.assert_allclose(packed.dequantize(), [[1.6, -0.4, 0.0, -1.4]], atol=1e-6)


def test_sym_ties_take_the_negative_extreme_and_halves_round_up():
    w = np.array([[0.8, -0.8, 0.3, 0.1]])
    packed = quantize_rtn(w, bits=2, group_size=4, scheme="rtn-sym")
    # |0.8| ties: -0.8 maps to -2, scale 0.4; 0.8 / 0.4 = 2 -> clipped to 1; 0.3 / 0.4 = 0.75
    # -> 1; 0.1 / 0.4 = 0.25 -> 0
    np.testing.assert_allclose(packed.scales, [[0.4]], rtol=1e-7)
    np.testing.assert_array_equal(packed.codes, [[1, -2, 1, 0]])
    half = quantize_rtn(np.array([[-1.0, 0.125, -0.375, 0.0]]), bits=4, group_size=4,
                        scheme="rtn-sym")
    # scale 0.125: 1.0 and -3.0 exactly; halves: none; then 0.0625 = half a step rounds up
    np.testing.assert_array_equal(half.codes, [[-8, 1, -3, 0]])
    up = quantize_rtn(np.array([[-1.0, 0.0625, -0.0625, 0.0]]), bits=4, group_size=4,
                      scheme="rtn-sym")
    np.testing.assert_array_equal(up.codes, [[-8, 1, 0, 0]])  # +-0.5 step -> up


@pytest.mark.parametrize("scheme", ["rtn-asym", "rtn-sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_all_zero_group_has_scale_one_and_dequantizes_exactly_to_zero(bits, scheme):
    w = np.zeros((2, 8), dtype=np.float32)
    packed = quantize_rtn(w, bits=bits, group_size=4, scheme=scheme)
    np.testing.assert_array_equal(packed.scales, np.ones((2, 2), dtype=np.float32))
    np.testing.assert_array_equal(packed.codes, np.zeros((2, 8)))
    if scheme == "rtn-asym":
        np.testing.assert_array_equal(packed.zero_points, np.zeros((2, 2)))
    deq = packed.dequantize()
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, np.zeros((2, 8)))


def test_zero_group_next_to_nonzero_group_keeps_its_own_unit_scale():
    w = np.array([[0.0, 0.0, 0.0, 0.0, -0.2, 0.2, 0.4, 0.6]])
    packed = quantize_rtn(w, bits=3, group_size=4, scheme="rtn-asym")
    # second group: range [-0.2, 0.6], scale 0.8 / 7
    np.testing.assert_allclose(packed.scales, [[1.0, 0.8 / 7]], rtol=1e-7)
    np.testing.assert_array_equal(packed.dequantize()[0, :4], np.zeros(4))


@pytest.mark.parametrize("scheme", ["rtn-asym", "rtn-sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_constant_positive_group_dequantizes_to_the_constant(bits, scheme):
    w = np.full((3, 16), 0.7, dtype=np.float32)
    packed = quantize_rtn(w, bits=bits, group_size=8, scheme=scheme)
    np.testing.assert_allclose(packed.dequantize(), w, rtol=1e-6)


def test_constant_negative_group_asym_uses_top_zero_point():
    w = np.full((1, 4), -0.9)
    packed = quantize_rtn(w, bits=2, group_size=4, scheme="rtn-asym")
    # range [-0.9, 0]: scale 0.3, zero point round(0.9 / 0.3) = 3, codes round(-3) + 3 = 0
    np.testing.assert_allclose(packed.scales, [[0.3]], rtol=1e-7)
    np.testing.assert_array_equal(packed.zero_points, [[3]])
    np.testing.assert_array_equal(packed.codes, [[0, 0, 0, 0]])
    np.testing.assert_allclose(packed.dequantize(), w, rtol=1e-6)


def test_partial_last_group_gets_scale_from_its_real_entries_asym():
    w = np.array(
        [
            [0.0, 0.1, 0.2, 0.3, -0.6, 0.3],
            [0.0, 0.0, 0.0, 1.5, 0.04, 0.1],
        ]
    )
    packed = quantize_rtn(w, bits=2, group_size=4, scheme="rtn-asym")
    assert packed.codes.shape == (2, 6)
    assert packed.scales.shape == (2, 2)
    # row 0: group [0, .1, .2, .3] -> scale 0.1; short group [-.6, .3] -> 0.9 / 3 = 0.3
    # row 1: group [0, 0, 0, 1.5] -> scale 0.5; short group [.04, .1] -> 0.1 / 3
    np.testing.assert_allclose(packed.scales, [[0.1, 0.3], [0.5, 0.1 / 3]], rtol=1e-7)
    # zero points: 0, round(0.6 / 0.3) = 2; 0, 0
    np.testing.assert_array_equal(packed.zero_points, [[0, 2], [0, 0]])
    # row 0 short group: round(-2) + 2 = 0, round(1) + 2 = 3
    # row 1 short group: round(1.2) = 1, round(3) = 3
    np.testing.assert_array_equal(packed.codes, [[0, 1, 2, 3, 0, 3], [0, 0, 0, 3, 1, 3]])
    expected = [[0.0, 0.1, 0.2, 0.3, -0.6, 0.3], [0.0, 0.0, 0.0, 1.5, 0.1 / 3, 0.1]]
    np.testing.assert_allclose(packed.dequantize(), expected, atol=1e-6)


def test_partial_last_group_gets_scale_from_its_real_entries_sym():
    w = np.array([[0.9, -2.0, 0.5, 0.25, 0.3]])
    packed = quantize_rtn(w, bits=3, group_size=4, scheme="rtn-sym")
    # extremes -2.0 and 0.3 map to code -4: scales 0.5 and -0.075
    np.testing.assert_allclose(packed.scales, [[0.5, -0.075]], rtol=1e-6)
    # [1.8, -4, 1, 0.5] rounded, halves up: [2, -4, 1, 1]; the last group: -4
    np.testing.assert_array_equal(packed.codes, [[2, -4, 1, 1, -4]])


@pytest.mark.parametrize("scheme", ["rtn-asym", "rtn-sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_round_to_nearest_error_is_at_most_half_a_step(bits, scheme):
    rng = np.random.default_rng(bits)
    w = (rng.standard_normal((7, 45)) * rng.uniform(0.01, 3.0, size=(7, 1))).astype(np.float32)
    w[0] = np.abs(w[0])
    w[1] = -np.abs(w[1])
    packed = quantize_rtn(w, bits=bits, group_size=16, scheme=scheme)
    step = np.abs(np.repeat(packed.scales, 16, axis=1)[:, :45].astype(np.float64))
    error = np.abs(packed.dequantize().astype(np.float64) - w.astype(np.float64))
    # symmetric codes: an entry of the extreme's opposite sign beyond the top code is clipped
    # to it, at most one step away
    clipped = packed.codes == 2 ** (bits - 1) - 1 if scheme == "rtn-sym" else False
    assert np.all(error <= step * np.where(clipped, 1.0 + 1e-5, 0.5 + 1e-5))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asym_codes_stay_in_unsigned_range(bits):
    rng = np.random.default_rng(100 + bits)
    w = rng.standard_normal((6, 50)) * 5
    w[2] += 40.0
    w[3] -= 40.0
    packed = quantize_rtn(w, bits=bits, group_size=8, scheme="rtn-asym")
    codes = packed.codes.astype(np.int64)
    assert codes.min() >= 0
    assert codes.max() <= 2**bits - 1
    assert codes.max() == 2**bits - 1
    zero_points = packed.zero_points.astype(np.int64)
    assert zero_points.min() >= 0
    assert zero_points.max() <= 2**bits - 1


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_sym_codes_stay_in_signed_range(bits):
    rng = np.random.default_rng(200 + bits)
    w = rng.standard_normal((6, 50)) * 5
    packed = quantize_rtn(w, bits=bits, group_size=8, scheme="rtn-sym")
    codes = packed.codes.astype(np.int64)
    assert codes.min() >= -(2 ** (bits - 1))
    assert codes.max() <= 2 ** (bits - 1) - 1
    # the largest magnitude of each group maps to -2^(b-1)
    assert np.all(codes[:, :48].reshape(6, 6, 8).min(axis=2) == -(2 ** (bits - 1)))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_weight_raises(bad):
    w = np.ones((2, 4), dtype=np.float32)
    w[1, 2] = bad
    with pytest.raises(NonFiniteWeightError):
        quantize_rtn(w, bits=4, group_size=4, scheme="rtn-asym")


@pytest.mark.parametrize("bits", [1, 5, 6, 32])
def test_unsupported_width_raises_plan_error(bits):
    with pytest.raises(PlanError, match="unsupported width"):
        quantize_rtn(np.ones((2, 4)), bits=bits, group_size=4, scheme="rtn-asym")


def test_unknown_scheme_raises_plan_error():
    with pytest.raises(PlanError, match="unknown scheme 'rtn-nf4'"):
        quantize_rtn(np.ones((2, 4)), bits=4, group_size=4, scheme="rtn-nf4")


def test_one_dimensional_weight_raises_value_error():
    with pytest.raises(ValueError, match="2-D"):
        quantize_rtn(np.ones(8), bits=4, group_size=4, scheme="rtn-sym")


def test_packed_weight_records_width_group_and_scheme():
    packed = quantize_rtn(np.ones((3, 10)), bits=3, group_size=4, scheme="rtn-sym")
    assert (packed.spec.bits, packed.spec.group_size, packed.spec.scheme) == (3, 4, "rtn-sym")
    assert packed.shape == (3, 10)
    assert packed.scales.shape == (3, 3)


@pytest.mark.parametrize("scheme", ["rtn-asym", "rtn-sym"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_clip_search_never_has_more_squared_error_per_group(scheme, bits):
    rng = np.random.default_rng(bits)
    w = rng.standard_t(3, size=(16, 96)).astype(np.float32)  # heavy tails: clipping pays
    group = 32
    plain = quantize_rtn(w, bits, group, scheme)
    searched = quantize_rtn(w, bits, group, scheme, clip_search=True)

    def group_error(packed):
        return ((packed.dequantize() - w) ** 2).reshape(16, -1, group).sum(axis=2)

    assert np.all(group_error(searched) <= group_error(plain) * (1 + 1e-6) + 1e-12)
    if bits <= 4:
        assert group_error(searched).sum() < group_error(plain).sum()


def test_clip_search_picks_the_least_squares_shrink_of_the_grid():
    # an independent scalar re-statement of the rule for one 2-bit asymmetric group
    w = np.array([[0.9, 1.0, 1.1, 1.2, -0.3, 0.0, 0.4, 6.0]], dtype=np.float32)

    def error(alpha):
        lo, hi = alpha * min(float(w.min()), 0.0), alpha * max(float(w.max()), 0.0)
        scale = float(np.float32((hi - lo) / 3))
        zero = min(max(round(-lo / scale), 0), 3)
        total = 0.0
        for x in w[0].astype(np.float64):
            code = min(max(round(x / scale) + zero, 0), 3)
            total += ((code - zero) * scale - x) ** 2
        return total

    best = min(error(a) for a in CLIP_GRID)
    searched = quantize_rtn(w, 2, 8, "rtn-asym", clip_search=True)
    assert np.sum((searched.dequantize().astype(np.float64) - w) ** 2) == pytest.approx(best)
    assert best < error(1.0)  # the outlier at 6.0 makes a shrunk range pay


@pytest.mark.parametrize("scheme", ["rtn-sym", "rtn-asym"])
@pytest.mark.parametrize("grid", [False, True])
def test_4bit_equals_onnx_runtimes_blockwise_quantizer(grid, scheme):
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from lwqc.backends import matmul_nbits

    rng = np.random.default_rng(7)
    out_features, in_features, block = 48, 96, 32
    w = rng.normal(size=(out_features, in_features)).astype(np.float32)
    if grid:  # values on a coarse grid (Q4_1-style checkpoints): many ties and exact halves
        w = np.round(w * 4) / 4
    packed = np.zeros((out_features, in_features // block, block // 2), np.uint8)
    scales = np.zeros(out_features * in_features // block, np.float32)
    zero_points = np.zeros(out_features * (in_features // block + 1) // 2, np.uint8)
    quantize_matmul_4bits(packed, np.ascontiguousarray(w.T), scales, zero_points, block,
                          out_features, in_features, scheme == "rtn-sym")
    ours = matmul_nbits.pack(quantize_rtn(w, bits=4, group_size=block, scheme=scheme))
    np.testing.assert_array_equal(ours["scales"].ravel(), scales)
    np.testing.assert_array_equal(ours["B"], packed)
    if scheme == "rtn-asym":  # (ONNX Runtime fills the odd block's spare nibble with 8)
        blocks = in_features // block
        np.testing.assert_array_equal(
            matmul_nbits.unpack_codes(ours["zero_points"], 4, blocks),
            matmul_nbits.unpack_codes(zero_points.reshape(out_features, -1), 4, blocks))
