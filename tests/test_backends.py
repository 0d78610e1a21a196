"""ORT and torch package the same PackedWeights: identical dequantized weights, same logits."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from conftest import ort_dequantized, save_tiny_model
from lwqc import backends, passes  # noqa: F401
from lwqc.backends import onnxruntime as ort_backend
from lwqc.ir.hf_import import import_hf
from lwqc.ir.plan import Plan, QuantSpec
from lwqc.passes.manager import PassManager
from lwqc.passes.pipeline import parse_pipeline


def _mixed_plan(graph, group_size: int) -> Plan:
    """Every width and both schemes across the sites, one site kept float."""
    choices = [
        QuantSpec(2, group_size, "rtn-asym"), QuantSpec(3, group_size, "rtn-asym"),
        QuantSpec(4, group_size, "rtn-sym"), QuantSpec(8, group_size, "rtn-asym"),
        QuantSpec(4, group_size, "rtn-asym"), QuantSpec(2, group_size, "rtn-sym"),
        QuantSpec(16), QuantSpec(3, group_size, "rtn-sym"), QuantSpec(8, group_size, "rtn-sym"),
    ]
    specs = {s: choices[i % len(choices)] for i, s in enumerate(graph.sites)}
    return Plan(specs=specs, policy="test", budget={})


def _lower(graph, group_size: int):
    graph.plan = _mixed_plan(graph, group_size)
    graph.available.add("plan")
    PassManager(parse_pipeline("quantize,lower-onnx,lower-torch")).run(graph)
    return graph


# llama: MatMul with B [in, out]; gpt2: Conv1D weights; bert: its pooler is a Gemm with transB
@pytest.mark.parametrize(("arch", "group_size"), [("llama", 32), ("llama", 48), ("gpt2", 64),
                                                  ("bert", 128)])
def test_ort_and_torch_dequantize_to_identical_weights(arch, group_size, tmp_path):
    graph = _lower(import_hf(str(save_tiny_model(arch, tmp_path / "model"))), group_size)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    onnx.checker.check_model(str(path), full_check=True)
    module = graph.lowered["torch"]
    from_ort = ort_dequantized(path)
    quantized = {s for s, spec in graph.plan.specs.items() if not spec.kept}
    assert set(from_ort) == quantized
    for site_id, weight in from_ort.items():
        expected = module.get_submodule(site_id).dequantized_weight().numpy()
        np.testing.assert_array_equal(weight, expected, err_msg=site_id)
        np.testing.assert_array_equal(expected, graph.packed[site_id].dequantize())
    # and each weight sits in its matmul the right way round: the whole models agree
    inputs = graph.source.example_inputs(batch=2, seq=12)
    feeds = {k: v.numpy() for k, v in inputs.items() if torch.is_tensor(v)}
    session = ort_backend.session(path)
    first = session.get_outputs()[0].name
    with torch.no_grad():
        expected_out = module(**inputs)[first].numpy()
    assert np.abs(session.run([first], feeds)[0] - expected_out).max() < 1e-4


def test_artifact_round_trips_packed_arrays_exactly(tiny_llama_dir, tmp_path):
    graph = _lower(import_hf(str(tiny_llama_dir)), 32)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    read = ort_backend.read_packed(path)
    assert set(read) == set(graph.packed)
    for site_id, packed in graph.packed.items():
        back = read[site_id]
        assert (back.bits, back.group_size, back.scheme) == (
            packed.bits, packed.group_size, packed.scheme)
        np.testing.assert_array_equal(back.codes, packed.codes)
        np.testing.assert_array_equal(back.scales, packed.scales)
        if packed.zero_points is None:
            assert back.zero_points is None
        else:
            np.testing.assert_array_equal(back.zero_points, packed.zero_points)


def test_ort_and_torch_logits_agree_and_int2_raises_the_opset(tiny_llama_dir, tmp_path):
    graph = _lower(import_hf(str(tiny_llama_dir)), 32)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 25
    ids = np.random.default_rng(0).integers(0, 128, (2, 16))
    ort_logits = ort_backend.session(path).run(["logits"], {"input_ids": ids})[0]
    with torch.no_grad():
        torch_logits = graph.lowered["torch"](input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ort_logits - torch_logits).max() < 1e-4


def test_decisions_are_written_into_node_metadata(tiny_llama_dir, tmp_path):
    graph = import_hf(str(tiny_llama_dir))
    PassManager(parse_pipeline(
        "zd,policy-uniform{width=4,override=\"down_proj=8\"},quantize,lower-onnx"
    )).run(graph)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    model = onnx.load(path)
    meta = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if node.op_type == "MatMul" and "lwqc.site" in props:
            meta[props["lwqc.site"]] = props
    assert set(meta) == set(graph.sites)
    assert meta["model.layers.1.mlp.down_proj"]["lwqc.bits"] == "8"
    assert meta["model.layers.1.mlp.up_proj"]["lwqc.bits"] == "4"
    assert '"zd"' in meta["lm_head"]["lwqc.scores"]
    model_meta = {p.key: p.value for p in model.metadata_props}
    assert model_meta["lwqc.pipeline"] == graph.pipeline


def test_large_models_write_external_data(tiny_llama_dir, tmp_path, monkeypatch):
    graph = _lower(import_hf(str(tiny_llama_dir)), 32)
    monkeypatch.setattr(ort_backend, "EXTERNAL_DATA_THRESHOLD", 1024)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    data = tmp_path / "model.onnx.data"
    assert data.exists() and data.stat().st_size > path.stat().st_size
    ids = np.zeros((1, 4), np.int64)
    assert ort_backend.session(path).run(["logits"], {"input_ids": ids})[0].shape == (1, 4, 128)
    assert set(ort_backend.read_packed(path)) == set(graph.packed)
