"""SmolLM2-135M-Instruct, a real 30-layer LM, compiled from its GGUF file and evaluated (slow).

Its linear weights are Q4_1-dequantized (4-bit codes in blocks of 32 with float scale and
minimum): 4-bit group-32 formats with float offsets represent it almost exactly, so numbers
here say nothing about robustness to quantization in general.
"""

from __future__ import annotations

import json
import math

import pytest

from lwqc.cli import main

pytestmark = pytest.mark.slow
PPL_FP_4_WINDOWS = 30.536  # first 4 WikiText-2 windows of 512 tokens, float32 from the GGUF


@pytest.fixture(scope="module")
def uniform_4(smollm2_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "u4"
    assert main(["compile", str(smollm2_gguf), "--policy", "uniform", "--width", "4",
                 "--group-size", "128", "-o", str(out), "-q"]) == 0
    return out


def test_gguf_compiles_with_every_linear_a_site_and_the_tied_head_excluded(uniform_4):
    plan = json.loads((uniform_4 / "plan.json").read_text())
    assert plan["model"]["architecture"] == "LlamaForCausalLM"
    assert len(plan["blocks"]) == 30 and len(plan["sites"]) == 30 * 7
    assert "lm_head" not in plan["sites"]
    assert any(e["tensor"] == "lm_head" and "tied" in e["why"] for e in plan["excluded"])
    # 4-bit codes + per group of 128 (576 inputs: 4 full groups and one of 64, 1536: 12) an
    # fp32 scale and a 4-bit zero point
    expected = 0
    for site in plan["sites"].values():
        out_features, in_features = site["shape"]
        groups = out_features * math.ceil(in_features / 128)
        expected += out_features * in_features // 2 + groups * 4 + math.ceil(groups / 2)
        assert site["bits"] == 4 and site["group_size"] == 128
    assert plan["totals"]["bytes"] == expected


def test_gguf_artifact_evaluates_against_its_float_model(uniform_4, capsys):
    capsys.readouterr()
    assert main(["eval", str(uniform_4), "--windows", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["predicted_tokens"] == 4 * 511
    assert result["ppl_fp"] == pytest.approx(PPL_FP_4_WINDOWS, abs=0.01)
    # uniform 4-bit g128 RTN costs SmolLM2 tens of percent (ONNX Runtime's quantizer: +34 %)
    assert 0.05 < result["delta_ppl"] < 1.0
    assert 0.05 < result["kld"] < 1.0 and 0.5 < result["top1_agreement"] < 0.95
