"""The ``lwqc`` command line: compile, eval, generate, analyze, sweep, check-iree, passes,
show."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from lwqc.ir.errors import LwqcError
from lwqc.ir.spec import SCHEMES

EXIT_USER_ERROR = 2


class _Parser(argparse.ArgumentParser):
    """Argument errors end with one line, like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"{self.prog}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_USER_ERROR)


def _add_compile(sub) -> None:
    p = sub.add_parser("compile", help="quantize a model under a budget and lower it")
    p.add_argument("model", help="Hugging Face model directory, hub id, .gguf or .onnx file")
    p.add_argument("-o", "--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--policy", default="entropy",
                   help="entropy | fastewq | zd | lim | sensitivity | uniform | random | "
                        "llamacpp | claq (default: entropy)")
    budget = p.add_argument_group("budget (one of --bits, --ratio, --width; none = the "
                                  "policy's own rule)")
    budget.add_argument("--bits", type=float, help="average physical bits per weight, "
                        "scales and zero points counted; never exceeded")
    budget.add_argument("--ratio", type=float, help="share of parameters at the low width")
    budget.add_argument("--width", type=int, help="uniform policy: every site at this width")
    budget.add_argument("--hi", type=int, help="high width (2, 3, 4, 8, 16 = float)")
    budget.add_argument("--lo", type=int, help="low width")
    budget.add_argument("--share", type=float,
                        help="claq without --bits: share of columns at the high width (0.1)")
    p.add_argument("--granularity", choices=("layer", "matmul", "row"),
                   help="unit sharing one width (default: matmul; policy sensitivity with "
                        "--bits: row, each output row its own width and group size)")
    p.add_argument("--group-size",
                   help="group size along the input dim (128; policy sensitivity: 32, at "
                        "--bits 2.5 and below 32+64+128; several joined by + let it choose one "
                        "per matmul or row with its width)")
    p.add_argument("--scheme", choices=SCHEMES,
                   help="rtn-asym (default; policy sensitivity: float-offset-dq): integer zero "
                        "points; rtn-sym: none; float-offset: float offsets (GGUF Q4_1 style); "
                        "float-offset-dq: the same with 6-bit scales and offsets under float16 "
                        "steps per 8 groups (llama.cpp K-quant style: 4.5 bits at 4 bits, group "
                        "32); codebook: per-column k-means")
    p.add_argument("--outliers", type=float, metavar="FRACTION",
                   help="share of weights kept sparse in float16 (e.g. 0.01)")
    p.add_argument("--override", action="append", metavar="REGEX=BITS",
                   help="pin sites whose id matches REGEX (repeatable; first match wins)")
    p.add_argument("--seed", type=int, help="random policy seed")
    p.add_argument("--k", type=float, help="entropy rule threshold in std units (0.65)")
    p.add_argument("--solver", choices=("greedy", "exact"),
                   help="greedy: most important first (default for rank scores); exact: optimal "
                        "knapsack (default for sensitivity)")
    p.add_argument("--widths", help="candidate widths of the exact solver, e.g. 2+3+4+8 "
                   "(default: the two rungs around --bits)")
    quant = p.add_argument_group("quantizer")
    quant.add_argument("--clip", choices=("minmax", "mse", "output"),
                       help="group range: full range, least weight error, or least output "
                            "error on calibration inputs (default: output when the policy "
                            "calibrates, else minmax)")
    quant.add_argument("--gptq", action=argparse.BooleanOptionalAction, default=None,
                       help="GPTQ error feedback from calibration inputs (default: on when "
                            "the policy calibrates)")
    quant.add_argument("--damp", type=float, help="GPTQ dampening (0.01)")
    quant.add_argument("--no-act-order", action="store_true",
                       help="GPTQ: process columns in their own order")
    calib = p.add_argument_group("calibration (policies lim and sensitivity, --gptq, "
                                 "--clip output)")
    calib.add_argument("--calib", help="wikitext2-valid (default) | tinyshakespeare | FILE")
    calib.add_argument("--calib-samples", type=int, help="windows (64)")
    calib.add_argument("--calib-seq-len", type=int, help="tokens per window (256)")
    calib.add_argument("--calib-seed", type=int, help="seed of the window offsets (0)")
    calib.add_argument("--lim-skip-first", action="store_true",
                       help="LIM: drop token position 0 (attention sink)")
    calib.add_argument("--measure", action="store_true",
                       help="sensitivity: measure delta-KL per site and width (slow, cached)")
    _add_executor(calib, "each measured (site, width)")
    p.add_argument("--plan", type=Path, help="recompile from an (edited) plan.json")
    p.add_argument("--pipeline", help="full pipeline text, e.g. "
                   "'zd,entropy,policy-entropy{bits=4.5},quantize,lower-onnx'")
    p.add_argument("--print-ir-after", action="append", default=[], metavar="PASS",
                   help="print the IR after PASS (repeatable, or 'all')")
    p.add_argument("--backend", choices=("onnx", "iree", "torch"), default="onnx",
                   help="onnx: model.onnx; iree: model.onnx in standard ops on byte tensors "
                        "(IREE reads it; check it with lwqc check-iree); torch: "
                        "packed.safetensors for the eager module")
    p.add_argument("--onnx-graph", choices=("auto", "kv-cache", "export"),
                   help="causal LMs: kv-cache = the ONNX Runtime GenAI decoder (default where "
                        "the architecture has one), export = the plain export, no cache")
    p.add_argument("--accuracy-level", type=int, choices=(1, 2, 3, 4),
                   help="MatMulNBits compute: 1 fp32 ... 4 int8 activations (default 4)")
    p.add_argument("--trust-remote-code", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress or timings")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="measure a compiled artifact against its float model")
    p.add_argument("out", type=Path, help="artifact directory written by lwqc compile")
    p.add_argument("--data", default=None,
                   help="wikitext2 (causal LMs), stsb (encoders) or a text FILE")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--windows", type=int, default=None, help="first N windows (default: all)")
    p.add_argument("--backend", choices=("onnx", "torch"), default=None,
                   help="runtime for the quantized model (default: what the artifact holds)")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="greedy text from a compiled causal LM, streamed")
    p.add_argument("out", type=Path, help="artifact directory written by lwqc compile")
    p.add_argument("--prompt", required=True)
    p.add_argument("--chat", action="store_true", help="apply the model's chat template")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--backend", choices=("onnx", "torch"), default=None,
                   help="onnx: the artifact's KV-cache decoder (default when it has one); "
                        "torch: the eager module with the artifact's weights")


def _add_analyze(sub) -> None:
    p = sub.add_parser("analyze", help="every score per block and matmul (CSV, PNG)")
    p.add_argument("model", help="Hugging Face model directory, hub id, .gguf or .onnx file")
    p.add_argument("-o", "--out", type=Path, help="directory for the CSVs and the chart "
                   "(default: analysis-<model name>)")
    p.add_argument("--validate", action="store_true",
                   help="measure each block alone at --low bits; Spearman rho per score")
    p.add_argument("--low", type=int, default=2, choices=(2, 3, 4, 8))
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--calib", default="wikitext2-valid")
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--calib-seq-len", type=int, default=256)
    p.add_argument("--trust-remote-code", action="store_true")


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="policies x budgets, each evaluated (resumable)")
    p.add_argument("model", help="causal LM directory or hub id")
    p.add_argument("-o", "--out", type=Path, required=True, help="results directory")
    p.add_argument("--policies", default="zd,entropy,lim,sensitivity,random,llamacpp")
    p.add_argument("--bits", default="2.5,3,3.5,4,4.5", help="comma-separated budgets")
    p.add_argument("--granularity", choices=("layer", "matmul"), default="matmul")
    p.add_argument("--seeds", type=int, default=3, help="seeds of the random policy (3)")
    p.add_argument("--windows", type=int, default=16, help="WikiText-2 windows per point")
    p.add_argument("--seq-len", type=int, default=512)
    _add_executor(p, "each point")


def _add_executor(p, task: str) -> None:
    p.add_argument("--executor", default="local",
                   help="local (default), ray (a Ray cluster on this machine) or ray:ADDRESS "
                        f"(a running cluster); on Ray {task} is a task")
    p.add_argument("--workers", type=int, help="Ray workers (default: the cluster's CPUs)")


def _add_check_iree(sub) -> None:
    p = sub.add_parser("check-iree", help="compile an artifact with IREE (llvm-cpu), compare "
                       "its output with ONNX Runtime's, keep model.vmfb")
    p.add_argument("out", type=Path, help="artifact directory written by lwqc compile "
                   "--backend iree")
    p.add_argument("--tokens", type=int, default=64, help="seeded token ids to run (64)")
    p.add_argument("--tolerance", type=float, default=1e-3,
                   help="largest |IREE - ONNX Runtime| accepted (1e-3); above it exit 1")


def _add_passes(sub) -> None:
    sub.add_parser("passes", help="list every pass: kind, contract and options")


def _add_show(sub) -> None:
    p = sub.add_parser("show", help="print the IR of a model or of a compiled artifact")
    p.add_argument("target", help="model directory / hub id / .gguf file, or an artifact "
                   "directory")
    p.add_argument("--trust-remote-code", action="store_true")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lwqc", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _add_compile(sub)
    _add_eval(sub)
    _add_generate(sub)
    _add_analyze(sub)
    _add_sweep(sub)
    _add_check_iree(sub)
    _add_passes(sub)
    _add_show(sub)
    return parser


def _compile(args: argparse.Namespace) -> int:
    from lwqc.compile import (
        CompileRequest,
        compile_model,
        default_passes,
        plan_passes,
        policy_pass,
        sensitivity_granularity,
        sensitivity_quantizer,
    )
    from lwqc.executors import parse_pool
    from lwqc.passes.analyses import calibrated
    from lwqc.passes.quantize import QuantizePass
    from lwqc.passes.sensitivity import SensitivityPass
    from lwqc.registry import parse

    if args.pipeline and args.plan:
        raise LwqcError("give --pipeline or --plan, not both")
    quantize = {"clip": args.clip, "gptq": args.gptq, "damp": args.damp,
                "act_order": False if args.no_act_order else None}
    lowering = {"graph": args.onnx_graph, "accuracy_level": args.accuracy_level}
    calibration = {"source": args.calib, "samples": args.calib_samples,
                   "seq_len": args.calib_seq_len, "seed": args.calib_seed}
    if args.backend != "onnx" and any(v is not None for v in lowering.values()):
        raise LwqcError("--onnx-graph and --accuracy-level apply to --backend onnx only")
    if args.pipeline:
        if any(v is not None for v in (*quantize.values(), *lowering.values(),
                                          *calibration.values())):
            raise LwqcError("--clip, --gptq, --damp, --no-act-order, --calib*, --onnx-graph "
                            "and --accuracy-level go inside --pipeline (quantize{clip=...,"
                            "gptq=true},calib{samples=...},lower-onnx{graph=...})")
        pass_list = parse(args.pipeline)
    elif args.plan:
        pass_list = plan_passes(args.plan, args.backend, quantize, lowering, calibration)
    else:
        if args.policy == "sensitivity" and args.scheme is None and args.group_size is None:
            chosen = sensitivity_quantizer(args.bits)
            args.scheme, args.group_size = chosen["scheme"], chosen["group_size"]
        if args.policy == "sensitivity" and args.granularity is None:
            args.granularity = sensitivity_granularity(args.bits, args.solver, args.measure)
        options = {
            "bits": args.bits, "ratio": args.ratio, "width": args.width, "hi": args.hi,
            "lo": args.lo, "granularity": args.granularity, "group_size": args.group_size,
            "scheme": args.scheme, "outliers": args.outliers, "override": args.override,
            "seed": args.seed, "k": args.k, "share": args.share,
            "solver": args.solver,
            "widths": args.widths,
        }
        policy = policy_pass(args.policy, options)
        passes = default_passes(policy, args.backend, quantize_options=quantize,
                                lowering_options=lowering)
        settings = next(p for p in passes if isinstance(p, QuantizePass))
        needed = calibrated([*policy.required(), *settings.required()])
        if not needed and any(v is not None for v in calibration.values()):
            raise LwqcError("--calib* apply to the policies lim and sensitivity, --gptq and "
                            "--clip output only")
        if args.measure and "sensitivity" not in needed:
            raise LwqcError("--measure applies to the sensitivity policy only")
        if args.lim_skip_first and "lim" not in needed:
            raise LwqcError("--lim-skip-first applies to the lim policy only")
        analyses = {
            "lim": {"skip_first": args.lim_skip_first or None},
            "sensitivity": {"metric": "delta-kl" if args.measure else None,
                            "group_size": args.group_size, "scheme": args.scheme},
        }
        pass_list = default_passes(policy, args.backend, calibration, analyses, quantize,
                                   lowering)
    pool = parse_pool(args.executor, args.workers)
    if pool is not None and not any(isinstance(p, SensitivityPass) and p.measures
                                    for p in pass_list):
        raise LwqcError("--executor applies to measured sensitivity (--measure, or "
                        "sensitivity{metric=delta-kl|kl-scaled} in --pipeline)")
    request = CompileRequest(
        model=args.model, out=args.out, passes=pass_list,
        print_ir_after=tuple(args.print_ir_after), trust_remote_code=args.trust_remote_code,
        show_progress=not args.quiet and sys.stderr.isatty(), pool=pool,
    )
    compile_model(request, log=None if args.quiet else sys.stderr)
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lwqc.evaluate import evaluate, format_result

    result = evaluate(args.out, data=args.data, seq_len=args.seq_len, windows=args.windows,
                      backend=args.backend)
    print(json.dumps(result, sort_keys=True) if args.json else format_result(result))
    return 0


def _generate(args: argparse.Namespace) -> int:
    from lwqc.generate import GenerateRequest, generate

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    generate(GenerateRequest(out=args.out, prompt=args.prompt, chat=args.chat,
                             max_new_tokens=args.max_new_tokens, backend=args.backend), write)
    sys.stdout.write("\n")
    return 0


def _check_iree(args: argparse.Namespace) -> int:
    from lwqc.artifacts import MODEL_FILE
    from lwqc.backends import iree

    model = args.out / MODEL_FILE
    result = iree.check(model, tokens=args.tokens)
    within = result.max_abs_diff <= args.tolerance
    print(f"IREE llvm-cpu vs ONNX Runtime on {result.tokens} tokens: max |diff| "
          f"{result.max_abs_diff:.3g} (largest output {result.max_abs_output:.3g}; tolerance "
          f"{args.tolerance:g}: {'within' if within else 'EXCEEDED'}); import "
          f"{result.import_s:.1f} s, compile {result.compile_s:.1f} s; wrote "
          f"{model.with_suffix('.vmfb')} ({result.vmfb_bytes:,} bytes)")
    return 0 if within else 1


def _analyze(args: argparse.Namespace) -> int:
    from lwqc.analyze import AnalyzeRequest, analyze

    calibration = {"source": args.calib, "samples": args.calib_samples,
                   "seq_len": args.calib_seq_len}
    out = args.out or Path(f"analysis-{Path(args.model.rstrip('/')).name}")
    analyze(AnalyzeRequest(
        model=args.model, out=out, calibration=calibration, validate=args.validate,
        low_bits=args.low, group_size=args.group_size, trust_remote_code=args.trust_remote_code,
    ))
    print(f"lwqc: wrote {out}/blocks.csv, sites.csv, scores.png"
          + (", validate.csv" if args.validate else ""), file=sys.stderr)
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from lwqc.executors import parse_executor
    from lwqc.plots import plot_pareto
    from lwqc.sweep import Sweeper, sweep_policies

    try:
        budgets = [float(b) for b in args.bits.split(",")]
    except ValueError:
        raise LwqcError(f"--bits {args.bits!r}: expected comma-separated numbers") from None
    if args.seeds < 1:
        raise LwqcError("--seeds must be at least 1")
    executor = parse_executor(args.executor, args.workers)
    sweeper = Sweeper(args.model, args.out, windows=args.windows, seq_len=args.seq_len)
    rows = sweep_policies(sweeper, args.policies.split(","), budgets, args.seeds,
                          args.granularity, executor)
    plot_pareto(rows, args.out / "pareto.png",
                f"{Path(sweeper.graph.model_id).name}: ΔPPL vs physical bits "
                f"({args.windows} WikiText-2 windows)")
    print(f"lwqc: {len(rows)} points in {args.out}/results.csv, pareto.png", file=sys.stderr)
    return 0


def _passes(args: argparse.Namespace) -> int:
    from lwqc.passes.base import option_text
    from lwqc.registry import REGISTRY

    for name in sorted(REGISTRY):
        cls = REGISTRY[name]
        doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or ""
        print(f"{name} ({cls.kind.value}): {doc.strip().splitlines()[0]}")
        key = getattr(cls, "score_key", None)
        requires = ", ".join(cls.requires or ((f"site.{key}", f"block.{key}") if key else ()))
        print(f"    requires {requires or '-'}; provides {', '.join(cls.provides) or '-'}")
        for option, spec in cls.options.items():
            default = "" if spec.default is None else f" (default {option_text(spec.default)})"
            print(f"    {option}: {spec.help}{default}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from lwqc.artifacts import PLAN_FILE
    from lwqc.ir.frontends import import_model
    from lwqc.ir.plan_json import graph_from_document, read_artifact_plan
    from lwqc.ir.text import print_ir

    target = Path(args.target)
    if (target / PLAN_FILE).exists():
        graph = graph_from_document(read_artifact_plan(target / PLAN_FILE))
    else:
        graph = import_model(args.target, args.trust_remote_code)
    sys.stdout.write(print_ir(graph))
    return 0


COMMANDS = {
    "compile": _compile, "eval": _eval, "generate": _generate, "analyze": _analyze,
    "sweep": _sweep, "check-iree": _check_iree, "passes": _passes, "show": _show,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except LwqcError as exc:
        if args.debug:
            raise
        print(f"lwqc: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("lwqc: interrupted; nothing was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
