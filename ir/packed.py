"""PackedWeight: the quantized numerics of one site, computed once, packaged by every backend.

Layout is the logical ``[out, in]`` of the weight; groups run along the input dimension, so
``scales`` and ``zero_points`` are ``[out, n_groups]``. Dequantization is
``(code - zero_point) * scale`` in float32, the formula of ONNX ``DequantizeLinear``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

KEEP_BITS = 16
QUANT_WIDTHS = (2, 3, 4, 8)
SCHEMES = ("rtn-asym", "rtn-sym")
SCALE_BITS = 32


def container_bits(bits: int) -> int:
    """Storage width of a code: 3-bit codes live in a 4-bit container and are charged as such."""
    if bits not in QUANT_WIDTHS:
        raise ValueError(f"no container for {bits}-bit codes; widths are {QUANT_WIDTHS}")
    return 4 if bits == 3 else bits


def n_groups(in_features: int, group_size: int) -> int:
    """Number of groups along the input dimension (the last one may be short)."""
    return math.ceil(in_features / group_size)


def physical_bytes(
    shape: tuple[int, int], bits: int, group_size: int, scheme: str, keep_bits: int = 32
) -> int:
    """Bytes a site's weight occupies in the artifact: codes + scales + zero points.

    ``bits == KEEP_BITS`` means the weight stays in the model's float type of ``keep_bits``.
    """
    out_features, in_features = shape
    if bits == KEEP_BITS:
        return out_features * in_features * keep_bits // 8
    width = container_bits(bits)
    groups = out_features * n_groups(in_features, group_size)
    codes = math.ceil(out_features * in_features * width / 8)
    scales = groups * SCALE_BITS // 8
    zero_points = math.ceil(groups * width / 8) if scheme == "rtn-asym" else 0
    return codes + scales + zero_points


@dataclasses.dataclass(frozen=True, eq=False)
class PackedWeight:
    """Integer codes with group-wise scales (and zero points for asymmetric schemes)."""

    bits: int
    group_size: int
    scheme: str
    codes: np.ndarray  # [out, in], uint8 (asym) or int8 (sym)
    scales: np.ndarray  # [out, n_groups], float32
    zero_points: np.ndarray | None  # [out, n_groups], uint8, asym only

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def signed(self) -> bool:
        return self.scheme == "rtn-sym"

    def nbytes(self) -> int:
        """Physical bytes, as charged by the budget."""
        return physical_bytes(self.shape, self.bits, self.group_size, self.scheme)

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Repeat a ``[out, n_groups]`` array along the input dimension to ``[out, in]``."""
        return np.repeat(per_group, self.group_size, axis=1)[:, : self.shape[1]]

    def dequantize(self) -> np.ndarray:
        """The float32 weight the codes stand for, ``(code - zero_point) * scale``."""
        codes = self.codes.astype(np.int32)
        if self.zero_points is not None:
            codes = codes - self.expand(self.zero_points).astype(np.int32)
        return codes.astype(np.float32) * self.expand(self.scales)
