"""The ONNX frontend against the transformers frontend of the same model.

The expectations are the HF route's own: its IR (sites, roles, fusion groups, dataflow,
blocks), its taps (torch forward hooks on the same weights), its packed weights and its
evaluation numbers. Exports: torch's dynamo export (MatMul; GPT-2's Gemm with bias; BERT's
post-norm residual) and the GenAI builder's decoder (fused q/k/v, SkipSimplifiedLayerNorm).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from conftest import genai_greedy, save_tiny_model
from lwqc.backends.decoder_session import DecoderSession
from lwqc.backends.onnx_rewrite import save, session
from lwqc.cli import main
from lwqc.evaluate import artifact_weights, evaluate
from lwqc.ir.frontends import import_model
from lwqc.ir.hf_source import import_model as import_hf
from lwqc.ir.onnx_source import fold_weight_transposes

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHT_ONLY = ["--no-gptq", "--clip", "minmax"]


def _export(hf_dir: Path, out: Path) -> Path:
    """torch's dynamo export of ``hf_dir`` with the model's tokenizer files beside it."""
    out.mkdir(parents=True)
    save(import_hf(str(hf_dir)).source.float_onnx(), out / "model.onnx")
    for name in TOKENIZER_FILES:
        if (hf_dir / name).exists():
            shutil.copy(hf_dir / name, out / name)
    return out / "model.onnx"


@pytest.fixture(scope="module")
def ref_export(ref_llama_dir, tmp_path_factory) -> Path:
    return _export(ref_llama_dir, tmp_path_factory.mktemp("ref-onnx") / "export")


@pytest.fixture(scope="module")
def ref_builder_decoder(ref_llama_dir, tmp_path_factory) -> Path:
    from lwqc.backends.genai_decoder import run_builder

    out = tmp_path_factory.mktemp("ref-genai") / "decoder"
    run_builder(ref_llama_dir, out)
    return out / "model.onnx"


def _compile(model: Path | str, out: Path, *flags: str) -> Path:
    assert main(["compile", str(model), "-o", str(out), "-q", *flags]) == 0
    return out


def _taps(graph, ids, names):
    seen = {}

    def keep(name):
        def callback(into, out):
            seen[name] = (into.numpy().copy(), out.numpy().copy())
        return callback

    logits = graph.source.run(ids, {name: keep(name) for name in names})
    return logits.numpy(), seen


def _same_ir_and_taps(onnx_model: Path, hf_dir: Path) -> None:
    onnx_graph, hf_graph = import_model(str(onnx_model)), import_model(str(hf_dir))
    assert list(onnx_graph.sites) == list(hf_graph.sites)
    for site_id, site in onnx_graph.sites.items():
        expected = hf_graph.sites[site_id]
        assert (site.role, site.block, site.shape, site.fusion_group) == \
            (expected.role, expected.block, expected.shape, expected.fusion_group), site_id
        assert np.array_equal(onnx_graph.weight(site_id), hf_graph.weight(site_id))
        assert (site.tied is None) == (expected.tied is None)
    assert [b.sites for b in onnx_graph.blocks] == [b.sites for b in hf_graph.blocks]
    assert set(onnx_graph.dataflow.edges) == set(hf_graph.dataflow.edges)
    ids = np.random.default_rng(0).integers(0, 100, (2, 24))
    names = [b.module for b in hf_graph.blocks] + list(hf_graph.sites)[:3]
    logits, onnx_taps = _taps(onnx_graph, ids, names)
    expected_logits, hf_taps = _taps(hf_graph, ids, names)
    np.testing.assert_allclose(logits, expected_logits, atol=1e-4)
    for name in names:
        for got, want in zip(onnx_taps[name], hf_taps[name], strict=True):
            np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-4, err_msg=name)


def test_dynamo_export_lifts_the_same_ir_and_taps_as_the_hf_model(ref_export, ref_llama_dir):
    _same_ir_and_taps(ref_export, ref_llama_dir)


@pytest.mark.parametrize("arch", ["gpt2", "bert"])
def test_gemm_and_post_norm_exports_lift_the_same_ir_and_taps(arch, tmp_path):
    """GPT-2: Gemm sites with bias, a tied head; BERT: the residual stream after LayerNorm."""
    hf_dir = save_tiny_model(arch, tmp_path / "hf")
    exported = _export(hf_dir, tmp_path / "onnx")
    if arch == "gpt2":
        gemms = [n for n in ir.load(exported).graph if n.op_type == "Gemm"]
        assert len(gemms) == 8
    _same_ir_and_taps(exported, hf_dir)


def test_weight_only_plan_gives_the_hf_models_packed_weights_and_eval(ref_export, ref_llama_dir,
                                                                     tmp_path):
    """LIM is measured in ONNX Runtime here and in torch there: the same plan, and with a
    weight-only quantizer the same arrays bit for bit and the same perplexity."""
    from_onnx = _compile(ref_export, tmp_path / "onnx", "--policy", "lim", "--bits", "4.5",
                         *WEIGHT_ONLY)
    from_hf = _compile(ref_llama_dir, tmp_path / "hf", "--policy", "lim", "--bits", "4.5",
                       "--onnx-graph", "export", *WEIGHT_ONLY)
    plans = [{site_id: (e["bits"], e["group_size"], e["scheme"]) for site_id, e in
              json.loads((d / "plan.json").read_text())["sites"].items()}
             for d in (from_onnx, from_hf)]
    assert plans[0] == plans[1] and {bits for bits, _, _ in plans[0].values()} == {4, 8}
    packed = [artifact_weights(d, set()) for d in (from_onnx, from_hf)]
    assert packed[0].keys() == packed[1].keys() and len(packed[0]) == 43
    for site_id, weight in packed[0].items():
        assert weight.spec == packed[1][site_id].spec
        assert np.array_equal(weight.dequantize(), packed[1][site_id].dequantize()), site_id
    results = [evaluate(d, windows=2, seq_len=128) for d in (from_onnx, from_hf)]
    assert results[0]["ppl"] == pytest.approx(results[1]["ppl"], rel=1e-5)
    assert results[0]["ppl_fp"] == pytest.approx(results[1]["ppl_fp"], rel=1e-5)


def test_builder_decoder_keeps_its_cache_and_packs_fused_qkv_as_the_hf_sites(
        ref_builder_decoder, ref_llama_dir, tmp_path):
    """The builder's fused q/k/v is one site holding the HF q, k, v rows: layer granularity
    gives the same widths, and the fused site's arrays are the three HF sites' stacked."""
    flags = ("--policy", "lim", "--bits", "4.5", "--granularity", "layer", *WEIGHT_ONLY)
    from_onnx = _compile(ref_builder_decoder, tmp_path / "onnx", *flags)
    from_hf = _compile(ref_llama_dir, tmp_path / "hf", *flags)
    assert json.loads((from_onnx / "genai_config.json").read_text())["model"]["decoder"][
        "filename"] == "model.onnx"
    onnx_packed, hf_packed = artifact_weights(from_onnx, set()), artifact_weights(from_hf, set())
    assert len(onnx_packed) == 6 * 5 + 1 and len(hf_packed) == 6 * 7 + 1
    for site_id, weight in onnx_packed.items():
        hf_ids = [site_id.replace(".attn.", ".self_attn.")]
        if "qkv_proj" in site_id:
            hf_ids = [hf_ids[0].replace("qkv_proj", f"{p}_proj") for p in "qkv"]
        assert all(hf_packed[h].spec == weight.spec for h in hf_ids), site_id
        expected = np.concatenate([hf_packed[h].dequantize() for h in hf_ids])
        assert np.array_equal(weight.dequantize(), expected), site_id
    results = [evaluate(d, windows=2, seq_len=128) for d in (from_onnx, from_hf)]
    assert results[0]["ppl"] == pytest.approx(results[1]["ppl"], rel=1e-6)
    tokens = list(DecoderSession(from_onnx).greedy([1, 2, 3, 4], 8))
    assert genai_greedy(from_onnx, [1, 2, 3, 4], 8, stop_at_eos=False) == tokens


def test_gemm_sites_are_quantized_and_the_tied_table_is_shared(tmp_path):
    """GPT-2's Gemm sites (bias kept) all become MatMulNBits; its tied head's embedding reads
    the head's quantized arrays; the artifact's logits track the float export's."""
    exported = _export(save_tiny_model("gpt2", tmp_path / "hf"), tmp_path / "onnx")
    out = _compile(exported, tmp_path / "out", "--policy", "uniform", "--width", "4",
                   "--group-size", "32", "--accuracy-level", "1")
    model = ir.load(out / "model.onnx")
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 9 and "Gemm" not in ops  # 8 Gemm sites + the head
    assert "GatherBlockQuantized" in ops
    float_tables = [name for name, v in model.graph.initializers.items()
                    if v.const_value.dtype == ir.DataType.FLOAT and v.const_value.size >= 64 * 64]
    assert float_tables == ["transformer.wpe.weight"]  # positions; the tied table is gone
    packed = artifact_weights(out, set())
    assert len(packed) == 9 and all(w.spec.bits == 4 for w in packed.values())
    ids = np.random.default_rng(0).integers(0, 128, (2, 32))
    logits = [session(path).run(["logits"], {"input_ids": ids})[0]
              for path in (exported, out / "model.onnx")]
    assert np.abs(logits[1] - logits[0]).max() > 0
    assert np.corrcoef(logits[0].ravel(), logits[1].ravel())[0, 1] > 0.99


def _write(model: ir.Model, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    ir.save(model, directory / "model.onnx")
    return directory / "model.onnx"


def _one_matmul(tmp_path: Path, output: str = "logits", extra_input: str | None = None,
                dtype=np.float32) -> Path:
    """input_ids -> Gather(table) -> MatMul(W) -> ``output``."""
    rng = np.random.default_rng(0)
    ids = ir.val("input_ids", ir.DataType.INT64, ir.Shape(["b", "s"]))
    table = ir.val("table", const_value=ir.tensor(rng.standard_normal((16, 8)).astype(dtype)))
    weight = ir.val("w", const_value=ir.tensor(rng.standard_normal((8, 16)).astype(dtype)))
    gather = ir.node("Gather", [table, ids])
    matmul = ir.node("MatMul", [gather.outputs[0], weight], name="/head/MatMul")
    matmul.outputs[0].name = output
    inputs = [ids]
    if extra_input:
        inputs.append(ir.val(extra_input, ir.DataType.INT64, ir.Shape(["b"])))
    graph = ir.Graph(inputs, [matmul.outputs[0]], nodes=[gather, matmul],
                     initializers=[table, weight], opset_imports={"": 21})
    return _write(ir.Model(graph, ir_version=10), tmp_path / "m")


def _no_sites(tmp_path: Path) -> Path:
    ids = ir.val("input_ids", ir.DataType.INT64, ir.Shape(["b", "s"]))
    cast = ir.node("Cast", [ids], attributes={"to": ir.DataType.FLOAT})
    cast.outputs[0].name = "logits"
    graph = ir.Graph([ids], [cast.outputs[0]], nodes=[cast], opset_imports={"": 21})
    return _write(ir.Model(graph, ir_version=10), tmp_path / "m")


def _garbage(tmp_path: Path) -> Path:
    path = tmp_path / "broken.onnx"
    path.write_bytes(b"\x08\x07garbage that is not a protobuf\xff\xff")
    return path


def _artifact(tmp_path: Path) -> Path:
    model = _one_matmul(tmp_path)
    return _compile(model, tmp_path / "art", "--policy", "uniform", "--width", "8") \
        / "model.onnx"


@pytest.mark.parametrize("make, match", [
    (_garbage, "is not a readable ONNX model"),
    (_no_sites, "has no MatMul or Gemm with a constant float weight"),
    (lambda p: _one_matmul(p, output="scores"), "neither logits"),
    (lambda p: _one_matmul(p, extra_input="pixel_values"), "cannot feed: pixel_values"),
    (lambda p: _one_matmul(p, dtype=np.float16), "reads float32 models"),
    (_artifact, "is an lwqc artifact"),
])
def test_bad_onnx_inputs_fail_with_one_line_and_write_nothing(make, match, tmp_path, capsys):
    model = make(tmp_path)
    capsys.readouterr()
    out = tmp_path / "out"
    code = main(["compile", str(model), "--policy", "uniform", "--width", "4", "-o", str(out),
                 "-q"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and match in err[0], err
    assert not out.exists()


def test_onnx_artifacts_refuse_torch_steps(tmp_path, capsys):
    model = _one_matmul(tmp_path)
    out = _compile(model, tmp_path / "out", "--policy", "uniform", "--width", "8")
    capsys.readouterr()
    assert main(["compile", str(model), "--policy", "uniform", "--width", "8", "--backend",
                 "torch", "-o", str(tmp_path / "torch"), "-q"]) == 2
    assert "torch backend" in capsys.readouterr().err
    assert not (tmp_path / "torch").exists()
    assert main(["eval", str(out), "--backend", "torch"]) == 2
    assert "runs in ONNX Runtime only" in capsys.readouterr().err
    assert main(["generate", str(out), "--prompt", "hi"]) == 2
    assert "which torch cannot run" in capsys.readouterr().err
    assert main(["sweep", str(model), "-o", str(tmp_path / "sweep")]) == 2
    assert "not an ONNX export" in capsys.readouterr().err


def test_weight_transposes_are_folded_and_an_unused_source_dropped():
    rng = np.random.default_rng(0)
    x = ir.val("x", ir.DataType.FLOAT, ir.Shape(["n", 4]))
    ids = ir.val("ids", ir.DataType.INT64, ir.Shape(["n"]))
    w = ir.val("w", const_value=ir.tensor(rng.standard_normal((3, 4)).astype(np.float32)))
    shared = ir.val("shared", const_value=ir.tensor(rng.standard_normal((5, 4)).astype(np.float32)))
    nodes = [ir.node("Transpose", [w], attributes={"perm": [1, 0]}),
             ir.node("Transpose", [shared], attributes={"perm": [1, 0]}),
             ir.node("Gather", [shared, ids])]
    nodes += [ir.node("MatMul", [x, nodes[0].outputs[0]]),
              ir.node("MatMul", [x, nodes[1].outputs[0]])]
    graph = ir.Graph([x, ids], [nodes[3].outputs[0], nodes[4].outputs[0], nodes[2].outputs[0]],
                     nodes=nodes, initializers=[w, shared], opset_imports={"": 21})
    fold_weight_transposes(graph)
    assert [n.op_type for n in graph] == ["Gather", "MatMul", "MatMul"]
    assert sorted(graph.initializers) == ["shared", "shared.transposed", "w.transposed"]
    np.testing.assert_array_equal(graph.initializers["w.transposed"].const_value.numpy(),
                                  w.const_value.numpy().T)
    assert list(graph)[1].inputs[1].name == "w.transposed"


def test_an_older_opset_is_converted_to_the_one_the_lowering_writes(tmp_path):
    model = ir.load(_one_matmul(tmp_path))
    model.opset_imports[""] = 17
    ir.save(model, tmp_path / "m" / "model.onnx")
    out = _compile(tmp_path / "m" / "model.onnx", tmp_path / "out", "--policy", "uniform",
                   "--width", "3", "--group-size", "16")
    lowered = ir.load(out / "model.onnx")
    assert lowered.opset_imports[""] == 21
    ids = np.array([[1, 2, 3]])
    logits = session(out / "model.onnx").run(["logits"], {"input_ids": ids})[0]
    expected = session(tmp_path / "m" / "model.onnx").run(["logits"], {"input_ids": ids})[0]
    assert np.corrcoef(logits.ravel(), expected.ravel())[0, 1] > 0.95


def test_a_tied_heads_table_is_substituted_with_it(tmp_path):
    """torch's export keeps the tied table as an initializer of its own: measuring the head
    at another weight must change the table too, as one array serves both."""
    graph = import_model(str(_export(save_tiny_model("gpt2", tmp_path / "hf"), tmp_path / "x")))
    source = graph.source
    table = source.tables["lm_head"]
    changed = graph.weight("lm_head") * 0.5
    with source.substituted({"lm_head": changed}):
        np.testing.assert_array_equal(source.model.graph.initializers[table].const_value.numpy(),
                                      changed)
        np.testing.assert_array_equal(graph.weight("lm_head"), changed)
    np.testing.assert_array_equal(graph.weight("lm_head"), changed * 2)


def test_sensitivity_falls_back_to_output_error_without_gradients(tmp_path):
    from lwqc.ir.errors import PipelineError
    from lwqc.passes.manager import PassManager
    from lwqc.registry import parse

    hf_dir = save_tiny_model("llama", tmp_path / "hf")
    graph = import_model(str(_export(hf_dir, tmp_path / "onnx")))
    graph.calibration = np.random.default_rng(2).integers(0, 128, (4, 16))
    graph.available.add("calibration")
    PassManager(parse("gram,sensitivity")).run(graph)
    assert {s.stats["sensitivity"].metric for s in graph} == {"output-error"}
    with pytest.raises(PipelineError, match="needs the gradients of a torch model"):
        PassManager(parse("sensitivity{metric=fisher}")).run(graph)
