"""lwqc compile and eval end to end on the real models (slow, runs in CI)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from conftest import ort_dequantized
from lwqc.backends import onnx_rewrite as ort_backend
from lwqc.backends import torch_eager
from lwqc.backends.decoder_session import DecoderSession
from lwqc.cli import main
from lwqc.compile import sensitivity_granularity
from lwqc.ir.datasets import wikitext2_text
from lwqc.ir.hf_load import load_model

pytestmark = pytest.mark.slow
BASELINE_PPL_FP = 165.32  # BASELINES.md: ref-llama-6L, 64 windows of 512 tokens


def _compile(model, out, *args):
    assert main(["compile", str(model), "-o", str(out), "-q", *args]) == 0
    return out


def _eval(capsys, out, *args):
    capsys.readouterr()
    assert main(["eval", str(out), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


# fp32 MatMulNBits compute, so ONNX Runtime and torch agree to float rounding
ENTROPY_45 = ("--policy", "entropy", "--bits", "4.5", "--accuracy-level", "1")


@pytest.fixture(scope="module")
def entropy_45(ref_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("entropy") / "out"
    return _compile(ref_llama_dir, out, *ENTROPY_45)


def test_entropy_budget_is_met_and_eval_reports_ppl(entropy_45, capsys):
    plan = json.loads((entropy_45 / "plan.json").read_text())
    assert plan["schema"] == "lwqc.plan/1"
    assert plan["totals"]["avg_bits_physical"] <= 4.5
    # the totals follow from the per-site bytes
    assert plan["totals"]["bytes"] == sum(s["bytes"] for s in plan["sites"].values())
    result = _eval(capsys, entropy_45, "--windows", "64")
    assert result["avg_bits_physical"] <= 4.5
    assert result["predicted_tokens"] == 64 * 511
    assert result["ppl_fp"] == pytest.approx(BASELINE_PPL_FP, abs=0.01)
    # at 4.5 bits perplexity may land on either side of float; the distributions still move
    assert abs(result["ppl"] - result["ppl_fp"]) < 0.02 * result["ppl_fp"]
    assert 0 < result["kld"] < 0.05 and result["top1_agreement"] < 1


def test_uniform_8_bit_costs_under_half_a_percent(ref_llama_dir, tmp_path, capsys):
    out = _compile(ref_llama_dir, tmp_path / "u8", "--policy", "uniform", "--width", "8")
    result = _eval(capsys, out, "--windows", "64")
    assert result["avg_bits_physical"] == pytest.approx(8 + (32 + 8) / 128)
    assert abs(result["delta_ppl"]) < 0.005
    assert result["kld"] < 1e-3 and result["top1_agreement"] > 0.98


def test_same_command_twice_gives_identical_bytes(ref_llama_dir, entropy_45, tmp_path):
    again = _compile(ref_llama_dir, tmp_path / "again", *ENTROPY_45)
    for name in ("plan.json", "model.onnx"):
        assert (again / name).read_bytes() == (entropy_45 / name).read_bytes(), name


def test_artifact_carries_no_exporter_debug_paths(entropy_45):
    data = (entropy_45 / "model.onnx").read_bytes()
    assert b"site-packages" not in data and b"stack_trace" not in data


def test_torch_backend_artifact_evaluates_like_the_onnx_one(ref_llama_dir, entropy_45, tmp_path,
                                                            capsys):
    out = _compile(ref_llama_dir, tmp_path / "new" / "torch", "--policy", "entropy",
                   "--bits", "4.5", "--backend", "torch")  # parents are created
    assert (out / "packed.safetensors").exists() and not (out / "model.onnx").exists()
    from_packed = _eval(capsys, out, "--windows", "4")
    from_onnx = _eval(capsys, entropy_45, "--windows", "4", "--backend", "torch")
    assert from_packed["backend"] == "torch"
    assert from_packed["ppl"] == from_onnx["ppl"] and from_packed["kld"] == from_onnx["kld"]


def test_recorded_pipeline_reproduces_the_plan(ref_llama_dir, entropy_45, tmp_path):
    pipeline = json.loads((entropy_45 / "plan.json").read_text())["pipeline"]
    out = _compile(ref_llama_dir, tmp_path / "from-text", "--pipeline", pipeline)
    assert (out / "plan.json").read_bytes() == (entropy_45 / "plan.json").read_bytes()


def test_ort_and_torch_agree_on_every_weight_and_on_logits(entropy_45, ref_llama_dir):
    path = entropy_45 / "model.onnx"
    module = load_model(str(ref_llama_dir)).module
    plan = json.loads((entropy_45 / "plan.json").read_text())
    quantized = torch_eager.build(module, ort_backend.read_packed(path, set(plan["sites"])))
    from_ort = ort_dequantized(path)
    assert set(from_ort) == set(plan["sites"])  # every site is quantized at 4.5 bits
    for site_id, weight in from_ort.items():
        expected = quantized.get_submodule(site_id).dequantized_weight().numpy()
        np.testing.assert_array_equal(weight, expected, err_msg=site_id)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(ref_llama_dir))
    ids = np.asarray(tokenizer(wikitext2_text()[:20000])["input_ids"][:512], np.int64)[None]
    ort_logits = DecoderSession(entropy_45).prefill(ids)  # the KV-cache decoder, empty cache
    with torch.no_grad():
        torch_logits = quantized(input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(ort_logits - torch_logits).max() < 1e-3


def test_show_prints_what_print_ir_after_printed(ref_llama_dir, tmp_path, capsys):
    out = tmp_path / "out"
    capsys.readouterr()
    main(["compile", str(ref_llama_dir), "-o", str(out), "-q", "--bits", "4",
          "--print-ir-after", "lower-onnx"])
    printed = capsys.readouterr().out
    assert printed.startswith("// ----- IR after lower-onnx -----\n")
    assert main(["show", str(out)]) == 0
    shown = capsys.readouterr().out
    assert shown == printed.split("\n", 1)[1]
    assert "spec=w4g128:rtn-asym" in shown and "entropy.entropy=" in shown


def test_edited_plan_recompiles_with_the_edit(ref_llama_dir, entropy_45, tmp_path):
    plan = json.loads((entropy_45 / "plan.json").read_text())
    site = "model.layers.2.mlp.up_proj"
    plan["sites"][site].update(bits=2, group_size=64)
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(plan))
    out = _compile(ref_llama_dir, tmp_path / "edited", "--plan", str(edited))
    recompiled = json.loads((out / "plan.json").read_text())
    assert recompiled["sites"][site]["bits"] == 2
    assert recompiled["sites"][site]["group_size"] == 64
    assert f"apply-plan{{file={edited}}}" in recompiled["pipeline"]
    for other, entry in plan["sites"].items():
        if other != site:
            assert recompiled["sites"][other]["bits"] == entry["bits"]
    assert recompiled["totals"]["bytes"] < plan["totals"]["bytes"]


def test_plan_recompiles_with_the_quantizer_and_calibration_it_records(ref_llama_dir,
                                                                       tmp_path):
    from lwqc.backends import onnx_rewrite

    calibrated = ("--calib-samples", "4", "--calib-seq-len", "64")
    first = _compile(ref_llama_dir, tmp_path / "first", "--policy", "uniform", "--width", "3",
                     "--group-size", "32", "--gptq", "--clip", "minmax", *calibrated)
    plan = first / "plan.json"
    again = _compile(ref_llama_dir, tmp_path / "again", "--plan", str(plan))
    pipeline = json.loads((again / "plan.json").read_text())["pipeline"]
    assert "calib{source=wikitext2-valid,samples=4,seq_len=64,seed=0}" in pipeline
    assert "quantize{clip=minmax,gptq=true}" in pipeline
    sites = set(json.loads(plan.read_text())["sites"])
    weights = [onnx_rewrite.read_packed(out / "model.onnx", sites) for out in (first, again)]
    for site in sites:
        for name, array in weights[0][site].arrays().items():
            np.testing.assert_array_equal(weights[1][site].arrays()[name], array)
    # a flag given with --plan wins over the recorded option
    plain = _compile(ref_llama_dir, tmp_path / "plain", "--plan", str(plan), "--no-gptq")
    assert "gptq=false" in json.loads((plain / "plan.json").read_text())["pipeline"]
    rtn = onnx_rewrite.read_packed(plain / "model.onnx", sites)
    assert any(not np.array_equal(rtn[s].arrays()["codes"], weights[0][s].arrays()["codes"])
               for s in sites)


def test_override_pins_sites_and_budget_still_holds(ref_llama_dir, tmp_path):
    out = _compile(ref_llama_dir, tmp_path / "pinned", "--policy", "zd", "--bits", "4.5",
                   "--override", r"mlp\.down_proj=8", "--override", "lm_head=4")
    plan = json.loads((out / "plan.json").read_text())
    downs = [e["bits"] for s, e in plan["sites"].items() if s.endswith("down_proj")]
    assert downs == [8] * 6
    assert plan["sites"]["lm_head"]["bits"] == 4
    assert plan["totals"]["avg_bits_physical"] <= 4.5


def test_recompiling_into_an_existing_artifact_replaces_it(ref_llama_dir, entropy_45, tmp_path):
    out = tmp_path / "replace"
    shutil.copytree(entropy_45, out)
    _compile(ref_llama_dir, out, "--policy", "uniform", "--width", "8")
    assert json.loads((out / "plan.json").read_text())["policy"] == "policy-uniform"


def test_minilm_uniform_8_bit_keeps_sts_quality(minilm_dir, tmp_path, capsys):
    out = _compile(minilm_dir, tmp_path / "minilm", "--policy", "uniform", "--width", "8")
    result = _eval(capsys, out)
    assert result["pairs"] == 1500
    assert result["spearman_fp"] > 0.8  # the real all-MiniLM-L6-v2 on STS-B dev
    assert abs(result["spearman"] - result["spearman_fp"]) < 0.005
    assert result["cosine_to_fp"] > 0.999


@pytest.mark.parametrize(("bits", "group_sizes"), [
    (4.5, "32"),
    (2.5, "32+64+128"),  # float-offset-dq costs 2.5 bits or more at 2 bits in groups of 32
])
def test_sensitivity_defaults_pick_a_quantizer_that_can_meet_the_budget(
        ref_llama_dir, tmp_path, bits, group_sizes):
    """`--policy sensitivity --bits B` alone: float-offset-dq per output row, in groups of 32,
    or at 2.5 bits and below of 32, 64 or 128."""
    out = tmp_path / "out"
    _compile(ref_llama_dir, out, "--policy", "sensitivity", "--bits", str(bits),
             "--calib-samples", "2", "--calib-seq-len", "64", "--no-gptq", "--backend", "torch")
    document = json.loads((out / "plan.json").read_text())
    pipeline = document["pipeline"]
    scheme = "float-offset-dq"
    assert f"sensitivity{{metric=auto,group_size={group_sizes},scheme={scheme}" in pipeline
    assert (f"policy-sensitivity{{bits={bits},granularity=row,group_size={group_sizes},"
            f"scheme={scheme}" in pipeline)
    parts = [part for site in document["sites"].values() for part in site.get("parts", [site])]
    quantized = [part for part in parts if part["bits"] != 16]
    assert {part["scheme"] for part in quantized} == {scheme}
    used = {part["group_size"] for part in quantized}
    assert used <= {int(size) for size in group_sizes.split("+")}
    assert document["totals"]["avg_bits_physical"] <= bits
    if bits == 2.5:  # 2-bit codes in wider groups pay for the budget
        assert used - {32} and min(part["bits"] for part in quantized) == 2


@pytest.mark.parametrize(("bits", "solver", "measured", "granularity"), [
    (4.5, None, False, "row"),
    (2.5, None, False, "row"),
    (4.5, None, True, None),  # measured damage has no rows
    (4.5, "greedy", False, None),  # the greedy solver plans per unit
    (None, None, False, None),  # --ratio: no budget in bits
])
def test_sensitivity_granularity_follows_the_budget(bits, solver, measured, granularity):
    assert sensitivity_granularity(bits, solver, measured) == granularity


@pytest.mark.parametrize("granularity", ["matmul", "row"])
def test_sensitivity_choosing_group_sizes_lowers_each_as_planned(ref_llama_dir, tmp_path,
                                                                granularity):
    """`--group-size 32+64+128`: predictions and plan at all three, per matmul or per row;
    ONNX Runtime and torch dequantize every site, whatever its group sizes, to the same
    weights."""
    out = _compile(ref_llama_dir, tmp_path / "out", "--policy", "sensitivity", "--bits", "3.5",
                   "--group-size", "32+64+128", "--granularity", granularity,
                   "--calib-samples", "2", "--calib-seq-len", "64", "--no-gptq")
    document = json.loads((out / "plan.json").read_text())
    assert "sensitivity{metric=auto,group_size=32+64+128," in document["pipeline"]
    assert (f"policy-sensitivity{{bits=3.5,granularity={granularity},group_size=32+64+128,"
            in document["pipeline"])
    parts = [part for site in document["sites"].values() for part in site.get("parts", [site])]
    chosen = {(part["scheme"], part["group_size"]) for part in parts}
    assert {g for _, g in chosen} == {32, 64, 128}  # all three in use on ref-llama-6L
    assert {s for s, _ in chosen} == {"float-offset-dq"}
    assert document["totals"]["avg_bits_physical"] <= 3.5
    module = load_model(str(ref_llama_dir)).module
    path = out / "model.onnx"
    quantized = torch_eager.build(module, ort_backend.read_packed(path, set(document["sites"])))
    for site_id, weight in ort_dequantized(path).items():
        expected = quantized.get_submodule(site_id).dequantized_weight().numpy()
        np.testing.assert_array_equal(weight, expected, err_msg=site_id)
