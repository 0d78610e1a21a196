"""Rewrite a source's float ONNX graph from the plan (what the ONNX lowerings share): each
quantized site's weight becomes MatMulNBits or its format's standard-op lowering
(``backends/onnx_formats.py``); also writing, reading back and running the result.

1. Find each site's MatMul (or Gemm): the node the source names (``lwqc.site``, an ONNX
   file's own graph), else the one whose ``pkg.torch.onnx.name_scopes`` metadata holds the
   site's module path (torch's export); its constant B input is the float weight.
2. Replace the node by MatMulNBits (affine groups it holds; float-offset groups with the
   group-sum correction of ``offset_nbits``; a row-mix of those on one kernel where its parts
   share one, else one kernel per run of parts of one group size, the outputs gathered into row
   order), else B by the lowered weight
   (DequantizeLinear for other affine groups, ...); 2-bit codes raise the opset to 25 (IR
   version 13).
3. Write the site's decision (spec fields, scores) into the nodes' ``metadata_props``.
4. Drop the exporter's debugging metadata (stack traces with local file paths, class
   hierarchies, FX node names): about 0.9 MB on a 6-layer model, and not portable. The module
   path of each node (``name_scopes``) stays.
``read_packed`` inverts step 2: the artifact's own arrays back as weight formats, and fails
on any quantized site the artifact does not hold.
"""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lwqc.backends import matmul_nbits, offset_nbits
from lwqc.backends.onnx_formats import (
    FORMAT_LOWERINGS,
    SPECS_KEY,
    LoweringError,
    SiteRewrite,
    lower_weight,
    replace_node,
    stored_arrays,
)
from lwqc.ir.capabilities import PACKED_STORAGE, Capabilities
from lwqc.ir.errors import LwqcError
from lwqc.ir.formats import AffineWeight, RowMixWeight, WeightFormat, load_weight
from lwqc.ir.formats.row_mix import split_row_order
from lwqc.ir.graph import Graph
from lwqc.ir.onnx_source import SCOPES, SITE_KEY, reads_table, weight_is_transposed
from lwqc.ir.plan_json import SCHEMA
from lwqc.ir.spec import SPECS, GroupSpec, QuantSpec, RowMixSpec, spec_from_json

OPSET_INT2 = 25
IR_VERSION_INT2 = 13  # int2/uint2 tensors arrived with IR version 13 (opset 25)
EXTERNAL_DATA_THRESHOLD = 2 * 1024**3
SPEC_FIELDS = {"scheme", *(name for cls in SPECS.values() for name in cls.field_names())}
_DEBUG_METADATA = ("pkg.torch.onnx.stack_trace", "pkg.torch.onnx.class_hierarchy",
                   "pkg.torch.onnx.fx_node", "namespace")
DEFAULT_ACCURACY_LEVEL = 4
CAPABILITIES = Capabilities(
    backend="onnx",
    widths={name: w for name, w in PACKED_STORAGE.widths.items() if name in FORMAT_LOWERINGS},
    containers=PACKED_STORAGE.containers,
    layout_bytes=matmul_nbits.layout_bytes,
)


def site_matmuls(model: ir.Model, site_ids: list[str]) -> dict[str, ir.Node]:
    """The MatMul/Gemm node of each site whose weight input is a constant."""
    wanted = set(site_ids)
    found: dict[str, ir.Node] = {}
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or node.inputs[1] is None:
            continue
        if node.inputs[1].const_value is None:
            continue
        if SITE_KEY in node.metadata_props:
            hits = wanted.intersection([node.metadata_props[SITE_KEY]])
        elif SCOPES in node.metadata_props:
            hits = wanted.intersection(ast.literal_eval(node.metadata_props[SCOPES]))
        else:
            continue
        if len(hits) == 1:
            site = hits.pop()
            if site in found:
                raise LoweringError(f"site {site} maps to two matmuls in the exported graph")
            found[site] = node
    missing = sorted(wanted - set(found))
    if missing:
        raise LoweringError(f"no matmul with a constant weight found for site {missing[0]}")
    return found


def spec_metadata(spec: QuantSpec) -> dict[str, str]:
    """The spec's fields as ``lwqc.<field>`` strings (None -> "", a list as JSON)."""
    return {f"lwqc.{k}": "" if v is None else json.dumps(v) if isinstance(v, list) else str(v)
            for k, v in spec.to_json().items()}


def _metadata_value(key: str, text: str) -> object:
    if key in ("scheme", "rows"):
        return text
    if text == "":
        return None
    if text.startswith("["):
        return json.loads(text)
    try:
        return int(text)
    except ValueError:
        return float(text)


def spec_from_metadata(meta: dict[str, str]) -> QuantSpec:
    """Inverse of ``spec_metadata``."""
    fields = {k.removeprefix("lwqc."): v for k, v in meta.items()
              if k.removeprefix("lwqc.") in SPEC_FIELDS}
    return spec_from_json({k: _metadata_value(k, v) for k, v in fields.items()})


def decision_metadata(graph: Graph, site_id: str) -> dict[str, str]:
    site, spec = graph.sites[site_id], graph.plan.specs[site_id]
    scores = {k: a.values() for k, a in sorted(site.stats.items())}
    return {
        "lwqc.site": site_id,
        "lwqc.role": site.role,
        "lwqc.block": "" if site.block is None else str(site.block),
        **spec_metadata(spec),
        "lwqc.scores": json.dumps(scores, sort_keys=True),
    }


def lower(graph: Graph, model: ir.Model, accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
          bytes_only: bool = False, capabilities: Capabilities = CAPABILITIES) -> ir.Model:
    """Rewrite the float ONNX ``model`` with the graph's plan and packed weights: MatMulNBits
    where it holds the weight (and GatherBlockQuantized the tied table, if any), MatMulNBits
    with a group-sum correction for float-offset groups, and on codes widened to its 4 or 8
    bits for affine groups of other widths (``offset_nbits``), else the format's
    standard-op lowering feeding the site's MatMul/Gemm, its codes in ``capabilities``'
    containers. ``bytes_only``: standard ops on byte tensors only (``onnx_formats`` step 8),
    for compilers other than ORT."""
    matmuls = site_matmuls(model, list(graph.sites))
    int2_codes = False
    for site_id, node in matmuls.items():
        decision = decision_metadata(graph, site_id)
        node.metadata_props.update(decision)
        weight = graph.packed.get(site_id)
        if weight is None:
            continue
        old = node.inputs[1]
        transposed = weight_is_transposed(node)
        expected = weight.shape[::-1] if transposed else weight.shape
        if old.const_value.numpy().shape != tuple(expected):
            raise LoweringError(f"site {site_id}: exported weight has shape {old.shape}")
        tied = graph.sites[site_id].tied is not None
        if not bytes_only and _nbits_fits(node) and (
                matmul_nbits.gathers(weight) if tied else matmul_nbits.supported(weight)):
            assert isinstance(weight, AffineWeight)
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            new = matmul_nbits.matmul(model.graph, node, site_id, node.inputs[0], [weight],
                                      accuracy_level, bias)
            new.metadata_props.update(decision)
            replace_node(model.graph, node, new.outputs[0])
            rows = functools.partial(matmul_nbits.gather, model.graph, site_id, weight)
        elif not bytes_only and _nbits_fits(node) and offset_nbits.fits(weight):
            rewrite = SiteRewrite(model.graph, site_id, node, False, capabilities.code_bits,
                                  dict(node.metadata_props))
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            output, lookups = offset_nbits.lower(rewrite, [(rewrite, weight)], node.inputs[0],
                                                 accuracy_level, bias)
            replace_node(model.graph, node, output)
            int2_codes |= 2 in weight.spec.code_widths()
            rows = lookups[site_id]
        elif not bytes_only and _nbits_fits(node) and offset_nbits.fits_rows(weight):
            assert isinstance(weight, RowMixWeight)
            rewrite = SiteRewrite(model.graph, site_id, node, False, capabilities.code_bits,
                                  dict(node.metadata_props))
            bias = node.inputs[2] if len(node.inputs) > 2 else None
            output, rows = offset_nbits.lower_rows(rewrite, weight, node.inputs[0],
                                                   accuracy_level, bias)
            replace_node(model.graph, node, output)
            int2_codes |= 2 in weight.spec.code_widths()
        else:
            rewrite = SiteRewrite(model.graph, site_id, node, transposed,
                                  capabilities.code_bits, dict(node.metadata_props),
                                  bytes_only=bytes_only)
            dequantized = lower_weight(rewrite, weight)
            node.replace_input_with(1, dequantized)
            int2_codes |= 2 in weight.spec.code_widths() and not bytes_only
            rows = _dequantized_rows(model.graph, site_id, dequantized, transposed)
        if tied:
            _share_table(model.graph, old, graph.weight(site_id), rows)
        if not old.uses() and old.name in model.graph.initializers:
            model.graph.initializers.pop(old.name)
    for node in model.graph.all_nodes():
        for key in _DEBUG_METADATA:
            node.metadata_props.pop(key, None)
    finish(graph, model, int2_codes)
    return model


def _nbits_fits(node: ir.Node) -> bool:
    """MatMulNBits can take the node's place: a MatMul, or a Gemm that only adds a bias of
    one value per output."""
    if node.op_type == "MatMul":
        return True
    attributes = node.attributes
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return (attributes.get_int("transA", 0) == 0 and attributes.get_float("alpha", 1.0) == 1.0
            and attributes.get_float("beta", 1.0) == 1.0
            and (bias is None or (bias.shape is not None and len(bias.shape) == 1)))


def _dequantized_rows(graph: ir.Graph, site_id: str, table: ir.Value,
                      transposed: bool) -> offset_nbits.RowLookup:
    """The lookup of rows of a dequantized weight (``[in, out]`` when ``transposed``)."""

    def lookup(before: ir.Node, indices: ir.Value) -> ir.Value:
        nodes, rows = [], table
        if transposed:
            nodes.append(ir.node("Transpose", [table], attributes={"perm": [1, 0]},
                                 name=f"{site_id}/table"))
            rows = nodes[-1].outputs[0]
        nodes.append(ir.node("Gather", [rows, indices], attributes={"axis": 0},
                             name=f"{site_id}/Gather"))
        graph.insert_before(before, nodes)
        return nodes[-1].outputs[0]

    return lookup


def _share_table(graph: ir.Graph, old: ir.Value, float_weight: np.ndarray,
                 rows: offset_nbits.RowLookup) -> None:
    """Replace the Gathers that read a tied head's float table by the lookup of ``rows`` of
    the head's quantized weight; drop the float table."""
    for gather in [node for node in graph if node.op_type == "Gather"
                   and reads_table(node, old, float_weight)]:
        table = gather.inputs[0]
        replace_node(graph, gather, rows(gather, gather.inputs[1]))
        producer = table.producer()
        if producer is not None and not table.uses():
            graph.remove(producer, safe=True)
        elif not table.uses() and table.name in graph.initializers:
            graph.initializers.pop(table.name)
        graph.sort()  # the table is now computed after the Gather's old position


def finish(graph: Graph, model: ir.Model, int2_codes: bool) -> None:
    """Raise the opset where int2 tensors are dequantized; record what the model came from;
    leave the initializers' types and shapes to their tensors (no value info repeating
    them)."""
    inputs = set(model.graph.inputs)
    for value in model.graph.initializers.values():
        if value not in inputs:
            value.type, value.shape = None, None
    if int2_codes:
        model.opset_imports[""] = OPSET_INT2
        model.ir_version = max(model.ir_version, IR_VERSION_INT2)
    if any(node.domain == matmul_nbits.DOMAIN for node in model.graph.all_nodes()):
        model.opset_imports.setdefault(matmul_nbits.DOMAIN, 1)
    model.metadata_props.update(
        {"lwqc.schema": SCHEMA, "lwqc.pipeline": graph.pipeline, "lwqc.model": graph.model_id,
         "lwqc.weights_sha256": graph.weights_sha256}
    )


def save(model: ir.Model, path: Path) -> None:
    """Write ``model``; weights go to ``<name>.data`` when the file would pass 2 GB."""
    size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
    external = f"{path.name}.data" if size > EXTERNAL_DATA_THRESHOLD else None
    ir.save(model, path, external_data=external)


def read_packed(path: Path, expected: set[str]) -> dict[str, WeightFormat]:
    """The weights stored in an lwqc ONNX artifact, keyed by site id; every site in
    ``expected`` must be there, quantized."""
    model = ir.load(path)
    initializers = {name: value.const_value.numpy()
                    for name, value in model.graph.initializers.items()}
    packed = {}
    for node in model.graph:
        meta = node.metadata_props
        if node.op_type not in ("MatMul", "Gemm", "MatMulNBits", "Gather") or not (
                {"lwqc.site", "lwqc.sites"} & set(meta)):
            continue  # a Gather carries a decision where it yields a row-mix's output
        specs = _site_specs(meta)
        first = next(iter(specs.values()))
        if first.kept:
            continue
        if (node.op_type == "MatMulNBits" and first.format == "affine"
                and node.inputs[1].is_initializer()):  # else: widened codes, offset_nbits
            packed.update(_read_nbits(node, initializers))
            continue
        transposed = node.op_type in ("MatMul", "Gemm") and weight_is_transposed(node)
        for site_id, spec in specs.items():
            arrays = _stored_site_arrays(initializers, site_id, transposed, spec)
            if arrays:
                packed[site_id] = load_weight(spec, arrays)
    missing = sorted(expected - set(packed))
    if missing:
        raise LwqcError(f"{path} holds no quantized weight for site {missing[0]}: the artifact "
                        "does not match its plan; recompile")
    return packed


def _site_specs(meta: dict[str, str]) -> dict[str, QuantSpec]:
    """The spec of each site whose decision a node carries: one site, or sites sharing a
    kernel (``lwqc.sites``), under one spec or each under its own (``lwqc.specs``)."""
    if "lwqc.site" in meta:
        return {meta["lwqc.site"]: spec_from_metadata(meta)}
    site_ids = json.loads(meta["lwqc.sites"])
    if SPECS_KEY in meta:
        return dict(zip(site_ids, map(spec_from_json, json.loads(meta[SPECS_KEY])),
                        strict=True))
    return dict.fromkeys(site_ids, spec_from_metadata(meta))


def _stored_site_arrays(initializers: dict[str, np.ndarray], site_id: str, transposed: bool,
                        spec: QuantSpec) -> dict[str, np.ndarray]:
    """``stored_arrays`` of a site, codes stored as MatMulNBits' ``B`` unpacked; a row-mix's
    parts under their prefixes, and its order (parameters its parts store jointly, in row
    order or stacked, ``offset_nbits``, split among them)."""
    if not isinstance(spec, RowMixSpec):
        return _part_arrays(initializers, site_id, transposed, spec)
    joined = stored_arrays(initializers, site_id, transposed, signed=False)
    order = joined.pop("order")
    parts = [_part_arrays(initializers, f"{site_id}.p{index}", transposed, part)
             for index, part in enumerate(spec.parts)]
    rows = [len(part_rows) for part_rows in spec.part_rows()]
    for part, shared in zip(parts, split_row_order(joined, order, rows), strict=True):
        part.update(shared)
    for run in offset_nbits.joint_parts(list(spec.parts)):
        stacked = stored_arrays(initializers, f"{site_id}.p{run[0]}+{len(run) - 1}",
                                transposed, signed=False)
        run_rows = [rows[i] for i in run]
        for i, shared in zip(run, split_row_order(stacked, np.arange(sum(run_rows)), run_rows),
                             strict=True):
            parts[i].update(shared)
    arrays = {"order": order}
    for index, stored in enumerate(parts):
        arrays.update({f"p{index}.{key}": value for key, value in stored.items()})
    return arrays


def _part_arrays(initializers: dict[str, np.ndarray], site_id: str, transposed: bool,
                 spec: QuantSpec) -> dict[str, np.ndarray]:
    arrays = stored_arrays(initializers, site_id, transposed, spec.scheme == "rtn-sym")
    if arrays and arrays["codes"].ndim == 3:  # float-offset codes stored as MatMulNBits' B
        assert isinstance(spec, GroupSpec) and spec.group_size is not None
        blocks = arrays["codes"].shape[1]
        arrays["codes"] = offset_nbits.read_codes(arrays["codes"], offset_nbits.container(
            spec.bits), blocks * spec.group_size)
    return arrays


def _read_nbits(node: ir.Node, initializers: dict[str, np.ndarray]) -> dict[str, WeightFormat]:
    """The sites of a MatMulNBits node (several when fused sites share its spec)."""
    meta = node.metadata_props
    spec = spec_from_metadata(meta)
    assert isinstance(spec, GroupSpec)
    stored = {key: initializers[value.name]
              for key, value in zip(matmul_nbits.ARRAYS, node.inputs[1:], strict=False)
              if value is not None}
    arrays = matmul_nbits.unpack(spec, stored, node.attributes.get_int("K"))
    if "lwqc.site" in meta:
        return {meta["lwqc.site"]: load_weight(spec, arrays)}
    site_ids, rows = json.loads(meta["lwqc.sites"]), json.loads(meta["lwqc.rows"])
    edges = np.cumsum(rows)[:-1]
    parts = {key: np.split(array, edges) for key, array in arrays.items()}
    return {site_id: load_weight(spec, {key: parts[key][i] for key in parts})
            for i, site_id in enumerate(site_ids)}


def session(path: Path, accuracy_level: int = 1, threads: int | None = None):
    """An ORT CPU session that computes what the artifact says.

    ORT's default optimizer fuses ``DequantizeLinear -> MatMul`` into ``MatMulNBits`` at
    accuracy level 4, which quantizes activations to int8; level 1 keeps float32 compute
    (same speed on CPU here) so the session matches the plan's numerics.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if threads is not None:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
