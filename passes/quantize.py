"""The quantize pass: compute each planned site's PackedWeight once.

1. Sites planned at 16 bits are kept float and get no PackedWeight.
2. Every other site is quantized by round-to-nearest with its spec's width, group and scheme.
"""

from __future__ import annotations

from lwqc.ir.graph import Graph
from lwqc.passes.base import Pass, PassContext, PassKind, register
from lwqc.passes.rtn import quantize_rtn


@register
class QuantizePass(Pass):
    name = "quantize"
    kind = PassKind.TRANSFORM
    requires = ("plan",)
    provides = ("packed",)

    def run(self, graph: Graph, context: PassContext) -> None:
        assert graph.plan is not None
        planned = [(s, spec) for s, spec in graph.plan.specs.items() if not spec.kept]
        graph.packed = {
            site_id: quantize_rtn(graph.weight(site_id), spec.bits, spec.group_size, spec.scheme)
            for site_id, spec in context.progress(planned, total=len(planned), desc=self.name)
        }
