"""Per-column codebooks (CLAQ, arXiv 2405.17233): ``w[i, j] = codebooks[j, code[i, j]]``.

Column j is input feature j of W ``[out, in]``; each has 2^bits float16 centroids, so
``codebooks`` is ``[in, 2^bits]`` and codes are unsigned indices.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lwqc.ir.formats.base import CodeBits, WeightFormat, packed_code_bytes
from lwqc.ir.formats.outliers import SparseOutliers
from lwqc.ir.spec import CodebookSpec

CENTROID_BYTES = 2  # float16


@dataclasses.dataclass(frozen=True, eq=False)
class CodebookWeight(WeightFormat):
    name = "codebook"
    spec: CodebookSpec
    codes: np.ndarray  # [out, in], uint8 indices
    codebooks: np.ndarray  # [in, 2^bits], float16
    outliers: SparseOutliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @classmethod
    def base_bytes(cls, shape: tuple[int, int], spec: CodebookSpec, code_bits: CodeBits) -> int:
        out_features, in_features = shape
        centroids = in_features * 2**spec.bits * CENTROID_BYTES
        return packed_code_bytes(out_features * in_features, code_bits(spec.bits)) + centroids

    def base_arrays(self) -> dict[str, np.ndarray]:
        return {"codes": self.codes, "codebooks": self.codebooks}

    @classmethod
    def load(cls, spec: CodebookSpec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"codes": arrays["codes"].astype(np.uint8),
                "codebooks": arrays["codebooks"].astype(np.float16)}

    @staticmethod
    def base_dequantize(spec: CodebookSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        table = tensors["codebooks"].to(torch.float32).T  # [2^bits, in]
        return torch.gather(table, 0, tensors["codes"].to(torch.int64))
