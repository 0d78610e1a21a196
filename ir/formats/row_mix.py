"""Row-mixed weights: the output rows of one site split among formats of different widths or
group sizes (``RowMixSpec``).

Each part holds its rows as a sub-matrix in its own format (``p<k>.<array>``); ``order[r]`` is
the position of output row r among the parts' rows stacked in part order, so

    W = concat(dequantize(part_0), dequantize(part_1), ...)[order]

``order`` is stored as uint16 where the rows allow (up to 65536), else int32, and charged at
that size. Exact: a row of ``W x`` reads only its own row of weights, and every format here
keeps its groups and parameters within one row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import numpy as np
import torch

from lwqc.ir.errors import PlanError
from lwqc.ir.formats.base import CodeBits, WeightFormat
from lwqc.ir.formats.outliers import SparseOutliers
from lwqc.ir.spec import QuantSpec, RowMixSpec

UINT16_ROWS = 1 << 16


def order_dtype(rows: int) -> type:
    """The type ``order`` is stored in for a site of ``rows`` output rows."""
    return np.uint16 if rows <= UINT16_ROWS else np.int32


def order_bytes(rows: int) -> int:
    """Bytes of the ``order`` of a site of ``rows`` output rows."""
    return rows * np.dtype(order_dtype(rows)).itemsize


def row_order(spec: RowMixSpec) -> np.ndarray:
    """``order`` of ``spec``'s row assignment: each row's position among the stacked parts."""
    stacked = np.concatenate(spec.part_rows())
    order = np.empty(len(stacked), np.int64)
    order[stacked] = np.arange(len(stacked))
    return order.astype(order_dtype(len(stacked)))


def row_mix_bytes(shape: tuple[int, int], spec: RowMixSpec,
                  part_bytes: Callable[[tuple[int, int], QuantSpec], int]) -> int:
    """Bytes of a row-mixed site of ``shape``: its order, and each part's rows as
    ``part_bytes(shape, spec)`` counts them."""
    return order_bytes(shape[0]) + sum(
        part_bytes((len(rows), shape[1]), part)
        for part, rows in zip(spec.parts, spec.part_rows(), strict=True))


def in_row_order(parts: Sequence[Mapping[str, np.ndarray]],
                 order: np.ndarray) -> dict[str, np.ndarray]:
    """Arrays the parts all have (``[rows, ...]``), stacked in part order and put in the site's
    row order: row r is stacked row ``order[r]``."""
    names = [name for name in parts[0] if all(name in part for part in parts)]
    return {name: np.concatenate([part[name] for part in parts])[np.asarray(order, np.int64)]
            for name in names}


def split_row_order(arrays: Mapping[str, np.ndarray], order: np.ndarray,
                    rows: Sequence[int]) -> list[dict[str, np.ndarray]]:
    """Inverse of ``in_row_order``: each part's rows of arrays in row order, the parts holding
    ``rows[k]`` rows each."""
    edges = np.cumsum(rows)[:-1]
    parts: list[dict[str, np.ndarray]] = [{} for _ in rows]
    for name, array in arrays.items():
        stacked = np.empty_like(array)
        stacked[np.asarray(order, np.int64)] = array
        for part, piece in zip(parts, np.split(stacked, edges), strict=True):
            part[name] = piece
    return parts


def prefix(index: int) -> str:
    """The array-name prefix of part ``index``."""
    return f"p{index}."


Array = TypeVar("Array", np.ndarray, torch.Tensor)


def part_arrays(arrays: Mapping[str, Array], index: int) -> dict[str, Array]:
    """Part ``index``'s own arrays from a row-mix's, their prefix removed."""
    return {k.removeprefix(prefix(index)): v for k, v in arrays.items()
            if k.startswith(prefix(index))}


@dataclasses.dataclass(frozen=True, eq=False)
class RowMixWeight(WeightFormat):
    name = "row-mix"
    spec: RowMixSpec
    parts: tuple[WeightFormat, ...]
    order: np.ndarray  # [out], uint16 or int32
    outliers: SparseOutliers | None = None  # always None: the parts hold their own

    def __post_init__(self) -> None:
        widths = {part.shape[1] for part in self.parts}
        if len(widths) != 1 or [p.spec for p in self.parts] != list(self.spec.parts):
            raise PlanError("row-mix parts must match the spec's parts and share their inputs")
        if sorted(np.asarray(self.order, np.int64).tolist()) != list(range(len(self.order))):
            raise PlanError("row-mix order must be a permutation of the output rows")

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.order), self.parts[0].shape[1]

    @classmethod
    def base_bytes(cls, shape: tuple[int, int], spec: RowMixSpec, code_bits: CodeBits) -> int:
        from lwqc.ir.formats import format_class

        return row_mix_bytes(shape, spec, lambda part_shape, part: format_class(
            part).physical_bytes(part_shape, part, code_bits))

    def base_arrays(self) -> dict[str, np.ndarray]:
        arrays = {"order": self.order}
        for index, part in enumerate(self.parts):
            arrays.update({prefix(index) + k: v for k, v in part.arrays().items()})
        return arrays

    @classmethod
    def from_arrays(cls, spec: QuantSpec, arrays: dict[str, np.ndarray]) -> WeightFormat:
        from lwqc.ir.formats import load_weight

        assert isinstance(spec, RowMixSpec)
        parts = tuple(load_weight(part, part_arrays(arrays, i))
                      for i, part in enumerate(spec.parts))
        return cls(spec, parts, arrays["order"].astype(order_dtype(len(arrays["order"]))))

    @classmethod
    def dequantize_tensors(cls, spec: QuantSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        from lwqc.ir.formats import format_class

        assert isinstance(spec, RowMixSpec)
        stacked = torch.cat([format_class(part).dequantize_tensors(part, part_arrays(tensors, i))
                             for i, part in enumerate(spec.parts)])
        return stacked[tensors["order"].to(torch.int64)]

    @staticmethod
    def base_dequantize(spec: QuantSpec, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        return RowMixWeight.dequantize_tensors(spec, tensors)
