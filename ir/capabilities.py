"""Backend capabilities: which formats, widths and group sizes a lowering stores natively, and
what a code of each width costs there. Policies are offered only what the target can run and
charge it at the target's real size; a plan asking for more is refused before any work."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from lwqc.ir.errors import PlanError
from lwqc.ir.formats import format_class
from lwqc.ir.formats.row_mix import row_mix_bytes
from lwqc.ir.spec import QUANT_WIDTHS, GroupSpec, QuantSpec, RowMixSpec


def any_group_size(group_size: int | None) -> bool:
    return True


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """``widths`` per format; ``containers`` maps a code width to the bits it occupies."""

    backend: str
    widths: dict[str, tuple[int, ...]]
    containers: dict[int, int]
    group_size_ok: Callable[[int | None], bool] = any_group_size
    group_size_rule: str = "any group size"
    # bytes of the specs the backend stores in a layout of its own (None: the format's)
    layout_bytes: Callable[[tuple[int, int], QuantSpec], int | None] | None = None

    def same_storage(self, other: Capabilities) -> bool:
        """Whether ``other`` stores the same specs at the same sizes (backend name aside)."""
        return (self.widths, self.containers, self.group_size_rule, self.layout_bytes) == (
            other.widths, other.containers, other.group_size_rule, other.layout_bytes)

    def supports(self, spec: QuantSpec) -> bool:
        if spec.kept:
            return True
        if isinstance(spec, RowMixSpec):
            return all(self.supports(part) for part in spec.parts)
        if spec.bits not in self.widths.get(spec.format or "", ()):
            return False
        return not isinstance(spec, GroupSpec) or self.group_size_ok(spec.group_size)

    def check(self, spec: QuantSpec, where: str) -> None:
        """Raise ``PlanError`` naming ``where`` if the backend cannot store ``spec``."""
        if self.supports(spec):
            return
        stored = ", ".join(f"{f} at {'/'.join(map(str, w))} bits" for f, w in self.widths.items())
        raise PlanError(f"{where}: backend {self.backend} cannot store {spec.label()} "
                        f"(it stores {stored}; {self.group_size_rule})")

    def code_bits(self, bits: int) -> int:
        if bits not in self.containers:
            raise PlanError(f"backend {self.backend} stores no {bits}-bit codes")
        return self.containers[bits]

    def bytes(self, shape: tuple[int, int], spec: QuantSpec, keep_bits: int) -> int:
        """Physical bytes of a weight of ``shape`` under ``spec`` on this backend."""
        if spec.kept:
            return shape[0] * shape[1] * keep_bits // 8
        if isinstance(spec, RowMixSpec):  # each part in its format's arrays (never a kernel's
            # own layout: parts are lowered by their format), and the order
            return row_mix_bytes(shape, spec, lambda part_shape, part: format_class(
                part).physical_bytes(part_shape, part, self.code_bits))
        own = None if self.layout_bytes is None else self.layout_bytes(shape, spec)
        if own is not None:
            return own
        return format_class(spec).physical_bytes(shape, spec, self.code_bits)


# Codes stored at their width: 2/4/8-bit in ONNX's int2/int4/int8 containers, 3- and 6-bit
# codes (6: float-offset-dq's parameter codes) packed eight resp. four to three bytes.
PACKED_STORAGE = Capabilities(
    backend="any",
    widths={name: QUANT_WIDTHS
            for name in ("affine", "float-offset", "float-offset-dq", "codebook")},
    containers={2: 2, 3: 3, 4: 4, 6: 6, 8: 8},
)
