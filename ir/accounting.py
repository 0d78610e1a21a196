"""Size accounting: physical bytes per site and totals of a plan, on the graph's target."""

from __future__ import annotations

import dataclasses
from fractions import Fraction
from typing import Any

from lwqc.ir.graph import Graph
from lwqc.ir.spec import KEEP_BITS, QuantSpec


def site_bytes(graph: Graph, site_id: str, spec: QuantSpec) -> int:
    """Physical bytes of one site under ``spec``: codes, scales, zero points or offsets,
    codebooks and outliers, as the graph's target stores them."""
    return graph.target.bytes(graph.sites[site_id].shape, spec, graph.keep_bits)


@dataclasses.dataclass(frozen=True)
class Totals:
    params: int
    bytes: int
    bytes_float: int
    avg_bits_physical: float
    avg_bits_logical: float
    params_by_bits: dict[int, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "bytes": self.bytes,
            "bytes_float": self.bytes_float,
            "avg_bits_physical": round(self.avg_bits_physical, 6),
            "avg_bits_logical": round(self.avg_bits_logical, 6),
            "params_by_bits": {str(b): n for b, n in sorted(self.params_by_bits.items())},
        }


def totals(graph: Graph, specs: dict[str, QuantSpec]) -> Totals:
    """Size of the quantizable weights under ``specs`` (everything a site stores counted)."""
    params = graph.total_params
    nbytes = sum(site_bytes(graph, s, spec) for s, spec in specs.items())
    by_bits: dict[int, int] = {}
    for s, spec in specs.items():
        for bits, count in spec.params_by_bits(graph.sites[s].shape).items():
            by_bits[bits] = by_bits.get(bits, 0) + count
    logical = sum((graph.keep_bits if bits == KEEP_BITS else bits) * count
                  for bits, count in by_bits.items())
    return Totals(
        params=params,
        bytes=nbytes,
        bytes_float=params * graph.keep_bits // 8,
        avg_bits_physical=float(Fraction(8 * nbytes, params)),
        avg_bits_logical=float(Fraction(logical, params)),
        params_by_bits=by_bits,
    )
