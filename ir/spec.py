"""QuantSpec: what a policy decides for one site, one typed class per scheme.

A spec carries the fields its scheme has and no others; ``SPECS`` maps every scheme name to
its class and is the one list of schemes (and ``WIDTHS`` the one list of widths) in lwqc.
1. ``keep``: the weight stays float (``bits`` 16).
2. ``rtn-asym`` / ``rtn-sym``: affine groups with integer zero points (asym) or none (sym);
   ``group_size`` along the input dimension, ``None`` = one group per output row.
3. ``float-offset``: affine groups with a float scale and a float offset per group (GGUF Q4_1,
   HQQ); same group fields. ``float-offset-dq``: the same groups with their scales and offsets
   quantized in turn (double quantization, the parameter layout of llama.cpp's K-quants):
   6-bit codes against two float16 steps shared by a super-group of about 8 groups.
4. ``codebook``: one codebook of 2^bits float centroids per input column (CLAQ's K-means).
5. ``row-mix``: the output rows split among several group specs (``parts``), ``rows`` naming
   each row's part; every output row is computed from its own row of weights alone, so each
   part is an exact sub-matrix of the site (row-level mixed precision).
Every quantized spec may reserve a fraction ``outliers`` of its weights, stored sparsely in
full precision and added to the dequantized base (0 = none).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

import numpy as np

from lwqc.ir.errors import PlanError

KEEP_BITS = 16
QUANT_WIDTHS = (2, 3, 4, 8)
WIDTHS = (*QUANT_WIDTHS, KEEP_BITS)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """Base of all specs: ``scheme`` names it, ``format`` the weight format it produces."""

    scheme: ClassVar[str] = ""
    format: ClassVar[str | None] = None
    bits: int

    @property
    def kept(self) -> bool:
        return self.bits == KEEP_BITS

    def label(self) -> str:
        return "keep"

    def params_by_bits(self, shape: tuple[int, int]) -> dict[int, int]:
        """Weights of a site of ``shape`` at each width."""
        return {self.bits: shape[0] * shape[1]}

    def code_widths(self) -> frozenset[int]:
        """The widths of the codes the spec stores."""
        return frozenset((self.bits,))

    def to_json(self) -> dict[str, Any]:
        """The spec as plan.json writes it: ``bits``, the scheme's own fields, ``scheme``."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {**fields, "scheme": self.scheme}

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))


@dataclasses.dataclass(frozen=True)
class KeepSpec(QuantSpec):
    """The weight stays in the model's float type."""

    scheme: ClassVar[str] = "keep"
    bits: int = KEEP_BITS

    def __post_init__(self) -> None:
        if self.bits != KEEP_BITS:
            raise PlanError(f"keep means {KEEP_BITS} bits, got {self.bits}")

    def to_json(self) -> dict[str, Any]:
        return {"bits": KEEP_BITS, "group_size": None, "scheme": "keep"}


@dataclasses.dataclass(frozen=True)
class _Quantized(QuantSpec):
    """Checks shared by quantized specs; each subclass declares ``outliers: float = 0.0``."""

    def __post_init__(self) -> None:
        if self.bits not in QUANT_WIDTHS:
            raise PlanError(f"unsupported width {self.bits}: choose one of {QUANT_WIDTHS} or 16")
        if not (isinstance(self.outliers, (int, float)) and 0 <= self.outliers < 0.5):
            raise PlanError(f"outlier fraction must lie in [0, 0.5), got {self.outliers!r}")

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if not self.outliers:
            del data["outliers"]  # absent = none: plans without outliers read as before
        return data

    def _outlier_label(self) -> str:
        return f" o{self.outliers:g}" if self.outliers else ""


@dataclasses.dataclass(frozen=True)
class GroupSpec(_Quantized):
    """Groups of ``group_size`` inputs (None = the whole row) sharing a scale."""

    group_size: int | None = 128
    outliers: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size is not None and (not _is_int(self.group_size) or self.group_size < 1):
            raise PlanError(f"group size must be a positive integer, got {self.group_size!r}")

    def groups(self, in_features: int) -> int:
        """Number of groups along the input dimension (the last one may be short)."""
        return 1 if self.group_size is None else math.ceil(in_features / self.group_size)

    def block(self, in_features: int) -> int:
        """Inputs per group: the group size, or the whole row."""
        return in_features if self.group_size is None else self.group_size

    def label(self) -> str:
        group = "row" if self.group_size is None else self.group_size
        return f"w{self.bits}g{group} {self.scheme}{self._outlier_label()}"



@dataclasses.dataclass(frozen=True)
class AsymmetricSpec(GroupSpec):
    """Unsigned codes with an integer zero point per group (ONNX DequantizeLinear)."""

    scheme: ClassVar[str] = "rtn-asym"
    format: ClassVar[str] = "affine"


@dataclasses.dataclass(frozen=True)
class SymmetricSpec(GroupSpec):
    """Signed codes, no zero point."""

    scheme: ClassVar[str] = "rtn-sym"
    format: ClassVar[str] = "affine"


@dataclasses.dataclass(frozen=True)
class FloatOffsetSpec(GroupSpec):
    """Unsigned codes with a float scale and float offset per group: w = scale * q + offset."""

    scheme: ClassVar[str] = "float-offset"
    format: ClassVar[str] = "float-offset"


@dataclasses.dataclass(frozen=True)
class FloatOffsetDqSpec(GroupSpec):
    """Float-offset groups whose scales and offsets are stored as codes of a coarser grid (see
    ``ir/formats/float_offset_dq.py``); needs a group size (super-groups are runs of groups)."""

    scheme: ClassVar[str] = "float-offset-dq"
    format: ClassVar[str] = "float-offset-dq"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.group_size is None:
            raise PlanError("float-offset-dq needs a group size (its parameters are quantized "
                            "over runs of groups)")


@dataclasses.dataclass(frozen=True)
class CodebookSpec(_Quantized):
    """A codebook of 2^bits float centroids per input column; with ``high_share`` > 0, that
    share of the columns (those holding the most outliers) gets 2^high_bits centroids
    (CLAQ's outlier-guided adaptive precision)."""

    scheme: ClassVar[str] = "codebook"
    format: ClassVar[str] = "codebook"
    outliers: float = 0.0
    high_bits: int | None = None
    high_share: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        share = self.high_share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise PlanError(f"high_share must lie in [0, 1), got {share!r}")
        if share and (self.high_bits not in QUANT_WIDTHS or self.high_bits <= self.bits):
            raise PlanError(f"high_bits must be a width above bits={self.bits}, got "
                            f"{self.high_bits!r}")
        if not share and self.high_bits is not None:
            raise PlanError("high_bits needs high_share > 0")

    def high_count(self, in_features: int) -> int:
        """Columns at ``high_bits`` in a site of ``in_features`` inputs (nearest integer)."""
        return math.floor(self.high_share * in_features + 0.5)

    def to_json(self) -> dict[str, Any]:
        data = super().to_json()
        if not self.high_share:
            del data["high_bits"], data["high_share"]
        return data

    def label(self) -> str:
        high = f" {self.high_share:g}@{self.high_bits}" if self.high_share else ""
        return f"w{self.bits} codebook{high}{self._outlier_label()}"


ROW_PART_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"  # a row's part, one character


@dataclasses.dataclass(frozen=True)
class RowMixSpec(QuantSpec):
    """Output rows split among ``parts`` (quantized group specs, each used by some row):
    ``rows[r]`` is the digit (``ROW_PART_DIGITS``) of row r's part. ``bits`` is the widest
    part's width. Quantizing and storing each part is that of its rows as a sub-matrix."""

    scheme: ClassVar[str] = "row-mix"
    format: ClassVar[str] = "row-mix"
    bits: int = 0
    parts: tuple[GroupSpec, ...] = ()
    rows: str = ""
    outliers: float = 0.0  # the parts reserve their own

    def __post_init__(self) -> None:
        if not self.parts or len(self.parts) > len(ROW_PART_DIGITS):
            raise PlanError(f"row-mix needs 1 to {len(ROW_PART_DIGITS)} parts, got "
                            f"{len(self.parts)}")
        if not all(isinstance(p, GroupSpec) for p in self.parts):
            raise PlanError("row-mix parts must be quantized group specs (rtn-asym, rtn-sym, "
                            "float-offset, float-offset-dq)")
        if len(set(self.parts)) != len(self.parts):
            raise PlanError("row-mix parts must differ from one another")
        if self.bits != max(p.bits for p in self.parts):
            raise PlanError(f"row-mix bits must be its widest part's, "
                            f"{max(p.bits for p in self.parts)}, got {self.bits!r}")
        if self.outliers:
            raise PlanError("row-mix reserves no outliers of its own (its parts may)")
        digits = ROW_PART_DIGITS[: len(self.parts)]
        if not isinstance(self.rows, str) or not self.rows or set(self.rows) - set(digits):
            raise PlanError(f"row-mix rows must be a string of part digits ({digits}), one per "
                            "output row")
        if set(self.rows) != set(digits):
            raise PlanError("every row-mix part must hold at least one row")

    def part_rows(self) -> list[np.ndarray]:
        """The output rows of each part, ascending."""
        codes = np.frombuffer(self.rows.encode(), np.uint8)
        return [np.flatnonzero(codes == ord(digit))
                for digit in ROW_PART_DIGITS[: len(self.parts)]]

    def params_by_bits(self, shape: tuple[int, int]) -> dict[int, int]:
        counts: dict[int, int] = {}
        for part, rows in zip(self.parts, self.part_rows(), strict=True):
            counts[part.bits] = counts.get(part.bits, 0) + len(rows) * shape[1]
        return counts

    def code_widths(self) -> frozenset[int]:
        return frozenset(p.bits for p in self.parts)

    def to_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "parts": [p.to_json() for p in self.parts],
                "rows": self.rows, "scheme": self.scheme}

    def label(self) -> str:
        """The parts by share of rows, e.g. ``rows: 70% w3g128 + 30% w4g32 float-offset-dq``
        (the scheme once where the parts share it)."""
        shares = [len(rows) / len(self.rows) for rows in self.part_rows()]
        ordered = sorted(zip(shares, self.parts, strict=True), key=lambda x: -x[0])
        schemes = {part.scheme for part in self.parts}
        if len(schemes) == 1 and not any(part.outliers for part in self.parts):
            mixed = " + ".join(f"{share:.0%} {part.label().split()[0]}"
                               for share, part in ordered)
            return f"rows: {mixed} {schemes.pop()}"
        return "rows: " + " + ".join(f"{share:.0%} {part.label()}" for share, part in ordered)


def row_mix(specs: list[GroupSpec], choice: np.ndarray) -> QuantSpec:
    """The spec of a site whose row r takes ``specs[choice[r]]``: that spec if every row takes
    it, else a row-mix of the specs used (in the order given)."""
    used = sorted(set(choice.tolist()))
    if len(used) == 1:
        return specs[used[0]]
    digit = {index: ROW_PART_DIGITS[i] for i, index in enumerate(used)}
    parts = tuple(specs[i] for i in used)
    return RowMixSpec(bits=max(p.bits for p in parts), parts=parts,
                      rows="".join(digit[i] for i in choice.tolist()))


SPECS: dict[str, type[QuantSpec]] = {
    cls.scheme: cls
    for cls in (KeepSpec, AsymmetricSpec, SymmetricSpec, FloatOffsetSpec, FloatOffsetDqSpec,
                CodebookSpec, RowMixSpec)
}
# the schemes a policy plans with (a row-mix is made of them)
SCHEMES = tuple(name for name, cls in SPECS.items() if cls not in (KeepSpec, RowMixSpec))


def make_spec(bits: int, scheme: str = "rtn-asym", **fields: Any) -> QuantSpec:
    """The spec of ``scheme`` at ``bits``; fields the scheme does not have are ignored, so one
    set of budget options serves every scheme. 16 bits is always ``keep``."""
    if bits == KEEP_BITS:
        return KeepSpec()
    cls = SPECS.get(scheme)
    if cls is None or cls is KeepSpec:
        raise PlanError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    names = cls.field_names()
    return cls(bits=bits, **{k: v for k, v in fields.items() if k in names})


def spec_from_json(data: Any) -> QuantSpec:
    """A spec as plan.json writes it; any defect is a ``PlanError``."""
    if not isinstance(data, dict):
        raise PlanError("a site entry must be an object with bits, scheme and the scheme's fields")
    bits = data.get("bits")
    if not _is_int(bits):
        raise PlanError(f"bits must be an integer, got {bits!r}")
    if bits == KEEP_BITS:
        return KeepSpec()
    scheme = data.get("scheme")
    cls = SPECS.get(scheme) if isinstance(scheme, str) else None
    if cls is None or cls is KeepSpec:
        raise PlanError(f"unknown scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
    if cls is RowMixSpec:
        return _row_mix_from_json(data)
    fields = {}
    for name in cls.field_names():
        if name == "group_size":
            if name not in data:
                raise PlanError(f"scheme {scheme} needs group_size (an integer, or null)")
            if data[name] is not None and not _is_int(data[name]):
                raise PlanError(f"group_size must be an integer or null, got {data[name]!r}")
        if name in ("outliers", "high_share") and name in data and (
            isinstance(data[name], bool) or not isinstance(data[name], (int, float))
        ):
            raise PlanError(f"{name} must be a number, got {data[name]!r}")
        if name == "high_bits" and data.get(name) is not None and not _is_int(data[name]):
            raise PlanError(f"high_bits must be an integer, got {data[name]!r}")
        if name in data:
            fields[name] = data[name]
    return cls(**fields)


def _row_mix_from_json(data: dict[str, Any]) -> RowMixSpec:
    parts = data.get("parts")
    if not isinstance(parts, list):
        raise PlanError("row-mix needs parts: a list of specs")
    return RowMixSpec(bits=data["bits"], parts=tuple(spec_from_json(part) for part in parts),
                      rows=data.get("rows"))
