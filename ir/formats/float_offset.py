"""Affine groups with float offsets: ``w = code * scale + offset`` (GGUF Q4_1, HQQ).

Unsigned codes ``0..2^b-1``; ``scales`` and ``offsets`` are float32 ``[out, n_groups]``. Unlike
an integer zero point, the offset places the grid anywhere, so a group whose values lie on a
grid with a non-integer ``offset / scale`` is represented exactly.
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
class FloatOffsetWeight(WeightFormat):
    name = "float-offset"
    spec: GroupSpec
    codes: np.ndarray  # [out, in], uint8
    scales: np.ndarray  # [out, n_groups], float32
    offsets: np.ndarray  # [out, n_groups], float32
    outliers: SparseOutliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @classmethod
    def base_bytes(cls, shape: tuple[int, int], spec: GroupSpec, code_bits: CodeBits) -> int:
        out_features, in_features = shape
        groups = out_features * spec.groups(in_features)
        codes = packed_code_bytes(out_features * in_features, code_bits(spec.bits))
        return codes + 2 * groups * SCALE_BYTES

    def base_arrays(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes, "scales": self.scales, "offsets": self.offsets}

    @classmethod
    def load(cls, spec: GroupSpec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"codes": arrays["codes"].astype(np.uint8),
                "scales": arrays["scales"].astype(np.float32),
                "offsets": arrays["offsets"].astype(np.float32)}

    @staticmethod
    def base_dequantize(spec: GroupSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        in_features = tensors["codes"].shape[1]
        block = spec.block(in_features)
        scaled = tensors["codes"].to(torch.float32) * expand_groups(tensors["scales"], block,
                                                                     in_features)
        return scaled + expand_groups(tensors["offsets"], block, in_features)
