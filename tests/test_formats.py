"""Weight formats on hand-made arrays: dequantization, array round trips and physical bytes."""

import dataclasses
import math

import numpy as np
import pytest
import torch

from lwqc.ir.capabilities import PACKED_STORAGE
from lwqc.ir.errors import PlanError
from lwqc.ir.formats import (
    FORMATS,
    AffineWeight,
    CodebookWeight,
    FloatOffsetDqWeight,
    FloatOffsetWeight,
    RowMixWeight,
    SparseOutliers,
    format_class,
    load_weight,
)
from lwqc.ir.formats.base import expand_groups, packed_code_bytes
from lwqc.ir.spec import (
    AsymmetricSpec,
    CodebookSpec,
    FloatOffsetDqSpec,
    FloatOffsetSpec,
    KeepSpec,
    RowMixSpec,
    SymmetricSpec,
)
from lwqc.passes.quantizers import quantize_weight

# --------------------------------------------------------------------------- dequantization


def test_affine_asym_dequantize_subtracts_zero_point_and_scales_per_group():
    weight = AffineWeight(
        AsymmetricSpec(bits=2, group_size=2),
        codes=np.array([[0, 1, 2, 3, 3], [3, 3, 0, 0, 1]], dtype=np.uint8),
        scales=np.array([[0.5, 1.0, 2.0], [0.25, 4.0, 1.5]], dtype=np.float32),
        zero_points=np.array([[1, 2, 0], [0, 1, 1]], dtype=np.uint8),
    )
    expected = np.array(
        [
            [(0 - 1) * 0.5, (1 - 1) * 0.5, (2 - 2) * 1.0, (3 - 2) * 1.0, (3 - 0) * 2.0],
            [(3 - 0) * 0.25, (3 - 0) * 0.25, (0 - 1) * 4.0, (0 - 1) * 4.0, (1 - 1) * 1.5],
        ],
        dtype=np.float32,
    )
    deq = weight.dequantize()
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, expected)
    assert not weight.signed
    assert weight.shape == (2, 5)


def test_affine_sym_dequantize_multiplies_signed_codes_by_scale():
    weight = AffineWeight(
        SymmetricSpec(bits=3, group_size=2),
        codes=np.array([[-2, 1, 3]], dtype=np.int8),
        scales=np.array([[0.25, 4.0]], dtype=np.float32),
    )
    np.testing.assert_array_equal(weight.dequantize(), [[-0.5, 0.25, 12.0]])
    assert weight.signed


def test_affine_short_last_group_uses_its_own_scale():
    # 7 inputs in groups of 3: groups {0,1,2}, {3,4,5}, {6}
    weight = AffineWeight(
        SymmetricSpec(bits=4, group_size=3),
        codes=np.ones((2, 7), dtype=np.int8),
        scales=np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32),
    )
    np.testing.assert_array_equal(
        weight.dequantize(), [[1, 1, 1, 2, 2, 2, 3], [4, 4, 4, 5, 5, 5, 6]]
    )


def test_expand_groups_repeats_group_values_and_truncates_the_short_group():
    per_group = torch.tensor([[1, 2, 3], [4, 5, 6]])
    expanded = expand_groups(per_group, 3, 7)
    assert expanded.tolist() == [[1, 1, 1, 2, 2, 2, 3], [4, 4, 4, 5, 5, 5, 6]]


def test_affine_group_size_none_is_one_group_per_row():
    weight = AffineWeight(
        AsymmetricSpec(bits=4, group_size=None),
        codes=np.array([[0, 5, 15], [7, 8, 9]], dtype=np.uint8),
        scales=np.array([[0.5], [2.0]], dtype=np.float32),
        zero_points=np.array([[5], [8]], dtype=np.uint8),
    )
    np.testing.assert_array_equal(
        weight.dequantize(), [[-2.5, 0.0, 5.0], [-2.0, 0.0, 2.0]]
    )


def test_float_offset_dequantize_is_code_times_scale_plus_offset():
    weight = FloatOffsetWeight(
        FloatOffsetSpec(bits=4, group_size=2),
        codes=np.array([[0, 15, 3], [1, 2, 15]], dtype=np.uint8),
        scales=np.array([[0.5, 0.25], [2.0, 0.125]], dtype=np.float32),
        offsets=np.array([[-1.25, 3.0], [0.75, -8.0]], dtype=np.float32),
    )
    expected = [
        [0 * 0.5 - 1.25, 15 * 0.5 - 1.25, 3 * 0.25 + 3.0],
        [1 * 2.0 + 0.75, 2 * 2.0 + 0.75, 15 * 0.125 - 8.0],
    ]
    deq = weight.dequantize()
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, expected)


def test_float_offset_dq_dequantize_by_hand_across_two_super_groups():
    # one row of 35 inputs in groups of 2: 18 groups (the last short), split into two
    # super-groups of 9 groups (round(18 / 8) = 2), not 8 + 8 + 2
    codes = np.arange(35, dtype=np.uint8)[None] % 4
    scale_codes = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 63, 9, 10, 11, 12, 13, 14, 15, 16, 17]],
                           np.uint8)
    offset_codes = np.array([[0, 1, 0, 2, 0, 3, 0, 4, 5, 63, 6, 7, 8, 9, 10, 11, 12, 13]],
                            np.uint8)
    steps = np.array([[0.5, 0.125]], np.float16), np.array([[0.25, 2.0]], np.float16)
    weight = FloatOffsetDqWeight(FloatOffsetDqSpec(bits=2, group_size=2), codes, scale_codes,
                                 offset_codes, *steps)
    expected = []
    for i in range(35):
        g = i // 2
        super_group = g // 9
        scale = int(scale_codes[0, g]) * float(steps[0][0, super_group])
        magnitude = int(offset_codes[0, g]) * float(steps[1][0, super_group])
        expected.append(int(codes[0, i]) * scale - magnitude)
    deq = weight.dequantize()
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, [expected])
    assert deq[0, 17] == 1 * 63 * 0.5 - 5 * 0.25  # group 8: the last of super-group 0
    assert deq[0, 19] == 3 * 9 * 0.125 - 63 * 2.0  # group 9: the first of super-group 1
    assert deq[0, 34] == 2 * 17 * 0.125 - 13 * 2.0  # group 17: one input, the short last


def test_float_offset_dq_rows_of_576_inputs_have_two_super_groups():
    # SmolLM2's hidden size: 18 groups of 32 share two pairs of float16 steps, so a 3-bit
    # weight costs 3 + 12/32 + 64/576 bits (three pairs, 8 + 8 + 2, would cost 96/576)
    nbytes = PACKED_STORAGE.bytes((64, 576), FloatOffsetDqSpec(3, 32), 32)
    assert nbytes == 64 * (576 * 3 // 8 + 2 * 18 * 6 // 8 + 2 * 2 * 2)
    assert 8 * nbytes / (64 * 576) == pytest.approx(3 + 12 / 32 + 64 / 576)
    weight = quantize_weight(np.random.default_rng(0).standard_normal((4, 576)),
                             FloatOffsetDqSpec(3, 32), "minmax")
    assert weight.scale_steps.shape == weight.offset_steps.shape == (4, 2)


def test_float_offset_dq_arrays_of_another_super_group_layout_are_refused():
    weight = quantize_weight(np.random.default_rng(0).standard_normal((2, 576)),
                             FloatOffsetDqSpec(4, 32), "minmax")
    arrays = weight.arrays()
    three = {k: np.concatenate([v, v[:, :1]], axis=1) if k.endswith("_steps") else v
             for k, v in arrays.items()}
    with pytest.raises(PlanError, match="3 super-groups of steps for 18 groups, where this "
                       "layout has 2"):
        load_weight(weight.spec, three)
    np.testing.assert_array_equal(load_weight(weight.spec, arrays).dequantize(),
                                  weight.dequantize())


def test_float_offset_dq_takes_four_and_a_half_bits_at_four_bits_and_groups_of_32():
    spec = FloatOffsetDqSpec(4, 32)
    # 256 inputs: 8 groups = one super-group; codes 4 bits, 2 x 8 six-bit codes, 2 float16
    nbytes = PACKED_STORAGE.bytes((64, 256), spec, 32)
    assert nbytes == 64 * (128 + 2 * 6 + 2 * 2)
    assert 8 * nbytes / (64 * 256) == 4.5


def test_float_offset_group_size_none_and_short_last_group():
    row = FloatOffsetWeight(
        FloatOffsetSpec(bits=2, group_size=None),
        codes=np.array([[0, 1, 2, 3]], dtype=np.uint8),
        scales=np.array([[0.5]], dtype=np.float32),
        offsets=np.array([[0.25]], dtype=np.float32),
    )
    np.testing.assert_array_equal(row.dequantize(), [[0.25, 0.75, 1.25, 1.75]])
    short = FloatOffsetWeight(
        FloatOffsetSpec(bits=2, group_size=3),
        codes=np.array([[1, 1, 1, 1]], dtype=np.uint8),
        scales=np.array([[1.0, 4.0]], dtype=np.float32),
        offsets=np.array([[0.0, -1.0]], dtype=np.float32),
    )
    np.testing.assert_array_equal(short.dequantize(), [[1.0, 1.0, 1.0, 3.0]])


def test_codebook_dequantize_looks_up_the_column_codebook():
    codes = np.array([[0, 3, 1], [2, 0, 3], [1, 1, 0]], dtype=np.uint8)
    codebooks = np.array(
        [[-1.0, 0.0, 0.5, 2.0], [-4.0, -2.0, 1.0, 8.0], [0.125, 0.25, 0.375, 0.5]],
        dtype=np.float16,
    )
    weight = CodebookWeight(CodebookSpec(bits=2), codes, codebooks)
    expected = np.array(
        [
            [-1.0, 8.0, 0.25],  # codebooks[0, 0], codebooks[1, 3], codebooks[2, 1]
            [0.5, -4.0, 0.5],
            [0.0, -2.0, 0.125],
        ],
        dtype=np.float32,
    )
    deq = weight.dequantize()
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, expected)
    assert weight.shape == (3, 3)


def test_sparse_outliers_add_float16_residuals_at_flat_row_major_positions():
    base = np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=np.float32)
    outliers = SparseOutliers(np.array([1, 5], dtype=np.int32),
                              np.array([0.5, -2.0], dtype=np.float16))
    tensors = {k: torch.from_numpy(v) for k, v in outliers.arrays().items()}
    result = SparseOutliers.add_to(torch.from_numpy(base), tensors).numpy()
    np.testing.assert_array_equal(result, [[1.0, 2.5, 3.0], [4.0, 5.0, 4.0]])
    np.testing.assert_array_equal(base, [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])  # a copy


def test_sparse_outliers_add_nothing_without_their_arrays():
    base = torch.ones(2, 2)
    assert SparseOutliers.add_to(base, {}) is base


def test_format_with_outliers_dequantizes_to_base_plus_residuals():
    outliers = SparseOutliers(np.array([0, 4], dtype=np.int32),
                              np.array([0.1, 100.0], dtype=np.float16))
    weight = FloatOffsetWeight(
        FloatOffsetSpec(bits=2, group_size=None, outliers=0.25),
        codes=np.array([[0, 1, 2, 3], [3, 2, 1, 0]], dtype=np.uint8),
        scales=np.array([[1.0], [0.5]], dtype=np.float32),
        offsets=np.array([[0.0], [1.0]], dtype=np.float32),
        outliers=outliers,
    )
    expected = np.array([[0.0, 1.0, 2.0, 3.0], [2.5, 2.0, 1.5, 1.0]], dtype=np.float32)
    expected[0, 0] += np.float32(np.float16(0.1))
    expected[1, 0] += 100.0
    np.testing.assert_array_equal(weight.dequantize(), expected)


@pytest.mark.parametrize("shape, fraction, expected", [
    ((10, 10), 0.01, 1), ((10, 10), 0.019, 1), ((7, 13), 0.05, 4), ((3, 3), 0.1, 0),
    ((4, 8), 0.0, 0),
])
def test_outlier_count_rounds_the_fraction_down(shape, fraction, expected):
    assert SparseOutliers.count_for(shape, fraction) == expected
    assert SparseOutliers.bytes_for(expected) == 6 * expected


# --------------------------------------------------------------------------- round trips

ROUND_TRIP_SPECS = [
    AsymmetricSpec(bits=4, group_size=8),
    AsymmetricSpec(bits=3, group_size=None),
    SymmetricSpec(bits=4, group_size=8),
    SymmetricSpec(bits=2, group_size=5),
    FloatOffsetSpec(bits=4, group_size=8),
    FloatOffsetSpec(bits=8, group_size=None),
    CodebookSpec(bits=2),
    CodebookSpec(bits=3),
]


@pytest.mark.parametrize("outliers", [0.0, 0.05])
@pytest.mark.parametrize("base_spec", ROUND_TRIP_SPECS, ids=lambda s: s.label())
def test_arrays_round_trip_through_load_weight(base_spec, outliers):
    spec = dataclasses.replace(base_spec, outliers=outliers)
    w = np.random.default_rng(3).standard_normal((6, 20)).astype(np.float32)
    weight = quantize_weight(w, spec)
    assert (weight.outliers is not None) == (outliers > 0)
    arrays = weight.arrays()
    assert ("outlier_positions" in arrays) == (outliers > 0)
    loaded = load_weight(spec, arrays)
    assert type(loaded) is type(weight)
    assert loaded.spec == spec
    reloaded = loaded.arrays()
    assert list(reloaded) == list(arrays)
    for name, array in arrays.items():
        assert reloaded[name].dtype == array.dtype, name
        np.testing.assert_array_equal(reloaded[name], array, err_msg=name)
    np.testing.assert_array_equal(loaded.dequantize(), weight.dequantize())


@pytest.mark.parametrize("base_spec", ROUND_TRIP_SPECS, ids=lambda s: s.label())
def test_load_weight_normalises_widened_dtypes(base_spec):
    # a backend may hand arrays back widened (int64 codes, float64 scales): load restores them
    spec = dataclasses.replace(base_spec, outliers=0.05)
    w = np.random.default_rng(4).standard_normal((5, 16)).astype(np.float32)
    weight = quantize_weight(w, spec)
    arrays = weight.arrays()
    widened = {k: v.astype(np.int64 if v.dtype.kind in "iu" else np.float64)
               for k, v in arrays.items()}
    loaded = load_weight(spec, widened).arrays()
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype, name
        np.testing.assert_array_equal(loaded[name], array, err_msg=name)


def test_rtn_asym_arrays_carry_zero_points_and_rtn_sym_arrays_do_not():
    w = np.random.default_rng(5).standard_normal((3, 8)).astype(np.float32)
    assert set(quantize_weight(w, AsymmetricSpec(4, 4)).arrays()) == {
        "codes", "scales", "zero_points"}
    assert set(quantize_weight(w, SymmetricSpec(4, 4)).arrays()) == {"codes", "scales"}
    assert set(quantize_weight(w, FloatOffsetSpec(4, 4)).arrays()) == {
        "codes", "scales", "offsets"}
    assert set(quantize_weight(w, CodebookSpec(2, outliers=0.1)).arrays()) == {
        "codes", "codebooks", "outlier_positions", "outlier_values"}


def test_format_class_maps_each_scheme_to_its_format():
    assert format_class(AsymmetricSpec(4)) is AffineWeight
    assert format_class(SymmetricSpec(4)) is AffineWeight
    assert format_class(FloatOffsetSpec(4)) is FloatOffsetWeight
    assert format_class(CodebookSpec(4)) is CodebookWeight
    assert format_class(FloatOffsetDqSpec(4, 32)) is FloatOffsetDqWeight
    mixed = RowMixSpec(bits=4, parts=(FloatOffsetDqSpec(4, 32), AsymmetricSpec(2)), rows="01")
    assert format_class(mixed) is RowMixWeight
    assert set(FORMATS) == {"affine", "float-offset", "float-offset-dq", "codebook", "row-mix"}


def test_format_class_of_keep_spec_raises_plan_error():
    with pytest.raises(PlanError, match="'keep' has no weight format"):
        format_class(KeepSpec())
    with pytest.raises(PlanError):
        load_weight(KeepSpec(), {})


# --------------------------------------------------------------------------- physical bytes

def _ceil_bytes(bits):
    return -(-bits // 8)


def _packed_bytes(count, bits):
    """Whole bytes; 3- and 6-bit codes in whole three-byte words (8 resp. 4 codes each)."""
    if bits in (3, 6):
        return 3 * -(-count // (24 // bits))
    return _ceil_bytes(count * bits)


def _expected_bytes(shape, spec):
    """Closed form per format, with codes and zero points packed at their own width."""
    out_features, in_features = shape
    c = spec.bits
    codes = _packed_bytes(out_features * in_features, c)
    outliers = math.floor(spec.outliers * out_features * in_features) * 6
    if spec.scheme == "codebook":
        return codes + in_features * 2**spec.bits * 2 + outliers
    group = in_features if spec.group_size is None else spec.group_size
    groups = out_features * -(-in_features // group)
    if spec.scheme == "rtn-asym":
        return codes + 4 * groups + _packed_bytes(groups, c) + outliers
    if spec.scheme == "rtn-sym":
        return codes + 4 * groups + outliers
    if spec.scheme == "float-offset-dq":  # 6-bit parameter codes, float16 steps per ~8 groups
        per_row = -(-in_features // group)
        supers = out_features * {1: 1, 2: 1, 8: 1, 9: 1, 64: 8}[per_row]  # BYTES_SHAPES' rows
        return codes + 2 * _packed_bytes(groups, 6) + 4 * supers + outliers
    return codes + 8 * groups + outliers  # float-offset


BYTES_SHAPES = [(3, 5), (17, 33), (256, 256), (1, 1)]
BYTES_SPECS = [
    cls(bits=bits, group_size=group, outliers=outliers)
    for cls in (AsymmetricSpec, SymmetricSpec, FloatOffsetSpec)
    for bits in (2, 3, 4, 8)
    for group in (4, 128, None)
    for outliers in (0.0, 0.03)
] + [CodebookSpec(bits=bits, outliers=o) for bits in (2, 3, 4, 8) for o in (0.0, 0.03)] + [
    FloatOffsetDqSpec(bits=bits, group_size=group, outliers=outliers)
    for bits in (2, 3, 4, 8) for group in (4, 32) for outliers in (0.0, 0.03)
]


@pytest.mark.parametrize("shape", BYTES_SHAPES)
def test_packed_storage_bytes_follow_the_closed_form_of_each_format(shape):
    for spec in BYTES_SPECS:
        assert PACKED_STORAGE.bytes(shape, spec, 32) == _expected_bytes(shape, spec), spec


def test_physical_bytes_by_hand_for_each_format():
    # 256 x 256, 4 bits, group 128: 32768 bytes of codes, 512 groups
    shape = (256, 256)
    assert PACKED_STORAGE.bytes(shape, AsymmetricSpec(4, 128), 32) == 32768 + 2048 + 256
    assert PACKED_STORAGE.bytes(shape, SymmetricSpec(4, 128), 32) == 32768 + 2048
    assert PACKED_STORAGE.bytes(shape, FloatOffsetSpec(4, 128), 32) == 32768 + 4096
    # codebook: 256 columns of 16 float16 centroids
    assert PACKED_STORAGE.bytes(shape, CodebookSpec(4), 32) == 32768 + 256 * 16 * 2
    # 1% outliers of 65536 weights: 655 of them, 6 bytes each
    assert PACKED_STORAGE.bytes(shape, SymmetricSpec(4, 128, 0.01), 32) == (
        32768 + 2048 + 655 * 6)
    # 8 bits: one byte per code and per zero point
    assert PACKED_STORAGE.bytes(shape, AsymmetricSpec(8, 128), 32) == 65536 + 2048 + 512
    # 2 bits: four codes and four zero points per byte
    assert PACKED_STORAGE.bytes(shape, AsymmetricSpec(2, 128), 32) == 16384 + 2048 + 128


def test_physical_bytes_round_odd_sizes_up_to_whole_bytes():
    # 3 x 5 at 2 bits, group 4: 15 codes = 30 bits -> 4 bytes; 6 groups -> 24 bytes of
    # scales; 6 zero points = 12 bits -> 2 bytes
    assert PACKED_STORAGE.bytes((3, 5), AsymmetricSpec(2, 4), 32) == 4 + 24 + 2
    # at 3 bits (packed eight to a three-byte word): 15 codes -> 2 words, 6 zero points -> 1
    assert PACKED_STORAGE.bytes((3, 5), AsymmetricSpec(3, 4), 32) == 6 + 24 + 3
    # a single 3-bit code and a single 3-bit zero point still take a word each
    assert PACKED_STORAGE.bytes((1, 1), AsymmetricSpec(3, 128), 32) == 3 + 4 + 3
    # a single 4-bit code still takes a byte
    assert PACKED_STORAGE.bytes((1, 1), SymmetricSpec(4, 128), 32) == 1 + 4
    assert packed_code_bytes(15, 2) == 4
    # eight 3-bit codes fill one three-byte word exactly; a ninth starts a second
    assert packed_code_bytes(8, 3) == 3
    assert packed_code_bytes(9, 3) == 6
    assert packed_code_bytes(15, 3) == 6
    assert packed_code_bytes(1, 4) == 1
    assert packed_code_bytes(0, 4) == 0


# 3-bit codes and zero points packed at 3 bits, by hand:
#   256 x 256, group 128: 65536 * 3 bits = 24576 B codes; 512 groups, zero points 192 B
#   3 x 5, group 4: 15 * 3 = 45 bits -> 6 B codes; 6 groups, zero points 18 bits -> 3 B
#   17 x 33, group 8: 561 * 3 = 1683 bits -> 211 B codes; 17 * 5 = 85 groups, zero points
#     255 bits -> 32 B
THREE_BIT_BYTES = {
    # 17 x 33 in groups of 8: 561 codes in 71 three-byte words, 85 zero points in 11
    AsymmetricSpec: [24576 + 512 * 4 + 192, 6 + 6 * 4 + 3, 213 + 85 * 4 + 33],
    SymmetricSpec: [24576 + 512 * 4, 6 + 6 * 4, 213 + 85 * 4],
    FloatOffsetSpec: [24576 + 512 * 8, 6 + 6 * 8, 213 + 85 * 8],
}


@pytest.mark.parametrize("cls", [AsymmetricSpec, SymmetricSpec, FloatOffsetSpec])
def test_3bit_group_formats_are_charged_three_bits_per_code_and_zero_point(cls):
    cases = [((256, 256), 128), ((3, 5), 4), ((17, 33), 8)]
    for (shape, group), expected in zip(cases, THREE_BIT_BYTES[cls], strict=True):
        three = PACKED_STORAGE.bytes(shape, cls(3, group), 32)
        assert three == expected, (shape, group)
        assert three < PACKED_STORAGE.bytes(shape, cls(4, group), 32)


def test_3bit_codebook_codes_cost_3_bits_and_it_has_only_8_centroids():
    # 17 x 33: 561 codes, eight to a three-byte word -> 71 words, 213 bytes; 33 columns * 8
    # centroids * 2 bytes
    assert PACKED_STORAGE.bytes((17, 33), CodebookSpec(3), 32) == 213 + 33 * 8 * 2
    # at 4 bits: 561 * 4 bits -> 281 bytes; 33 columns * 16 centroids * 2 bytes
    assert PACKED_STORAGE.bytes((17, 33), CodebookSpec(4), 32) == 281 + 33 * 16 * 2


@pytest.mark.parametrize("keep_bits", [32, 16])
def test_kept_weight_costs_its_float_size(keep_bits):
    assert PACKED_STORAGE.bytes((256, 512), KeepSpec(), keep_bits) == (
        256 * 512 * keep_bits // 8)
    assert PACKED_STORAGE.bytes((3, 5), KeepSpec(), 16) == 30


@pytest.mark.parametrize("spec", [
    AsymmetricSpec(3, 8, 0.02), SymmetricSpec(2, None), FloatOffsetSpec(4, 5, 0.05),
    CodebookSpec(3, 0.02), AsymmetricSpec(8, 4),
], ids=lambda s: s.label())
def test_nbytes_of_a_quantized_weight_equals_the_planned_bytes(spec):
    w = np.random.default_rng(6).standard_normal((9, 21)).astype(np.float32)
    weight = quantize_weight(w, spec)
    planned = PACKED_STORAGE.bytes((9, 21), spec, 32)
    assert weight.nbytes(PACKED_STORAGE.code_bits) == planned
    assert planned == _expected_bytes((9, 21), spec)


@pytest.mark.parametrize("spec", [
    AsymmetricSpec(8, 4, 0.05), SymmetricSpec(8, None, 0.05), FloatOffsetSpec(8, 5, 0.05),
    CodebookSpec(8, 0.05),
], ids=lambda s: s.label())
def test_8bit_nbytes_equals_the_bytes_of_the_stored_numpy_arrays(spec):
    # at 8 bits every array is stored in its own dtype, so the charge is what numpy holds
    w = np.random.default_rng(7).standard_normal((6, 10)).astype(np.float32)
    weight = quantize_weight(w, spec)
    assert weight.nbytes(lambda bits: 8) == sum(a.nbytes for a in weight.arrays().values())
