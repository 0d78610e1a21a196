"""Float-offset groups with quantized parameters (double quantization, as llama.cpp's K-quants
store a super-block's 6-bit scales and mins):

    scale[g]  = scale_codes[g]  * scale_steps[g // S]
    offset[g] = -offset_codes[g] * offset_steps[g // S]
    w = code * scale[g] - offset_codes[g] * offset_steps[g // S]

per row, ``g`` the group of the input; all products in float32. ``codes`` are unsigned
``0..2^bits-1``; ``scale_codes`` and ``offset_codes`` ``[out, n_groups]`` are ``PARAM_BITS``-bit
unsigned; ``scale_steps`` and ``offset_steps`` ``[out, n_supers]`` float16, one pair per
super-group of ``S`` consecutive groups (the last may be short). In a row of n groups,
S = ceil(n / k) for k = round(n / SUPER_GROUPS) (at least 1): super-groups of about
SUPER_GROUPS groups, as even as the row allows. 18 groups (576 inputs in groups of 32) make two
super-groups of 9, not 8 + 8 + 2. Offsets are never
positive (a group's range always reaches down to zero or below). At 4 bits and groups of 32 a
weight costs 4 + 12/32 + 32/256 = 4.5 bits (4.486 on 576 inputs).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lwqc.ir.errors import PlanError
from lwqc.ir.formats.base import CodeBits, WeightFormat, expand_groups, packed_code_bytes
from lwqc.ir.formats.outliers import SparseOutliers
from lwqc.ir.spec import FloatOffsetDqSpec

PARAM_BITS = 6  # width of the scale and offset codes
SUPER_GROUPS = 8  # groups sharing one pair of steps, as near as a row's groups divide
STEP_BYTES = 2  # float16 steps


def super_group_size(groups: int) -> int:
    """Groups per super-group in a row of ``groups`` groups (the last may be short)."""
    count = max(1, (groups + SUPER_GROUPS // 2) // SUPER_GROUPS)
    return -(-groups // count)


def super_groups(groups: int) -> int:
    """Super-groups of a row of ``groups`` groups."""
    return -(-groups // super_group_size(groups))


@dataclasses.dataclass(frozen=True, eq=False)
class FloatOffsetDqWeight(WeightFormat):
    name = "float-offset-dq"
    spec: FloatOffsetDqSpec
    codes: np.ndarray  # [out, in], uint8
    scale_codes: np.ndarray  # [out, n_groups], uint8 < 2^PARAM_BITS
    offset_codes: np.ndarray  # [out, n_groups], uint8 < 2^PARAM_BITS
    scale_steps: np.ndarray  # [out, n_supers], float16
    offset_steps: np.ndarray  # [out, n_supers], float16
    outliers: SparseOutliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @classmethod
    def base_bytes(cls, shape: tuple[int, int], spec: FloatOffsetDqSpec,
                   code_bits: CodeBits) -> int:
        out_features, in_features = shape
        groups = spec.groups(in_features)
        codes = packed_code_bytes(out_features * in_features, code_bits(spec.bits))
        params = 2 * packed_code_bytes(out_features * groups, code_bits(PARAM_BITS))
        return codes + params + 2 * out_features * super_groups(groups) * STEP_BYTES

    def base_arrays(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes, "scale_codes": self.scale_codes,
                "offset_codes": self.offset_codes, "scale_steps": self.scale_steps,
                "offset_steps": self.offset_steps}

    @classmethod
    def load(cls, spec: FloatOffsetDqSpec,
             arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        groups, supers = arrays["scale_codes"].shape[1], arrays["scale_steps"].shape[1]
        if supers != super_groups(groups):
            raise PlanError(f"float-offset-dq arrays hold {supers} super-groups of steps for "
                            f"{groups} groups, where this layout has {super_groups(groups)}: "
                            "they were written with another super-group layout; compile again")
        codes = ("codes", "scale_codes", "offset_codes")
        steps = ("scale_steps", "offset_steps")
        return {**{k: arrays[k].astype(np.uint8) for k in codes},
                **{k: arrays[k].astype(np.float16) for k in steps}}

    @staticmethod
    def group_parameters(tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-group ``scale`` and offset magnitude (``-offset``), float32 ``[out, n_groups]``."""
        groups = tensors["scale_codes"].shape[1]

        def product(codes: str, steps: str) -> torch.Tensor:
            per_group = expand_groups(tensors[steps].to(torch.float32),
                                      super_group_size(groups), groups)
            return tensors[codes].to(torch.float32) * per_group

        return product("scale_codes", "scale_steps"), product("offset_codes", "offset_steps")

    @classmethod
    def base_dequantize(cls, spec: FloatOffsetDqSpec,
                        tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        in_features = tensors["codes"].shape[1]
        block = spec.block(in_features)
        scales, magnitudes = cls.group_parameters(tensors)
        scaled = tensors["codes"].to(torch.float32) * expand_groups(scales, block, in_features)
        return scaled - expand_groups(magnitudes, block, in_features)
