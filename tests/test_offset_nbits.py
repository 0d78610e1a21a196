"""Float-offset sites on MatMulNBits plus a group-sum correction: ORT computes with exactly the
format's weights, from nothing but the format's own arrays."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from lwqc.backends import matmul_nbits, offset_nbits
from lwqc.backends.onnx_formats import SiteRewrite
from lwqc.ir.capabilities import PACKED_STORAGE
from lwqc.ir.spec import FloatOffsetDqSpec, FloatOffsetSpec, make_spec
from lwqc.passes.quantizers import quantize_weight


def test_float_offset_groups_of_a_power_of_two_without_outliers_fit():
    rng = np.random.default_rng(0)
    float_weight = rng.normal(size=(8, 64)).astype(np.float32)

    def quantized(spec):
        return quantize_weight(float_weight, spec, clip="minmax")

    assert offset_nbits.fits(quantized(FloatOffsetDqSpec(4, 32)))
    assert offset_nbits.fits(quantized(FloatOffsetSpec(3, 16)))
    assert not offset_nbits.fits(quantized(FloatOffsetSpec(4, 8)))  # below MatMulNBits' 16
    assert not offset_nbits.fits(quantized(FloatOffsetSpec(4, None)))  # per row
    assert not offset_nbits.fits(quantized(FloatOffsetDqSpec(4, 32, outliers=0.02)))
    assert not offset_nbits.fits(quantized(make_spec(4, "rtn-asym", group_size=32)))
    assert [offset_nbits.container(b) for b in (2, 3, 4, 8)] == [4, 4, 4, 8]


def _site_graph(weight, in_features: int, accuracy_level: int):
    activation = ir.Value(name="A", type=ir.TensorType(ir.DataType.FLOAT),
                          shape=ir.Shape(["m", in_features]))
    anchor = ir.node("Identity", [activation])
    graph = ir.Graph([activation], [], nodes=[anchor], opset_imports={"": 25})  # uint2
    rewrite = SiteRewrite(graph, "w", anchor, False, PACKED_STORAGE.code_bits, {})
    output, tables = offset_nbits.lower(rewrite, [(rewrite, weight)], activation,
                                        accuracy_level)
    graph.outputs.append(output)
    graph.remove(anchor)
    graph.outputs.append(tables["w"]())
    model = ir.Model(graph, ir_version=13)
    model.opset_imports[matmul_nbits.DOMAIN] = 1
    return model


@pytest.mark.parametrize("scheme", ["float-offset", "float-offset-dq"])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize(("in_features", "group_size"), [(96, 32), (80, 32)])
def test_ort_computes_with_the_formats_weights(scheme, bits, in_features, group_size):
    rng = np.random.default_rng(bits)
    float_weight = rng.normal(size=(24, in_features)).astype(np.float32)
    weight = quantize_weight(float_weight, make_spec(bits, scheme, group_size=group_size),
                             clip="minmax")
    expected = weight.dequantize()
    model = _site_graph(weight, in_features, accuracy_level=1)
    kernels = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(kernels) == 1 and kernels[0].attributes.get_int("bits") == (
        4 if bits <= 4 else 8)
    # the file holds the format's arrays at their physical size, nothing derived from them
    stored = sum(v.const_value.nbytes for name, v in model.graph.initializers.items()
                 if name.startswith("w.weight_"))
    assert stored == PACKED_STORAGE.bytes(weight.shape, weight.spec, 16)
    assert all(v.const_value.nbytes <= 64 for name, v in model.graph.initializers.items()
               if not name.startswith("w.weight_"))
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    x = rng.normal(size=(3, in_features)).astype(np.float32)
    product, dense = session.run(None, {"A": x})
    np.testing.assert_array_equal(dense, expected)
    np.testing.assert_allclose(product, x @ expected.T, rtol=0, atol=1e-4)
    # on the identity each output is one weight: code * scale + offset, rounded as in torch
    by_identity = session.run(None, {"A": np.eye(in_features, dtype=np.float32)})[0]
    np.testing.assert_array_equal(by_identity.T, expected)
