"""Lower to ONNX Runtime: export the float model, then put DequantizeLinear before each MatMul.

1. Export the traced program with the dynamo exporter (opset 21).
2. Find each site's MatMul (or Gemm) by the module path the exporter records in the node's
   ``pkg.torch.onnx.name_scopes`` metadata; its constant B input is the float weight.
3. Replace B by ``DequantizeLinear(codes, scales, zero points)``, blocked along the input
   dimension: uint8/int8, uint4/int4 (3-bit codes in a 4-bit container), uint2/int2 (opset 25,
   raised only when 2-bit codes are present).
4. Write the site's decision (bits, group, scheme, scores) into the nodes' ``metadata_props``.
5. Drop the exporter's debugging metadata (stack traces with local file paths, class
   hierarchies, FX node names): about 0.9 MB on a 6-layer model, and not portable. The module
   path of each node (``name_scopes``) stays.
``read_packed`` inverts step 3: the artifact's own arrays back as PackedWeights.
"""

from __future__ import annotations

import ast
import json
import logging
import warnings
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx_ir as ir
import torch

from lwqc.ir.errors import LwqcError
from lwqc.ir.graph import Graph
from lwqc.ir.packed import PackedWeight, container_bits
from lwqc.ir.plan import SCHEMA
from lwqc.passes.base import Pass, PassContext, PassKind, register

OPSET = 21
OPSET_INT2 = 25
IR_VERSION_INT2 = 13  # int2/uint2 tensors arrived with IR version 13 (opset 25)
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
_SCOPES = "pkg.torch.onnx.name_scopes"
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy",
                   "pkg.torch.onnx.fx_node", "namespace")
_CODE_TYPES = {
    (8, False): np.uint8, (4, False): ml_dtypes.uint4, (2, False): ml_dtypes.uint2,
    (8, True): np.int8, (4, True): ml_dtypes.int4, (2, True): ml_dtypes.int2,
}


class LoweringError(LwqcError):
    """The exported graph does not have the shape the lowering expects."""


def output_names(module: torch.nn.Module, inputs: dict) -> list[str]:
    with torch.no_grad():
        outputs = module(**inputs)
    return [k for k, v in outputs.items() if torch.is_tensor(v)]


def export_float(source) -> ir.Model:
    """The float model as ONNX (dynamic batch and sequence), from the importer's trace."""
    inputs = source.example_inputs()
    tensors = {k: v for k, v in inputs.items() if torch.is_tensor(v)}
    names = output_names(source.module, inputs)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            source.exported, (), kwargs=tensors, dynamo=True, opset_version=OPSET,
            input_names=list(tensors), output_names=names, verbose=False,
        )
    return program.model


def site_matmuls(model: ir.Model, site_ids: list[str]) -> dict[str, ir.Node]:
    """The MatMul/Gemm node of each site whose weight input is a constant."""
    wanted = set(site_ids)
    found: dict[str, ir.Node] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.inputs[1] is None:
            continue
        if node.inputs[1].const_value is None or _SCOPES not in node.metadata_props:
            continue
        scopes = ast.literal_eval(node.metadata_props[_SCOPES])
        hits = wanted.intersection(scopes)
        if len(hits) == 1:
            site = hits.pop()
            if site in found:
                raise LoweringError(f"site {site} maps to two matmuls in the exported graph")
            found[site] = node
    missing = sorted(wanted - set(found))
    if missing:
        raise LoweringError(f"no matmul with a constant weight found for site {missing[0]}")
    return found


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
    value.type = ir.TensorType(value.const_value.dtype)
    value.shape = ir.Shape(array.shape)
    graph.register_initializer(value)
    return value


def _weight_is_transposed(node: ir.Node) -> bool:
    """Whether B is stored [in, out] (MatMul, Gemm without transB) rather than [out, in]."""
    return not (node.op_type == "Gemm" and node.attributes.get_int("transB", 0))


def _dequantize_node(graph: ir.Graph, site_id: str, packed: PackedWeight, transposed: bool):
    dtype = _CODE_TYPES[(container_bits(packed.bits), packed.signed)]
    orient = (lambda a: np.ascontiguousarray(a.T)) if transposed else np.ascontiguousarray
    inputs = [
        _initializer(graph, f"{site_id}.weight_codes", orient(packed.codes).astype(dtype)),
        _initializer(graph, f"{site_id}.weight_scales", orient(packed.scales)),
    ]
    if packed.zero_points is not None:
        zeros = orient(packed.zero_points).astype(dtype)
        inputs.append(_initializer(graph, f"{site_id}.weight_zero_points", zeros))
    node = ir.node(
        "DequantizeLinear", inputs,
        attributes={"axis": 0 if transposed else 1, "block_size": packed.group_size},
        name=f"{site_id}/DequantizeLinear",
    )
    node.outputs[0].name = f"{site_id}.weight_dequantized"
    node.outputs[0].type = ir.TensorType(ir.DataType.FLOAT)
    node.outputs[0].shape = ir.Shape(inputs[0].shape)
    return node


def _decision_metadata(graph: Graph, site_id: str) -> dict[str, str]:
    site, spec = graph.sites[site_id], graph.plan.specs[site_id]
    scores = {k: a.values() for k, a in sorted(site.stats.items())}
    return {
        "lwqc.site": site_id,
        "lwqc.role": site.role,
        "lwqc.block": "" if site.block is None else str(site.block),
        "lwqc.bits": str(spec.bits),
        "lwqc.group_size": "" if spec.kept else str(spec.group_size),
        "lwqc.scheme": "keep" if spec.kept else spec.scheme,
        "lwqc.scores": json.dumps(scores, sort_keys=True),
    }


def lower(graph: Graph, model: ir.Model) -> ir.Model:
    """Rewrite the float ONNX ``model`` with the graph's plan and packed weights."""
    matmuls = site_matmuls(model, list(graph.sites))
    for site_id, node in matmuls.items():
        node.metadata_props.update(_decision_metadata(graph, site_id))
        packed = graph.packed.get(site_id)
        if packed is None:
            continue
        old = node.inputs[1]
        transposed = _weight_is_transposed(node)
        expected = graph.weight(site_id).T if transposed else graph.weight(site_id)
        if old.const_value.numpy().shape != expected.shape:
            raise LoweringError(f"site {site_id}: exported weight has shape {old.shape}")
        dq = _dequantize_node(model.graph, site_id, packed, transposed)
        dq.metadata_props.update(node.metadata_props)
        model.graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        if not old.uses() and old.name in model.graph.initializers:
            model.graph.initializers.pop(old.name)
    for node in model.graph.all_nodes():
        for key in _DEBUG_METADATA:
            node.metadata_props.pop(key, None)
    if any(p.bits == 2 for p in graph.packed.values()):
        model.opset_imports[""] = OPSET_INT2
        model.ir_version = max(model.ir_version, IR_VERSION_INT2)
    model.metadata_props.update(
        {"lwqc.schema": SCHEMA, "lwqc.pipeline": graph.pipeline, "lwqc.model": graph.model_id,
         "lwqc.weights_sha256": graph.weights_sha256}
    )
    return model


def save(model: ir.Model, path: Path) -> None:
    """Write ``model``; weights go to ``<name>.data`` when the file would pass 2 GB."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    external = f"{path.name}.data" if size > EXTERNAL_DATA_THRESHOLD else None
    ir.save(model, path, external_data=external)


def read_packed(path: Path) -> dict[str, PackedWeight]:
    """The PackedWeights stored in an lwqc ONNX artifact, keyed by site id."""
    model = ir.load(path)
    packed = {}
    for node in model.graph:
        if node.op_type != "DequantizeLinear" or "lwqc.site" not in node.metadata_props:
            continue
        meta = node.metadata_props
        transposed = node.attributes.get_int("axis") == 0
        orient = (lambda a: np.ascontiguousarray(a.T)) if transposed else np.ascontiguousarray
        signed = meta["lwqc.scheme"] == "rtn-sym"
        arrays = [orient(v.const_value.numpy()) for v in node.inputs]
        packed[meta["lwqc.site"]] = PackedWeight(
            bits=int(meta["lwqc.bits"]),
            group_size=node.attributes.get_int("block_size"),
            scheme=meta["lwqc.scheme"],
            codes=arrays[0].astype(np.int8 if signed else np.uint8),
            scales=arrays[1],
            zero_points=None if signed else arrays[2].astype(np.uint8),
        )
    return packed


@register
class LowerOnnxPass(Pass):
    """Export the float model and rewrite every quantized site to DequantizeLinear -> MatMul."""

    name = "lower-onnx"
    kind = PassKind.TRANSFORM
    requires = ("packed",)
    provides = ("lowered.onnx",)

    def run(self, graph: Graph, context: PassContext) -> None:
        graph.lowered["onnx"] = lower(graph, export_float(graph.source))


def session(path: Path, accuracy_level: int = 1):
    """An ORT CPU session that computes what the artifact says.

    ORT's default optimizer fuses ``DequantizeLinear -> MatMul`` into ``MatMulNBits`` at
    accuracy level 4, which quantizes activations to int8; level 1 keeps float32 compute
    (same speed on CPU here) so the session matches the plan's numerics.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
