"""ONNX Runtime's n-bit kernels for affine sites: ``com.microsoft::MatMulNBits`` for the
matmul and ``com.microsoft::GatherBlockQuantized`` for an embedding table tied to it, both on
the same initializers.

Layout (the contrib operators' own): the weight ``[N, K]`` (``[out, in]``) is cut into blocks of
``block_size`` inputs, the last one padded with zero codes; ``B`` is uint8
``[N, blocks, block_size * bits / 8]``, codes packed little-endian within each byte (for 4 bits
the even input in the low nibble); ``scales`` ``[N, blocks]`` float32; ``zero_points`` uint8
``[N, ceil(blocks * bits / 8)]`` packed the same way, absent when the codes are symmetric (the
kernel's default zero point is ``2^(bits-1)``, so signed codes are stored shifted by it).
Dequantization is ``(code - zero_point) * scale``: the affine format's own formula, so the
weights are the ones the torch backend computes. ``matmul`` and ``gather`` build the nodes;
a table the gather reads is the matmul's own ``B`` (no second copy), its padded columns cut
by a Slice.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from lwqc.backends.onnx_formats import add_initializer
from lwqc.ir.formats import AffineWeight, WeightFormat
from lwqc.ir.formats.base import SCALE_BYTES
from lwqc.ir.spec import GroupSpec, QuantSpec

# The widths lwqc runs on MatMulNBits as they are. ORT also has a 2-bit kernel, but on CPU it
# decodes SmolLM2-135M several times slower than the 4-bit one, so 2-bit codes run widened to
# 4 bits, as 3-bit codes do (offset_nbits).
BITS = (4, 8)
GATHER_BITS = (4, 8)  # GatherBlockQuantized holds 4- and 8-bit codes
MIN_BLOCK = 16
ARRAYS = ("B", "scales", "zero_points")  # MatMulNBits' inputs after A, in order
BIAS_INPUT = 5  # after A, B, scales, zero_points, g_idx
DOMAIN = "com.microsoft"


def holds(spec: QuantSpec) -> bool:
    """Whether MatMulNBits holds weights of ``spec`` as they are: affine codes of 4 or 8 bits,
    groups of a power of two of at least 16 inputs, no outliers."""
    if spec.format != "affine" or not isinstance(spec, GroupSpec) or spec.outliers:
        return False
    size = spec.group_size
    return spec.bits in BITS and size is not None and size >= MIN_BLOCK and size & (size - 1) == 0


def supported(weight: WeightFormat) -> bool:
    return isinstance(weight, AffineWeight) and weight.outliers is None and holds(weight.spec)


def layout_bytes(shape: tuple[int, int], spec: QuantSpec) -> int | None:
    """Bytes of ``B``, ``scales`` and ``zero_points`` for a weight MatMulNBits holds (the last
    block padded to a whole one, zero points packed per row); None for any other."""
    if not holds(spec):
        return None
    assert isinstance(spec, GroupSpec) and spec.group_size is not None
    out_features, in_features = shape
    blocks = spec.groups(in_features)
    codes = out_features * blocks * spec.group_size * spec.bits // 8
    zero_points = out_features * -(-blocks * spec.bits // 8) if spec.scheme == "rtn-asym" else 0
    return codes + out_features * blocks * SCALE_BYTES + zero_points


def pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """``[rows, count]`` codes in ``0 .. 2^bits - 1`` packed along the last axis, little-endian
    within each byte (the count padded with zeros to whole bytes)."""
    per_byte = 8 // bits
    rows, count = codes.shape
    padded = np.zeros((rows, -(-count // per_byte) * per_byte), np.uint8)
    padded[:, :count] = codes
    lanes = padded.reshape(rows, -1, per_byte).astype(np.uint16)
    shifts = (bits * np.arange(per_byte)).astype(np.uint16)
    return (lanes << shifts).sum(axis=2).astype(np.uint8)


def unpack_codes(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_codes``: the first ``count`` codes of each row."""
    per_byte = 8 // bits
    shifts = (bits * np.arange(per_byte)).astype(np.uint8)
    lanes = (packed[:, :, None] >> shifts) & np.uint8((1 << bits) - 1)
    return lanes.reshape(packed.shape[0], -1)[:, :count]


def pack(weight: AffineWeight) -> dict[str, np.ndarray]:
    """``B``, ``scales`` and (asymmetric codes) ``zero_points`` of MatMulNBits."""
    spec = weight.spec
    bits, block = spec.bits, spec.group_size
    assert block is not None
    out_features, in_features = weight.shape
    blocks = spec.groups(in_features)
    codes = np.zeros((out_features, blocks * block), np.int32)
    codes[:, :in_features] = weight.codes
    if weight.signed:
        codes[:, :in_features] += 1 << (bits - 1)
    packed = pack_codes(codes.astype(np.uint8), bits)
    arrays = {"B": packed.reshape(out_features, blocks, block * bits // 8),
              "scales": np.ascontiguousarray(weight.scales, np.float32)}
    if not weight.signed:
        arrays["zero_points"] = pack_codes(weight.zero_points, bits)
    return arrays


def unpack(spec: GroupSpec, arrays: dict[str, np.ndarray],
           in_features: int) -> dict[str, np.ndarray]:
    """The affine format's arrays back from MatMulNBits' (inverse of ``pack``)."""
    bits = spec.bits
    packed = arrays["B"]
    out_features, blocks = packed.shape[0], packed.shape[1]
    codes = unpack_codes(packed.reshape(out_features, -1), bits, in_features).astype(np.int32)
    result = {"scales": arrays["scales"].reshape(out_features, blocks).astype(np.float32)}
    if "zero_points" in arrays:
        result["codes"] = codes.astype(np.uint8)
        result["zero_points"] = unpack_codes(arrays["zero_points"], bits, blocks)
    else:
        result["codes"] = (codes - (1 << (bits - 1))).astype(np.int8)
    return result


def gathers(weight: WeightFormat) -> bool:
    """Whether GatherBlockQuantized reads the weight's table from MatMulNBits' arrays."""
    return supported(weight) and weight.spec.bits in GATHER_BITS


def matmul(graph: ir.Graph, before: ir.Node, name: str, activation: ir.Value,
           weights: list[AffineWeight], accuracy_level: int,
           bias: ir.Value | None = None) -> ir.Node:
    """A MatMulNBits node (inserted before ``before``) multiplying ``activation`` by the
    weights stacked along the output dimension (one spec); initializers ``<name>.weight_*``."""
    arrays = [pack(w) for w in weights]
    joined = {key: np.concatenate([a[key] for a in arrays]) for key in arrays[0]}
    spec = weights[0].spec
    inputs: list[ir.Value | None] = [activation]
    inputs += [add_initializer(graph, f"{name}.weight_{key}", joined[key])
               for key in ARRAYS if key in joined]
    if bias is not None:
        inputs += [None] * (BIAS_INPUT - len(inputs)) + [bias]
    node = ir.node("MatMulNBits", inputs, domain=DOMAIN, name=f"{name}/MatMulNBits",
                   attributes={"K": weights[0].shape[1], "N": int(joined["B"].shape[0]),
                               "bits": spec.bits, "block_size": spec.group_size,
                               "accuracy_level": accuracy_level})
    graph.insert_before(before, node)
    return node


def gather(graph: ir.Graph, name: str, weight: AffineWeight, before: ir.Node,
           indices: ir.Value) -> ir.Value:
    """Rows of the weight at ``indices``, read by GatherBlockQuantized from the initializers
    ``matmul`` wrote for ``name`` (inserted before ``before``)."""
    spec = weight.spec
    assert isinstance(spec, GroupSpec) and spec.group_size is not None
    out_features, in_features = weight.shape
    stored = graph.initializers
    shape = add_initializer(graph, f"{name}.lowering_table_shape",
                            np.asarray([out_features, -1], np.int64))
    table = ir.node("Reshape", [stored[f"{name}.weight_B"], shape], name=f"{name}/table")
    inputs = [table.outputs[0], indices, stored[f"{name}.weight_scales"]]
    if f"{name}.weight_zero_points" in stored:
        inputs.append(stored[f"{name}.weight_zero_points"])
    lookup = ir.node("GatherBlockQuantized", inputs, domain=DOMAIN,
                     attributes={"bits": spec.bits, "gather_axis": 0, "quantize_axis": 1,
                                 "block_size": spec.group_size},
                     name=f"{name}/GatherBlockQuantized")
    nodes = [table, lookup]
    if in_features % spec.group_size:
        bounds = [add_initializer(graph, f"{name}.lowering_table_{key}", np.asarray([v], np.int64))
                  for key, v in (("start", 0), ("end", in_features), ("axis", -1))]
        nodes.append(ir.node("Slice", [lookup.outputs[0], *bounds],
                             name=f"{name}/table_columns"))
    graph.insert_before(before, nodes)
    return nodes[-1].outputs[0]
