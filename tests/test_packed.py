import numpy as np
import pytest

from lwqc.ir.packed import PackedWeight, container_bits, n_groups, physical_bytes


def test_physical_bytes_8bit_asym_counts_codes_scales_and_zero_points():
    # 65536 one-byte codes, 256 * 2 = 512 groups: 512 float32 scales, 512 one-byte zero points
    assert physical_bytes((256, 256), 8, 128, "rtn-asym") == 65536 + 512 * 4 + 512


def test_physical_bytes_sym_has_no_zero_points():
    assert physical_bytes((256, 256), 8, 128, "rtn-sym") == 65536 + 512 * 4


def test_physical_bytes_4bit_asym_packs_two_codes_per_byte():
    assert physical_bytes((256, 256), 4, 128, "rtn-asym") == 32768 + 2048 + 256


def test_physical_bytes_2bit_asym_packs_four_codes_per_byte():
    assert physical_bytes((256, 256), 2, 128, "rtn-asym") == 16384 + 2048 + 128


@pytest.mark.parametrize("scheme", ["rtn-asym", "rtn-sym"])
def test_physical_bytes_charges_3bit_exactly_as_4bit(scheme):
    for shape, group in [((256, 256), 128), ((3, 5), 4), ((17, 33), 8)]:
        assert physical_bytes(shape, 3, group, scheme) == physical_bytes(shape, 4, group, scheme)


def test_physical_bytes_of_kept_weight_is_float_size():
    assert physical_bytes((256, 512), 16, 128, "rtn-asym") == 256 * 512 * 4
    assert physical_bytes((256, 512), 16, 128, "rtn-asym", keep_bits=32) == 256 * 512 * 4
    assert physical_bytes((256, 512), 16, 128, "rtn-asym", keep_bits=16) == 256 * 512 * 2


def test_physical_bytes_rounds_odd_sizes_up_to_whole_bytes():
    # 3 x 5 at 2 bits, group 4: 15 codes = 30 bits -> 4 bytes; 3 * 2 = 6 groups -> 24 bytes of
    # scales; 6 zero points = 12 bits -> 2 bytes
    assert physical_bytes((3, 5), 2, 4, "rtn-asym") == 4 + 24 + 2
    # at 3 bits (4-bit containers): 60 bits -> 8 bytes; 24 bits of zero points -> 3 bytes
    assert physical_bytes((3, 5), 3, 4, "rtn-asym") == 8 + 24 + 3
    # a single 4-bit code still takes a byte
    assert physical_bytes((1, 1), 4, 128, "rtn-sym") == 1 + 4


def test_physical_bytes_rejects_unsupported_width():
    with pytest.raises(ValueError):
        physical_bytes((4, 4), 5, 4, "rtn-asym")


@pytest.mark.parametrize("bits, expected", [(2, 2), (3, 4), (4, 4), (8, 8)])
def test_container_bits_puts_3bit_codes_in_4bit_containers(bits, expected):
    assert container_bits(bits) == expected


@pytest.mark.parametrize("bits", [1, 5, 16])
def test_container_bits_rejects_other_widths(bits):
    with pytest.raises(ValueError):
        container_bits(bits)


@pytest.mark.parametrize(
    "in_features, group_size, expected", [(256, 128, 2), (300, 128, 3), (1, 128, 1), (5, 1, 5)]
)
def test_n_groups_counts_a_short_last_group(in_features, group_size, expected):
    assert n_groups(in_features, group_size) == expected


def test_dequantize_asym_subtracts_zero_point_and_scales_per_group():
    packed = PackedWeight(
        bits=2,
        group_size=2,
        scheme="rtn-asym",
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
    deq = packed.dequantize()
    assert deq.dtype == np.float32
    np.testing.assert_array_equal(deq, expected)


def test_dequantize_sym_multiplies_signed_codes_by_scale():
    packed = PackedWeight(
        bits=3,
        group_size=2,
        scheme="rtn-sym",
        codes=np.array([[-2, 1, 3]], dtype=np.int8),
        scales=np.array([[0.25, 4.0]], dtype=np.float32),
        zero_points=None,
    )
    np.testing.assert_array_equal(packed.dequantize(), [[-0.5, 0.25, 12.0]])
    assert packed.signed


def test_expand_repeats_group_values_and_truncates_short_group():
    packed = PackedWeight(
        bits=4,
        group_size=3,
        scheme="rtn-sym",
        codes=np.zeros((2, 7), dtype=np.int8),
        scales=np.ones((2, 3), dtype=np.float32),
        zero_points=None,
    )
    per_group = np.array([[1, 2, 3], [4, 5, 6]])
    np.testing.assert_array_equal(
        packed.expand(per_group), [[1, 1, 1, 2, 2, 2, 3], [4, 4, 4, 5, 5, 5, 6]]
    )


def test_nbytes_shape_and_signed_follow_the_codes():
    packed = PackedWeight(
        bits=4,
        group_size=4,
        scheme="rtn-asym",
        codes=np.zeros((3, 10), dtype=np.uint8),
        scales=np.ones((3, 3), dtype=np.float32),
        zero_points=np.zeros((3, 3), dtype=np.uint8),
    )
    assert packed.shape == (3, 10)
    assert not packed.signed
    # 30 codes * 4 bits = 15 bytes; 9 groups: 36 bytes of scales, 36 bits -> 5 bytes zero points
    assert packed.nbytes() == 15 + 36 + 5
