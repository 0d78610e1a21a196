"""The frontend of a model argument: an ONNX file, else transformers (HF directory, hub id or
GGUF file)."""

from __future__ import annotations

from lwqc.ir import hf_source, onnx_source
from lwqc.ir.graph import Graph


def import_model(model: str, trust_remote_code: bool = False) -> Graph:
    """Read ``model`` into the IR, its source attached."""
    if onnx_source.is_onnx_file(model):
        return onnx_source.import_onnx(model)
    return hf_source.import_model(model, trust_remote_code)
