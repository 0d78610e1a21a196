"""Per-column codebooks (CLAQ, arXiv 2405.17233): ``w[i, j] = codebooks[j, code[i, j]]``.

Column j is input feature j of W ``[out, in]``; it has 2^bits float16 centroids, or 2^high_bits
when it is one of the spec's high columns (outlier-guided adaptive precision). ``codebooks``
is ``[in, 2^max_bits]`` with the unused tail of a low column's row zero; codes are unsigned
indices. With high columns, ``column_slots`` (int32 ``[in]``) places each column in the stored
order: the high columns first (ascending), then the low ones; storage splits codes and
codebooks by width (``split`` / ``merge``) and charges each part at its own width, plus the
slots.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from lwqc.ir.formats.base import CodeBits, WeightFormat, packed_code_bytes
from lwqc.ir.formats.outliers import SparseOutliers
from lwqc.ir.spec import CodebookSpec

CENTROID_BYTES = 2  # float16
SLOT_BYTES = 4  # int32 column slots
SPLIT = ("codes_high", "codebooks_high")  # stored arrays of the high columns


@dataclasses.dataclass(frozen=True, eq=False)
class CodebookWeight(WeightFormat):
    name = "codebook"
    spec: CodebookSpec
    codes: np.ndarray  # [out, in], uint8 indices
    codebooks: np.ndarray  # [in, 2^max_bits], float16
    column_slots: np.ndarray | None = None  # [in] int32, with high columns only
    outliers: SparseOutliers | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @classmethod
    def base_bytes(cls, shape: tuple[int, int], spec: CodebookSpec, code_bits: CodeBits) -> int:
        out_features, in_features = shape
        high = spec.high_count(in_features)
        low = in_features - high
        total = (packed_code_bytes(out_features * low, code_bits(spec.bits))
                 + low * 2**spec.bits * CENTROID_BYTES)
        if high:
            total += (packed_code_bytes(out_features * high, code_bits(spec.high_bits))
                      + high * 2**spec.high_bits * CENTROID_BYTES + in_features * SLOT_BYTES)
        return total

    def base_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"codes": self.codes, "codebooks": self.codebooks}
        if self.column_slots is not None:
            arrays["column_slots"] = self.column_slots
        return arrays

    @classmethod
    def load(cls, spec: CodebookSpec, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if SPLIT[0] in arrays:
            arrays = merge(spec, arrays)
        loaded = {"codes": arrays["codes"].astype(np.uint8),
                  "codebooks": arrays["codebooks"].astype(np.float16)}
        if "column_slots" in arrays:
            loaded["column_slots"] = arrays["column_slots"].astype(np.int32)
        return loaded

    @staticmethod
    def base_dequantize(spec: CodebookSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        table = tensors["codebooks"].to(torch.float32).T  # [2^max_bits, in]
        return torch.gather(table, 0, tensors["codes"].to(torch.int64))

    def high_columns(self) -> np.ndarray:
        """The high columns, ascending (empty without adaptive precision)."""
        if self.column_slots is None:
            return np.zeros(0, np.int64)
        count = self.spec.high_count(self.shape[1])
        return np.flatnonzero(self.column_slots < count)

    def split(self) -> dict[str, np.ndarray]:
        """The stored arrays: low columns' codes and codebooks (``codes``, ``codebooks``), high
        ones' (``codes_high``, ``codebooks_high``), and ``column_slots``."""
        high = self.high_columns()
        low = np.setdiff1d(np.arange(self.shape[1]), high)
        return {"codes": self.codes[:, low], "codebooks": self.codebooks[low, : 2**self.spec.bits],
                "codes_high": self.codes[:, high],
                "codebooks_high": self.codebooks[high, : 2**self.spec.high_bits],
                "column_slots": self.column_slots}


def merge(spec: CodebookSpec, stored: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Inverse of ``CodebookWeight.split``."""
    slots = stored["column_slots"].astype(np.int64)
    count = len(stored["codebooks_high"])
    high, low = np.flatnonzero(slots < count), np.flatnonzero(slots >= count)
    out_features = stored["codes"].shape[0]
    codes = np.zeros((out_features, len(slots)), np.uint8)
    codes[:, high], codes[:, low] = stored["codes_high"], stored["codes"]
    codebooks = np.zeros((len(slots), 2**spec.high_bits), np.float16)
    codebooks[high] = stored["codebooks_high"]
    codebooks[low, : 2**spec.bits] = stored["codebooks"]
    return {"codes": codes, "codebooks": codebooks, "column_slots": stored["column_slots"]}


def column_slots(high: np.ndarray, in_features: int) -> np.ndarray:
    """Slots of every column when ``high`` (ascending) come first, then the rest."""
    order = np.concatenate([high, np.setdiff1d(np.arange(in_features), high)])
    slots = np.empty(in_features, np.int32)
    slots[order] = np.arange(in_features, dtype=np.int32)
    return slots
