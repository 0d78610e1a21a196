"""ORT and torch package the same weight formats: identical dequantized weights, same logits."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
import torch

from conftest import mixed_plan, ort_dequantized, save_tiny_model, scattered_rows
from lwqc.backends import offset_nbits
from lwqc.backends import onnx_rewrite as ort_backend
from lwqc.ir.accounting import site_bytes
from lwqc.ir.errors import LwqcError
from lwqc.ir.formats import RowMixWeight
from lwqc.ir.formats.base import packed_code_bytes
from lwqc.ir.fx_lift import example_inputs
from lwqc.ir.hf_source import import_model
from lwqc.ir.plan import Plan
from lwqc.ir.spec import AsymmetricSpec, RowMixSpec, SymmetricSpec
from lwqc.passes.manager import PassManager
from lwqc.registry import parse


def _lower(graph, group_size: int):
    graph.plan = mixed_plan(graph, group_size)
    graph.available.add("plan")
    PassManager(parse("quantize,lower-onnx{accuracy_level=1},lower-torch")).run(graph)
    return graph


# llama: MatMul with B [in, out]; gpt2: Conv1D weights; bert: its pooler is a Gemm with transB
@pytest.mark.parametrize(("arch", "group_size"), [("llama", 32), ("llama", 48), ("gpt2", 64),
                                                  ("bert", 128)])
def test_ort_and_torch_dequantize_to_identical_weights(arch, group_size, tmp_path):
    graph = _lower(import_model(str(save_tiny_model(arch, tmp_path / "model"))), group_size)
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
    inputs = example_inputs(graph.source.kind, graph.source.module.config.vocab_size, 2, 12)
    feeds = {k: v.numpy() for k, v in inputs.items() if torch.is_tensor(v)}
    session = ort_backend.session(path)
    first = session.get_outputs()[0].name
    with torch.no_grad():
        expected_out = module(**inputs)[first].numpy()
    assert np.abs(session.run([first], feeds)[0] - expected_out).max() < 1e-4


def test_artifact_round_trips_packed_arrays_exactly(tiny_llama_dir, tmp_path):
    graph = _lower(import_model(str(tiny_llama_dir)), 32)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    read = ort_backend.read_packed(path, set(graph.packed))
    assert set(read) == set(graph.packed)
    for site_id, packed in graph.packed.items():
        back = read[site_id]
        assert back.spec == packed.spec
        assert type(back) is type(packed)
        arrays, stored = packed.arrays(), back.arrays()
        assert set(stored) == set(arrays), site_id
        for name, array in arrays.items():
            assert stored[name].dtype == array.dtype, (site_id, name)
            np.testing.assert_array_equal(stored[name], array, err_msg=f"{site_id}.{name}")


def test_reading_an_artifact_back_fails_on_a_missing_site(tiny_llama_dir, tmp_path):
    graph = _lower(import_model(str(tiny_llama_dir)), 32)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    with pytest.raises(LwqcError, match="holds no quantized weight for site model.other"):
        ort_backend.read_packed(path, {*graph.packed, "model.other"})


def test_ort_and_torch_logits_agree_and_int2_raises_the_opset(tiny_llama_dir, tmp_path):
    graph = _lower(import_model(str(tiny_llama_dir)), 32)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    assert {o.domain: o.version for o in onnx.load(path).opset_import}[""] == 25
    ids = np.random.default_rng(0).integers(0, 128, (2, 16))
    ort_logits = ort_backend.session(path).run(["logits"], {"input_ids": ids})[0]
    with torch.no_grad():
        torch_logits = graph.lowered["torch"](input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ort_logits - torch_logits).max() < 1e-4


def test_decisions_are_written_into_node_metadata(tiny_llama_dir, tmp_path):
    graph = import_model(str(tiny_llama_dir))
    PassManager(parse(
        "zd,policy-uniform{width=4,override=\"down_proj=8\"},quantize,lower-onnx"
    )).run(graph)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    model = onnx.load(path)
    meta = {}
    for node in model.graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        if node.op_type == "MatMulNBits" and "lwqc.site" in props:
            meta[props["lwqc.site"]] = props
    assert set(meta) == set(graph.sites)
    assert meta["model.layers.1.mlp.down_proj"]["lwqc.bits"] == "8"
    assert meta["model.layers.1.mlp.up_proj"]["lwqc.bits"] == "4"
    assert '"zd"' in meta["lm_head"]["lwqc.scores"]
    model_meta = {p.key: p.value for p in model.metadata_props}
    assert model_meta["lwqc.pipeline"] == graph.pipeline


def test_large_models_write_external_data(tiny_llama_dir, tmp_path, monkeypatch):
    graph = _lower(import_model(str(tiny_llama_dir)), 32)
    monkeypatch.setattr(ort_backend, "EXTERNAL_DATA_THRESHOLD", 1024)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    data = tmp_path / "model.onnx.data"
    stored = onnx.load(str(path), load_external_data=False).graph.initializer
    inline = [len(t.raw_data) for t in stored if t.data_location != onnx.TensorProto.EXTERNAL]
    # the weights moved out; only small constants (at most 256 bytes each) stay in the graph
    # (the lowering's shapes and indices, one set per part of the row-mixed sites)
    assert data.exists() and max(inline) <= 256
    assert data.stat().st_size > 5 * sum(inline)
    monkeypatch.undo()
    inline = tmp_path / "inline" / "model.onnx"
    inline.parent.mkdir()
    ort_backend.save(graph.lowered["onnx"], inline)
    assert not (inline.parent / "model.onnx.data").exists()
    ids = np.random.default_rng(1).integers(0, 128, (1, 6))
    external_logits = ort_backend.session(path).run(["logits"], {"input_ids": ids})[0]
    inline_logits = ort_backend.session(inline).run(["logits"], {"input_ids": ids})[0]
    np.testing.assert_array_equal(external_logits, inline_logits)
    read = ort_backend.read_packed(path, set(graph.packed))
    for site_id, packed in graph.packed.items():
        np.testing.assert_array_equal(read[site_id].dequantize(), packed.dequantize())


def _stored_bytes(path) -> dict[str, int]:
    """Bytes of each site's arrays in an artifact, by site."""
    stored: dict[str, int] = {}
    for tensor in onnx.load(str(path)).graph.initializer:
        site, sep, _ = tensor.name.rpartition(".weight_")
        if sep:  # a row-mix's parts are <site>.p<k>.weight_*, parts stored jointly
            site = re.sub(r"\.p[0-9]+(\+[0-9]+)?$", "", site)  # <site>.p<k>+<more>.weight_*
            stored[site] = stored.get(site, 0) + len(tensor.raw_data)
    return stored


def test_stored_bytes_of_every_site_equal_the_plans_bytes(tiny_llama_dir, tmp_path):
    graph = _lower(import_model(str(tiny_llama_dir)), 32)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    stored = _stored_bytes(path)
    assert set(stored) == set(graph.packed)
    joined = []
    for site_id, weight in graph.packed.items():
        expected = site_bytes(graph, site_id, weight.spec)
        if isinstance(weight, RowMixWeight) and offset_nbits.fits_rows(weight):
            # float-offset-dq parts stored jointly (one kernel for the whole site, or
            # ``joint_parts``): their 6-bit parameter codes in whole words once
            runs = ([list(range(len(weight.parts)))] if offset_nbits.fits(weight) else
                    offset_nbits.joint_parts([part.spec for part in weight.parts]))
            for run in runs:
                groups = [weight.parts[i].scale_codes.size for i in run]
                expected += 2 * (packed_code_bytes(sum(groups), 6)
                                 - sum(packed_code_bytes(g, 6) for g in groups))
            joined.append(offset_nbits.fits(weight))
        assert stored[site_id] == expected, site_id
    assert any(w.spec.bits == 3 for w in graph.packed.values())  # packed 3-bit included
    assert sorted(joined) == [False, True]


def test_lowering_constants_are_stored_once_without_value_info_or_folded_names(
        tiny_llama_dir, tmp_path):
    graph = _lower(import_model(str(tiny_llama_dir)), 32)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    model = onnx.load(str(path))
    initializers = {t.name: t for t in model.graph.initializer}
    written = {name for name in initializers
               if name.startswith("lwqc.") or ".lowering_" in name or ".weight_" in name}
    assert len(written) > 100 and not {info.name for info in model.graph.value_info} & written
    # only the layout of packed arrays, which read_packed reads, is kept per site
    layout = re.compile(r".*\.lowering_[a-z_]+_(shape|byte_shifts|mask)$")
    constants = [onnx.numpy_helper.to_array(initializers[name]) for name in written
                 if ".weight_" not in name and not layout.fullmatch(name)]
    contents = {(array.dtype.str, array.shape, array.tobytes()) for array in constants}
    assert len(contents) == len(constants) > 10
    # Reshape to byte triples, read by the unpacking of every 3- and 6-bit array
    np.testing.assert_array_equal(
        onnx.numpy_helper.to_array(initializers["lwqc.int64.2.m1_3"]), [-1, 3])
    readers = [node for node in model.graph.node if "lwqc.int64.2.m1_3" in node.input]
    words = [name for name, tensor in initializers.items() if name.endswith("_mask")
             and onnx.numpy_helper.to_array(tensor).item() in (7, 63)]
    assert len(readers) == len(words) > 1
    # nodes on constants alone (folded when the session starts) go unnamed, the others not
    assert {node.name for node in readers} == {""}
    kernels = [node for node in model.graph.node if node.op_type == "MatMulNBits"]
    assert kernels and all(node.name.startswith("model.layers.") for node in kernels)


# hand cases: codes 0..7 fill one 3-bit word 0o76543210 = 0xFAC688; codes 1, 2, 3, 63 make
# the 6-bit word 63 << 18 | 3 << 12 | 2 << 6 | 1 = 0xFC3081; bytes little-endian
WORD_HAND_CASES = {3: (list(range(8)), [0x88, 0xC6, 0xFA]), 6: ([1, 2, 3, 63], [0x81, 0x30, 0xFC])}


@pytest.mark.parametrize("width, count", [(3, c) for c in (1, 7, 8, 9, 64, 1001)]
                         + [(6, c) for c in (1, 3, 4, 5, 64, 1001)])
def test_word_packing_round_trips_and_takes_its_width(width, count):
    from lwqc.backends.onnx_formats import pack_words, unpack_words

    codes = np.random.default_rng(count).integers(0, 2**width, count).astype(np.uint8)
    packed = pack_words(codes, width)
    per_word = 24 // width
    assert packed.dtype == np.uint8 and len(packed) == 3 * -(-count // per_word)
    np.testing.assert_array_equal(unpack_words(packed, count, width), codes)
    hand, expected = WORD_HAND_CASES[width]
    np.testing.assert_array_equal(pack_words(np.array(hand, np.uint8), width), expected)


def test_affine_codes_below_four_bits_run_widened_on_the_4_bit_kernel(tiny_llama_dir, tmp_path):
    """2- and 3-bit affine sites, asymmetric and symmetric, and affine row-mixes (on one kernel,
    or one per group size) run on MatMulNBits at 4 bits (ORT's own 2-bit kernel is several
    times slower on CPU), their codes and zero points widened when the session starts: the file
    holds their own arrays at their physical size, read back exactly, and ORT multiplies by the
    weights torch computes."""
    graph = import_model(str(tiny_llama_dir))
    choices = [AsymmetricSpec(2, 32), SymmetricSpec(3, 32), SymmetricSpec(2, 64),
               (AsymmetricSpec(3, 32), AsymmetricSpec(2, 32), AsymmetricSpec(4, 64)),
               (SymmetricSpec(4, 32), SymmetricSpec(2, 32), SymmetricSpec(3, 32))]
    specs = {}
    for index, (site_id, site) in enumerate(graph.sites.items()):
        spec = choices[index % len(choices)]
        specs[site_id] = spec if not isinstance(spec, tuple) else RowMixSpec(
            bits=4, parts=spec, rows=scattered_rows(len(spec), site.shape[0]))
    graph.plan = Plan(specs=specs, policy="test", budget={})
    graph.available.add("plan")
    PassManager(parse("quantize,lower-onnx{accuracy_level=1},lower-torch")).run(graph)
    path = tmp_path / "model.onnx"
    ort_backend.save(graph.lowered["onnx"], path)
    nodes = onnx.load(path).graph.node
    kernels = [n for n in nodes if n.op_type == "MatMulNBits"]
    assert kernels and {a.i for n in kernels for a in n.attribute if a.name == "bits"} == {4}
    assert not [n for n in nodes if n.op_type in ("MatMul", "DequantizeLinear")
                and "lwqc.site" in {p.key for p in n.metadata_props}]
    assert _stored_bytes(path) == {site_id: site_bytes(graph, site_id, weight.spec)
                                   for site_id, weight in graph.packed.items()}
    read = ort_backend.read_packed(path, set(graph.packed))
    for site_id, packed in graph.packed.items():
        for name, array in packed.arrays().items():
            np.testing.assert_array_equal(read[site_id].arrays()[name], array,
                                          err_msg=f"{site_id}.{name}")
    for site_id, weight in ort_dequantized(path).items():
        np.testing.assert_array_equal(weight, graph.packed[site_id].dequantize(), site_id)
    ids = np.random.default_rng(0).integers(0, 128, (2, 16))
    ort_logits = ort_backend.session(path).run(["logits"], {"input_ids": ids})[0]
    with torch.no_grad():
        torch_logits = graph.lowered["torch"](input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ort_logits - torch_logits).max() < 1e-4
