"""SmolLM2-135M-Instruct, a real 30-layer LM, compiled from its GGUF file into a KV-cache
decoder, evaluated, and asked a question (slow).

Its linear weights are Q4_1-dequantized (4-bit codes in blocks of 32 with float scale and
minimum): 4-bit group-32 formats with float offsets represent it almost exactly, so numbers
here say nothing about robustness to quantization in general.
"""

from __future__ import annotations

import json

import numpy as np
import onnx_ir as ir
import pytest

from conftest import genai_greedy
from lwqc.backends.decoder_session import DecoderSession
from lwqc.cli import main

pytestmark = pytest.mark.slow
PPL_FP_4_WINDOWS = 30.536  # first 4 WikiText-2 windows of 512 tokens, float32 from the GGUF


@pytest.fixture(scope="module")
def int4_b32(smollm2_gguf, tmp_path_factory):
    """The ONNX Runtime GenAI builder's int4 format: 4-bit symmetric, blocks of 32."""
    out = tmp_path_factory.mktemp("smollm2") / "u4"
    assert main(["compile", str(smollm2_gguf), "--policy", "uniform", "--width", "4",
                 "--group-size", "32", "--scheme", "rtn-sym", "-o", str(out), "-q"]) == 0
    return out


def test_gguf_compiles_every_linear_and_the_tied_head_as_sites(int4_b32):
    plan = json.loads((int4_b32 / "plan.json").read_text())
    assert plan["model"]["architecture"] == "LlamaForCausalLM"
    assert len(plan["blocks"]) == 30 and len(plan["sites"]) == 30 * 7 + 1
    head = plan["sites"]["lm_head"]
    assert head["tied"] == "model.embed_tokens.weight" and head["shape"] == [49152, 576]
    # 4-bit codes and an fp32 scale per block of 32 (576 and 1536 inputs: whole blocks)
    expected = 0
    for site in plan["sites"].values():
        out_features, in_features = site["shape"]
        expected += out_features * in_features // 2 + out_features * in_features // 32 * 4
        assert site["bits"] == 4 and site["group_size"] == 32
    assert plan["totals"]["bytes"] == expected
    assert plan["totals"]["avg_bits_physical"] == 5.0
    # the file: those bytes, the norms and the rotary tables, no second copy of the table
    size = (int4_b32 / "model.onnx").stat().st_size
    assert expected < size < expected + 3_000_000


def test_gguf_artifact_evaluates_against_its_float_model(int4_b32, capsys):
    capsys.readouterr()
    assert main(["eval", str(int4_b32), "--windows", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predicted_tokens"] == 4 * 511
    assert result["ppl_fp"] == pytest.approx(PPL_FP_4_WINDOWS, abs=0.01)
    # int4 everywhere, the tied table included, costs SmolLM2 tens of percent (the builder's
    # int4 artifact: +65.6 % on 16 windows)
    assert 0.05 < result["delta_ppl"] < 1.5
    assert 0.05 < result["kld"] < 1.5 and 0.4 < result["top1_agreement"] < 0.95


def test_chat_answers_and_onnxruntime_genai_agrees(int4_b32, capsys):
    og = pytest.importorskip("onnxruntime_genai")
    capsys.readouterr()
    assert main(["generate", str(int4_b32), "--chat", "--prompt",
                 "What is the capital of France?", "--max-new-tokens", "16"]) == 0
    assert "Paris" in capsys.readouterr().out
    # onnxruntime-genai runs the same decoder: the same greedy tokens
    prompt = list(og.Tokenizer(og.Model(str(int4_b32))).encode("The capital of France is"))
    tokens = genai_greedy(int4_b32, prompt, 8, stop_at_eos=False)
    assert tokens == list(DecoderSession(int4_b32).greedy(prompt, 8))


def test_the_builders_onnx_export_compiles_to_the_same_arrays(int4_b32, smollm2_gguf,
                                                              tmp_path):
    """``lwqc compile model.onnx`` on the GenAI builder's float SmolLM2: one fused q/k/v site
    per layer holding the GGUF route's q, k, v arrays, the tied table served by the head's own
    arrays, and the same perplexity."""
    from lwqc.backends.genai_decoder import run_builder
    from lwqc.evaluate import artifact_weights, evaluate
    from lwqc.ir.hf_source import import_model

    hf_dir = import_model(str(smollm2_gguf)).source.transformers_directory(tmp_path / "hf")
    run_builder(hf_dir, tmp_path / "builder")
    out = tmp_path / "from-onnx"
    assert main(["compile", str(tmp_path / "builder" / "model.onnx"), "--policy", "uniform",
                 "--width", "4", "--group-size", "32", "--scheme", "rtn-sym", "-o", str(out),
                 "-q"]) == 0
    plan = json.loads((out / "plan.json").read_text())
    assert len(plan["sites"]) == 30 * 5 + 1 and plan["sites"]["lm_head"]["tied"]
    packed, expected = artifact_weights(out, set()), artifact_weights(int4_b32, set())
    for site_id, weight in packed.items():
        parts = [site_id.replace(".attn.", ".self_attn.")]
        if "qkv_proj" in site_id:
            parts = [parts[0].replace("qkv_proj", f"{p}_proj") for p in "qkv"]
        rows = np.concatenate([expected[p].dequantize() for p in parts])
        assert np.array_equal(weight.dequantize(), rows), site_id
    ops = [node.op_type for node in ir.load(out / "model.onnx").graph]
    assert "GatherBlockQuantized" in ops and "Transpose" not in ops
    results = [evaluate(d, windows=1) for d in (out, int4_b32)]
    assert results[0]["ppl"] == pytest.approx(results[1]["ppl"], rel=1e-6)


def test_iree_builds_smollm2_and_matches_onnx_runtime(smollm2_gguf, tmp_path, capsys):
    """The real 30-layer model through IREE: iree-compile builds the byte-tensor artifact for
    llvm-cpu and its logits match ONNX Runtime's within 1e-3 (measured 1.7e-4 at lim 4.5)."""
    pytest.importorskip("iree.compiler")
    out = tmp_path / "iree"
    assert main(["compile", str(smollm2_gguf), "--policy", "uniform", "--width", "4",
                 "--group-size", "32", "--backend", "iree", "-o", str(out), "-q"]) == 0
    capsys.readouterr()
    assert main(["check-iree", str(out), "--tolerance", "1e-3", "--tokens", "32"]) == 0
    assert "within" in capsys.readouterr().out
