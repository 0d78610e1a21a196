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
weights are the ones the torch backend computes.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.formats import AffineWeight, WeightFormat
from lwqc.ir.spec import GroupSpec

BITS = (2, 4, 8)
GATHER_BITS = (4, 8)  # GatherBlockQuantized holds 4- and 8-bit codes
MIN_BLOCK = 16
ARRAYS = ("B", "scales", "zero_points")  # MatMulNBits' inputs after A, in order


def supported(weight: WeightFormat) -> bool:
    """Whether MatMulNBits holds ``weight`` exactly: affine codes of 2, 4 or 8 bits, groups
    of a power of two of at least 16 inputs, no outliers."""
    spec = weight.spec
    if not isinstance(weight, AffineWeight) or weight.outliers is not None:
        return False
    assert isinstance(spec, GroupSpec)
    size = spec.group_size
    return spec.bits in BITS and size is not None and size >= MIN_BLOCK and size & (size - 1) == 0


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
