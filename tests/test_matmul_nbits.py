"""MatMulNBits / GatherBlockQuantized layout: hand-packed bytes, round trips, and ORT's own
kernels computing with the packed arrays exactly the affine format's weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lwqc.backends import matmul_nbits
from lwqc.ir.formats import AffineWeight
from lwqc.ir.spec import AsymmetricSpec, CodebookSpec, SymmetricSpec, make_spec
from lwqc.passes.quantizers import quantize_weight


def test_codes_pack_little_endian_within_each_byte():
    np.testing.assert_array_equal(
        matmul_nbits.pack_codes(np.array([[1, 2, 3, 4, 5]], np.uint8), 4),
        [[0x21, 0x43, 0x05]])  # the odd code count padded with a zero nibble
    np.testing.assert_array_equal(
        matmul_nbits.pack_codes(np.array([[1, 2, 3, 0]], np.uint8), 2), [[0b00111001]])
    np.testing.assert_array_equal(
        matmul_nbits.pack_codes(np.array([[200, 7]], np.uint8), 8), [[200, 7]])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_codes_round_trip(bits):
    codes = np.random.default_rng(bits).integers(0, 2**bits, (5, 37)).astype(np.uint8)
    packed = matmul_nbits.pack_codes(codes, bits)
    assert packed.shape == (5, -(-37 * bits // 8))
    np.testing.assert_array_equal(matmul_nbits.unpack_codes(packed, bits, 37), codes)


def test_only_power_of_two_groups_of_16_or_more_affine_without_outliers_are_held():
    assert matmul_nbits.holds(AsymmetricSpec(4, 32)) and matmul_nbits.holds(SymmetricSpec(8, 16))
    assert not matmul_nbits.holds(AsymmetricSpec(3, 32))  # no 3-bit kernel
    assert not matmul_nbits.holds(SymmetricSpec(2, 16))  # run widened to 4 bits instead
    assert not matmul_nbits.holds(AsymmetricSpec(4, 48))  # not a power of two
    assert not matmul_nbits.holds(AsymmetricSpec(4, 8))  # below 16
    assert not matmul_nbits.holds(AsymmetricSpec(4, None))  # per row
    assert not matmul_nbits.holds(AsymmetricSpec(4, 32, outliers=0.01))
    assert not matmul_nbits.holds(CodebookSpec(4))


def _run(graph: ir.Graph, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    model = ir.Model(graph, ir_version=10)
    model.opset_imports[matmul_nbits.DOMAIN] = 1
    proto = ir.to_proto(model).SerializeToString()
    session = ort.InferenceSession(proto, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


@pytest.mark.parametrize("scheme", ["rtn-asym", "rtn-sym"])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("in_features", "group_size"), [(96, 32), (80, 64)])
def test_ort_kernels_compute_with_the_formats_weights(scheme, bits, in_features, group_size):
    rng = np.random.default_rng(bits)
    float_weight = rng.normal(size=(24, in_features)).astype(np.float32)
    weight = quantize_weight(float_weight, make_spec(bits, scheme, group_size=group_size),
                             clip="minmax")
    assert isinstance(weight, AffineWeight)
    expected = weight.dequantize()
    arrays = matmul_nbits.pack(weight)
    unpacked = matmul_nbits.unpack(weight.spec, arrays, in_features)
    for name, array in weight.arrays().items():
        np.testing.assert_array_equal(unpacked[name], array)

    activation = ir.Value(name="A", type=ir.TensorType(ir.DataType.FLOAT),
                          shape=ir.Shape(["m", in_features]))
    indices = ir.Value(name="I", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape(["n"]))
    anchor = ir.node("Identity", [activation])
    graph = ir.Graph([activation, indices], [], nodes=[anchor], opset_imports={"": 21})
    product = matmul_nbits.matmul(graph, anchor, "w", activation, [weight], 1).outputs[0]
    graph.outputs.append(product)
    if bits in matmul_nbits.GATHER_BITS:
        graph.outputs.append(matmul_nbits.gather(graph, "w", weight, anchor, indices))
    graph.remove(anchor)
    x = rng.normal(size=(3, in_features)).astype(np.float32)
    rows = np.array([0, 7, 23], np.int64)
    results = _run(graph, {"A": x, "I": rows})
    np.testing.assert_allclose(results[0], x @ expected.T, rtol=0, atol=1e-4)
    if bits in matmul_nbits.GATHER_BITS:  # the table is MatMulNBits' B, padding cut off
        np.testing.assert_array_equal(results[1], expected[rows])


@pytest.mark.parametrize(("shape", "group_size", "scheme", "expected"), [
    # 80 inputs in blocks of 64: two blocks, the second padded; 2 zero points in 1 byte/row
    ((24, 80), 64, "rtn-asym", 24 * 2 * 64 // 2 + 24 * 2 * 4 + 24 * 1),
    ((24, 96), 32, "rtn-sym", 24 * 96 // 2 + 24 * 3 * 4),
])
def test_layout_bytes_equal_the_arrays_written(shape, group_size, scheme, expected):
    weight = quantize_weight(np.random.default_rng(0).normal(size=shape).astype(np.float32),
                             make_spec(4, scheme, group_size=group_size), clip="minmax")
    assert isinstance(weight, AffineWeight)
    written = sum(a.nbytes for a in matmul_nbits.pack(weight).values())
    assert matmul_nbits.layout_bytes(shape, weight.spec) == written == expected
