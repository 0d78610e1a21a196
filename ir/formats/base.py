"""The weight-format contract: a site's quantized arrays, their dequantization and their size.

A format owns
1. its arrays (``arrays()``: name -> numpy array, in the logical ``[out, in]`` orientation),
   which every backend packages as they are (``from_arrays`` inverts it);
2. its dequantization, written once in torch (``dequantize_tensors``) and used by the torch
   backend as is; ``dequantize()`` applies it to the numpy arrays;
3. its physical bytes from the spec alone (``physical_bytes``), which the budget charges;
   ``code_bits`` maps a code width to the bits the backend stores it in.
Sparse outliers are an optional additive part of any format (``outliers``).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import ClassVar

import numpy as np
import torch

from lwqc.ir.formats.outliers import SparseOutliers
from lwqc.ir.spec import QuantSpec

SCALE_BYTES = 4  # float32 scales and offsets
CodeBits = Callable[[int], int]  # code width -> stored bits


def expand_groups(per_group: torch.Tensor, block: int, in_features: int) -> torch.Tensor:
    """Repeat a ``[out, n_groups]`` tensor along the input dimension to ``[out, in]``."""
    return per_group.repeat_interleave(block, dim=1)[:, :in_features]


WORD_BITS = 24  # 3- and 6-bit codes are packed in 24-bit words of three bytes
WORD_PACKED = (3, 6)


def packed_code_bytes(count: int, code_bits: int) -> int:
    """Bytes of ``count`` codes stored at ``code_bits`` each (3- and 6-bit codes in whole
    24-bit words, the last one padded)."""
    if code_bits in WORD_PACKED:
        return -(-count * code_bits // WORD_BITS) * (WORD_BITS // 8)
    return -(-count * code_bits // 8)


@dataclasses.dataclass(frozen=True, eq=False)
class WeightFormat(abc.ABC):
    """Base of all formats; subclasses are frozen dataclasses whose first field is ``spec``
    and whose last is ``outliers``."""

    name: ClassVar[str] = ""

    @property
    @abc.abstractmethod
    def shape(self) -> tuple[int, int]:
        """The logical weight shape ``(out, in)``."""

    @classmethod
    @abc.abstractmethod
    def base_bytes(cls, shape: tuple[int, int], spec: QuantSpec, code_bits: CodeBits) -> int:
        """Bytes of the format's own arrays, codes of width b stored at ``code_bits(b)``."""

    @abc.abstractmethod
    def base_arrays(self) -> dict[str, np.ndarray]:
        """The format's own arrays (outliers excluded)."""

    @staticmethod
    @abc.abstractmethod
    def base_dequantize(spec: QuantSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The float32 ``[out, in]`` weight the base arrays stand for."""

    @classmethod
    def physical_bytes(cls, shape: tuple[int, int], spec: QuantSpec,
                       code_bits: CodeBits) -> int:
        """Bytes a site of ``shape`` occupies under ``spec``: base arrays plus outliers."""
        count = SparseOutliers.count_for(shape, spec.outliers)
        return cls.base_bytes(shape, spec, code_bits) + SparseOutliers.bytes_for(count)

    def arrays(self) -> dict[str, np.ndarray]:
        extra = {} if self.outliers is None else self.outliers.arrays()
        return {**self.base_arrays(), **extra}

    @classmethod
    def from_arrays(cls, spec: QuantSpec, arrays: dict[str, np.ndarray]) -> WeightFormat:
        """Rebuild the format from ``arrays()`` (dtypes are normalised by ``load``)."""
        base = {k: v for k, v in arrays.items() if k not in SparseOutliers.ARRAYS}
        return cls(spec, **cls.load(spec, base), outliers=SparseOutliers.from_arrays(arrays))

    @classmethod
    def load(cls, spec: QuantSpec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The constructor's array arguments from stored arrays (dtype normalisation)."""
        return arrays

    @classmethod
    def dequantize_tensors(cls, spec: QuantSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """The one dequantization formula of the format: base, plus outliers if any."""
        weight = cls.base_dequantize(spec, tensors)
        return SparseOutliers.add_to(weight, tensors)

    def dequantize(self) -> np.ndarray:
        """The float32 ``[out, in]`` weight, exactly as the backends compute it."""
        tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in self.arrays().items()}
        return self.dequantize_tensors(self.spec, tensors).numpy()

    def nbytes(self, code_bits: CodeBits) -> int:
        """Physical bytes of this weight with codes of width b stored at ``code_bits(b)``."""
        return self.physical_bytes(self.shape, self.spec, code_bits)
