"""Float-offset sites (``float-offset``, ``float-offset-dq``), and affine sites whose codes
MatMulNBits does not run at their own width, on ONNX Runtime's n-bit kernel.

A group's weights are ``code * scale + offset``, so a product with an input row ``x`` splits
in two::

    x · Wᵀ = MatMulNBits(x; codes, scales, zero points 0) + (x · S) · offsetsᵀ

``x · S`` each group's sum of the inputs (a Reshape to ``[..., groups, group]`` and a
ReduceSum; the last group padded with zeros). The file holds the format's own arrays at their
physical size in ``[out, in]`` orientation: codes of the kernel's width (4 or 8 bits) in whole
groups as the kernel's ``B`` itself, every other array as ``onnx_formats`` stores it (tight
3-bit codes, 6-bit parameter codes, float16 steps). The kernel's other inputs (``B`` from codes
of other widths, float32 scales, zero zero-points, the offsets) are computed from them by
standard ops on constants, which ONNX Runtime folds once, at session start, before the kernel
packs its weights; ``B`` from tight 3-bit codes in byte ops on their packed words, which keeps
what that folding holds at once small. So the site runs on MatMulNBits' uint8 zero-point kernel
(float zero points take a kernel about ten times slower on CPU) plus a MatMul of ``groups``
inputs. The weight it multiplies by is the format's own float32 formula, ``code * scale +
offset``, each term rounded once as the torch backend computes it.

A row-mix whose parts share one format, group size and container (3- and 4-bit rows in groups
of 32, say) runs as a site of that format: its parts' codes under ``<site>.p<k>``, put in row
order by a Gather folded at session start, its scales and offsets stored once in row order; so
it shares a kernel with the sites reading its input (q/k/v) as any site does. Another row-mix
(``lower_rows``) runs its parts this way on the same input, consecutive parts of one group size
and container on one kernel (the planner orders parts by group size; consecutive parts of one
format there store their scales and offsets jointly), corrects the kernels' products together
(one MatMul on the sums over groups of the smallest group size, the wider groups' offsets
repeated over it) and puts them in the site's row order: ``Gather(Concat(products) +
correction, order)`` along the last axis.

Affine groups (``(code - zero point) * scale``, ``ir/formats/affine.py``) of 2, 3, 5, 6 or 7
bits, and row-mixes of affine parts, run the same way without a correction: their codes
widened to the kernel's 4 or 8 bits and their zero points packed at that width, both by ops
folded at session start (signed codes shifted by ``2^(width-1)``, the kernel's zero point for
them). The file holds their own arrays at their physical size, as for any other lowering; ORT's
own 2-bit kernel, which would hold 2-bit codes as they are, decodes several times slower than
the 4-bit one on CPU.

A tied embedding reads its rows from the kernel's own arrays (``RowLookup``): GatherBlockQuantized
on ``B``, the scales and zero points (plus the rows' float offsets), only the rows it looks up.
No float table is computed, neither at session start (where folding one would briefly take
about 50 bytes per weight) nor kept (4 bytes per weight).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from lwqc.backends import matmul_nbits
from lwqc.backends.onnx_formats import (
    SiteRewrite,
    float_offset_parameters,
    part_rewrite,
    repeat_blocks,
    row_order_indices,
)
from lwqc.ir.formats import AffineWeight, RowMixWeight, WeightFormat, load_weight
from lwqc.ir.formats.row_mix import in_row_order
from lwqc.ir.spec import GroupSpec

FORMATS = ("float-offset", "float-offset-dq")
AFFINE = "affine"  # no offsets: zero points in the kernel, no correction
CONTAINERS = (4, 8)  # MatMulNBits widths holding the codes: narrower codes sit in 4 bits
WORD_CODE_BITS = 3  # codes packed in 24-bit words, widened to the 4-bit kernel byte by byte
# rows ``indices`` of a site's weight, ``[..., in]``, computed by nodes inserted before the node
RowLookup = Callable[[ir.Node, ir.Value], ir.Value]


def fits(weight: WeightFormat) -> bool:
    """Whether the site can run this way: a float-offset or affine format without outliers,
    groups of a power of two of at least MatMulNBits' smallest block; or a row-mix of such
    parts of one format sharing one ``kernel_key``, which runs as a site of that format
    (``_member``). Affine sites MatMulNBits holds as they are (``matmul_nbits.supported``) run
    there instead.
    """
    if isinstance(weight, RowMixWeight):
        return fits_rows(weight) and len({(part.name, kernel_key(part))
                                          for part in weight.parts}) == 1
    return _fits_part(weight)


def _fits_part(weight: WeightFormat) -> bool:
    spec = weight.spec
    if weight.name not in (*FORMATS, AFFINE) or weight.outliers is not None:
        return False
    assert isinstance(spec, GroupSpec)
    size = spec.group_size
    return size is not None and size >= matmul_nbits.MIN_BLOCK and size & (size - 1) == 0


def fits_rows(weight: WeightFormat) -> bool:
    """Whether the site is a row-mix whose every part can run this way (on one kernel where
    ``fits``, else ``lower_rows``)."""
    return isinstance(weight, RowMixWeight) and all(_fits_part(part) for part in weight.parts)


def container(bits: int) -> int:
    """The MatMulNBits width holding codes of ``bits``."""
    return next(width for width in CONTAINERS if width >= bits)


def kernel_key(weight: WeightFormat) -> tuple[int | None, int, bool]:
    """What weights sharing one MatMulNBits must share: group size, code container (3- and
    4-bit codes both sit in 4 bits; scales, offsets and zero points are per group, whatever the
    width) and whether they are affine (zero points, no correction); a row-mix that ``fits``:
    its parts'."""
    if isinstance(weight, RowMixWeight):
        return kernel_key(weight.parts[0])
    spec = weight.spec
    assert isinstance(spec, GroupSpec)
    return spec.group_size, container(spec.bits), weight.name == AFFINE


def lower(shared: SiteRewrite, sites: list[tuple[SiteRewrite, WeightFormat]],
          activation: ir.Value, accuracy_level: int, bias: ir.Value | None = None
          ) -> tuple[ir.Value, dict[str, RowLookup]]:
    """One MatMulNBits (and its correction) computing the outputs of ``sites`` side by side for
    ``activation`` (one ``kernel_key``: several sites when they read one input, as q/k/v do),
    with the kernel's ``accuracy_level`` and optional ``bias`` (one value per output). Each
    site's rewrite stores that site's arrays; ``shared`` builds the nodes they share and
    carries the decision metadata; all in ``[out, in]`` orientation. Returns the output and,
    per site, the lookup of its rows in the kernel's arrays (for a tied embedding)."""
    width = kernel_key(sites[0][1])[1]
    assert all(not r.transposed and fits(w) and kernel_key(w) == kernel_key(sites[0][1])
               for r, w in sites)
    members = [(rewrite, _member(rewrite, weight, width)) for rewrite, weight in sites]
    product, tables = _kernel(shared, members, activation, width, accuracy_level, bias)
    return _corrected(shared, activation, [product]), tables


@dataclasses.dataclass(frozen=True)
class _Member:
    """A share of a kernel's rows (a site, a part of a row-mix, or parts stored jointly), in
    its own row order: the weight whose layout (spec, shape) its parameters have, MatMulNBits'
    ``B``, its scales, and its offsets (float-offset) or the kernel's zero points
    ``[out, groups]`` (affine)."""

    layout: WeightFormat
    kernel_codes: ir.Value
    scales: ir.Value
    offsets: ir.Value | None
    zero_points: ir.Value | None


@dataclasses.dataclass(frozen=True)
class _Product:
    """A kernel's output (its rows side by side) before the group-sum correction, and what the
    correction needs: the offsets ``[rows, groups]`` in the same row order (None: affine rows,
    none to correct), their group size, and the inputs; and the kernel's arrays, which its
    rows are looked up in (``B``, scales, packed zero points, the codes' width)."""

    value: ir.Value
    offsets: ir.Value | None
    rows: int
    group_size: int
    in_features: int
    codes: ir.Value
    scales: ir.Value
    zero_points: ir.Value
    width: int


def _kernel(shared: SiteRewrite, members: list[tuple[SiteRewrite, _Member]],
            activation: ir.Value, width: int, accuracy_level: int, bias: ir.Value | None
            ) -> tuple[_Product, dict[str, RowLookup]]:
    """The MatMulNBits of ``lower`` for members: its product (their outputs side by side, to
    be ``_corrected``), and the lookup of each member's rows by the name of its rewrite."""
    layout = members[0][1].layout
    spec = layout.spec
    assert isinstance(spec, GroupSpec) and spec.group_size is not None
    in_features = layout.shape[1]
    out_features = sum(member.layout.shape[0] for _, member in members)
    groups = spec.groups(in_features)

    def joined(values: list[ir.Value]) -> ir.Value:
        return values[0] if len(values) == 1 else shared.node("Concat", values, {"axis": 0})

    packed_groups = -(-groups * width // 8)
    if members[0][1].zero_points is None:
        zero_points = shared.node("ConstantOfShape",
                                  [shared.constant([out_features, packed_groups])],
                                  {"value": ir.tensor(np.zeros(1, np.uint8))})
    else:
        zero_points = shared.node("Reshape", [
            _packed_lanes(shared, joined([m.zero_points for _, m in members]),
                          -groups % (8 // width), width),
            shared.constant([out_features, packed_groups])])
    codes, scales = (joined([m.kernel_codes for _, m in members]),
                     joined([m.scales for _, m in members]))
    inputs = [activation, codes, scales, zero_points]
    if bias is not None:
        inputs += [None] * (matmul_nbits.BIAS_INPUT - len(inputs)) + [bias]
    product = shared.node(
        "MatMulNBits", inputs, {"K": in_features, "N": out_features, "bits": width,
                                "block_size": spec.group_size, "accuracy_level": accuracy_level},
        output="kernel_product", domain=matmul_nbits.DOMAIN)
    affine = members[0][1].offsets is None
    offsets = None if affine else joined([m.offsets for _, m in members])
    kernel = _Product(product, offsets, out_features, spec.group_size, in_features, codes,
                      scales, zero_points, width)
    firsts = itertools.accumulate((m.layout.shape[0] for _, m in members), initial=0)
    return kernel, {rewrite.site_id: _row_lookup(rewrite, [kernel], first=first)
                    for (rewrite, _), first in zip(members, firsts, strict=False)}


def _row_lookup(rewrite: SiteRewrite, products: list[_Product], order: ir.Value | None = None,
                first: int = 0) -> RowLookup:
    """The lookup of a weight's rows in the kernels holding it, ``products`` (their rows
    stacked in this order: the weight's row ``r`` is stacked row ``order[r]``, or ``first +
    r``): each kernel's rows at the indices it holds (``_kernel_rows``), chosen per index by
    the kernel it falls in."""

    def lookup(before: ir.Node, indices: ir.Value) -> ir.Value:
        rewrite.matmul = before
        position = indices
        if order is not None or first or len(products) > 1:
            position = rewrite.node("Cast", [indices], {"to": ir.DataType.INT64})
        if order is not None:
            position = rewrite.node("Gather", [order, position], {"axis": 0})
        if first:
            position = rewrite.node("Add", [position, rewrite.constant([first])])
        if len(products) == 1:
            return _kernel_rows(rewrite, products[0], position)
        rows, start = None, 0
        for product in products:
            local = rewrite.node("Min", [rewrite.node("Max", [
                rewrite.node("Sub", [position, rewrite.constant([start])]),
                rewrite.constant([0])]), rewrite.constant([product.rows - 1])])
            held = _kernel_rows(rewrite, product, local)
            if rows is not None:
                inside = rewrite.node("Unsqueeze", [rewrite.node(
                    "GreaterOrEqual", [position, rewrite.constant([start])]),
                    rewrite.constant([-1])])
                held = rewrite.node("Where", [inside, held, rows])
            rows, start = held, start + product.rows
        assert rows is not None
        return rows

    return lookup


def _kernel_rows(rewrite: SiteRewrite, product: _Product, indices: ir.Value) -> ir.Value:
    """A kernel's rows ``indices``, ``[..., in]``, as its weight has them: GatherBlockQuantized
    on its ``B`` (``[rows, blocks * block * width / 8]``), scales and zero points gives
    ``(code - zero point) * scale``; float offsets are added per group (a Reshape to
    ``[..., groups, group]``), and a padded last group cut off."""
    blocks = -(-product.in_features // product.group_size)
    data = rewrite.node("Reshape", [product.codes, rewrite.constant([product.rows, -1])])
    rows = rewrite.node("GatherBlockQuantized",
                        [data, indices, product.scales, product.zero_points],
                        {"bits": product.width, "block_size": product.group_size,
                         "gather_axis": 0, "quantize_axis": 1}, domain=matmul_nbits.DOMAIN)
    if product.offsets is not None:
        leading = rewrite.node("Shape", [indices])
        grouped = rewrite.node("Reshape", [rows, rewrite.node(
            "Concat", [leading, rewrite.constant([blocks, product.group_size])], {"axis": 0})])
        offsets = rewrite.node("Unsqueeze", [rewrite.node(
            "Gather", [product.offsets, indices], {"axis": 0}), rewrite.constant([-1])])
        rows = rewrite.node("Reshape", [rewrite.node("Add", [grouped, offsets]), rewrite.node(
            "Concat", [leading, rewrite.constant([blocks * product.group_size])], {"axis": 0})])
    if blocks * product.group_size != product.in_features:
        rows = rewrite.node("Slice", [rows, rewrite.constant([0]),
                                      rewrite.constant([product.in_features]),
                                      rewrite.constant([-1])])
    return rows


def _corrected(rewrite: SiteRewrite, activation: ir.Value, products: list[_Product]
               ) -> ir.Value:
    """Kernels' products on ``activation`` side by side plus their group-sum correction, one
    MatMul for all: the activation's sums over groups of the smallest group size ``b``
    (``_group_sums``) times every kernel's offsets repeated ``g / b`` times along the groups
    (a group of ``g`` inputs is ``g / b`` groups of ``b``; repeated on constants, folded at
    session start), zero for affine rows; none where every row is affine."""
    values = [product.value for product in products]
    output = values[0] if len(values) == 1 else rewrite.node("Concat", values, {"axis": -1})
    if all(product.offsets is None for product in products):
        return output
    base = min(product.group_size for product in products)
    in_features = products[0].in_features
    groups = -(-in_features // base)
    offsets = []
    for product in products:
        rows = product.offsets
        if rows is None:
            rows = rewrite.node("ConstantOfShape", [rewrite.constant([product.rows, groups])],
                                {"value": ir.tensor(np.zeros(1, np.float32))})
        elif product.group_size != base:
            rows = repeat_blocks(rewrite, rows, (product.rows, groups),
                                 product.group_size // base)
        offsets.append(rows)
    stacked = offsets[0] if len(offsets) == 1 else rewrite.node("Concat", offsets, {"axis": 0})
    sums = _group_sums(rewrite, activation, in_features, base)
    transposed = rewrite.node("Transpose", [stacked], {"perm": [1, 0]})
    return rewrite.node("Add", [output, rewrite.node("MatMul", [sums, transposed])])


def _member(rewrite: SiteRewrite, weight: WeightFormat, width: int) -> _Member:
    """A site (or part) as a kernel's member; a row-mix that ``fits`` as its parts stored
    jointly, in the site's row order."""
    if isinstance(weight, RowMixWeight):
        parts = [(part_rewrite(rewrite, f"p{i}"), part) for i, part in enumerate(weight.parts)]
        return _joined(rewrite, parts, width, weight)
    return _Member(weight, _codes(rewrite, weight, width), *_parameters(rewrite, weight, width))


def _parameters(rewrite: SiteRewrite, weight: WeightFormat, width: int
                ) -> tuple[ir.Value, ir.Value | None, ir.Value | None]:
    """A weight's per-group scales and offsets (float-offset), or scales and the kernel's
    uint8 zero points (affine: its own, or ``2^(width-1)`` for signed codes), ``[out, groups]``.
    """
    if weight.name != AFFINE:
        return (*float_offset_parameters(rewrite, weight), None)
    assert isinstance(weight, AffineWeight)
    scales = rewrite.array(weight, "scales")
    if weight.signed:
        zero_points = rewrite.node("ConstantOfShape", [rewrite.constant(list(
            weight.scales.shape))], {"value": ir.tensor(np.full(1, 1 << (width - 1), np.uint8))})
    else:
        zero_points = rewrite.node("Cast", [rewrite.array(weight, "zero_points")],
                                   {"to": ir.DataType.UINT8})
    return scales, None, zero_points


def _joined(rewrite: SiteRewrite, parts: list[tuple[SiteRewrite, WeightFormat]], width: int,
            mix: RowMixWeight | None) -> _Member:
    """Parts of one format sharing a kernel as one member: each part's codes under its own
    rewrite, their float-offset parameters stored once under ``rewrite`` as one weight of the
    widest part's spec stores them (one decoding of each, as for an unmixed site), affine
    parameters (zero points of each part's width) under each part's rewrite: in the row order
    of ``mix`` (its parts' codes put in it by a Gather on constants, folded at session start),
    or without, stacked in part order."""
    blobs = [_codes(part_site, part, width) for part_site, part in parts]
    weights = [part for _, part in parts]
    order = row_order_indices(rewrite, mix) if mix is not None else None

    def arranged(values: list[ir.Value]) -> ir.Value:
        stacked = rewrite.node("Concat", values, {"axis": 0})
        return stacked if order is None else rewrite.node("Gather", [stacked, order],
                                                          {"axis": 0})

    rows = sum(part.shape[0] for part in weights)
    widest = max(weights, key=lambda part: part.spec.bits)
    layout = load_weight(widest.spec, in_row_order(
        [part.arrays() for part in weights], np.arange(rows) if mix is None else mix.order))
    if weights[0].name == AFFINE:  # zero points are codes of each part's own width
        scales, _, zero_points = zip(*(_parameters(part_site, part, width)
                                       for part_site, part in parts), strict=True)
        return _Member(layout, arranged(blobs), arranged(list(scales)), None,
                       arranged(list(zero_points)))
    return _Member(layout, arranged(blobs), *_parameters(rewrite, layout, width))


def _codes(rewrite: SiteRewrite, weight: WeightFormat, width: int) -> ir.Value:
    """MatMulNBits' ``B`` of a weight. Codes stored at the kernel's width in whole blocks (4-
    or 8-bit codes, groups dividing the inputs) are stored as ``B`` itself, the format's bytes
    in the kernel's order: nothing to fold, and ``read_codes`` reads them back. Other codes
    (signed ones too) are stored in their own container and ``B`` is computed from them:
    from their packed bytes where they are packed in words (``_word_kernel_codes``), else
    from the codes."""
    spec = weight.spec
    assert isinstance(spec, GroupSpec) and spec.group_size is not None
    out_features, in_features = weight.shape
    signed = isinstance(weight, AffineWeight) and weight.signed
    stored = rewrite.code_bits(spec.bits)
    if stored == WORD_CODE_BITS and in_features % 2 == 0:
        return _word_kernel_codes(rewrite, weight)
    if stored != width or in_features % spec.group_size or signed:
        return _kernel_codes(rewrite, rewrite.array(weight, "codes", signed), weight, width)
    packed = matmul_nbits.pack_codes(weight.arrays()["codes"], width)
    return rewrite.initializer(f"{rewrite.site_id}.weight_codes", packed.reshape(
        out_features, in_features // spec.group_size, spec.group_size * width // 8))


def _word_kernel_codes(rewrite: SiteRewrite, weight: WeightFormat) -> ir.Value:
    """The 4-bit kernel's ``B`` from 3-bit codes packed in 24-bit words (eight to a word,
    ``onnx_formats.pack_words``), in uint8 ops on the packed bytes, so that no tensor ONNX
    Runtime folds at session start holds more than half a byte per code (unpacking the codes
    first takes several bytes per code). Each word is four 6-bit windows of two codes, which
    make one byte of ``B`` (the first in the low nibble); signed codes move from their offset
    4 to the kernel's 8; the bytes are cut to the codes (rows of whole bytes: an even number
    of inputs) and each row is padded to whole blocks."""
    spec = weight.spec
    assert isinstance(spec, GroupSpec) and spec.group_size is not None
    out_features, in_features = weight.shape
    signed = isinstance(weight, AffineWeight) and weight.signed
    constant = rewrite.constant
    packed = rewrite.packed_words(weight.arrays()["codes"], "codes", WORD_CODE_BITS, signed)
    triples = rewrite.node("Pad", [rewrite.node("Reshape", [packed, constant([-1, 3])]),
                                   constant([0, 0, 0, 1])])  # a zero fourth byte
    low = rewrite.node("BitShift", [rewrite.node("Gather", [triples, constant([0, 0, 1, 2])],
                                                 {"axis": 1}),
                                    constant([[0, 6, 4, 2]], np.uint8)], {"direction": "RIGHT"})
    high = rewrite.node("BitShift", [rewrite.node("Gather", [triples, constant([3, 1, 2, 3])],
                                                  {"axis": 1}),
                                     constant([[0, 2, 4, 0]], np.uint8)], {"direction": "LEFT"})
    windows = rewrite.node("BitwiseOr", [low, high])
    mask = rewrite.layout_constant("codes", "mask", [(1 << WORD_CODE_BITS) - 1], np.uint8)
    second = rewrite.node("BitShift", [windows, constant([WORD_CODE_BITS], np.uint8)],
                          {"direction": "RIGHT"})
    second = rewrite.node("BitShift", [rewrite.node("BitwiseAnd", [second, mask]),
                                       constant([4], np.uint8)], {"direction": "LEFT"})
    lanes = rewrite.node("BitwiseOr", [rewrite.node("BitwiseAnd", [windows, mask]), second])
    if signed:  # both codes of the byte up by 8 - 4, within their nibbles
        lanes = rewrite.node("Add", [lanes, constant([0x44], np.uint8)])
    flat = rewrite.node("Slice", [rewrite.node("Reshape", [lanes, constant([-1])]),
                                  constant([0]), constant([out_features * in_features // 2])])
    shape = rewrite.node("Div", [rewrite.layout_constant("codes", "shape", list(weight.shape)),
                                 constant([1, 2])])
    rows = rewrite.node("Reshape", [flat, shape])
    blocks = spec.groups(in_features)
    padding = (blocks * spec.group_size - in_features) // 2
    if padding:
        rows = rewrite.node("Pad", [rows, constant([0, 0, 0, padding])])
    return rewrite.node("Reshape", [rows, constant([out_features, blocks,
                                                    spec.group_size // 2])])


def read_codes(blob: np.ndarray, width: int, in_features: int) -> np.ndarray:
    """The codes ``[out, in]`` stored as MatMulNBits' ``B`` (inverse of ``_codes``)."""
    return matmul_nbits.unpack_codes(blob.reshape(blob.shape[0], -1), width, in_features)


def _group_sums(rewrite: SiteRewrite, activation: ir.Value, in_features: int,
                group_size: int) -> ir.Value:
    """Each group's sum of the activation's ``in_features`` inputs, ``[..., groups]``: Reshape
    to ``[..., groups, group_size]`` (the leading dimensions copied where the rank is known,
    else read from the activation's shape) and ReduceSum; a short last group padded with zeros
    first."""
    groups = -(-in_features // group_size)
    value = activation
    padding = groups * group_size - in_features
    if padding:
        value = rewrite.node("Pad", [value, rewrite.constant([0, padding]), None,
                                     rewrite.constant([-1])])
    grouped = [groups, group_size]
    if activation.shape is not None:
        shape = rewrite.constant([0] * (len(activation.shape) - 1) + grouped)
    else:
        leading = rewrite.node("Slice", [rewrite.node("Shape", [activation]),
                                         rewrite.constant([0]),
                                         rewrite.constant([-1])])
        shape = rewrite.node("Concat", [leading, rewrite.constant(grouped)],
                             {"axis": 0})
    value = rewrite.node("Reshape", [value, shape])
    return rewrite.node("ReduceSum", [value, rewrite.constant([-1])],
                        {"keepdims": 0})


def _kernel_codes(rewrite: SiteRewrite, codes: ir.Value, weight: WeightFormat,
                  width: int) -> ir.Value:
    """MatMulNBits' ``B``: ``[out, blocks, block * width / 8]`` uint8, the codes (signed
    ones shifted by ``2^(width-1)``) ``_packed_lanes`` in blocks, the last block padded with
    zero codes."""
    spec = weight.spec
    assert isinstance(spec, GroupSpec) and spec.group_size is not None
    out_features, in_features = weight.shape
    blocks = spec.groups(in_features)
    if isinstance(weight, AffineWeight) and weight.signed:
        codes = rewrite.node("Add", [rewrite.node("Cast", [codes], {"to": ir.DataType.INT32}),
                                     rewrite.constant([1 << (width - 1)], np.int32)])
    value = rewrite.node("Cast", [codes], {"to": ir.DataType.UINT8})
    value = _packed_lanes(rewrite, value, blocks * spec.group_size - in_features, width)
    shape = [out_features, blocks, spec.group_size * width // 8]
    return rewrite.node("Reshape", [value, rewrite.constant(shape)])


def _packed_lanes(rewrite: SiteRewrite, value: ir.Value, padding: int, width: int) -> ir.Value:
    """uint8 codes ``[rows, n]`` padded with ``padding`` zero codes along the last axis and
    packed little-endian within each byte (4 bits: the even one in the low nibble; 8 bits: as
    they are), in row-major order; uint8 ops throughout."""
    if padding:
        value = rewrite.node("Pad", [value, rewrite.constant([0, 0, 0, padding])])
    if width == 8:
        return value
    pairs = rewrite.node("Reshape", [value, rewrite.constant([-1, 2])])
    low, high = (rewrite.node("Slice", [pairs, rewrite.constant([i]),
                                        rewrite.constant([i + 1]), rewrite.constant([1])])
                 for i in (0, 1))  # the even code, the odd one
    high = rewrite.node("BitShift", [high, rewrite.constant([4], np.uint8)],
                        {"direction": "LEFT"})
    return rewrite.node("BitwiseOr", [low, high])


def joint_parts(specs: list[GroupSpec]) -> list[list[int]]:
    """The parts of a row-mix whose parameters ``lower_rows`` stores jointly (``_joined``,
    under ``<site>.p<first>+<more>``): each run of two or more consecutive parts of one
    float-offset format and ``kernel_key``."""
    keys = [(spec.format, spec.group_size, container(spec.bits)) for spec in specs]
    runs = [[i for i, _ in run] for _, run in itertools.groupby(enumerate(keys),
                                                                key=lambda pair: pair[1])]
    return [run for run in runs if len(run) > 1 and specs[run[0]].format != AFFINE]


def _parts_rewrite(rewrite: SiteRewrite, indices: list[int]) -> SiteRewrite:
    """The rewrite of a row-mix's consecutive parts ``indices`` (``p<k>`` for one part, else
    ``p<first>+<more>``)."""
    more = len(indices) - 1
    return part_rewrite(rewrite, f"p{indices[0]}+{more}" if more else f"p{indices[0]}")


def lower_rows(rewrite: SiteRewrite, weight: RowMixWeight, activation: ir.Value,
               accuracy_level: int, bias: ir.Value | None = None
               ) -> tuple[ir.Value, RowLookup]:
    """A row-mixed site: each run of consecutive parts sharing a ``kernel_key`` on one
    MatMulNBits on ``activation`` (parts of one format in it stored jointly, ``joint_parts``),
    the products concatenated, corrected together and put in row order, plus ``bias``. Returns
    the output and the lookup of the site's rows in the kernels' arrays."""
    products = []
    for (_, width, _), run in itertools.groupby(enumerate(weight.parts),
                                                key=lambda indexed: kernel_key(indexed[1])):
        run = list(run)
        shared = _parts_rewrite(rewrite, [i for i, _ in run])
        members = []
        for _, same in itertools.groupby(run, key=lambda indexed: indexed[1].name):
            indices = [i for i, _ in same]
            member = shared if len(indices) == len(run) else _parts_rewrite(rewrite, indices)
            if len(indices) == 1:
                members.append((member, _member(member, weight.parts[indices[0]], width)))
            else:
                parts = [(part_rewrite(rewrite, f"p{i}"), weight.parts[i]) for i in indices]
                members.append((member, _joined(member, parts, width, None)))
        products.append(_kernel(shared, members, activation, width, accuracy_level, None)[0])
    order = row_order_indices(rewrite, weight)
    output = rewrite.node("Gather", [_corrected(rewrite, activation, products), order],
                          {"axis": -1}, output="rows_product")
    if bias is not None:
        output = rewrite.node("Add", [output, bias])
    return output, _row_lookup(rewrite, products, order)
