"""Weight formats: the arrays a quantized site is stored as. ``FORMATS`` is the one table
from a spec's format name to its class; an unknown format is an error."""

from __future__ import annotations

import numpy as np

from lwqc.ir.errors import PlanError
from lwqc.ir.formats.affine import AffineWeight
from lwqc.ir.formats.base import WeightFormat
from lwqc.ir.formats.codebook import CodebookWeight
from lwqc.ir.formats.float_offset import FloatOffsetWeight
from lwqc.ir.formats.float_offset_dq import FloatOffsetDqWeight
from lwqc.ir.formats.outliers import SparseOutliers
from lwqc.ir.formats.row_mix import RowMixWeight
from lwqc.ir.spec import QuantSpec

__all__ = ["FORMATS", "AffineWeight", "CodebookWeight", "FloatOffsetDqWeight",
           "FloatOffsetWeight", "RowMixWeight", "SparseOutliers", "WeightFormat", "format_class",
           "load_weight"]

FORMATS: dict[str, type[WeightFormat]] = {
    cls.name: cls
    for cls in (AffineWeight, FloatOffsetWeight, FloatOffsetDqWeight, CodebookWeight,
                RowMixWeight)
}


def format_class(spec: QuantSpec) -> type[WeightFormat]:
    """The format a quantized spec is stored in."""
    cls = FORMATS.get(spec.format or "")
    if cls is None:
        raise PlanError(f"scheme {spec.scheme!r} has no weight format (formats: "
                        f"{', '.join(FORMATS)})")
    return cls


def load_weight(spec: QuantSpec, arrays: dict[str, np.ndarray]) -> WeightFormat:
    """A stored weight back from its spec and arrays (``[out, in]`` orientation)."""
    return format_class(spec).from_arrays(spec, arrays)
