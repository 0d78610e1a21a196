"""Lower a causal LM to the decoder ONNX Runtime GenAI runs: a KV cache, GroupQueryAttention,
MatMulNBits, and the embedding reading a tied head's quantized table.

1. The GenAI model builder (``onnxruntime_genai.models.builder``, fp32, CPU) writes the float
   decoder of the source's transformers directory, with ``genai_config.json`` and the
   tokenizer files; they become the artifact's.
2. Each site's weight is found in the decoder by value: the builder stores ``W^T`` as a
   MatMul's B and fuses sites reading one input (q/k/v) into one MatMul whose columns are the
   sites' rows in order. A MatMul holding anything but whole sites is an error.
3. Each MatMul is rewritten from the plan: ``MatMulNBits`` where the format fits
   (``matmul_nbits.supported``; fused sites sharing one such spec stay one node), else the
   format's standard-op lowering (``onnx_formats``) feeding a MatMul; fused sites with
   different specs become one node per site and a Concat.
4. The embedding Gather of a tied head reads the same arrays: ``GatherBlockQuantized`` on
   MatMulNBits' B (4 and 8 bits), else a Gather on the transposed dequantized weight.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lwqc.backends import matmul_nbits
from lwqc.backends.onnx_formats import LoweringError, SiteRewrite, lower_weight
from lwqc.ir.capabilities import PACKED_STORAGE
from lwqc.ir.errors import ModelLoadError
from lwqc.ir.formats import AffineWeight, WeightFormat
from lwqc.ir.graph import Graph
from lwqc.ir.spec import GroupSpec

# Architectures whose builder output lwqc has checked against the float model.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
MS_DOMAIN = "com.microsoft"
DECODER_FILE = "model.onnx"  # the builder's, and the genai_config.json's, file name
BUILDER_TIMEOUT_S = 3600


def builds(graph: Graph) -> bool:
    """Whether the builder makes this model's decoder: an architecture it knows, and a
    tokenizer (the builder writes the tokenizer's files beside the decoder)."""
    if graph.architecture not in ARCHITECTURES or graph.source is None:
        return False
    try:
        graph.source.tokenizer()
    except ModelLoadError:
        return False
    return True


def run_builder(hf_dir: Path, out: Path) -> None:
    """The builder's float32 CPU decoder of ``hf_dir`` in ``out``."""
    command = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir),
               "-o", str(out), "-p", "fp32", "-e", "cpu", "-c", str(out / "cache")]
    try:
        done = subprocess.run(command, capture_output=True, text=True,
                              timeout=BUILDER_TIMEOUT_S, check=False)
    except FileNotFoundError:  # pragma: no cover - sys.executable always exists
        raise LoweringError("cannot start the ONNX Runtime GenAI model builder") from None
    if done.returncode != 0:
        last = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        if "No module named" in (done.stderr or ""):
            raise LoweringError("the KV-cache decoder needs onnxruntime-genai: "
                                "pip install onnxruntime-genai (or --onnx-graph export)")
        raise LoweringError(f"the ONNX Runtime GenAI model builder failed: {last[0]}")
    shutil.rmtree(out / "cache", ignore_errors=True)


def _constant_matmuls(model: ir.Model) -> list[ir.Node]:
    return [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1] is not None
            and n.inputs[1].const_value is not None]


def locate_sites(model: ir.Model, graph: Graph) -> dict[ir.Node, list[str]]:
    """Each MatMul holding site weights -> its sites in column order (whole columns only)."""
    by_first_row: dict[int, list[str]] = {}
    for site in graph:
        by_first_row.setdefault(hash(graph.weight(site.id)[0].tobytes()), []).append(site.id)
    placed: dict[ir.Node, list[tuple[int, str]]] = {}
    found: set[str] = set()
    for node in _constant_matmuls(model):
        columns = np.ascontiguousarray(node.inputs[1].const_value.numpy().T)
        for start, row in enumerate(columns):
            for site_id in by_first_row.get(hash(row.tobytes()), ()):
                rows = graph.sites[site_id].shape[0]
                if site_id not in found and np.array_equal(columns[start:start + rows],
                                                           graph.weight(site_id)):
                    placed.setdefault(node, []).append((start, site_id))
                    found.add(site_id)
    missing = [s.id for s in graph if s.id not in found]
    if missing:
        raise LoweringError(f"site {missing[0]}: no MatMul of the GenAI decoder holds its "
                            "weight; compile with --onnx-graph export")
    located = {}
    for node, members in placed.items():
        members.sort()
        edge = 0
        for start, site_id in members:
            if start != edge:
                raise LoweringError(f"the decoder's {node.name} holds columns of no site")
            edge += graph.sites[site_id].shape[0]
        if edge != node.inputs[1].const_value.shape[1]:
            raise LoweringError(f"the decoder's {node.name} holds columns of no site")
        located[node] = [site_id for _, site_id in members]
    return located


class DecoderRewrite:
    """Rewrites the builder's decoder from a graph's plan and packed weights."""

    def __init__(self, model: ir.Model, graph: Graph, accuracy_level: int,
                 metadata: dict[str, dict[str, str]]) -> None:
        self.model, self.graph = model, graph
        self.accuracy_level = accuracy_level
        self.metadata = metadata  # site -> its decision metadata
        self.dequantized: dict[str, ir.Value] = {}  # site -> its weight as a float B
        self.int2_dequantized = False  # a DequantizeLinear of int2 codes needs opset 25

    def run(self) -> None:
        for node, site_ids in locate_sites(self.model, self.graph).items():
            self._rewrite(node, site_ids)
        unused = [name for name, value in self.model.graph.initializers.items()
                  if not value.uses()]
        for name in unused:
            self.model.graph.initializers.pop(name)

    def _rewrite(self, node: ir.Node, site_ids: list[str]) -> None:
        """Replace ``node`` by the lowering of its sites."""
        packed = [self.graph.packed.get(s) for s in site_ids]
        weight_b = node.inputs[1]
        if len(site_ids) == 1 or self._shares_nbits(packed):
            output = self._lower(node, site_ids, packed)
        else:
            starts = np.cumsum([0] + [self.graph.sites[s].shape[0] for s in site_ids])
            parts = [self._lower(node, [s], [w], int(start))
                     for s, w, start in zip(site_ids, packed, starts, strict=False)]
            output = self._insert(node, ir.node("Concat", parts, attributes={"axis": -1},
                                                name=f"{node.name}/Concat"))
        self._replace(node, output)
        site = self.graph.sites[site_ids[0]]
        if len(site_ids) == 1 and site.tied is not None and packed[0] is not None:
            self._share_embedding(weight_b, site.id, packed[0])

    @staticmethod
    def _shares_nbits(packed: list[WeightFormat | None]) -> bool:
        first = packed[0]
        return first is not None and all(
            w is not None and w.spec == first.spec and matmul_nbits.supported(w) for w in packed)

    def _lower(self, node: ir.Node, site_ids: list[str], packed: list[WeightFormat | None],
               start: int = 0) -> ir.Value:
        """One node computing the sites' columns of ``node`` (one site, or several sharing
        one MatMulNBits spec)."""
        weight, name, activation = packed[0], "+".join(site_ids), node.inputs[0]
        if weight is None:  # kept float: this site's columns of the builder's weight
            rows = self.graph.sites[name].shape[0]
            columns = node.inputs[1].const_value.numpy()[:, start:start + rows]
            value = self._initializer(f"{name}.weight", np.ascontiguousarray(columns))
            return self._matmul_node("MatMul", [activation, value], node, site_ids)
        if matmul_nbits.supported(weight):
            return self._nbits(node, site_ids, packed)
        rewrite = SiteRewrite(self.model.graph, name, node, True, PACKED_STORAGE.code_bits,
                              self.metadata[name])
        self.int2_dequantized |= weight.spec.bits == 2
        self.dequantized[name] = lower_weight(rewrite, weight)
        return self._matmul_node("MatMul", [activation, self.dequantized[name]], node, site_ids)

    def _nbits(self, node: ir.Node, site_ids: list[str],
               packed: list[WeightFormat | None]) -> ir.Value:
        arrays = [matmul_nbits.pack(w) for w in packed if isinstance(w, AffineWeight)]
        joined = {key: np.concatenate([a[key] for a in arrays]) for key in arrays[0]}
        spec = packed[0].spec if packed[0] is not None else None
        assert isinstance(spec, GroupSpec)
        name = "+".join(site_ids)
        inputs = [node.inputs[0]] + [self._initializer(f"{name}.weight_{key}", joined[key])
                                     for key in matmul_nbits.ARRAYS if key in joined]
        attributes = {"K": int(node.inputs[1].const_value.shape[0]),
                      "N": int(joined["B"].shape[0]), "bits": spec.bits,
                      "block_size": spec.group_size, "accuracy_level": self.accuracy_level}
        return self._matmul_node("MatMulNBits", inputs, node, site_ids, attributes, MS_DOMAIN)

    def _matmul_node(self, op: str, inputs: list[ir.Value], before: ir.Node,
                     site_ids: list[str], attributes: dict | None = None,
                     domain: str = "") -> ir.Value:
        new = ir.node(op, inputs, attributes=attributes or {}, domain=domain,
                      name=f"{'+'.join(site_ids)}/{op}")
        first = self.metadata[site_ids[0]]
        if len(site_ids) == 1:
            new.metadata_props.update(first)
        else:  # one spec, several sites
            new.metadata_props.update({k: v for k, v in first.items()
                                       if k not in ("lwqc.site", "lwqc.role", "lwqc.scores")})
            new.metadata_props["lwqc.sites"] = json.dumps(site_ids)
            new.metadata_props["lwqc.rows"] = json.dumps(
                [self.graph.sites[s].shape[0] for s in site_ids])
            new.metadata_props["lwqc.scores"] = json.dumps(
                {s: json.loads(self.metadata[s]["lwqc.scores"]) for s in site_ids})
        return self._insert(before, new)

    def _insert(self, before: ir.Node, *nodes: ir.Node) -> ir.Value:
        self.model.graph.insert_before(before, list(nodes))
        return nodes[-1].outputs[0]

    def _initializer(self, name: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.Tensor(array, name=name))
        value.type = ir.TensorType(value.const_value.dtype)
        value.shape = ir.Shape(array.shape)
        self.model.graph.register_initializer(value)
        return value

    def _replace(self, node: ir.Node, output: ir.Value) -> None:
        name = node.outputs[0].name
        ir.convenience.replace_all_uses_with(node.outputs[0], output,
                                             replace_graph_outputs=True)
        self.model.graph.remove(node, safe=True)
        output.name = name

    def _share_embedding(self, weight_b: ir.Value, site_id: str, weight: WeightFormat) -> None:
        """Point the Gathers that read ``Transpose(B)`` of a tied head at its arrays."""
        for transpose in [u.node for u in weight_b.uses() if u.node.op_type == "Transpose"]:
            for use in list(transpose.outputs[0].uses()):
                if use.node.op_type == "Gather" and use.idx == 0:
                    self._replace(use.node, self._lookup(use.node, site_id, weight))
            if not transpose.outputs[0].uses():
                self.model.graph.remove(transpose, safe=True)

    def _lookup(self, gather: ir.Node, site_id: str, weight: WeightFormat) -> ir.Value:
        """Rows of the site's weight at the Gather's indices."""
        indices = gather.inputs[1]
        if site_id in self.dequantized:  # no n-bit kernel holds it: gather float rows
            table = ir.node("Transpose", [self.dequantized[site_id]],
                            attributes={"perm": [1, 0]}, name=f"{site_id}/table")
            lookup = ir.node("Gather", [table.outputs[0], indices], attributes={"axis": 0},
                             name=f"{site_id}/Gather")
            return self._insert(gather, table, lookup)
        spec = weight.spec
        assert isinstance(spec, GroupSpec) and spec.group_size is not None
        if spec.bits not in matmul_nbits.GATHER_BITS:
            raise LoweringError(f"site {site_id}: GatherBlockQuantized cannot read "
                                f"{spec.bits}-bit codes for the tied embedding")
        stored = self.model.graph.initializers
        out_features, in_features = weight.shape
        shape = self._initializer(f"{site_id}.lowering_table_shape",
                                  np.asarray([out_features, -1], np.int64))
        table = ir.node("Reshape", [stored[f"{site_id}.weight_B"], shape],
                        name=f"{site_id}/table")
        inputs = [table.outputs[0], indices, stored[f"{site_id}.weight_scales"]]
        if f"{site_id}.weight_zero_points" in stored:
            inputs.append(stored[f"{site_id}.weight_zero_points"])
        lookup = ir.node("GatherBlockQuantized", inputs, domain=MS_DOMAIN,
                         attributes={"bits": spec.bits, "gather_axis": 0, "quantize_axis": 1,
                                     "block_size": spec.group_size},
                         name=f"{site_id}/GatherBlockQuantized")
        value = self._insert(gather, table, lookup)
        if in_features % spec.group_size == 0:
            return value
        bounds = [self._initializer(f"{site_id}.lowering_embedding_{key}",
                                    np.asarray([v], np.int64))
                  for key, v in (("start", 0), ("end", in_features), ("axis", -1))]
        return self._insert(gather, ir.node("Slice", [value, *bounds],
                                            name=f"{site_id}/embedding_columns"))


def _materialize(model: ir.Model) -> None:
    """Read every initializer still held in the builder's external data file into memory."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)


def build_decoder(graph: Graph, accuracy_level: int,
                  metadata: dict[str, dict[str, str]]) -> tuple[ir.Model, dict[str, bytes], bool]:
    """The rewritten decoder, the builder's other files (GenAI config, tokenizer) by name,
    and whether it dequantizes int2 codes with DequantizeLinear (opset 25)."""
    assert graph.source is not None
    with tempfile.TemporaryDirectory(prefix="lwqc-decoder-") as work:
        hf_dir, out = Path(work) / "hf", Path(work) / "decoder"
        graph.source.save_pretrained(hf_dir)
        run_builder(hf_dir, out)
        model = ir.load(out / DECODER_FILE)
        rewrite = DecoderRewrite(model, graph, accuracy_level, metadata)
        rewrite.run()
        _materialize(model)
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir())
                 if p.is_file() and not p.name.startswith(DECODER_FILE)}
    return model, files, rewrite.int2_dequantized
