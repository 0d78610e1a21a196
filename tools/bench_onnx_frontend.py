"""The same plan compiled from a model and from its ONNX export: plans, arrays, perplexity.

For each pair (the transformers route and the ONNX file of the same weights) it compiles
``--policy lim --bits 4.5`` twice, with the default quantizer (GPTQ and output-error ranges,
calibrated through torch on one side and ONNX Runtime on the other) and with a weight-only one
(``--no-gptq --clip minmax``), and reports: whether every site got the same spec, the share of
sites and of weights whose dequantized arrays are identical, and perplexity and KL on the first
WikiText-2 windows. Models: ref-llama-6L and SmolLM2-135M-Instruct (its GGUF) against torch's
export of each, written by the tool (``HFSource.float_onnx``, tokenizer files beside it).

Writes ``bench/onnx-frontend.json`` and ``.md``.
Usage: python tools/bench_onnx_frontend.py [--windows 8] [--work DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_quality import smollm2_gguf  # noqa: I001  (a sibling tool)

from lwqc.backends.onnx_rewrite import save
from lwqc.cli import main as lwqc
from lwqc.evaluate import artifact_weights, evaluate
from lwqc.ir.hf_source import import_model

REPO = Path(__file__).resolve().parents[1]
QUANTIZERS = {"default (GPTQ, output ranges)": [], "weight-only (min/max)":
              ["--no-gptq", "--clip", "minmax"]}


def export(model: str, tokenizer_dir: Path | None, out: Path) -> Path:
    """torch's export of ``model`` with the tokenizer's files beside it."""
    source = import_model(model).source
    out.mkdir(parents=True, exist_ok=True)
    save(source.float_onnx(), out / "model.onnx")
    if tokenizer_dir is None:
        source.tokenizer().save_pretrained(out)
    else:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_dir / name, out / name)
    return out / "model.onnx"


def compile_timed(model: str | Path, out: Path, flags: list[str]) -> float:
    start = time.perf_counter()
    assert lwqc(["compile", str(model), "-o", str(out), "-q", "--policy", "lim", "--bits", "4.5",
                 "--onnx-graph", "export", *flags]) == 0
    return time.perf_counter() - start


def compare(a: Path, b: Path) -> dict:
    plans = [json.loads((d / "plan.json").read_text())["sites"] for d in (a, b)]
    same_specs = all((plans[0][s]["bits"], plans[0][s]["group_size"], plans[0][s]["scheme"])
                     == (plans[1][s]["bits"], plans[1][s]["group_size"], plans[1][s]["scheme"])
                     for s in plans[0])
    packed = [artifact_weights(d, set()) for d in (a, b)]
    same_sites = equal_weights = total = 0
    for site_id, weight in packed[0].items():
        x, y = weight.dequantize(), packed[1][site_id].dequantize()
        same_sites += bool(np.array_equal(x, y))
        equal_weights += int(np.count_nonzero(x == y))
        total += x.size
    return {"same_specs": same_specs, "sites": len(packed[0]), "identical_sites": same_sites,
            "identical_weight_share": equal_weights / total,
            "bits": [json.loads((d / "plan.json").read_text())["totals"]["avg_bits_physical"]
                     for d in (a, b)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--work", type=Path, help="keep the exports and artifacts here")
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="lwqc-onnx-frontend-"))
    ref = REPO.parent / "shared" / "models" / "ref-llama-6L"
    models = {"ref-llama-6L": (str(ref), ref), "SmolLM2-135M-Instruct": (str(smollm2_gguf()),
                                                                         None)}
    rows = []
    for name, (model, tokenizer_dir) in models.items():
        onnx_file = export(model, tokenizer_dir, work / name / "export")
        for label, flags in QUANTIZERS.items():
            tag = "gptq" if not flags else "minmax"
            from_hf, from_onnx = work / name / f"hf-{tag}", work / name / f"onnx-{tag}"
            seconds = [compile_timed(model, from_hf, flags),
                       compile_timed(onnx_file, from_onnx, flags)]
            row = {"model": name, "quantizer": label, "compile_s": seconds,
                   **compare(from_onnx, from_hf)}
            for side, directory in (("hf", from_hf), ("onnx", from_onnx)):
                result = evaluate(directory, windows=args.windows)
                row[f"ppl_{side}"], row[f"kld_{side}"] = result["ppl"], result["kld"]
                row[f"ppl_fp_{side}"] = result["ppl_fp"]
            rows.append(row)
            print(json.dumps(row), flush=True)
    document = {"date": datetime.date.today().isoformat(), "windows": args.windows,
                "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "onnx-frontend.json").write_text(json.dumps(document, indent=1) + "\n")
    lines = [
        "# The same plan from the model and from its ONNX export",
        "",
        f"`python tools/bench_onnx_frontend.py --windows {args.windows}` on "
        f"{document['date']}: `lwqc compile MODEL --policy lim --bits 4.5 --onnx-graph export` "
        "from the transformers model (GGUF for SmolLM2) and from torch's ONNX export of the same "
        f"weights; perplexity and KL on the first {args.windows} WikiText-2 windows of 512 "
        "tokens (float perplexity: torch on one side, ONNX Runtime on the other).",
        "",
        "| model | quantizer | same spec per site | identical sites | identical weights | "
        "bits/weight | ppl from model | ppl from ONNX | float ppl (torch / ORT) | KLD (model / "
        "ONNX) | compile s (model / ONNX) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['quantizer']} | {'yes' if r['same_specs'] else 'no'} | "
            f"{r['identical_sites']}/{r['sites']} | {100 * r['identical_weight_share']:.3f} % "
            f"| {r['bits'][1]:.4f} | {r['ppl_hf']:.4f} | {r['ppl_onnx']:.4f} | "
            f"{r['ppl_fp_hf']:.4f} / {r['ppl_fp_onnx']:.4f} | {r['kld_hf']:.5f} / "
            f"{r['kld_onnx']:.5f} | {r['compile_s'][0]:.0f} / {r['compile_s'][1]:.0f} |")
    same_plans = all(r["same_specs"] for r in rows)
    weight_only_exact = all(r["identical_sites"] == r["sites"] for r in rows
                            if QUANTIZERS[r["quantizer"]])
    lines += [
        "",
        "Reading: LIM is measured in ONNX Runtime on the ONNX side and in torch on the other. "
        + ("Every plan gives every site the same spec on both sides. " if same_plans
           else "Some plans differ (above). ")
        + ("With the weight-only quantizer the arrays are identical bit for bit. "
           if weight_only_exact else "Even the weight-only arrays differ (above). ")
        + "GPTQ's Hessians (and the output-error ranges) come from each runtime's activations, "
        "which differ in the last float bits; its error feedback carries a rounding flip along "
        "the rest of the row, so some of its weights differ.",
    ]
    (args.out_dir / "onnx-frontend.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
