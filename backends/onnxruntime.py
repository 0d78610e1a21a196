"""Lower to ONNX Runtime (``lower-onnx``): for a causal LM the GenAI decoder with a KV cache
(``backends/genai_decoder.py``), else the source's float export, rewritten from the plan
(``backends/onnx_rewrite.py``); an ONNX source that is a GenAI decoder already keeps its
graph and brings its config and tokenizer files."""

from __future__ import annotations

import onnx_ir as ir

from lwqc.backends.genai_decoder import ARCHITECTURES, build_decoder, builds
from lwqc.backends.onnx_formats import LoweringError
from lwqc.backends.onnx_rewrite import (
    CAPABILITIES,
    DEFAULT_ACCURACY_LEVEL,
    decision_metadata,
    finish,
    lower,
)
from lwqc.ir.graph import Graph
from lwqc.ir.source import CAUSAL_LM
from lwqc.passes.base import Option, Pass, PassContext, PassKind, choice

GRAPHS = ("auto", "kv-cache", "export")
ACCURACY_LEVELS = (1, 2, 3, 4)
SIDE_FILES_KEY = "onnx.files"  # graph.lowered key: the decoder's config and tokenizer files


def lower_decoder(graph: Graph, accuracy_level: int) -> tuple[ir.Model, dict[str, bytes]]:
    """The GenAI decoder (KV cache) rewritten from the plan, and its config and tokenizer
    files."""
    metadata = {site_id: decision_metadata(graph, site_id) for site_id in graph.sites}
    model, files, int2_codes = build_decoder(graph, accuracy_level, metadata)
    finish(graph, model, int2_codes)
    return model, files


def parse_accuracy_level(text: str) -> int:
    value = int(text)
    if value not in ACCURACY_LEVELS:
        raise ValueError("an accuracy level 1 (fp32), 2 (fp16), 3 (bf16) or 4 (int8)")
    return value


class LowerOnnxPass(Pass):
    """Write the ONNX model: for a causal LM the GenAI decoder with a KV cache (``graph=auto``
    when the builder knows the architecture, ``kv-cache`` to insist), else the source's float
    export; every quantized site's weight from its format."""

    name = "lower-onnx"
    kind = PassKind.TRANSFORM
    requires = ("packed",)
    provides = ("lowered.onnx",)
    capabilities = CAPABILITIES
    options = {
        "graph": Option(choice(*GRAPHS), "auto",
                        "causal LMs: kv-cache (the GenAI decoder) or export (no cache)"),
        "accuracy_level": Option(parse_accuracy_level, DEFAULT_ACCURACY_LEVEL,
                                 "MatMulNBits compute: 1 fp32 ... 4 int8 activations"),
    }

    def _decoder(self, graph: Graph) -> bool:
        wanted = self.values["graph"]
        if wanted == "export":
            return False
        fits = graph.source is not None and graph.source.kind == CAUSAL_LM and builds(graph)
        if wanted == "kv-cache" and not fits:
            raise LoweringError(f"no KV-cache decoder for {graph.architecture} (it needs one of "
                                f"{', '.join(ARCHITECTURES)} with a tokenizer); use graph=export")
        return fits

    def run(self, graph: Graph, context: PassContext) -> None:
        files = graph.source.decoder_files()
        if files:  # the source's own graph is a KV-cache decoder
            graph.lowered["onnx"] = lower(graph, graph.source.float_onnx(),
                                          self.values["accuracy_level"])
            graph.lowered[SIDE_FILES_KEY] = files
        elif self._decoder(graph):
            model, files = lower_decoder(graph, self.values["accuracy_level"])
            graph.lowered["onnx"] = model
            graph.lowered[SIDE_FILES_KEY] = files
        else:
            graph.lowered["onnx"] = lower(graph, graph.source.float_onnx(),
                                          self.values["accuracy_level"])
