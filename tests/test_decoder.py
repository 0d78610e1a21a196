"""The KV-cache decoder artifact of a causal LM: the GenAI builder's graph rewritten from the
plan. ORT (at fp32 accuracy) and the torch backend compute the same logits and the same greedy
tokens; onnxruntime-genai loads the artifact as it is; a tied head's table serves the
embedding from the same arrays."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from conftest import genai_greedy, nbits_dequantized
from lwqc.backends import onnx_rewrite as ort_backend
from lwqc.backends import torch_eager
from lwqc.backends.decoder_session import DecoderSession
from lwqc.cli import main
from lwqc.generate import torch_greedy
from lwqc.ir.hf_source import import_model
from lwqc.passes.manager import PassManager
from lwqc.registry import parse

LOGIT_TOLERANCE = 1e-3  # fp32 kernels in a different order: ~1e-5 seen; the bound


def _compile(model: Path, pipeline: str):
    graph = import_model(str(model))
    PassManager(parse(pipeline)).run(graph)
    return graph


def _save(graph, out: Path) -> Path:
    from lwqc.compile import write_artifacts

    out.mkdir()
    write_artifacts(graph, out, [])
    return out


def _agree(graph, out: Path, tokens: int = 12) -> list[int]:
    """Assert decoder == torch backend on logits (two sequences) and greedy tokens."""
    decoder = DecoderSession(out)
    module = torch_eager.build(graph.source.module, graph.packed)
    ids = np.random.default_rng(0).integers(3, graph.source.module.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected = module(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert np.abs(decoder.prefill(ids) - expected).max() < LOGIT_TOLERANCE
    prompt = [int(t) for t in ids[0, :8]]
    ours = list(decoder.greedy(prompt, tokens))
    assert ours == list(torch_greedy(module, prompt, tokens, set()))
    return ours


def _ops(out: Path) -> list[str]:
    return [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]


@pytest.fixture(scope="module")
def ref_decoder(ref_llama_dir, tmp_path_factory):
    graph = _compile(ref_llama_dir, "policy-uniform{width=4,group_size=32},quantize,"
                                    "lower-onnx{accuracy_level=1}")
    return graph, _save(graph, tmp_path_factory.mktemp("ref") / "u4")


def test_causal_lm_artifact_is_a_kv_cache_decoder_with_genai_files(ref_decoder):
    graph, out = ref_decoder
    assert {"genai_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    ops = _ops(out)
    assert ops.count("GroupQueryAttention") == 6
    # q/k/v share one spec: one MatMulNBits per layer for them; o, gate, up, down, head alone
    assert ops.count("MatMulNBits") == 6 * 5 + 1 and "MatMul" not in ops
    config = json.loads((out / "genai_config.json").read_text())["model"]["decoder"]
    assert config["filename"] == "model.onnx" and config["num_hidden_layers"] == 6


def test_decoder_holds_the_packed_arrays_and_ort_dequantizes_them_exactly(ref_decoder):
    _holds_exactly(*ref_decoder)


def _holds_exactly(graph, out: Path) -> None:
    """The artifact holds every site's packed arrays, and ORT multiplies by their weights."""
    read = ort_backend.read_packed(out / "model.onnx", set(graph.packed))
    dequantized = nbits_dequantized(onnx.load(str(out / "model.onnx")))
    assert set(read) == set(dequantized) == set(graph.packed)
    for site_id, weight in graph.packed.items():
        for name, array in weight.arrays().items():
            np.testing.assert_array_equal(read[site_id].arrays()[name], array)
        np.testing.assert_allclose(dequantized[site_id], weight.dequantize(), rtol=0, atol=1e-6)


def test_decoder_and_torch_agree_on_logits_and_greedy_tokens(ref_decoder):
    graph, out = ref_decoder
    _agree(graph, out, tokens=16)


def test_onnxruntime_genai_loads_the_artifact_and_generates_the_same_tokens(ref_decoder):
    pytest.importorskip("onnxruntime_genai")
    graph, out = ref_decoder
    prompt = [5, 100, 200, 300, 7, 9]
    tokens = genai_greedy(out, prompt, 10)
    module = torch_eager.build(graph.source.module, graph.packed)
    expected = list(torch_greedy(module, prompt, len(tokens), set()))
    eos = module.generation_config.eos_token_id
    assert tokens == expected[:len(tokens)] and (len(tokens) == 10 or tokens[-1] == eos)


def test_generate_streams_the_same_text_on_both_backends(ref_decoder, capsys):
    _, out = ref_decoder
    texts = {}
    for backend in ("onnx", "torch"):
        capsys.readouterr()
        assert main(["generate", str(out), "--prompt", "Once upon a time",
                     "--max-new-tokens", "12", "--backend", backend]) == 0
        texts[backend] = capsys.readouterr().out
    assert texts["onnx"] == texts["torch"] and len(texts["onnx"].strip()) > 10


def test_fused_sites_with_different_specs_become_one_node_each(ref_llama_dir, tmp_path):
    graph = _compile(ref_llama_dir, 'policy-uniform{width=4,group_size=32,override="q_proj=8",'
                                    'override="k_proj=3",override="v_proj=16"},quantize,'
                                    'lower-onnx{accuracy_level=1}')
    out = _save(graph, tmp_path / "mixed")
    ops = _ops(out)
    assert ops.count("Concat") >= 6  # q (8 bits), k (3-bit codes), v (float) per layer
    assert ops.count("MatMul") == 6  # v float; k on MatMulNBits, its codes widened to 4 bits
    _agree(graph, out)


def _tied_llama(directory: Path, ref_llama_dir: Path) -> Path:
    """A random tied Llama with ref-llama-6L's tokenizer (96 wide: 6 heads of 16)."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=4096, hidden_size=96, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=0, eos_token_id=0)
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ref_llama_dir / name, directory / name)
    return directory


@pytest.mark.parametrize(("width", "group_size", "scheme", "lookup"), [
    (4, 64, "rtn-asym", "GatherBlockQuantized"),  # 96 inputs: padded block, Slice
    (8, 32, "rtn-sym", "GatherBlockQuantized"),
    # codes widened to the kernel's 4 bits, float offsets (every site MatMulNBits, with a
    # group-sum correction): the rows read from the kernel's arrays all the same
    (2, 32, "rtn-asym", "GatherBlockQuantized"),
    (3, 32, "rtn-asym", "GatherBlockQuantized"),
    (4, 32, "float-offset-dq", "GatherBlockQuantized"),
    (3, 32, "float-offset", "GatherBlockQuantized"),
    (4, 8, "rtn-asym", "Gather"),  # groups below MatMulNBits' 16: the dequantized table
])
def test_tied_head_serves_the_embedding_from_its_own_arrays(ref_llama_dir, tmp_path, width,
                                                            group_size, scheme, lookup):
    """The tied head's arrays serve the embedding; where the head runs on MatMulNBits only the
    rows looked up are dequantized: no float table, in the file or once the session has
    started."""
    from conftest import holds_table_at_session_start

    model = _tied_llama(tmp_path / "tied", ref_llama_dir)
    graph = _compile(model, f"policy-uniform{{width={width},group_size={group_size},"
                            f"scheme={scheme}}},quantize,lower-onnx{{accuracy_level=1}}")
    assert graph.sites["lm_head"].tied == "model.embed_tokens.weight"
    out = _save(graph, tmp_path / "out")
    proto = onnx.load(str(out / "model.onnx"))
    ops = [n.op_type for n in proto.graph.node]
    assert lookup in ops
    if scheme.startswith("float-offset"):  # the head; q/k/v in one node, o, gate, up, down
        assert ops.count("MatMulNBits") == 1 + 5 * 2
        _holds_exactly(graph, out)
    # no float copy of the 4096 x 96 table is left
    assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                and 4096 * 96 <= np.prod(t.dims)]
    if lookup == "GatherBlockQuantized":  # nor is one computed when the session starts
        assert not holds_table_at_session_start(out / "model.onnx", tmp_path / "started.onnx",
                                                graph.packed["lm_head"].dequantize())
    _agree(graph, out)


@pytest.mark.parametrize("arch", ["qwen2", "mistral"])
def test_other_decoder_architectures_match_torch(arch, ref_llama_dir, tmp_path):
    from conftest import TINY, tiny_config

    torch.manual_seed(0)
    config = tiny_config(arch)
    config.vocab_size, config.hidden_size, config.head_dim = 4096, TINY["hidden_size"], 16
    import transformers

    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / arch)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ref_llama_dir / name, tmp_path / arch / name)
    graph = _compile(tmp_path / arch, "policy-uniform{width=4,group_size=32},quantize,"
                                      "lower-onnx{graph=kv-cache,accuracy_level=1}")
    _agree(graph, _save(graph, tmp_path / "out"))


def test_row_mixed_sites_run_one_kernel_per_part_and_serve_the_tied_table(ref_llama_dir,
                                                                          tmp_path):
    """Every site a row-mix of 3-bit g32, 2-bit g32 and 4-bit g64 float-offset-dq rows: one
    MatMulNBits per site for the parts in groups of 32 (3- and 2-bit codes both in 4 bits),
    one for those in groups of 64 (q/k/v no longer share one), the outputs gathered into row
    order; the tied head's table is the same arrays; ORT and torch agree."""
    from conftest import scattered_rows
    from lwqc.ir.plan import Plan
    from lwqc.ir.spec import FloatOffsetDqSpec, RowMixSpec

    graph = import_model(str(_tied_llama(tmp_path / "tied", ref_llama_dir)))
    parts = (FloatOffsetDqSpec(3, 32), FloatOffsetDqSpec(2, 32), FloatOffsetDqSpec(4, 64))
    graph.plan = Plan(specs={s.id: RowMixSpec(bits=4, parts=parts,
                                              rows=scattered_rows(3, s.shape[0]))
                             for s in graph}, policy="test", budget={})
    graph.available.add("plan")
    PassManager(parse("quantize,lower-onnx{accuracy_level=1}")).run(graph)
    out = _save(graph, tmp_path / "out")
    ops = _ops(out)
    assert ops.count("MatMulNBits") == 2 * len(graph.sites) and "MatMul" in ops
    proto = onnx.load(str(out / "model.onnx"))
    assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                and 4096 * 96 <= np.prod(t.dims)]
    _holds_exactly(graph, out)
    _agree(graph, out)


def test_row_mixes_of_one_group_size_run_as_sites_and_share_q_k_v_kernels(ref_llama_dir,
                                                                          tmp_path):
    """Every site but k a row-mix of 3-, 2- and 4-bit float-offset-dq rows in groups of 32, k
    4-bit: each runs as an unmixed site (q/k/v on one kernel, their specs in its metadata), no
    Gather puts outputs in order; the tied head's table is the same arrays; ORT and torch
    agree."""
    from conftest import scattered_rows
    from lwqc.ir.plan import Plan
    from lwqc.ir.spec import FloatOffsetDqSpec, RowMixSpec, spec_from_json

    graph = import_model(str(_tied_llama(tmp_path / "tied", ref_llama_dir)))
    parts = (FloatOffsetDqSpec(3, 32), FloatOffsetDqSpec(2, 32), FloatOffsetDqSpec(4, 32))
    graph.plan = Plan(specs={s.id: parts[2] if s.role == "k" else RowMixSpec(
        bits=4, parts=parts, rows=scattered_rows(3, s.shape[0])) for s in graph},
        policy="test", budget={})
    graph.available.add("plan")
    PassManager(parse("quantize,lower-onnx{accuracy_level=1}")).run(graph)
    out = _save(graph, tmp_path / "out")
    proto = onnx.load(str(out / "model.onnx"))
    kernels = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert len(kernels) == 1 + 5 * 2  # the head; q/k/v in one node, o, gate, up, down
    for kernel in kernels:
        props = {p.key: p.value for p in kernel.metadata_props}
        if "lwqc.sites" in props:
            sites = json.loads(props["lwqc.sites"])
            assert [spec_from_json(spec) for spec in json.loads(props["lwqc.specs"])] == [
                graph.plan.specs[site] for site in sites]
    assert not [n for n in proto.graph.node if n.op_type == "Gather"
                and any(p.key == "lwqc.scheme" for p in n.metadata_props)]
    _holds_exactly(graph, out)
    _agree(graph, out)
