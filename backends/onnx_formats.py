"""ONNX lowering of each weight format: standard ops that rebuild the float weight from the
format's own arrays, exactly as its torch formula does.

``FORMAT_LOWERINGS`` maps a format name to its lowering; an unknown format is an error. Arrays
are stored in the orientation of the MatMul's B input (``[in, out]`` for MatMul, ``[out, in]``
for Gemm with transB), initializers named ``<site>.weight_<array>``; the lowerings' small
constants (shapes, shifts, bounds) are stored once per graph (``shared_constant``), but for the
layout of packed arrays, which ``stored_arrays`` reads back per site:
1. ``affine``: ``DequantizeLinear(codes, blocked fp32 scales[, zero points])`` — uint8/int8,
   uint4/int4, uint2/int2 (opset 25).
2. ``float-offset``: ``Cast(codes) * scales + offsets``, scales and offsets repeated along the
   input dimension (Unsqueeze, Expand, Reshape, Slice): standard ops on constants only, which
   ONNX Runtime folds into the float weight once, when the session starts (it never folds a
   ``DequantizeLinear``, which would dequantize again on every run; the affine formats keep
   it, as ONNX Runtime fuses it with the MatMul).
3. ``codebook``: ``Cast(GatherElements(codebooks, Cast(codes -> int64)) -> float)``; codebooks
   stay ``[in, 2^bits]`` float16 (transposed in the graph for Gemm).
4. ``float-offset-dq``: the scales and offset magnitudes are computed first, ``Cast(codes)
   * Cast(float16 steps)`` with the steps repeated over their super-groups; then
   ``Cast(codes) * scales + Neg(magnitudes)`` as in 2. (ONNX Runtime's own build of both
   float-offset formats is ``offset_nbits``: MatMulNBits plus a group-sum correction; affine
   codes MatMulNBits does not hold as they are run there too, widened.)
5. 3- and 6-bit codes (and zero points, and 6-bit parameter codes) are packed in little-endian
   24-bit words, eight resp. four to three bytes (signed codes offset by 2^(bits-1)), and
   unpacked with standard ops: Reshape to byte triples, Cast, Mul by (1, 256, 65536),
   ReduceSum, BitShift right by 0, bits, 2 bits, ..., BitwiseAnd 2^bits - 1, Reshape, Slice,
   Cast.
6. ``row-mix``: each part lowered as above from its arrays (``<site>.p<k>.weight_*``), the
   parts concatenated along the output dimension and ``Gather(order)`` along it.
7. Outliers of any format: ``ScatterElements(reduction=add)`` of the float16 residuals at
   their int32 positions (re-indexed to B's orientation) into the flattened weight.
8. ``bytes_only`` (for compilers that read no sub-byte tensors or blocked ``DequantizeLinear``,
   e.g. IREE): 2- and 4-bit codes are packed four or two to a uint8 (signed codes offset by
   2^(bits-1)) and unpacked with ``BitShift`` and ``BitwiseAnd``; 3- and 6-bit codes as in 5
   (unpacked in uint8 ops);
   dequantization is ``Cast``, ``Sub`` of the zero points and ``Mul`` by the scales, each
   repeated over its group as float offsets are. The weights are the same floats.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import ml_dtypes
import numpy as np
import onnx_ir as ir

from lwqc.ir.errors import LwqcError
from lwqc.ir.formats import (
    CodebookWeight,
    FloatOffsetDqWeight,
    RowMixWeight,
    SparseOutliers,
    WeightFormat,
)
from lwqc.ir.formats.base import WORD_BITS, WORD_PACKED
from lwqc.ir.formats.float_offset_dq import PARAM_BITS, super_group_size
from lwqc.ir.spec import GroupSpec

CODE_TYPES = {
    (8, False): np.uint8, (4, False): ml_dtypes.uint4, (2, False): ml_dtypes.uint2,
    (8, True): np.int8, (4, True): ml_dtypes.int4, (2, True): ml_dtypes.int2,
}
# stored in the code container type
CODE_ARRAYS = ("codes", "zero_points", "codes_high", "scale_codes", "offset_codes")
UNORIENTED = ("codebooks", "codebooks_high", "column_slots",  # not laid out as [out, x]
              *SparseOutliers.ARRAYS)


# the constants of a packed array's unpacking that ``stored_arrays`` reads its layout from,
# stored per site (``<site>.lowering_<array>_<label>``); a lowering's other constants are shared
# graph-wide (``shared_constant``)
LAYOUT_LABELS = ("shape", "byte_shifts", "mask")

# in-memory metadata of a value computed from constants alone (``SiteRewrite.node``)
_FOLDED = "lwqc.folded"

# node metadata of sites sharing a kernel under different specs (or row-mixes): each site's
# spec, as JSON
SPECS_KEY = "lwqc.specs"


class LoweringError(LwqcError):
    """The exported graph does not have the shape the lowering expects."""


def add_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """``array`` as a new initializer of ``graph``."""
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    value.type = ir.TensorType(value.const_value.dtype)
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def shared_constant(graph: ir.Graph, array: np.ndarray) -> ir.Value:
    """A small ``array`` as the graph's initializer named by its content,
    ``lwqc.<dtype>.<shape>.<values>`` (``m`` for a minus sign), added when the graph does not
    hold it yet."""
    shape = "x".join(map(str, array.shape)) or "scalar"
    values = "_".join(map(str, array.reshape(-1).tolist())).replace("-", "m")
    name = f"lwqc.{array.dtype}.{shape}.{values}"
    existing = graph.initializers.get(name)
    return existing if existing is not None else add_initializer(graph, name, array)


def replace_node(graph: ir.Graph, node: ir.Node, output: ir.Value) -> None:
    """Remove ``node``; ``output`` takes over its single output's uses and name."""
    name = node.outputs[0].name
    ir.convenience.replace_all_uses_with(node.outputs[0], output, replace_graph_outputs=True)
    graph.remove(node, safe=True)
    output.name = name


@dataclasses.dataclass
class SiteRewrite:
    """Builds the nodes that compute one site's weight, inserted before its MatMul."""

    graph: ir.Graph
    site_id: str
    matmul: ir.Node
    transposed: bool  # B is [in, out]
    code_bits: Callable[[int], int]  # code width -> stored bits
    metadata: dict[str, str]
    bytes_only: bool = False  # no sub-byte tensors, no blocked DequantizeLinear (step 8)
    nodes: int = 0

    @property
    def axis(self) -> int:
        """The input dimension of B."""
        return 0 if self.transposed else 1

    def orient(self, array: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(array.T if self.transposed else array)

    def initializer(self, name: str, array: np.ndarray) -> ir.Value:
        return add_initializer(self.graph, name, array)

    def array(self, weight: WeightFormat, name: str, signed: bool = False) -> ir.Value:
        """The format's array ``name`` as an initializer in B's orientation (3- and 6-bit codes:
        packed, and the value returned is their unpacked uint8/int8 tensor)."""
        return self.stored(weight.arrays(), name, weight.spec.bits, signed)

    def stored(self, arrays: dict[str, np.ndarray], name: str, bits: int,
               signed: bool = False) -> ir.Value:
        """``arrays[name]`` as an initializer, codes of width ``bits`` in their container."""
        array = arrays[name]
        if name not in UNORIENTED:
            array = self.orient(array)
        width = self.code_bits(bits)
        if name in CODE_ARRAYS and width in WORD_PACKED:
            packed = self.packed_words(array, name, width, signed)
            unpack = self.unpack_words_bytewise if self.bytes_only else self.unpack_words
            return unpack(packed, name, array.shape, width, signed)
        if name in CODE_ARRAYS and self.bytes_only and width < 8:
            values = array.astype(np.int32) + (1 << (width - 1) if signed else 0)
            packed = self.initializer(f"{self.site_id}.weight_{name}",
                                      pack_bytes(values.astype(np.uint8), width))
            return self.unpack_bytes(packed, name, array.shape, width, signed)
        if name in CODE_ARRAYS:
            array = array.astype(CODE_TYPES[(width, signed)])
        return self.initializer(f"{self.site_id}.weight_{name}", array)

    def packed_words(self, array: np.ndarray, name: str, width: int,
                     signed: bool) -> ir.Value:
        """Codes of a word-packed ``width`` (3 or 6 bits; signed ones offset by
        ``2^(width-1)``) as their packed initializer."""
        values = array.astype(np.int32) + (1 << (width - 1) if signed else 0)
        return self.initializer(f"{self.site_id}.weight_{name}",
                                pack_words(values.astype(np.uint8), width))

    def unpack_words(self, packed: ir.Value, name: str, shape: tuple[int, ...], width: int,
                     signed: bool) -> ir.Value:
        """3- or 6-bit codes from byte triples read as 24-bit words (step 5)."""
        triples = self.node("Reshape", [packed, self.constant([-1, 3])])
        value = self.node("Cast", [triples], {"to": ir.DataType.INT32})
        value = self.node("Mul", [value, self.constant([[1, 256, 65536]], np.int32)])
        value = self.node("ReduceSum", [value, self.constant([1])], {"keepdims": 1})
        value = self.node("Cast", [value], {"to": ir.DataType.UINT32})
        shifts = [list(range(0, WORD_BITS, width))]
        value = self.node("BitShift", [value, self.constant(shifts, np.uint32)],
                          {"direction": "RIGHT"})
        value = self.node("BitwiseAnd", [value, self.layout_constant(
            name, "mask", [(1 << width) - 1], np.uint32)])
        value = self.node("Cast", [value], {"to": ir.DataType.UINT8})
        return self._codes(value, name, shape, signed, 1 << (width - 1))

    def unpack_words_bytewise(self, packed: ir.Value, name: str, shape: tuple[int, ...],
                              width: int, signed: bool) -> ir.Value:
        """``unpack_words`` in uint8 ops: code ``i`` of a byte triple is ``byte[lo_i] >> s_i``,
        or'd with ``byte[hi_i] << (8 - s_i)`` where it spans two bytes (else with a zero
        byte)."""
        constant = self.constant
        starts = list(range(0, WORD_BITS, width))
        low = [start // 8 for start in starts]
        low_shift = [start % 8 for start in starts]
        spans = [start % 8 > 8 - width for start in starts]
        high = [lo + 1 if span else 3 for lo, span in zip(low, spans, strict=True)]
        high_shift = [8 - s if span else 0 for s, span in zip(low_shift, spans, strict=True)]
        triples = self.node("Reshape", [packed, constant([-1, 3])])
        padded = self.node("Pad", [triples, constant([0, 0, 0, 1])])
        lows = self.node("Gather", [padded, constant(low)], {"axis": 1})
        lows = self.node("BitShift", [lows, constant([low_shift], np.uint8)],
                         {"direction": "RIGHT"})
        highs = self.node("Gather", [padded, constant(high)], {"axis": 1})
        highs = self.node("BitShift", [highs, constant([high_shift], np.uint8)],
                          {"direction": "LEFT"})
        value = self.node("BitwiseOr", [lows, highs])
        value = self.node("BitwiseAnd", [value, self.layout_constant(
            name, "mask", [(1 << width) - 1], np.uint8)])
        return self._codes(value, name, shape, signed, 1 << (width - 1))

    def _codes(self, value: ir.Value, name: str, shape: tuple[int, ...], signed: bool,
               offset: int) -> ir.Value:
        """Unpacked uint8 codes, flattened and padded, cut to ``shape`` (signed: less
        ``offset``, as int8)."""
        value = self.node("Reshape", [value, self.constant([-1])])
        count = int(np.prod(shape))
        value = self.node("Slice", [value, self.constant([0]), self.constant([count])])
        value = self.node("Reshape", [value, self.layout_constant(name, "shape", list(shape))])
        if not signed:
            return value
        value = self.node("Cast", [value], {"to": ir.DataType.INT32})
        value = self.node("Sub", [value, self.constant([offset], np.int32)])
        return self.node("Cast", [value], {"to": ir.DataType.INT8})

    def unpack_bytes(self, packed: ir.Value, name: str, shape: tuple[int, ...], width: int,
                     signed: bool) -> ir.Value:
        """2- or 4-bit codes packed ``8 // width`` to a byte, lowest first (step 8)."""
        per_byte = 8 // width
        value = self.node("Reshape", [packed, self.constant([-1, 1])])
        shifts = [[width * i for i in range(per_byte)]]
        value = self.node("BitShift", [value, self.layout_constant(name, "byte_shifts", shifts,
                                                                   np.uint8)],
                          {"direction": "RIGHT"})
        value = self.node("BitwiseAnd", [value, self.layout_constant(
            name, "mask", [(1 << width) - 1], np.uint8)])
        return self._codes(value, name, shape, signed, 1 << (width - 1))

    def layout_constant(self, name: str, label: str, values: list,
                        dtype: type = np.int64) -> ir.Value:
        """A constant of the unpacking of the format's packed array ``name`` that
        ``stored_arrays`` reads its layout from (``label`` one of ``LAYOUT_LABELS``), stored
        for this site."""
        assert label in LAYOUT_LABELS
        return self.initializer(f"{self.site_id}.lowering_{name}_{label}",
                                np.asarray(values, dtype))

    def constant(self, values: list, dtype: type = np.int64) -> ir.Value:
        """A constant of the lowering, shared by every lowering of the graph that reads the
        same values (``shared_constant``)."""
        return shared_constant(self.graph, np.asarray(values, dtype))

    def node(self, op: str, inputs: list[ir.Value | None], attributes: dict | None = None,
             output: str | None = None, domain: str = "") -> ir.Value:
        """A node named ``<site>/<op>_<n>``, or with ``output`` (the node yielding the weight,
        carrying the decision) ``<site>/<output>``; a node reading constants alone, which ONNX
        Runtime folds when the session starts, is left unnamed."""
        self.nodes += 1
        folded = all(value is None or value.is_initializer() or value.meta.get(_FOLDED)
                     for value in inputs)
        label = output or f"{op}_{self.nodes}"
        node = ir.node(op, inputs, attributes=attributes or {}, domain=domain,
                       name="" if folded and output is None else f"{self.site_id}/{label}")
        node.outputs[0].meta[_FOLDED] = folded
        if output is not None:  # the node that yields the weight carries the decision
            node.outputs[0].name = f"{self.site_id}.{output}"
            node.metadata_props.update(self.metadata)
        self.graph.insert_before(self.matmul, node)
        return node.outputs[0]


def pack_words(values: np.ndarray, width: int) -> np.ndarray:
    """Codes below ``2^width`` (width 3 or 6; any shape, row-major) packed ``24 // width`` to
    three bytes, the last word padded."""
    per_word = WORD_BITS // width
    flat = values.reshape(-1).astype(np.uint32)
    flat = np.pad(flat, (0, -len(flat) % per_word)).reshape(-1, per_word)
    shifts = width * np.arange(per_word, dtype=np.uint32)
    words = (flat << shifts).sum(axis=1, dtype=np.uint32)
    triples = np.stack([words & 255, (words >> 8) & 255, (words >> 16) & 255], axis=1)
    return triples.astype(np.uint8).reshape(-1)


def pack_bytes(values: np.ndarray, width: int) -> np.ndarray:
    """Codes below ``2^width`` (width 2 or 4) packed ``8 // width`` to a byte, lowest first."""
    per_byte = 8 // width
    flat = values.reshape(-1).astype(np.uint8)
    flat = np.pad(flat, (0, -len(flat) % per_byte)).reshape(-1, per_byte)
    shifts = (width * np.arange(per_byte)).astype(np.uint8)
    return np.bitwise_or.reduce(flat << shifts, axis=1).astype(np.uint8)


def unpack_bytes(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of ``pack_bytes``: the first ``count`` codes, uint8."""
    shifts = (width * np.arange(8 // width)).astype(np.uint8)
    codes = (packed[:, None] >> shifts) & ((1 << width) - 1)
    return codes.reshape(-1)[:count].astype(np.uint8)


def unpack_words(packed: np.ndarray, count: int, width: int) -> np.ndarray:
    """Inverse of ``pack_words``: the first ``count`` codes, uint8."""
    triples = packed.reshape(-1, 3).astype(np.uint32)
    words = triples[:, 0] | (triples[:, 1] << 8) | (triples[:, 2] << 16)
    shifts = width * np.arange(WORD_BITS // width, dtype=np.uint32)
    codes = (words[:, None] >> shifts) & ((1 << width) - 1)
    return codes.reshape(-1)[:count].astype(np.uint8)


def _dequantize_linear(rewrite: SiteRewrite, weight: WeightFormat, inputs: list[ir.Value],
                        name: str, spelled_out: bool = False) -> ir.Value:
    """``DequantizeLinear(codes, scales[, zero points])`` in B's orientation, or with
    ``spelled_out`` (and in ``bytes_only`` mode) the same formula in Cast, Sub and Mul."""
    spec = weight.spec
    assert isinstance(spec, GroupSpec)
    if rewrite.bytes_only or spelled_out:  # (code - zero point) * scale
        codes = rewrite.node("Cast", [inputs[0]], {"to": ir.DataType.FLOAT})
        if len(inputs) > 2:
            zero_points = rewrite.node("Cast", [inputs[2]], {"to": ir.DataType.FLOAT})
            codes = rewrite.node("Sub", [codes, _repeat_groups(rewrite, zero_points, weight)])
        scales = _repeat_groups(rewrite, inputs[1], weight)
        return rewrite.node("Mul", [codes, scales], output=name)
    block = spec.block(weight.shape[1])
    node = ir.node("DequantizeLinear", inputs,
                   attributes={"axis": rewrite.axis, "block_size": block},
                   name=f"{rewrite.site_id}/DequantizeLinear")
    node.outputs[0].name = f"{rewrite.site_id}.{name}"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(weight.shape[::-1] if rewrite.transposed else weight.shape)
    node.metadata_props.update(rewrite.metadata)
    rewrite.graph.insert_before(rewrite.matmul, node)
    return node.outputs[0]


def lower_affine(rewrite: SiteRewrite, weight: WeightFormat) -> ir.Value:
    signed = weight.arrays().get("zero_points") is None
    inputs = [rewrite.array(weight, "codes", signed), rewrite.array(weight, "scales")]
    if not signed:
        inputs.append(rewrite.array(weight, "zero_points"))
    return _dequantize_linear(rewrite, weight, inputs, "weight_dequantized")


def _repeat_groups(rewrite: SiteRewrite, per_group: ir.Value, weight: WeightFormat) -> ir.Value:
    """A ``[groups, out]`` (or ``[out, groups]``) tensor repeated to B's shape."""
    spec = weight.spec
    assert isinstance(spec, GroupSpec)
    return repeat_blocks(rewrite, per_group, weight.shape, spec.block(weight.shape[1]))


def repeat_blocks(rewrite: SiteRewrite, value: ir.Value, shape: tuple[int, int],
                  block: int) -> ir.Value:
    """A tensor of one entry per ``block`` inputs (B's orientation) repeated to the ``[out,
    in]`` ``shape`` (oriented), the last block cut short."""
    out_features, in_features = shape
    blocks = -(-in_features // block)
    axis = rewrite.axis
    stretched = [blocks, block, out_features] if axis == 0 else [out_features, blocks, block]
    flat = [blocks * block, out_features] if axis == 0 else [out_features, blocks * block]
    constant = rewrite.constant
    value = rewrite.node("Unsqueeze", [value, constant([axis + 1])])
    value = rewrite.node("Expand", [value, constant(stretched)])
    value = rewrite.node("Reshape", [value, constant(flat)])
    return rewrite.node("Slice", [value, constant([0]), constant([in_features]),
                                  constant([axis])])


def float_offset_parameters(rewrite: SiteRewrite,
                            weight: WeightFormat) -> tuple[ir.Value, ir.Value]:
    """Per-group scales and offsets of a float-offset weight (``w = code * scale + offset``),
    float32 in the orientation of its groups; a float-offset-dq weight's are computed from its
    parameter codes and steps, its offsets negated magnitudes."""
    if not isinstance(weight, FloatOffsetDqWeight):
        return rewrite.array(weight, "scales"), rewrite.array(weight, "offsets")
    scales, magnitudes = (_dq_parameter(rewrite, weight, kind) for kind in ("scale", "offset"))
    return scales, rewrite.node("Neg", [magnitudes])


def _float_offset_weight(rewrite: SiteRewrite, weight: WeightFormat, codes: ir.Value,
                         scales: ir.Value, offsets: ir.Value) -> ir.Value:
    """``Cast(codes) * scales + offsets``, the per-group tensors repeated to the weight's
    shape."""
    scaled = _dequantize_linear(rewrite, weight, [codes, scales], "weight_scaled",
                                 spelled_out=True)
    return rewrite.node("Add", [scaled, _repeat_groups(rewrite, offsets, weight)],
                        output="weight_dequantized")


def lower_float_offset(rewrite: SiteRewrite, weight: WeightFormat) -> ir.Value:
    """Both float-offset formats (``float-offset``, ``float-offset-dq``)."""
    return _float_offset_weight(rewrite, weight, rewrite.array(weight, "codes"),
                                *float_offset_parameters(rewrite, weight))


def _dq_parameter(rewrite: SiteRewrite, weight: WeightFormat, kind: str) -> ir.Value:
    """Per-group ``scale`` (``kind`` "scale") or offset magnitude ("offset") of a
    float-offset-dq weight, float32 in the orientation of its groups."""
    spec = weight.spec
    assert isinstance(weight, FloatOffsetDqWeight) and isinstance(spec, GroupSpec)
    arrays = weight.arrays()
    codes = rewrite.node("Cast", [rewrite.stored(arrays, f"{kind}_codes", PARAM_BITS)],
                         {"to": ir.DataType.FLOAT})
    steps = rewrite.node("Cast", [rewrite.array(weight, f"{kind}_steps")],
                         {"to": ir.DataType.FLOAT})
    groups = spec.groups(weight.shape[1])
    steps = repeat_blocks(rewrite, steps, (weight.shape[0], groups), super_group_size(groups))
    return rewrite.node("Mul", [codes, steps])


def _gather_codebook(rewrite: SiteRewrite, codes: ir.Value, table: ir.Value) -> ir.Value:
    """``table[j, codes[j, i]]`` in B's orientation (``table`` is ``[columns, 2^bits]``)."""
    indices = rewrite.node("Cast", [codes], {"to": ir.DataType.INT64})
    if not rewrite.transposed:
        table = rewrite.node("Transpose", [table], {"perm": [1, 0]})
    return rewrite.node("GatherElements", [table, indices], {"axis": 1 - rewrite.axis})


def lower_codebook(rewrite: SiteRewrite, weight: WeightFormat) -> ir.Value:
    assert isinstance(weight, CodebookWeight)
    if weight.column_slots is None:
        gathered = _gather_codebook(rewrite, rewrite.array(weight, "codes"),
                                    rewrite.array(weight, "codebooks"))
        return rewrite.node("Cast", [gathered], {"to": ir.DataType.FLOAT},
                            output="weight_dequantized")
    # adaptive precision: low and high columns stored apart, each at its own width, gathered
    # separately, concatenated, and put back in column order by their slots
    stored, low_bits, high_bits = weight.split(), weight.spec.bits, weight.spec.high_bits
    low = _gather_codebook(rewrite, rewrite.stored(stored, "codes", low_bits),
                           rewrite.stored(stored, "codebooks", low_bits))
    high = _gather_codebook(rewrite, rewrite.stored(stored, "codes_high", high_bits),
                            rewrite.stored(stored, "codebooks_high", high_bits))
    joined = rewrite.node("Concat", [high, low], {"axis": rewrite.axis})
    slots = rewrite.node("Cast", [rewrite.stored(stored, "column_slots", low_bits)],
                         {"to": ir.DataType.INT64})
    ordered = rewrite.node("Gather", [joined, slots], {"axis": rewrite.axis})
    return rewrite.node("Cast", [ordered], {"to": ir.DataType.FLOAT},
                        output="weight_dequantized")


def oriented_positions(positions: np.ndarray, shape: tuple[int, int],
                       transposed: bool) -> np.ndarray:
    """Flat ``[out, in]`` positions as flat positions of B (``[in, out]`` when transposed)."""
    if not transposed:
        return positions.astype(np.int32)
    rows, cols = np.divmod(positions.astype(np.int64), shape[1])
    return (cols * shape[0] + rows).astype(np.int32)


def logical_positions(positions: np.ndarray, shape: tuple[int, int],
                      transposed: bool) -> np.ndarray:
    """Inverse of ``oriented_positions``."""
    if not transposed:
        return positions.astype(np.int32)
    cols, rows = np.divmod(positions.astype(np.int64), shape[0])
    return (rows * shape[1] + cols).astype(np.int32)


def add_outliers(rewrite: SiteRewrite, weight: WeightFormat, base: ir.Value) -> ir.Value:
    outliers = weight.outliers
    assert outliers is not None
    positions = oriented_positions(outliers.positions, weight.shape, rewrite.transposed)
    stored = rewrite.initializer(f"{rewrite.site_id}.weight_outlier_positions", positions)
    values = rewrite.initializer(f"{rewrite.site_id}.weight_outlier_values", outliers.values)
    flat = rewrite.node("Reshape", [base, rewrite.constant([-1])])
    indices = rewrite.node("Cast", [stored], {"to": ir.DataType.INT64})
    updates = rewrite.node("Cast", [values], {"to": ir.DataType.FLOAT})
    added = rewrite.node("ScatterElements", [flat, indices, updates],
                         {"axis": 0, "reduction": "add"})
    shape = list(weight.shape[::-1] if rewrite.transposed else weight.shape)
    return rewrite.node("Reshape", [added, rewrite.constant(shape)],
                        output="weight_with_outliers")


def part_rewrite(rewrite: SiteRewrite, name: str) -> SiteRewrite:
    """The rewrite of a row-mixed site's part ``name`` (``p<k>``: its arrays are
    ``<site>.p<k>.*``), without the site's decision metadata."""
    return dataclasses.replace(rewrite, site_id=f"{rewrite.site_id}.{name}", metadata={},
                               nodes=0)


def row_order_indices(rewrite: SiteRewrite, weight: RowMixWeight) -> ir.Value:
    """The stored ``order`` of a row-mixed site, as the int64 indices Gather reads."""
    order = rewrite.initializer(f"{rewrite.site_id}.weight_order", weight.order)
    return rewrite.node("Cast", [order], {"to": ir.DataType.INT64})


def lower_row_mix(rewrite: SiteRewrite, weight: WeightFormat) -> ir.Value:
    """Each part lowered as its format is, the parts stacked along the output dimension, the
    rows put in place by ``Gather(order)``."""
    assert isinstance(weight, RowMixWeight)
    axis = 1 if rewrite.transposed else 0  # the output dimension of B
    parts = [lower_weight(part_rewrite(rewrite, f"p{i}"), part)
             for i, part in enumerate(weight.parts)]
    stacked = rewrite.node("Concat", parts, {"axis": axis})
    # no decision metadata here: the site's MatMul carries it (a Gather carries it only where
    # it yields the site's output, ``offset_nbits.lower_rows``)
    return rewrite.node("Gather", [stacked, row_order_indices(rewrite, weight)], {"axis": axis})


FORMAT_LOWERINGS: dict[str, Callable[[SiteRewrite, WeightFormat], ir.Value]] = {
    "affine": lower_affine,
    "float-offset": lower_float_offset,
    "float-offset-dq": lower_float_offset,
    "codebook": lower_codebook,
    "row-mix": lower_row_mix,
}


def lower_weight(rewrite: SiteRewrite, weight: WeightFormat) -> ir.Value:
    """The value computing ``weight`` in B's orientation, outliers included."""
    lowering = FORMAT_LOWERINGS.get(weight.name)
    if lowering is None:
        raise LoweringError(f"site {rewrite.site_id}: no ONNX lowering for format "
                            f"{weight.name!r} (formats: {', '.join(FORMAT_LOWERINGS)})")
    value = lowering(rewrite, weight)
    return value if weight.outliers is None else add_outliers(rewrite, weight, value)


def stored_arrays(initializers: dict[str, np.ndarray], site_id: str, transposed: bool,
                  signed: bool) -> dict[str, np.ndarray]:
    """A site's format arrays read back from its initializers, in ``[out, in]`` orientation
    (empty if the site has none; a row-mix's own: its order, and where its parts share one
    kernel their parameters in row order, ``offset_nbits``); packed arrays are unpacked."""
    prefix = f"{site_id}.weight_"
    stored = {}
    for name, array in initializers.items():
        if not name.startswith(prefix):
            continue
        key = name.removeprefix(prefix)
        packed_shape = initializers.get(f"{site_id}.lowering_{key}_shape")
        byte_shifts = initializers.get(f"{site_id}.lowering_{key}_byte_shifts")
        mask = initializers.get(f"{site_id}.lowering_{key}_mask")
        if key in CODE_ARRAYS and packed_shape is not None:
            width = int(mask.reshape(-1)[0]).bit_length()
            unpack = unpack_bytes if byte_shifts is not None else unpack_words
            array = unpack(array, int(np.prod(packed_shape)), width).reshape(packed_shape)
            if signed:
                array = array.astype(np.int32) - (1 << (width - 1))
        stored[key] = array
    if "codes" not in stored:
        return stored
    codes = stored["codes"]
    shape = codes.shape[::-1] if transposed else codes.shape
    if "column_slots" in stored:  # codes hold the low columns only
        shape = (shape[0], len(stored["column_slots"]))
    arrays = {}
    for key, array in stored.items():
        if key == SparseOutliers.ARRAYS[0]:
            arrays[key] = logical_positions(array, shape, transposed)
        elif key in UNORIENTED:
            arrays[key] = array
        else:
            arrays[key] = np.ascontiguousarray(array.T if transposed else array)
    return arrays
