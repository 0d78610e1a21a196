"""Round-to-nearest groups with a float scale and a float offset (GGUF Q4_1, HQQ's format).

Groups run along the input dimension of W ``[out, in]``.
1. A group's range [lo, hi] maps onto codes 0..2^b-1: scale = (hi - lo) / (2^b - 1),
   offset = lo, code = clip(round((w - offset) / scale)); w ~ code * scale + offset.
2. The range is the group's [min, max], or with a search (``passes/rtn.py``) the range
   shrunk about its midpoint by the alpha in CLIP_GRID with the least weighted squared error
   (alpha = 1 is in the grid, so it never does worse than min/max).
3. A constant group gets scale 1 and offset = its value: dequantizes exactly.
Scales and offsets are float32 and codes are computed against the float32 values stored.

``float-offset-dq`` (``ir/formats/float_offset_dq.py``) quantizes the parameters in turn:
4. A group's range reaches down to zero at least (lo = min(w_min, 0)), so its offset is never
   positive. Each super-group's steps are its largest scale and largest offset magnitude of the
   full ranges over 2^PARAM_BITS - 1, rounded up to float16 (so no code needs more).
5. A group's scale and offset magnitude (from its range, shrunk as in 2) snap to the nearest
   step multiple, 0 .. 2^PARAM_BITS - 1 (a nonzero scale to at least one step); codes are
   computed against the snapped float32 values. A group whose scale snaps to zero holds its
   offset only. With a range search, the chosen scale and offset codes then move by one step
   (each of the 8 neighbours in turn, twice over) wherever that lowers the weighted error.
"""

from __future__ import annotations

import numpy as np

from lwqc.ir.errors import PlanError
from lwqc.ir.formats import FloatOffsetDqWeight, FloatOffsetWeight
from lwqc.ir.formats.float_offset_dq import PARAM_BITS, super_group_size, super_groups
from lwqc.ir.spec import FloatOffsetDqSpec, GroupSpec
from lwqc.passes.rtn import GroupRule, grouped, grouped_weights, search


class FloatOffset(GroupRule):
    """Unsigned codes with a float offset per group (``second`` = offsets)."""

    pad = "edge"

    def __init__(self, groups: np.ndarray, bits: int) -> None:
        self.qmax = 2**bits - 1
        self.lo, self.hi = groups.min(axis=2), groups.max(axis=2)

    def params(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        mid, half = (self.hi + self.lo) / 2, (self.hi - self.lo) / 2
        scales = (2 * alpha * half / self.qmax).astype(np.float32)
        offsets = (mid - alpha * half).astype(np.float32)
        scales[scales == 0] = 1.0
        return scales, offsets

    def codes(self, groups: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        shifted = groups - offsets.astype(np.float64)[..., None]
        shifted /= scales.astype(np.float64)[..., None]
        return np.clip(np.round(shifted), 0, self.qmax)

    @staticmethod
    def dequantize(codes: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        return (codes * scales.astype(np.float64)[..., None]
                + offsets.astype(np.float64)[..., None])


def pack_float_offset(spec: GroupSpec, codes: np.ndarray, scales: np.ndarray,
                      offsets: np.ndarray) -> FloatOffsetWeight:
    return FloatOffsetWeight(spec, codes.astype(np.uint8), scales, offsets)


def quantize_float_offset(weights: np.ndarray, spec: GroupSpec,
                          column_weights: np.ndarray | None = None) -> FloatOffsetWeight:
    """Quantize ``weights`` ``[out, in]`` to codes, float scales and float offsets."""
    groups = grouped(weights, spec, pad=FloatOffset.pad)
    rule = FloatOffset(groups, spec.bits)
    scales, offsets = search(rule, groups,
                             grouped_weights(column_weights, spec, weights.shape[1]))
    codes = rule.codes(groups, scales, offsets).reshape(weights.shape[0], -1)
    return pack_float_offset(spec, codes[:, : weights.shape[1]], scales, offsets)


PARAM_TOP = 2**PARAM_BITS - 1


def _steps_up(values: np.ndarray) -> np.ndarray:
    """``values`` / PARAM_TOP as float16, rounded up (a step never makes a code exceed the top)."""
    exact = values / PARAM_TOP
    largest = float(np.finfo(np.float16).max)
    if np.any(exact >= largest):  # rounded up, it would not be finite
        raise PlanError("float-offset-dq: a group's range exceeds what float16 steps can hold; "
                        "use float-offset")
    steps = exact.astype(np.float16)
    low = steps.astype(np.float64) < exact
    steps[low] = np.nextafter(steps[low], np.float16(np.inf))
    return steps


def _snap(values: np.ndarray, steps: np.ndarray, least: int) -> np.ndarray:
    """Codes of ``values`` in multiples of ``steps`` (0 where the step is 0): the nearest, at
    least ``least`` for a positive value."""
    safe = np.where(steps > 0, steps, 1.0)
    codes = np.clip(np.round(values / safe), 0, PARAM_TOP)
    codes = np.where(values > 0, np.maximum(codes, least), codes)
    return np.where(steps > 0, codes, 0.0)


class SnappedFloatOffset(FloatOffset):
    """Float-offset groups whose scale and offset snap to codes of per-group steps."""

    def __init__(self, groups: np.ndarray, bits: int, scale_steps: np.ndarray,
                 offset_steps: np.ndarray) -> None:
        super().__init__(groups, bits)
        self.lo = np.minimum(self.lo, 0.0)
        self.scale_steps = scale_steps.astype(np.float32)  # [out, groups], float16 values
        self.offset_steps = offset_steps.astype(np.float32)

    def params(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        mid, half = (self.hi + self.lo) / 2, (self.hi - self.lo) / 2
        return self._values(_snap(2 * alpha * half / self.qmax, self.scale_steps, 1),
                            _snap(alpha * half - mid, self.offset_steps, 0))

    def neighbours(self, scales: np.ndarray,
                   offsets: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        scale_codes = _snap(scales, self.scale_steps, 0)
        offset_codes = _snap(-offsets, self.offset_steps, 0)
        held = self.scale_steps > 0
        return [self._values(np.where(held, np.clip(scale_codes + ds, 1, PARAM_TOP), 0),
                             np.clip(offset_codes + do, 0, PARAM_TOP))
                for ds in (-1, 0, 1) for do in (-1, 0, 1) if ds or do]

    def _values(self, scale_codes: np.ndarray,
                offset_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        scales = scale_codes.astype(np.float32) * self.scale_steps
        return scales, -(offset_codes.astype(np.float32) * self.offset_steps)

    def codes(self, groups: np.ndarray, scales: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        held = scales != 0
        codes = super().codes(groups, np.where(held, scales, np.float32(1)), offsets)
        return codes * held[..., None]


class DqParameters:
    """One weight's parameter steps, fixed from its groups' full ranges before quantizing."""

    def __init__(self, groups: np.ndarray, bits: int) -> None:
        out_features, count = groups.shape[:2]
        lo = np.minimum(groups.min(axis=2), 0.0)
        scales, magnitudes = (groups.max(axis=2) - lo) / (2**bits - 1), -lo
        self.size, supers = super_group_size(count), super_groups(count)

        def per_super(values: np.ndarray) -> np.ndarray:
            padded = np.zeros((out_features, supers * self.size))
            padded[:, :count] = values
            return _steps_up(padded.reshape(out_features, supers, self.size).max(axis=2))

        self.scale_steps, self.offset_steps = per_super(scales), per_super(magnitudes)
        self.groups = count

    def per_group(self, steps: np.ndarray, first: int, count: int) -> np.ndarray:
        return np.repeat(steps, self.size, axis=1)[:, first : first + count]

    def rule(self, groups: np.ndarray, bits: int, first: int = 0) -> SnappedFloatOffset:
        """The rule of ``groups`` ``[out, n, block]``, the weight's groups from ``first`` on."""
        count = groups.shape[1]
        return SnappedFloatOffset(groups, bits, self.per_group(self.scale_steps, first, count),
                                  self.per_group(self.offset_steps, first, count))

    def pack(self, spec: FloatOffsetDqSpec, codes: np.ndarray, scales: np.ndarray,
             offsets: np.ndarray) -> FloatOffsetDqWeight:
        def param_codes(values: np.ndarray, steps: np.ndarray) -> np.ndarray:
            per_group = self.per_group(steps, 0, self.groups).astype(np.float32)
            return _snap(values, per_group, least=0).astype(np.uint8)

        return FloatOffsetDqWeight(spec, codes.astype(np.uint8),
                                   param_codes(scales, self.scale_steps),
                                   param_codes(-offsets, self.offset_steps),
                                   self.scale_steps, self.offset_steps)


def quantize_float_offset_dq(weights: np.ndarray, spec: FloatOffsetDqSpec,
                             column_weights: np.ndarray | None = None) -> FloatOffsetDqWeight:
    """Quantize ``weights`` ``[out, in]`` to codes and quantized scales and offsets."""
    groups = grouped(weights, spec, pad=FloatOffset.pad)
    parameters = DqParameters(groups, spec.bits)
    rule = parameters.rule(groups, spec.bits)
    scales, offsets = search(rule, groups,
                             grouped_weights(column_weights, spec, weights.shape[1]))
    codes = rule.codes(groups, scales, offsets).reshape(weights.shape[0], -1)
    return parameters.pack(spec, codes[:, : weights.shape[1]], scales, offsets)
