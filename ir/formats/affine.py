"""Affine groups with integer zero points: ``w = (code - zero_point) * scale``.

The formula of ONNX ``DequantizeLinear``. Groups run along the input dimension; ``scales``
and ``zero_points`` are ``[out, n_groups]``. ``rtn-asym`` stores unsigned codes and zero
points, ``rtn-sym`` signed codes and no zero points.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lwqc.ir.formats.base import (
    SCALE_BYTES,
    CodeBits,
    WeightFormat,
    expand_groups,
    packed_code_bytes,
)
from lwqc.ir.formats.outliers import SparseOutliers
from lwqc.ir.spec import GroupSpec


@dataclasses.dataclass(frozen=True, eq=False)
class AffineWeight(WeightFormat):
    name = "affine"
    spec: GroupSpec
    codes: np.ndarray  # [out, in], uint8 (asym) or int8 (sym)
    scales: np.ndarray  # [out, n_groups], float32
    zero_points: np.ndarray | None = None  # [out, n_groups], uint8, asym only
    outliers: SparseOutliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def signed(self) -> bool:
        return self.zero_points is None

    @classmethod
    def base_bytes(cls, shape: tuple[int, int], spec: GroupSpec, code_bits: CodeBits) -> int:
        out_features, in_features = shape
        groups = out_features * spec.groups(in_features)
        width = code_bits(spec.bits)
        zero_points = packed_code_bytes(groups, width) if spec.scheme == "rtn-asym" else 0
        return (packed_code_bytes(out_features * in_features, width)
                + groups * SCALE_BYTES + zero_points)

    def base_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"codes": self.codes, "scales": self.scales}
        if self.zero_points is not None:
            arrays["zero_points"] = self.zero_points
        return arrays

    @classmethod
    def load(cls, spec: GroupSpec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        signed = spec.scheme == "rtn-sym"
        loaded = {"codes": arrays["codes"].astype(np.int8 if signed else np.uint8),
                  "scales": arrays["scales"].astype(np.float32)}
        if not signed:
            loaded["zero_points"] = arrays["zero_points"].astype(np.uint8)
        return loaded

    @staticmethod
    def base_dequantize(spec: GroupSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        in_features = tensors["codes"].shape[1]
        block = spec.block(in_features)
        codes = tensors["codes"].to(torch.int32)
        if "zero_points" in tensors:
            codes = codes - expand_groups(tensors["zero_points"].to(torch.int32), block,
                                          in_features)
        return codes.to(torch.float32) * expand_groups(tensors["scales"], block, in_features)
