"""The quantize pass: compute each planned site's packed weight once.

1. Sites planned at 16 bits are kept float and get no packed weight.
2. Every other site is quantized by its scheme's quantizer (``passes/quantizers.py``) into
   its scheme's weight format, outliers reserved where the spec asks for them.
3. ``clip=mse`` (default) picks each group's range by a least-squares search over shrink
   factors; ``clip=minmax`` uses the group's full range (what ONNX Runtime's quantizer does).
   Codebooks have no range to choose and ignore it.
"""

from __future__ import annotations

from lwqc.ir.graph import Graph
from lwqc.passes.base import Option, Pass, PassContext, PassContractError, PassKind, choice
from lwqc.passes.quantizers import CLIP_MODES, quantize_weight


class QuantizePass(Pass):
    name = "quantize"
    kind = PassKind.TRANSFORM
    requires = ("plan",)
    provides = ("packed",)
    options = {"clip": Option(choice(*CLIP_MODES), "mse", "how each group's range is chosen")}

    def run(self, graph: Graph, context: PassContext) -> None:
        assert graph.plan is not None
        planned = [(s, spec) for s, spec in graph.plan.specs.items() if not spec.kept]
        graph.packed = {
            site_id: quantize_weight(graph.weight(site_id), spec, self.values["clip"])
            for site_id, spec in context.progress(planned, total=len(planned), desc=self.name)
        }

    def ensures(self, graph: Graph) -> None:
        super().ensures(graph)
        assert graph.plan is not None
        expected = {s for s, spec in graph.plan.specs.items() if not spec.kept}
        if set(graph.packed) != expected:
            raise PassContractError(f"pass '{self.name}' did not pack every quantized site")
