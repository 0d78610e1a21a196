"""The ModelSource of an ONNX file: ``lwqc compile model.onnx`` (external data too).

1. Sites are the MatMul nodes, and the Gemm nodes without ``transA`` or ``alpha``, whose
   weight is a float32 2-D initializer (a ``Transpose`` of one is folded first). A site's id
   is the module path the torch exporter recorded (``pkg.torch.onnx.name_scopes``), else the
   node's name read as a path (``/model/layers.0/attn/qkv_proj/MatMul`` ->
   ``model.layers.0.attn.qkv_proj``), else the initializer's name; its role comes from that
   id (``ir/roles.py``).
2. Blocks are the ``<prefix>.<index>`` groups of site ids under the prefix naming the most
   sites. Their residual stream is found in the graph: a block's output is the tensor that
   covers every site of the block, no site of a later one, and enters a residual add (``Add``
   or a ``Skip*Normalization``) of the next block beside that block's branch; the first block's
   input is the tensor no site precedes that enters such an add of the first block and reaches
   all its sites (the attention mask enters an add too, but reaches no projection); the last
   block's output is its residual add after its last branch.
3. A head whose weight an embedding Gather also reads (the same initializer transposed, or an
   equal table of its own) is a tied site: one quantized array serves both.
4. The float model runs in ONNX Runtime (an empty KV cache where the graph takes one); taps are
   extra graph outputs; ``substituted`` swaps initializers.
5. An ONNX file the GenAI model builder wrote (``genai_config.json`` beside it) is a KV-cache
   decoder already: its config and tokenizer files travel into the artifact.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch

from lwqc.ir.errors import ModelLoadError, NonFiniteWeightError
from lwqc.ir.graph import Block, Graph, MatmulSite
from lwqc.ir.roles import role_of
from lwqc.ir.source import CAUSAL_LM, ENCODER, Tap
from lwqc.ir.structure import assign_fusion_groups, blocks_under, site_dataflow

ONNX_SUFFIX = ".onnx"
GENAI_CONFIG = "genai_config.json"
# The files the GenAI builder writes beside its decoder that an artifact of it carries.
DECODER_SIDE_FILES = ("genai_config.json", "tokenizer.json", "tokenizer_config.json",
                      "chat_template.jinja", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "tokenizer.model", "added_tokens.json",
                      "generation_config.json")
SCOPES = "pkg.torch.onnx.name_scopes"
SITE_KEY = "lwqc.site"  # metadata naming a node's site in the float graph handed to lowerings
RESIDUAL_ADDS = ("Add", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
_SKIP_SUM_OUTPUT = 3  # Skip*Normalization's optional output: input + skip (+ bias)
_SKIP_BIAS_INPUT = {"SkipLayerNormalization": 4, "SkipSimplifiedLayerNormalization": 3}
_OUTPUT_KINDS = {"logits": CAUSAL_LM, "last_hidden_state": ENCODER}
_SESSION_BYTES_LIMIT = 1_800_000_000  # larger graphs go to ONNX Runtime as files
MIN_OPSET = 21  # blocked DequantizeLinear and int4 tensors, which the lowerings write


def is_onnx_file(model: str) -> bool:
    return model.endswith(ONNX_SUFFIX)


@dataclasses.dataclass
class _Probe:
    """Where a tap reads: an existing value, or a sum (a fused residual add's terms)."""

    value: ir.Value | None = None
    summands: tuple[ir.Value, ...] | None = None


@dataclasses.dataclass
class OnnxSource:
    """A float ONNX model, its sites' initializers and the tensors taps read."""

    path: Path
    model: ir.Model
    kind: str
    weights_sha256: str
    output: str
    layouts: dict[str, tuple[str, bool]] = dataclasses.field(default_factory=dict)
    tables: dict[str, str] = dataclasses.field(default_factory=dict)  # tied head -> its table
    probes: dict[str, tuple[_Probe, _Probe]] = dataclasses.field(default_factory=dict)
    cache_shape: tuple[int, int] | None = None  # (kv heads, head size) of an empty KV cache
    _sessions: dict[tuple[str, ...], Any] = dataclasses.field(default_factory=dict, repr=False)

    @property
    def model_id(self) -> str:
        return str(self.path)

    def weight(self, site_id: str) -> np.ndarray:
        name, transposed = self.layouts[site_id]
        array = self.model.graph.initializers[name].const_value.numpy()
        return array.T if transposed else array

    def tokenizer(self) -> Any:
        return tokenizer_beside(self.path)

    def tokenize(self, text: str) -> np.ndarray:
        ids = self.tokenizer()(text, add_special_tokens=False)["input_ids"]
        return np.asarray(ids, np.int64)

    def _session(self, extra: list[ir.Value]) -> Any:
        key = tuple(v.name for v in extra)
        if key not in self._sessions:
            self._sessions[key] = _session(self.model, extra)
        return self._sessions[key]

    def run(self, input_ids: np.ndarray, taps: dict[str, Tap] | None = None) -> torch.Tensor:
        """The float model's first output on ``[batch, seq]`` ids; a tap on a block (its
        module name) or a site gets the residual stream or the site's input and output."""
        ids = np.asarray(input_ids, np.int64)
        taps = taps or {}
        for name in taps:
            if name not in self.probes:
                raise ModelLoadError(f"{self.path.name}: no residual stream found for {name} "
                                     "(weight-only analyses and policies still work)")
        wanted: list[ir.Value] = []
        for name in taps:
            for probe in self.probes[name]:
                for value in (probe.summands or (probe.value,)):
                    if value not in wanted:
                        wanted.append(value)
        session = self._session(wanted)
        names = [self.output, *(v.name for v in wanted)]
        feeds = session_feeds(session, ids, cache_shape=self.cache_shape)
        results = dict(zip(names, session.run(names, feeds), strict=True))

        def read(probe: _Probe) -> torch.Tensor:
            if probe.summands is not None:
                return torch.from_numpy(sum(results[v.name] for v in probe.summands)).float()
            return torch.from_numpy(results[probe.value.name]).float()

        for name, callback in taps.items():
            into, out = self.probes[name]
            callback(read(into), read(out))
        return torch.from_numpy(results[self.output])

    def output_fisher(self, input_ids: np.ndarray, site_ids: list[str],
                      seed: int) -> None:
        """None: ONNX Runtime's inference sessions give no gradients."""
        return None

    @contextlib.contextmanager
    def substituted(self, weights: dict[str, np.ndarray]) -> Iterator[None]:
        """Temporarily replace site weights (``[out, in]`` arrays) in the float graph (a tied
        head's: in its embedding table too, as one array serves both)."""
        initializers = self.model.graph.initializers
        saved = {}
        for site_id, weight in weights.items():
            name, transposed = self.layouts[site_id]
            stored = {name: weight.T if transposed else weight}
            if site_id in self.tables:  # a tied head's embedding table reads the same weight
                stored[self.tables[site_id]] = weight
            for key, array in stored.items():
                saved[key] = initializers[key].const_value
                initializers[key].const_value = ir.tensor(
                    np.ascontiguousarray(array, np.float32), name=key)
        self._sessions.clear()
        try:
            yield
        finally:
            for name, tensor in saved.items():
                initializers[name].const_value = tensor
            self._sessions.clear()

    def float_onnx(self) -> ir.Model:
        """The ONNX file read afresh (weights in memory), each site's node naming its site
        (``lwqc.site``)."""
        model = _load(self.path)
        site_of = {name: site_id for site_id, (name, _) in self.layouts.items()}
        for node in model.graph:  # the first node reading a weight holds the site
            weight = _site_weight(node)
            if weight is not None and weight.name in site_of:
                node.metadata_props[SITE_KEY] = site_of.pop(weight.name)
        return model

    def eager_module(self) -> torch.nn.Module:
        raise ModelLoadError(f"{self.path.name} is an ONNX model: the torch backend and lwqc "
                             "sweep need a PyTorch model (compile with --backend onnx)")

    def transformers_directory(self, scratch: Path) -> Path:
        raise ModelLoadError(f"{self.path.name} is an ONNX model, not a transformers checkpoint")

    def decoder_files(self) -> dict[str, bytes]:
        """The GenAI config (its decoder renamed ``model.onnx``) and tokenizer files beside a
        decoder the GenAI builder wrote; empty for any other ONNX file."""
        config_path = self.path.parent / GENAI_CONFIG
        if not config_path.exists():
            return {}
        config = json.loads(config_path.read_text())
        if config["model"]["decoder"]["filename"] != self.path.name:
            return {}
        config["model"]["decoder"]["filename"] = "model.onnx"
        files = {name: (self.path.parent / name).read_bytes() for name in DECODER_SIDE_FILES
                 if name != GENAI_CONFIG and (self.path.parent / name).is_file()}
        files[GENAI_CONFIG] = json.dumps(config, indent=4).encode()
        return files


def session_feeds(session: Any, ids: np.ndarray, given: dict[str, np.ndarray] | None = None,
                  cache_shape: tuple[int, int] | None = None) -> dict[str, np.ndarray]:
    """Every input of an ONNX Runtime session over ``[batch, seq]`` ids: ``given`` arrays,
    else all-ones attention, positions 0..seq-1, token type 0, and an empty KV cache
    (``cache_shape`` (heads, head size), else the input's own static dimensions)."""
    batch, seq = ids.shape
    positions = np.arange(seq, dtype=np.int64)
    defaults = {"input_ids": lambda: ids, "attention_mask": lambda: np.ones_like(ids),
                "position_ids": lambda: np.broadcast_to(positions, ids.shape).copy(),
                "token_type_ids": lambda: np.zeros_like(ids)}
    feeds = {}
    for spec in session.get_inputs():
        if given and spec.name in given:
            feeds[spec.name] = given[spec.name]
        elif spec.name in defaults:
            feeds[spec.name] = defaults[spec.name]()
        else:  # a past key or value, checked at load
            heads, size = cache_shape or (spec.shape[1], spec.shape[3])
            feeds[spec.name] = np.zeros((batch, heads, 0, size), np.float32)
    return feeds


def tokenizer_beside(path: Path) -> Any:
    """The tokenizer saved beside an ONNX file."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path.parent))
    except (OSError, ValueError, TypeError):
        raise ModelLoadError(f"{path.parent} holds no tokenizer beside {path.name}; this step "
                             "needs one (save the model's tokenizer files next to the ONNX "
                             "file)") from None


def _session(model: ir.Model, extra: list[ir.Value]) -> Any:
    """An ORT CPU session of ``model`` with ``extra`` values as additional outputs."""
    import onnxruntime as ort

    added = [v for v in extra if v not in model.graph.outputs]
    for value in added:
        if value.dtype is None:
            value.dtype = ir.DataType.FLOAT
        model.graph.outputs.append(value)
    try:
        size = sum(v.const_value.nbytes for v in model.graph.initializers.values())
        if size < _SESSION_BYTES_LIMIT:
            return ort.InferenceSession(ir.to_proto(model).SerializeToString(),
                                        providers=["CPUExecutionProvider"])
        with tempfile.TemporaryDirectory(prefix="lwqc-onnx-") as scratch:
            path = Path(scratch) / "model.onnx"
            ir.save(model, path, external_data="model.onnx.data")
            return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    finally:
        for value in added:
            model.graph.outputs.remove(value)


def _site_weight(node: ir.Node) -> ir.Value | None:
    """The constant weight of a MatMul, or of a Gemm without ``transA``/``alpha``."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx"):
        return None
    if len(node.inputs) < 2 or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    if weight.const_value is None or weight.const_value.shape is None \
            or len(weight.const_value.shape) != 2 or not weight.is_initializer():
        return None
    if node.op_type == "Gemm" and (node.attributes.get_int("transA", 0)
                                   or node.attributes.get_float("alpha", 1.0) != 1.0):
        return None
    return weight


def _site_id(node: ir.Node, weight: ir.Value) -> str:
    if SCOPES in node.metadata_props:
        scopes = ast.literal_eval(node.metadata_props[SCOPES])
        if len(scopes) >= 2 and scopes[-2]:
            return scopes[-2]
    parts = (node.name or "").strip("/").split("/")
    if len(parts) > 1:
        return ".".join(parts[:-1])
    return weight.name.removesuffix(".weight").removesuffix(".MatMul")


def _block_prefix(site_ids: list[str]) -> str:
    """The prefix of the ``<prefix>.<index>`` groups naming the most sites."""
    counts: Counter[str] = Counter()
    for site_id in site_ids:
        parts = site_id.split(".")
        counts.update({".".join(parts[:k]) for k, part in enumerate(parts) if part.isdigit()})
    return counts.most_common(1)[0][0] if counts else ""


class _Reach:
    """Which sites each value of the graph depends on (bit ``i``: the ``i``-th site)."""

    def __init__(self, graph: ir.Graph, site_nodes: dict[ir.Node, int]) -> None:
        self.of: dict[ir.Value, int] = {}
        for node in graph:
            upstream = 0
            for value in node.inputs:
                if value is not None:
                    upstream |= self.of.get(value, 0)
            if node in site_nodes:
                upstream |= 1 << site_nodes[node]
            for value in node.outputs:
                self.of[value] = upstream

    def __call__(self, value: ir.Value | None) -> int:
        return 0 if value is None else self.of.get(value, 0)


def _is_constant(value: ir.Value | None) -> bool:
    producer = value.producer() if value is not None else None
    return value is None or value.const_value is not None \
        or (producer is not None and producer.op_type == "Constant")


def _residual_value(node: ir.Node) -> _Probe:
    """The residual sum a residual add computes."""
    if node.op_type == "Add":
        return _Probe(value=node.outputs[0])
    if len(node.outputs) > _SKIP_SUM_OUTPUT and node.outputs[_SKIP_SUM_OUTPUT].name:
        return _Probe(value=node.outputs[_SKIP_SUM_OUTPUT])
    index = _SKIP_BIAS_INPUT[node.op_type]
    bias = node.inputs[index] if len(node.inputs) > index else None
    return _Probe(summands=tuple(v for v in (node.inputs[0], node.inputs[1], bias)
                                 if v is not None))


def _block_probes(graph: ir.Graph, blocks: list[Block], site_nodes: dict[ir.Node, int],
                  order: dict[str, int]) -> dict[str, tuple[_Probe, _Probe]]:
    """Each block's residual-stream input and output (module docstring, step 2); blocks
    whose stream is not found are left out."""
    if not blocks:
        return {}
    reach = _Reach(graph, site_nodes)
    masks = [sum(1 << order[s] for s in block.sites) for block in blocks]
    later = [sum(masks[i + 1 :]) for i in range(len(blocks))]
    adds = [node for node in graph if node.op_type in RESIDUAL_ADDS]

    def enters_add_of(value: ir.Value, block: int) -> bool:
        return any(use.op_type in RESIDUAL_ADDS and any(
            other is not value and reach(other) & masks[block] for other in use.inputs)
            for use, _ in value.uses())

    def feeds_all(value: ir.Value, block: int) -> bool:
        below = _descendants(value)
        return all(node in below for node, i in site_nodes.items() if masks[block] >> i & 1)

    outputs: list[_Probe | None] = []
    for b in range(len(blocks)):
        found = None
        if b + 1 < len(blocks):
            for value, bits in reach.of.items():
                if bits & masks[b] == masks[b] and not bits & later[b] \
                        and enters_add_of(value, b + 1):
                    found = _Probe(value=value)
                    break
        else:
            for node in adds:  # branch + skip: both activations (a bias add is no residual)
                pair = node.inputs[:2]
                bits = [reach(v) for v in pair]
                if len(pair) == 2 and not any(_is_constant(v) for v in pair) \
                        and any(x & masks[b] == masks[b] for x in bits) \
                        and not all(x & masks[b] == masks[b] for x in bits):
                    found = _residual_value(node)
                    break
            found = _follow_normalization(found, outputs)
        outputs.append(found)
    first = next((value for value, bits in reach.of.items() if bits == 0
                  and not value.is_initializer() and not _is_constant(value)
                  and enters_add_of(value, 0) and feeds_all(value, 0)), None)
    inputs = [_Probe(value=first) if first is not None else None, *outputs[:-1]]
    return {block.module: (into, out) for block, into, out in zip(blocks, inputs, outputs,
                                                                  strict=True)
            if into is not None and out is not None}


def _follow_normalization(found: _Probe | None, earlier: list[_Probe | None]) -> _Probe | None:
    """Where the earlier blocks' outputs are a normalization of the residual sum (post-norm
    encoders), the last block's output is the normalization of its sum too."""
    producers = {p.value.producer().op_type for p in earlier
                 if p and p.value and p.value.producer()}
    if found is None or found.value is None or len(producers) != 1:
        return found
    (op_type,) = producers
    if op_type in RESIDUAL_ADDS:
        return found
    for use, _ in found.value.uses():
        if use.op_type == op_type:
            return _Probe(value=use.outputs[0])
    return found


def _descendants(value: ir.Value) -> set[ir.Node]:
    seen: set[ir.Node] = set()
    stack = [use for use, _ in value.uses()]
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for out in node.outputs:
            stack.extend(use for use, _ in out.uses())
    return seen


def weight_is_transposed(node: ir.Node) -> bool:
    """Whether B is stored [in, out] (MatMul, Gemm without transB) rather than [out, in]."""
    return not (node.op_type == "Gemm" and node.attributes.get_int("transB", 0))


def reads_table(gather: ir.Node, weight: ir.Value, float_weight: np.ndarray) -> bool:
    """Whether a Gather's table is a head's weight: ``Transpose`` of the head's own B (the
    GenAI builder), or an initializer of its own holding ``[out, in]`` (torch's export)."""
    table = gather.inputs[0] if gather.op_type == "Gather" else None
    if table is None:
        return False
    producer = table.producer()
    if producer is not None and producer.op_type == "Transpose" and producer.inputs[0] is weight:
        return True
    return table.const_value is not None and table.const_value.shape == float_weight.shape \
        and np.array_equal(table.const_value.numpy(), float_weight)


def fold_weight_transposes(graph: ir.Graph) -> None:
    """Give each MatMul/Gemm whose weight is ``Transpose(2-D initializer)`` (exporters leave
    large ones unfolded, e.g. a tied head's) the transposed weight as an initializer."""
    for node in list(graph):
        source = node.inputs[0] if node.op_type == "Transpose" and node.inputs else None
        if source is None or not source.is_initializer() or source.const_value is None \
                or len(source.const_value.shape) != 2 \
                or list(node.attributes.get_ints("perm", [1, 0])) != [1, 0]:
            continue
        out = node.outputs[0]
        if not out.uses() or not all(use.op_type in ("MatMul", "Gemm") and index == 1
                                     for use, index in out.uses()):
            continue
        name = f"{source.name}.transposed"
        folded = graph.initializers.get(name)
        if folded is None:
            folded = ir.Value(name=name, const_value=ir.tensor(
                np.ascontiguousarray(source.const_value.numpy().T), name=name))
            folded.type = ir.TensorType(folded.const_value.dtype)
            folded.shape = ir.Shape(folded.const_value.shape)
            graph.register_initializer(folded)
        ir.convenience.replace_all_uses_with(out, folded)
        graph.remove(node, safe=True)
        if not source.uses() and source.name not in {v.name for v in graph.outputs}:
            graph.initializers.pop(source.name)


def _load(path: Path) -> ir.Model:
    if not path.is_file():
        raise ModelLoadError(f"model path {path} does not exist; check the path")
    try:
        model = ir.load(path)
        for name, value in model.graph.initializers.items():  # external data read in
            value.const_value = ir.tensor(value.const_value.numpy(), name=name)
    except (OSError, ValueError, RuntimeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"cannot read ONNX model {path}: {first}") from None
    except Exception as exc:  # the protobuf parser's DecodeError and kin
        raise ModelLoadError(f"{path} is not a readable ONNX model "
                             f"({type(exc).__name__})") from None
    if "lwqc.schema" in model.metadata_props:
        raise ModelLoadError(f"{path} is an lwqc artifact; compile its float model instead")
    fold_weight_transposes(model.graph)
    opset = model.opset_imports.get("", model.opset_imports.get("ai.onnx", MIN_OPSET))
    return model if opset >= MIN_OPSET else _converted(model, opset, path)


def _converted(model: ir.Model, opset: int, path: Path) -> ir.Model:
    """``model`` at ``MIN_OPSET`` through ONNX's version converter."""
    import onnx.version_converter

    try:
        proto = onnx.version_converter.convert_version(ir.to_proto(model), MIN_OPSET)
    except Exception as exc:  # the converter raises RuntimeError and C++ errors of its own
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ModelLoadError(f"{path.name} is opset {opset}; lwqc writes opset {MIN_OPSET} "
                             f"and ONNX's version converter failed: {first}") from None
    return ir.from_proto(proto)


def _weights_sha256(model: ir.Model) -> str:
    """Hash of every initializer (name, dtype, shape, bytes), in name order."""
    digest = hashlib.sha256()
    for name, value in sorted(model.graph.initializers.items()):
        tensor = value.const_value
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.tobytes())
    return digest.hexdigest()


def _kind_and_output(model: ir.Model, path: Path) -> tuple[str, str]:
    names = [v.name for v in model.graph.outputs]
    for name in names:
        if name in _OUTPUT_KINDS:
            return _OUTPUT_KINDS[name], name
    raise ModelLoadError(f"{path.name}: outputs {', '.join(names)} are neither logits (a causal "
                         "LM) nor last_hidden_state (an encoder); export the model with one of "
                         "those output names")


_FED_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")


def _cache_shape(model: ir.Model, path: Path) -> tuple[int, int] | None:
    """(kv heads, head size) of the KV-cache inputs; refuses inputs lwqc cannot feed."""
    past = [v for v in model.graph.inputs if v.name not in _FED_INPUTS]
    unknown = [v.name for v in past if not v.name.startswith("past_key_values.")]
    if unknown:
        raise ModelLoadError(f"{path.name} takes an input lwqc cannot feed: {unknown[0]} "
                             f"(it feeds {', '.join(_FED_INPUTS)} and past_key_values.*)")
    if not past:
        return None
    config_path = path.parent / GENAI_CONFIG
    if config_path.exists():
        decoder = json.loads(config_path.read_text())["model"]["decoder"]
        return decoder["num_key_value_heads"], decoder["head_size"]
    dims = past[0].shape
    if dims is None or len(dims) != 4 or not all(isinstance(d, int) for d in (dims[1], dims[3])):
        raise ModelLoadError(f"{path.name}: the shape of {past[0].name} does not say the KV "
                             f"cache's heads and head size, and no {GENAI_CONFIG} is beside it")
    return dims[1], dims[3]


def open_onnx(model: str) -> OnnxSource:
    """Read an ONNX file: its weights, what it computes, and how to feed it."""
    path = Path(model).expanduser().resolve()
    onnx_model = _load(path)
    kind, output = _kind_and_output(onnx_model, path)
    return OnnxSource(path=path, model=onnx_model, kind=kind,
                      weights_sha256=_weights_sha256(onnx_model), output=output,
                      cache_shape=_cache_shape(onnx_model, path))


def import_onnx(model: str) -> Graph:
    """Read an ONNX file and lift its sites, blocks, dataflow and residual stream."""
    source = open_onnx(model)
    onnx_model, path = source.model, source.path
    graph = onnx_model.graph
    found: list[tuple[ir.Node, ir.Value, str]] = []
    seen: Counter[str] = Counter()
    for node in graph:
        weight = _site_weight(node)
        if weight is None:
            continue
        site_id = _site_id(node, weight)
        seen[site_id] += 1
        if seen[site_id] > 1:
            site_id = f"{site_id}#{seen[site_id]}"
        found.append((node, weight, site_id))
    if not found:
        raise ModelLoadError(f"{path.name} has no MatMul or Gemm with a constant float weight "
                             "to quantize (is it quantized already?)")
    sites: dict[str, MatmulSite] = {}
    inputs_of: dict[str, ir.Value] = {}
    site_nodes: dict[ir.Node, str] = {}
    owners: dict[str, str] = {}
    for node, weight, site_id in found:
        if weight.const_value.dtype != ir.DataType.FLOAT:
            raise ModelLoadError(f"{path.name}: weight {weight.name} is "
                                 f"{weight.const_value.dtype.name}; lwqc reads float32 models")
        if weight.name in owners:
            continue  # one initializer, two matmuls: quantized once, for the first
        owners[weight.name] = site_id
        transposed = weight_is_transposed(node)
        source.layouts[site_id] = (weight.name, transposed)
        rows, cols = weight.const_value.shape
        shape = (cols, rows) if transposed else (rows, cols)
        sites[site_id] = MatmulSite(id=site_id, role=role_of(site_id), block=None, shape=shape,
                                    fusion_group=site_id, order=len(sites))
        inputs_of[site_id] = node.inputs[0]
        site_nodes[node] = site_id
    excluded = []
    for site_id, site in sites.items():
        float_weight = source.weight(site_id)
        bad = int(float_weight.size - np.count_nonzero(np.isfinite(float_weight)))
        if bad:
            raise NonFiniteWeightError(f"weight of {site_id} holds {bad} NaN/Inf values: the "
                                       "model is corrupt; re-export it")
        if site.role == "lm_head":
            weight = graph.initializers[source.layouts[site_id][0]]
            table = next((node.inputs[0] for node in graph
                          if reads_table(node, weight, float_weight)), None)
            if table is not None:
                site.tied = table.name
                if table.is_initializer():  # its own copy: substituted with the head
                    source.tables[site_id] = table.name
    used = {name for name, _ in source.layouts.values()}
    tied = {site.tied for site in sites.values() if site.tied}
    for name, value in graph.initializers.items():
        if value.const_value.shape is not None and len(value.const_value.shape) == 2 \
                and name not in used and name not in tied:
            excluded.append((name, "not a matmul weight (embedding or table); stays float"))
    blocks = blocks_under(_block_prefix(list(sites)), sites)
    assign_fusion_groups(sites, inputs_of)
    for node, site_id in site_nodes.items():
        source.probes[site_id] = (_Probe(value=node.inputs[0]), _Probe(value=node.outputs[0]))
    order = {site_id: i for i, site_id in enumerate(sites)}
    source.probes.update(_block_probes(graph, blocks, {n: order[s] for n, s in site_nodes.items()},
                                       order))
    producers = {v: v.producer() for node in graph for v in node.inputs if v is not None}
    dataflow = site_dataflow(list(graph), lambda node: [p for v in node.inputs
                                                        if v is not None
                                                        and (p := producers.get(v)) is not None],
                             site_nodes)
    exporter = onnx_model.producer_name or "unknown exporter"
    return Graph(model_id=source.model_id, architecture=f"ONNX ({exporter})",
                 sites=sites, blocks=blocks, dataflow=dataflow, keep_bits=32,
                 weights_sha256=source.weights_sha256, excluded=excluded, source=source)
