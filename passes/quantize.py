"""The quantize pass: compute each planned site's packed weight once.

1. Sites planned at 16 bits are kept float and get no packed weight.
2. Every other site is quantized by its scheme's quantizer (``passes/quantizers.py``) into
   its scheme's weight format, outliers reserved where the spec asks for them.
3. ``clip`` chooses each group's range: ``minmax`` (default) the full range (what ONNX
   Runtime's quantizer does), ``mse`` the least squared weight error over shrink factors,
   ``output`` the least output error on calibration inputs (needs the ``gram`` analysis).
   Min/max is among every search's candidates. On SmolLM2-135M at 4-bit g128, ``mse`` nearly
   doubles the damage of min/max and ``output`` cuts it (bench/quality-smollm2.md).
   Codebooks have no range to choose and ignore it.
4. ``gptq=true`` quantizes by GPTQ with the calibration inputs' Gram matrices (``damp``,
   ``act_order``), for every scheme.
"""

from __future__ import annotations

from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.passes.base import (
    Option,
    Pass,
    PassContext,
    PassContractError,
    PassKind,
    boolean,
    choice,
)
from lwqc.passes.gptq import GptqSettings
from lwqc.passes.quantizers import CLIP_MODES, quantize_weight


def damping(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:  # also rejects nan
        raise ValueError("a dampening fraction in (0, 1)")
    return value


class QuantizePass(Pass):
    name = "quantize"
    kind = PassKind.TRANSFORM
    requires = ("plan",)
    provides = ("packed",)
    options = {
        "clip": Option(choice(*CLIP_MODES), "minmax", "how each group's range is chosen"),
        "gptq": Option(boolean, None, "GPTQ error feedback from calibration inputs (false)"),
        "damp": Option(damping, None, "GPTQ dampening, share of mean diag H (0.01)"),
        "act_order": Option(boolean, None, "GPTQ: columns by descending H[j, j] (true)"),
    }

    def validate(self) -> None:
        v = self.values
        if not v["gptq"] and (v["damp"] is not None or v["act_order"] is not None):
            raise PipelineError("quantize: damp= and act_order= apply with gptq=true only")

    def required(self) -> tuple[str, ...]:
        if self.values["gptq"] or self.values["clip"] == "output":
            return (*self.requires, "grams")
        return self.requires

    def settings(self) -> GptqSettings | None:
        v = self.values
        if not v["gptq"]:
            return None
        defaults = GptqSettings()
        return GptqSettings(damp=defaults.damp if v["damp"] is None else v["damp"],
                            act_order=defaults.act_order if v["act_order"] is None
                            else v["act_order"])

    def run(self, graph: Graph, context: PassContext) -> None:
        assert graph.plan is not None
        planned = [(s, spec) for s, spec in graph.plan.specs.items() if not spec.kept]
        settings = self.settings()
        graph.packed = {
            site_id: quantize_weight(graph.weight(site_id), spec, self.values["clip"],
                                     graph.grams.get(site_id), settings)
            for site_id, spec in context.progress(planned, total=len(planned), desc=self.name)
        }

    def ensures(self, graph: Graph) -> None:
        super().ensures(graph)
        assert graph.plan is not None
        expected = {s for s, spec in graph.plan.specs.items() if not spec.kept}
        if set(graph.packed) != expected:
            raise PassContractError(f"pass '{self.name}' did not pack every quantized site")
