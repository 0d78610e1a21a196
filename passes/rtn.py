"""Round-to-nearest group-wise quantization: the group rules every group format shares.

Groups run along the input dimension of W ``[out, in]`` (the last group may be short; a group
size of None makes each row one group).
1. ``rtn-asym``: a range [lo, hi] with lo <= 0 <= hi (zero is always exact) maps onto codes
   0..2^b-1: scale = (hi - lo) / (2^b - 1), zero point = floor(-lo / scale + 1/2),
   code = clip(floor(w * (1 / scale) + zero point + 1/2)), in float32.
2. ``rtn-sym``: the group's entry of largest magnitude m (with its sign; the negative one on a
   tie) maps onto the most negative code: scale = m / -2^(b-1) (negative when m is), so all
   2^b codes are in use (a bound |m| / (2^(b-1) - 1) would leave one unused); code =
   floor(w * (1 / scale) + 2^(b-1) + 1/2) - 2^(b-1), clipped, in float32.
   Both are, bit for bit, ONNX Runtime's blockwise quantizer (the GenAI builder's int4, its
   ``MatMulNBitsQuantizer``): halves round up, as it rounds the code shifted to be positive.
3. The range is the group's own [min(w_min, 0), max(w_max, 0)] (resp. max |w|), or with a
   search the shrunk range alpha * [lo, hi], alpha in CLIP_GRID, whose dequantized group has
   the least error sum_j c_j (w_j - q_j)^2 under per-input-column weights c (all 1: the
   weight's squared error; the diagonal of the input Gram matrix: the output error of
   uncorrelated inputs). alpha = 1 is in the grid, so the search never does worse than min/max
   under its own objective.
4. A group of zeros gets scale 1 (its codes, and zero point, are 0): dequantizes exactly.
Scales are float32 and codes are computed against the float32 scale actually stored.
"""

from __future__ import annotations

import abc

import numpy as np

from lwqc.ir.formats import AffineWeight, WeightFormat
from lwqc.ir.spec import GroupSpec

CLIP_GRID = tuple(round(1.0 - 0.025 * i, 3) for i in range(21))  # 1.0, 0.975, ..., 0.5


def grouped(weights: np.ndarray, spec: GroupSpec, pad: str = "zero") -> np.ndarray:
    """``[out, groups, block]`` float64 copy of W, the short last group padded.

    ``pad="zero"``: zeros, which change no statistic of a range that includes zero and add
    no error (zero is exact). ``pad="edge"``: the group's last value, which changes neither
    its min nor its max.
    """
    out_features, in_features = weights.shape
    block = spec.block(in_features)
    padded = spec.groups(in_features) * block
    mode = {"zero": "constant", "edge": "edge"}[pad]
    w = np.pad(weights.astype(np.float64), ((0, 0), (0, padded - in_features)), mode=mode)
    return w.reshape(out_features, -1, block)


REFINE_ROUNDS = 2  # rounds of moving to a better neighbour after the range search


class GroupRule(abc.ABC):
    """A group format's range rule: ``params(alpha)`` gives the (scales, second) of the range
    shrunk by ``alpha``; ``neighbours(scales, second)`` the candidates next to a choice that
    the search also tries (none: the parameters are not on a grid of their own)."""

    @abc.abstractmethod
    def params(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """The (scales, second) of every group's range shrunk by ``alpha``."""

    def neighbours(self, scales: np.ndarray,
                   second: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        return []


class Asymmetric(GroupRule):
    """Unsigned codes and an integer zero point per group (``second`` = zero points)."""

    pad = "zero"

    def __init__(self, groups: np.ndarray, bits: int) -> None:
        self.qmax = 2**bits - 1
        self.lo = np.minimum(groups.min(axis=2), 0.0).astype(np.float32)
        self.hi = np.maximum(groups.max(axis=2), 0.0).astype(np.float32)

    def params(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        scales = (self.hi - self.lo) / np.float32(self.qmax) * np.float32(alpha)
        scales[scales == 0] = 1.0
        lo = self.lo * np.float32(alpha)
        zeros = np.floor(-lo / scales + np.float32(0.5))
        return scales, np.clip(zeros, 0, self.qmax).astype(np.float64)

    def codes(self, groups: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        reciprocal = (np.float32(1.0) / scales)[..., None]
        shifted = groups.astype(np.float32) * reciprocal + zeros.astype(np.float32)[..., None]
        return np.clip(np.floor(shifted + np.float32(0.5)), 0, self.qmax)

    @staticmethod
    def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        return (codes - zeros[..., None]) * scales.astype(np.float64)[..., None]


class Symmetric(GroupRule):
    """Signed codes, no zero point (``second`` = zeros)."""

    pad = "zero"

    def __init__(self, groups: np.ndarray, bits: int) -> None:
        self.qmax = 2 ** (bits - 1) - 1
        high, low = groups.max(axis=2), groups.min(axis=2)
        self.extreme = np.where(np.abs(high) > np.abs(low), high, low)

    def params(self, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        scales = (alpha * self.extreme / -(self.qmax + 1)).astype(np.float32)
        scales[scales == 0] = 1.0
        return scales, np.zeros(scales.shape)

    def codes(self, groups: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> np.ndarray:
        offset = np.float32(self.qmax + 1)
        reciprocal = (np.float32(1.0) / scales)[..., None]
        shifted = groups.astype(np.float32) * reciprocal + offset
        return np.clip(np.floor(shifted + np.float32(0.5)) - offset, -self.qmax - 1, self.qmax)

    dequantize = staticmethod(Asymmetric.dequantize)


def search(rule: GroupRule, groups: np.ndarray, column_weights: np.ndarray | None):
    """The (scales, second) of each group: min/max when ``column_weights`` is None, else the
    least weighted squared error over CLIP_GRID, then over the rule's neighbours of the choice
    (REFINE_ROUNDS times; ``column_weights`` grouped like ``groups``)."""
    scales, second = rule.params(1.0)
    if column_weights is None:
        return scales, second
    best = np.full(scales.shape, np.inf)

    def consider(trial_scales: np.ndarray, trial_second: np.ndarray) -> None:
        codes = rule.codes(groups, trial_scales, trial_second)
        error = (((rule.dequantize(codes, trial_scales, trial_second) - groups) ** 2)
                 * column_weights).sum(2)
        better = error < best
        best[better] = error[better]
        scales[better], second[better] = trial_scales[better], trial_second[better]

    for alpha in CLIP_GRID:
        consider(*rule.params(alpha))
    for _ in range(REFINE_ROUNDS):
        for candidate in rule.neighbours(scales.copy(), second.copy()):
            consider(*candidate)
    return scales, second


def grouped_weights(column_weights: np.ndarray | None, spec: GroupSpec,
                    in_features: int) -> np.ndarray | None:
    """Per-input-column weights as ``[1, groups, block]`` (padding weighs nothing)."""
    if column_weights is None:
        return None
    block = spec.block(in_features)
    padded = np.zeros(spec.groups(in_features) * block)
    padded[:in_features] = column_weights
    return padded.reshape(1, -1, block)


def pack_affine(spec: GroupSpec, codes: np.ndarray, scales: np.ndarray,
                zeros: np.ndarray) -> WeightFormat:
    if spec.scheme == "rtn-asym":
        return AffineWeight(spec, codes.astype(np.uint8), scales, zeros.astype(np.uint8))
    return AffineWeight(spec, codes.astype(np.int8), scales, None)


def quantize_rtn(weights: np.ndarray, spec: GroupSpec,
                 column_weights: np.ndarray | None = None) -> WeightFormat:
    """Quantize ``weights`` ``[out, in]`` under an ``rtn-asym`` or ``rtn-sym`` spec; the range
    search runs when ``column_weights`` (``[in]``) are given."""
    groups = grouped(weights, spec)
    rule = (Asymmetric if spec.scheme == "rtn-asym" else Symmetric)(groups, spec.bits)
    scales, zeros = search(rule, groups, grouped_weights(column_weights, spec, weights.shape[1]))
    codes = rule.codes(groups, scales, zeros).reshape(weights.shape[0], -1)
    return pack_affine(spec, codes[:, : weights.shape[1]], scales, zeros)
