"""Every bad input ends with one clear line on stderr, exit code 2, and no output written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from conftest import save_tiny_model
from lwqc.cli import main


def _run_and_expect_error(capsys, argv, out, match):
    code = main([*argv, "-q"] if argv[0] == "compile" else argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("lwqc") and match in err[0], err[0]
    if out is not None:
        assert not out.exists()
        assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


def test_missing_model_path(capsys, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tmp_path / "missing"), "--bits", "4", "-o",
                                   str(out)], out, "does not exist")


def test_unknown_policy(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--policy", "magic",
                                   "--bits", "4", "-o", str(out)], out, "unknown policy 'magic'")


def test_infeasible_bits(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--bits", "1.5", "-o",
                                   str(out)], out, "--bits 1.5 is infeasible")


def test_several_group_sizes_outside_policy_sensitivity(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--policy", "lim", "--bits",
                                   "4.5", "--group-size", "32+64", "-o", str(out)], out,
                          "group_size='32+64': one group size; choosing among several")
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--policy", "sensitivity",
                                   "--bits", "4.5", "--group-size", "32+x", "-o", str(out)], out,
                          "group_size='32+x': must be a positive integer")


def test_nan_weights(capsys, tmp_path):
    model = save_tiny_model("llama", tmp_path / "model")
    tensors = load_file(model / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = float("nan")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] = float("inf")
    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(model), "--bits", "4", "-o", str(out)], out,
                          "model.layers.1.mlp.up_proj holds 2 NaN/Inf values")


def test_unwritable_output_directory(capsys, tiny_llama_dir):
    # /proc refuses new entries even to root
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--bits", "4", "-o",
                                   "/proc/lwqc-out"], None, "cannot write to /proc")


def test_failed_compile_removes_the_parents_it_created(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "made" / "for" / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--bits", "1.5", "-o",
                                   str(out)], None, "infeasible")
    assert not (tmp_path / "made").exists()


def test_corrupt_plan_json(capsys, tiny_llama_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text('{"schema": "lwqc.plan/1", "sites": {')
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--plan", str(plan), "-o",
                                   str(out)], out, "is not valid JSON")


def test_plan_with_a_bad_width(capsys, tiny_llama_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema": "lwqc.plan/1", "sites": {
        "lm_head": {"bits": 5, "group_size": 128, "scheme": "rtn-asym"}}}))
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--plan", str(plan), "-o",
                                   str(out)], out, "unsupported width 5")


def test_plan_recording_a_pipeline_lwqc_cannot_read(capsys, tiny_llama_dir, tmp_path):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"schema": "lwqc.plan/1", "pipeline": "quantize{gptq=maybe}",
                                "sites": {"lm_head": {"bits": 4, "group_size": 128,
                                                      "scheme": "rtn-asym"}}}))
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--plan", str(plan), "-o",
                                   str(out)], out, "records a pipeline lwqc cannot read")


def test_calibration_flags_beside_a_pipeline(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--pipeline",
                                   "policy-uniform{width=4},quantize,lower-onnx",
                                   "--calib-samples", "8", "-o", str(out)], out,
                          "--calib*, --onnx-graph and --accuracy-level go inside --pipeline")


def test_option_that_does_not_apply_to_the_policy(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--policy", "zd", "--bits",
                                   "4", "--seed", "3", "-o", str(out)], out,
                          "--seed does not apply to policy 'zd'")


def test_pipeline_with_unknown_pass(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--pipeline",
                                   "zd,frobnicate,lower-onnx", "-o", str(out)], out,
                          "unknown pass 'frobnicate'")


def test_eval_of_a_directory_that_is_no_artifact(capsys, tmp_path):
    _run_and_expect_error(capsys, ["eval", str(tmp_path)], None, "is not an lwqc artifact")


def test_existing_foreign_directory_is_not_overwritten(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code = main(["compile", str(tiny_llama_dir), "--bits", "4", "-o", str(out), "-q"])
    assert code == 2 and "files lwqc did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


def test_console_script_exits_non_zero_with_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "lwqc.cli", "compile", str(tmp_path / "missing"), "--bits", "4",
         "-o", str(tmp_path / "out")], capture_output=True, text=True, check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"lwqc: error: model path {tmp_path / 'missing'} does not exist; check the path"
    ]


def test_argument_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["compile", "model", "--bits", "four", "-o", "out"])
    assert exit_info.value.code == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_analyze_of_a_missing_model(capsys, tmp_path):
    out = tmp_path / "analysis"
    _run_and_expect_error(capsys, ["analyze", str(tmp_path / "missing"), "-o", str(out)], out,
                          "does not exist")


def test_sweep_with_malformed_budgets(capsys, tmp_path):
    _run_and_expect_error(capsys, ["sweep", str(tmp_path), "-o", str(tmp_path / "s"), "--bits",
                                   "3,four"], None, "expected comma-separated numbers")


def test_calibrating_on_the_evaluation_text_is_refused(capsys, ref_llama_dir, wikitext2_raw,
                                                       tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(ref_llama_dir), "--policy", "lim", "--bits",
                                   "3.5", "--calib", str(wikitext2_raw), "-o", str(out)], out,
                          "must not use the evaluation text")


def test_a_directory_with_a_plan_and_other_files_is_not_replaced(capsys, tiny_llama_dir,
                                                                 tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "plan.json").write_text("{}")
    (out / "my-notes.md").write_text("mine")
    code = main(["compile", str(tiny_llama_dir), "--bits", "4", "-o", str(out), "-q"])
    assert code == 2 and "my-notes.md" in capsys.readouterr().err
    assert (out / "my-notes.md").read_text() == "mine"


def test_gguf_without_its_packages_names_the_extra(capsys, tmp_path, monkeypatch):
    import importlib.util

    model = tmp_path / "model.gguf"
    model.write_bytes(b"GGUF")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "gguf" else real(name, *a))
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(model), "--bits", "4", "-o", str(out)], out,
                          "needs the package(s) gguf: pip install 'lwqc[gguf]'")


def test_corrupt_gguf_file(capsys, tmp_path):
    model = tmp_path / "model.gguf"
    model.write_bytes(b"not a gguf file at all" * 10)
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(model), "--bits", "4", "-o", str(out)], out,
                          f"cannot read GGUF file {model}")


def test_missing_gguf_file(capsys, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tmp_path / "model.gguf"), "--bits", "4", "-o",
                                   str(out)], out, "does not exist")



def test_kv_cache_decoder_for_an_encoder(capsys, tmp_path):
    model = save_tiny_model("bert", tmp_path / "bert")
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(model), "--policy", "uniform", "--width",
                                   "4", "--onnx-graph", "kv-cache", "-o", str(out)], out,
                          "no KV-cache decoder for BertModel")


def test_lowering_options_with_the_torch_backend(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--bits", "4",
                                   "--backend", "torch", "--accuracy-level", "1", "-o",
                                   str(out)], out, "apply to --backend onnx only")


def test_generate_from_a_directory_that_is_no_artifact(capsys, tmp_path):
    _run_and_expect_error(capsys, ["generate", str(tmp_path), "--prompt", "hi"], None,
                          "is not an lwqc artifact")


def test_generate_on_onnx_without_a_decoder(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"  # a tiny model has no tokenizer: the plain export, no cache
    assert main(["compile", str(tiny_llama_dir), "--policy", "uniform", "--width", "4",
                 "-o", str(out), "-q"]) == 0
    _run_and_expect_error(capsys, ["generate", str(out), "--prompt", "hi", "--backend",
                                   "onnx"], None, "holds no KV-cache decoder")


def test_generate_chat_without_a_chat_template(capsys, ref_llama_dir, tmp_path):
    out = tmp_path / "out"
    assert main(["compile", str(ref_llama_dir), "--policy", "uniform", "--width", "8",
                 "-o", str(out), "-q"]) == 0
    _run_and_expect_error(capsys, ["generate", str(out), "--prompt", "hi", "--chat"], None,
                          "no chat template")
    _run_and_expect_error(capsys, ["generate", str(out), "--prompt", "hi",
                                   "--max-new-tokens", "0"], None, "at least 1")


@pytest.mark.parametrize(("executor", "workers", "match"), [
    ("spark", None, "choose local, ray or ray:ADDRESS"),
    ("local", "2", "--workers applies to --executor ray"),
    ("ray", "0", "--workers must be at least 1"),
])
def test_bad_sweep_executor(capsys, tmp_path, executor, workers, match):
    argv = ["sweep", str(tmp_path / "model"), "-o", str(tmp_path / "out"), "--executor",
            executor]
    _run_and_expect_error(capsys, argv + (["--workers", workers] if workers else []), None,
                          match)


def test_executor_without_measured_sensitivity(capsys, tiny_llama_dir, tmp_path):
    out = tmp_path / "out"
    _run_and_expect_error(capsys, ["compile", str(tiny_llama_dir), "--policy", "uniform",
                                   "--width", "4", "--executor", "ray", "-o", str(out)], out,
                          "--executor applies to measured sensitivity")
