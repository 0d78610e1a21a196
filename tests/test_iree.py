"""The IREE lowering: standard ops on byte tensors that rebuild the packed weights exactly (in
ONNX Runtime), and a module iree-compile builds whose logits match ONNX Runtime's."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from conftest import mixed_plan, ort_dequantized, save_tiny_model
from lwqc.backends import iree
from lwqc.backends import onnx_rewrite as ort_backend
from lwqc.backends.onnx_formats import pack_bytes, pack_words, unpack_bytes
from lwqc.cli import main
from lwqc.ir.hf_source import import_model
from lwqc.passes.manager import PassManager
from lwqc.registry import parse

BYTE_TYPES = {ir.DataType.UINT8, ir.DataType.INT8, ir.DataType.FLOAT, ir.DataType.FLOAT16,
              ir.DataType.INT64, ir.DataType.INT32, ir.DataType.UINT16, ir.DataType.BOOL}


def test_codes_pack_lowest_first_into_bytes():
    assert pack_bytes(np.array([1, 2, 3, 0, 3]), 2).tolist() == [0b00111001, 0b00000011]
    assert pack_bytes(np.array([0xA, 0x5, 0xF]), 4).tolist() == [0x5A, 0x0F]
    codes = np.random.default_rng(0).integers(0, 16, 101).astype(np.uint8)
    assert np.array_equal(unpack_bytes(pack_bytes(codes, 4), 101, 4), codes)
    assert np.array_equal(unpack_bytes(pack_bytes(codes % 4, 2), 101, 2), codes % 4)


def _lower_iree(arch: str, tmp_path):
    graph = import_model(str(save_tiny_model(arch, tmp_path / "hf")))
    graph.plan = mixed_plan(graph, 32)
    graph.available.add("plan")
    PassManager(parse("quantize,lower-iree")).run(graph)
    out = tmp_path / "artifact"
    out.mkdir()
    ort_backend.save(graph.lowered["onnx"], out / "model.onnx")
    return graph, out


@pytest.mark.parametrize("arch", ["llama", "gpt2", "bert"])
def test_byte_lowering_rebuilds_every_format_exactly(arch, tmp_path):
    """Every width, scheme and format (mixed plan), in standard ops on byte tensors: ORT
    computes the packed weights bit for bit, and the arrays read back unchanged."""
    graph, out = _lower_iree(arch, tmp_path)
    model = ir.load(out / "model.onnx")
    assert {v.const_value.dtype for v in model.graph.initializers.values()} <= BYTE_TYPES
    assert not {"DequantizeLinear", "MatMulNBits", "GatherBlockQuantized"} & {
        n.op_type for n in model.graph}
    from_ort = ort_dequantized(out / "model.onnx")
    assert set(from_ort) == {s for s, spec in graph.plan.specs.items() if not spec.kept}
    for site_id, weight in from_ort.items():
        np.testing.assert_array_equal(weight, graph.packed[site_id].dequantize(), site_id)
    read = ort_backend.read_packed(out / "model.onnx", set(from_ort))
    for site_id, packed in read.items():
        for name, array in graph.packed[site_id].arrays().items():
            np.testing.assert_array_equal(packed.arrays()[name], array, f"{site_id}.{name}")


def test_byte_packing_stores_codes_at_their_width(tmp_path):
    """2/3/4-bit affine codes take their width in the file: ceil(n * bits / 8) bytes (3-bit:
    whole byte triples), as the packed-storage accounting counts them."""
    graph, out = _lower_iree("llama", tmp_path)
    model = ir.load(out / "model.onnx")
    checked = set()
    for site_id, weight in graph.packed.items():
        if weight.name != "affine" or weight.spec.bits not in (2, 3, 4):
            continue
        codes = model.graph.initializers[f"{site_id}.weight_codes"].const_value
        count = int(np.prod(weight.shape))
        expected = pack_words(np.zeros(count, np.uint8), 3).size if weight.spec.bits == 3 \
            else -(-count * weight.spec.bits // 8)
        assert codes.size == expected, site_id
        checked.add(weight.spec.bits)
    assert checked == {2, 3, 4}


@pytest.mark.parametrize("arch", ["llama", "bert"])
def test_iree_compiles_every_format_and_matches_ort(arch, tmp_path):
    pytest.importorskip("iree.compiler")
    _, out = _lower_iree(arch, tmp_path)
    result = iree.check(out / "model.onnx", tokens=16)
    assert result.max_abs_diff < 1e-4
    assert (out / "model.vmfb").stat().st_size == result.vmfb_bytes


def test_ref_llama_compiled_for_iree_matches_ort(ref_llama_dir, tmp_path, capsys):
    """The real 6-layer model, lim at 4.5 bits: iree-compile builds it for llvm-cpu and its
    logits match ONNX Runtime's within 1e-3 (measured: 1.6e-5 of logits up to 14)."""
    pytest.importorskip("iree.compiler")
    out = tmp_path / "out"
    assert main(["compile", str(ref_llama_dir), "--policy", "lim", "--bits", "4.5",
                 "--backend", "iree", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["check-iree", str(out), "--tolerance", "1e-3"]) == 0
    assert "within" in capsys.readouterr().out
    assert (out / "model.vmfb").exists()


def test_check_refuses_what_iree_cannot_read(tiny_llama_dir, tmp_path, capsys):
    assert main(["check-iree", str(tmp_path)]) == 2
    assert "holds no model.onnx" in capsys.readouterr().err
    out = tmp_path / "ort"
    assert main(["compile", str(tiny_llama_dir), "--policy", "uniform", "--width", "4",
                 "--group-size", "32", "--onnx-graph", "export", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["check-iree", str(out)]) == 2
    assert "was not lowered for IREE" in capsys.readouterr().err
