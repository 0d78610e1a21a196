"""Lower a causal LM to the decoder ONNX Runtime GenAI runs: a KV cache, GroupQueryAttention,
MatMulNBits, and the embedding reading a tied head's quantized table.

1. The GenAI model builder (``onnxruntime_genai.models.builder``, fp32, CPU) writes the float
   decoder of the source's transformers directory, with ``genai_config.json`` and the
   tokenizer files; they become the artifact's.
2. Each site's weight is found in the decoder by value: the builder stores ``W^T`` as a
   MatMul's B and fuses sites reading one input (q/k/v) into one MatMul whose columns are the
   sites' rows in order. A MatMul holding anything but whole sites is an error.
3. Each MatMul is rewritten from the plan: ``MatMulNBits`` where the format fits
   (``matmul_nbits.supported``; fused sites sharing one such spec stay one node), float-offset
   groups as MatMulNBits plus a group-sum correction, affine groups of other widths on codes
   widened to 4 or 8 bits (``offset_nbits``; fused sites of one ``kernel_key`` stay one node,
   whatever their widths, row-mixes of such parts included; another row-mix one kernel per run
   of parts of one ``kernel_key``, the outputs gathered into row order), else the format's
   standard-op lowering (``onnx_formats``) feeding a MatMul; fused sites not sharing one
   MatMulNBits become one node per site and a Concat.
4. The embedding Gather of a tied head reads the same arrays: ``GatherBlockQuantized`` on
   MatMulNBits' B (affine 4 and 8 bits), else a Gather on the float weight the site's
   arrays compute.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx_ir as ir

from lwqc.backends import matmul_nbits, offset_nbits
from lwqc.backends.onnx_formats import (
    SPECS_KEY,
    LoweringError,
    SiteRewrite,
    add_initializer,
    lower_weight,
    replace_node,
)
from lwqc.ir.capabilities import PACKED_STORAGE
from lwqc.ir.errors import ModelLoadError
from lwqc.ir.formats import AffineWeight, RowMixWeight, WeightFormat
from lwqc.ir.graph import Graph
from lwqc.ir.spec import RowMixSpec

# Architectures whose builder output lwqc has checked against the float model.
ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")
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
    done = subprocess.run(command, capture_output=True, text=True, timeout=BUILDER_TIMEOUT_S,
                          check=False)
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
        # site -> the lookup of its rows (sites whose table GatherBlockQuantized reads not
        # from MatMulNBits' own arrays)
        self.tables: dict[str, offset_nbits.RowLookup] = {}
        self.int2_dequantized = False  # int2 codes (read by any op) need opset 25

    def run(self) -> None:
        for node, site_ids in locate_sites(self.model, self.graph).items():
            self._rewrite(node, site_ids)
        unused = [name for name, value in self.model.graph.initializers.items()
                  if not value.uses()]
        for name in unused:
            self.model.graph.initializers.pop(name)
        self.model.graph.sort()  # tied tables are computed after the embedding's old place

    def _rewrite(self, node: ir.Node, site_ids: list[str]) -> None:
        """Replace ``node`` by the lowering of its sites."""
        packed = [self.graph.packed.get(s) for s in site_ids]
        weight_b = node.inputs[1]
        if len(site_ids) == 1 or self._shares_nbits(site_ids, packed):
            output = self._lower(node, site_ids, packed)
        else:
            starts = np.cumsum([0] + [self.graph.sites[s].shape[0] for s in site_ids])
            parts = [self._lower(node, [s], [w], int(start))
                     for s, w, start in zip(site_ids, packed, starts, strict=False)]
            concat = ir.node("Concat", parts, attributes={"axis": -1}, name=f"{node.name}/Concat")
            self.model.graph.insert_before(node, concat)
            output = concat.outputs[0]
        replace_node(self.model.graph, node, output)
        site = self.graph.sites[site_ids[0]]
        if len(site_ids) == 1 and site.tied is not None and packed[0] is not None:
            self._share_embedding(weight_b, site.id, packed[0])

    def _nbits_holds(self, site_id: str, weight: WeightFormat | None) -> bool:
        """MatMulNBits holds the weight, and GatherBlockQuantized its tied table, if any."""
        if weight is None:
            return False
        if self.graph.sites[site_id].tied is not None:
            return matmul_nbits.gathers(weight)
        return matmul_nbits.supported(weight)

    def _shares_nbits(self, site_ids: list[str], packed: list[WeightFormat | None]) -> bool:
        """The sites can share one MatMulNBits: one affine spec it holds, or weights (plain or
        row-mixed) of one ``offset_nbits.kernel_key``."""
        first = packed[0]
        if first is None or any(w is None for w in packed):
            return False
        if self._nbits_holds(site_ids[0], first):
            return all(w.spec == first.spec and self._nbits_holds(s, w)
                       for s, w in zip(site_ids, packed, strict=True))
        return all(offset_nbits.fits(w) and offset_nbits.kernel_key(w)
                   == offset_nbits.kernel_key(first) for w in packed)

    def _lower(self, node: ir.Node, site_ids: list[str], packed: list[WeightFormat | None],
               start: int = 0) -> ir.Value:
        """One node computing the sites' columns of ``node`` (one site, or several sharing
        one MatMulNBits spec)."""
        weight, name, activation = packed[0], "+".join(site_ids), node.inputs[0]
        if weight is None:  # kept float: this site's columns of the builder's weight
            rows = self.graph.sites[name].shape[0]
            columns = node.inputs[1].const_value.numpy()[:, start:start + rows]
            value = add_initializer(self.model.graph, f"{name}.weight",
                                    np.ascontiguousarray(columns))
            new = ir.node("MatMul", [activation, value], name=f"{name}/MatMul")
            self.model.graph.insert_before(node, new)
        elif self._nbits_holds(site_ids[0], weight):
            weights = [w for w in packed if isinstance(w, AffineWeight)]
            new = matmul_nbits.matmul(self.model.graph, node, name, activation, weights,
                                      self.accuracy_level)
        elif offset_nbits.fits(weight):
            sites = [(SiteRewrite(self.model.graph, s, node, False, PACKED_STORAGE.code_bits,
                                  self.metadata[s]), w) for s, w in zip(site_ids, packed,
                                                                         strict=True)]
            shared = sites[0][0] if len(sites) == 1 else SiteRewrite(
                self.model.graph, name, node, False, PACKED_STORAGE.code_bits,
                self._decision(site_ids))
            self.int2_dequantized |= any(2 in w.spec.code_widths() for _, w in sites)
            output, lookups = offset_nbits.lower(shared, sites, activation,
                                                 self.accuracy_level)
            self.tables.update(lookups)
            return output
        elif offset_nbits.fits_rows(weight):
            assert isinstance(weight, RowMixWeight)
            rewrite = SiteRewrite(self.model.graph, name, node, False, PACKED_STORAGE.code_bits,
                                  self.metadata[name])
            self.int2_dequantized |= 2 in weight.spec.code_widths()
            output, self.tables[name] = offset_nbits.lower_rows(rewrite, weight, activation,
                                                                self.accuracy_level)
            return output
        else:
            rewrite = SiteRewrite(self.model.graph, name, node, True, PACKED_STORAGE.code_bits,
                                  self.metadata[name])
            self.int2_dequantized |= 2 in weight.spec.code_widths()
            dequantized = lower_weight(rewrite, weight)
            table = functools.cache(functools.partial(self._transposed, name, dequantized))
            self.tables[name] = functools.partial(self._rows, name, table)
            new = ir.node("MatMul", [activation, dequantized], name=f"{name}/MatMul")
            self.model.graph.insert_before(node, new)
        new.metadata_props.update(self._decision(site_ids))
        return new.outputs[0]

    def _transposed(self, name: str, dequantized: ir.Value) -> ir.Value:
        """The ``[out, in]`` table of a weight lowered as B (``[in, out]``)."""
        table = ir.node("Transpose", [dequantized], attributes={"perm": [1, 0]},
                        name=f"{name}/table")
        self.model.graph.insert_after(dequantized.producer(), table)
        return table.outputs[0]

    def _rows(self, name: str, table: Callable[[], ir.Value], before: ir.Node,
              indices: ir.Value) -> ir.Value:
        """Rows ``indices`` of a dequantized ``table()``, read by a Gather before ``before``."""
        rows = ir.node("Gather", [table(), indices], attributes={"axis": 0},
                       name=f"{name}/Gather")
        self.model.graph.insert_before(before, rows)
        return rows.outputs[0]

    def _decision(self, site_ids: list[str]) -> dict[str, str]:
        """The decision metadata of one site, or of sites sharing a kernel: their spec, or
        where their specs differ (or a row-mix's rows would be ambiguous) each site's
        (``SPECS_KEY``)."""
        first = self.metadata[site_ids[0]]
        if len(site_ids) == 1:
            return first
        specs = [self.graph.plan.specs[s] for s in site_ids]
        one_spec = all(spec == specs[0] for spec in specs) and not isinstance(specs[0],
                                                                              RowMixSpec)
        shared = {k: v for k, v in first.items()
                  if k not in ("lwqc.site", "lwqc.role", "lwqc.scores")
                  and (one_spec or k.removeprefix("lwqc.") not in specs[0].to_json())}
        if not one_spec:
            shared[SPECS_KEY] = json.dumps([spec.to_json() for spec in specs])
        return {**shared, "lwqc.sites": json.dumps(site_ids),
                "lwqc.rows": json.dumps([self.graph.sites[s].shape[0] for s in site_ids]),
                "lwqc.scores": json.dumps({s: json.loads(self.metadata[s]["lwqc.scores"])
                                           for s in site_ids})}

    def _share_embedding(self, weight_b: ir.Value, site_id: str, weight: WeightFormat) -> None:
        """Point the Gathers that read ``Transpose(B)`` of a tied head at its arrays."""
        for transpose in [u.node for u in weight_b.uses() if u.node.op_type == "Transpose"]:
            for use in list(transpose.outputs[0].uses()):
                gather = use.node
                if gather.op_type != "Gather" or use.idx != 0:
                    continue
                if site_id in self.tables:  # MatMulNBits holds it not as it is
                    value = self.tables[site_id](gather, gather.inputs[1])
                else:
                    assert isinstance(weight, AffineWeight)
                    value = matmul_nbits.gather(self.model.graph, site_id, weight, gather,
                                                gather.inputs[1])
                replace_node(self.model.graph, gather, value)
            if not transpose.outputs[0].uses():
                self.model.graph.remove(transpose, safe=True)


def _materialize(model: ir.Model) -> None:
    """Read every initializer still held in the builder's external data file into memory."""
    for value in model.graph.initializers.values():
        if isinstance(value.const_value, ir.ExternalTensor):
            value.const_value = ir.Tensor(value.const_value.numpy(), name=value.name)


def build_decoder(graph: Graph, accuracy_level: int,
                  metadata: dict[str, dict[str, str]]) -> tuple[ir.Model, dict[str, bytes], bool]:
    """The rewritten decoder, the builder's other files (GenAI config, tokenizer) by name,
    and whether it reads int2 codes (opset 25)."""
    assert graph.source is not None
    with tempfile.TemporaryDirectory(prefix="lwqc-decoder-") as work:
        out = Path(work) / "decoder"
        run_builder(graph.source.transformers_directory(Path(work) / "hf"), out)
        model = ir.load(out / DECODER_FILE)
        rewrite = DecoderRewrite(model, graph, accuracy_level, metadata)
        rewrite.run()
        _materialize(model)
        files = {p.name: p.read_bytes() for p in sorted(out.iterdir())
                 if p.is_file() and not p.name.startswith(DECODER_FILE)}
    return model, files, rewrite.int2_dequantized
