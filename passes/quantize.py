"""The quantize pass: compute each planned site's PackedWeight once.

1. Sites planned at 16 bits are kept float and get no PackedWeight.
2. Every other site is quantized by round-to-nearest with its spec's width, group and scheme.
3. ``clip=mse`` (default) picks each group's range by a least-squares search over shrink
   factors; ``clip=minmax`` uses the group's full range (what ONNX Runtime's quantizer does).
"""

from __future__ import annotations

from lwqc.ir.graph import Graph
from lwqc.passes.base import Option, Pass, PassContext, PassKind, choice, register
from lwqc.passes.rtn import quantize_rtn


@register
class QuantizePass(Pass):
    name = "quantize"
    kind = PassKind.TRANSFORM
    requires = ("plan",)
    provides = ("packed",)
    options = {"clip": Option(choice("mse", "minmax"), "mse", "how each group's range is chosen")}

    def run(self, graph: Graph, context: PassContext) -> None:
        assert graph.plan is not None
        planned = [(s, spec) for s, spec in graph.plan.specs.items() if not spec.kept]
        search = self.values["clip"] == "mse"
        graph.packed = {
            site_id: quantize_rtn(graph.weight(site_id), spec.bits, spec.group_size, spec.scheme,
                                  clip_search=search)
            for site_id, spec in context.progress(planned, total=len(planned), desc=self.name)
        }
