"""``lwqc compile``: import, run the pipeline, write plan.json, model.onnx and report.md."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

from lwqc.artifacts import (
    DECODER_FILES,
    MODEL_FILE,
    PACKED_FILE,
    PLAN_FILE,
    REPORT_FILE,
    atomic_directory,
)
from lwqc.backends import onnx_rewrite, torch_eager
from lwqc.backends.onnxruntime import SIDE_FILES_KEY
from lwqc.ir.accounting import totals
from lwqc.ir.errors import LwqcError, PipelineError, PlanError
from lwqc.ir.frontends import import_model
from lwqc.ir.graph import Graph
from lwqc.ir.plan_json import plan_document, read_plan, write_plan
from lwqc.passes.analyses import analysis_passes, calibrated
from lwqc.passes.apply_plan import ApplyPlanPass
from lwqc.passes.base import Pass, PassKind, TaskPool
from lwqc.passes.calibration import CalibrationPass
from lwqc.passes.manager import PassManager, PassTiming
from lwqc.passes.pipeline import parse_passes_named
from lwqc.passes.quantize import QuantizePass
from lwqc.passes.quantizers import SENSITIVITY_GROUP_SIZES, SENSITIVITY_SCHEME
from lwqc.registry import LOWERINGS, REGISTRY, policies
from lwqc.report import render


def policy_pass(policy: str, values: dict[str, Any]) -> Pass:
    """The policy pass for ``--policy NAME`` configured with the given (non-None) options."""
    cls = REGISTRY.get(f"policy-{policy}")
    if cls is None:
        raise LwqcError(f"unknown policy {policy!r}: choose one of {', '.join(policies())}")
    given = {k: v for k, v in values.items() if v is not None}
    unsupported = sorted(set(given) - set(cls.options))
    if unsupported:
        raise LwqcError(
            f"--{unsupported[0].replace('_', '-')} does not apply to policy {policy!r}"
        )
    return cls(**given)


# `--policy sensitivity` without --scheme and --group-size plans for float-offset-dq in groups
# of 32 (passes/quantizers.py), whose narrowest width costs about 2.5 bits per weight (2.486 on
# rows of 576 inputs), leaving nothing to mix; a budget at or below that plans for it in groups
# of 32, 64 or 128 (2 bits in groups of 128: 2.16), per output row. On SmolLM2-135M that gave
# +190 % at 2.5 bits where rtn-asym in groups of 128 per matmul, the narrowest of the other
# schemes (2 bits: 2.31), gave +1294 %, and +559 % at 2.7 bits for a file of the same size
# (bench/quality-smollm2-defaults.md, README "Benchmarks").
FLOAT_OFFSET_DQ_FLOOR_BITS = 2.5
NARROW_BUDGET_GROUP_SIZES = (32, 64, 128)


# Without --granularity, policy sensitivity plans a --bits budget per output row: on
# SmolLM2-135M rows measured less damage than whole matmuls for a file of the same size at 4.0
# bits (KLD 0.105 against 0.128) and at 4.5 (0.0186 against 0.0242), the same at 3.5, far less
# at 3.0 (0.647 against 0.786; bench/quality-smollm2-defaults.md, README "Benchmarks"). Measured
# damage (--measure) has no rows, and the greedy solver plans none.
def sensitivity_granularity(bits: float | None, solver: str | None,
                            measured: bool) -> str | None:
    """The granularity ``lwqc compile --policy sensitivity`` plans at when not given: ``row``
    for a ``--bits`` budget with the exact solver (``solver``: ``--solver``, None for the
    default) and predicted damage (``measured``: ``--measure``); otherwise None, the pass's own
    default (per matmul)."""
    if bits is None or solver == "greedy" or measured:
        return None
    return "row"


def sensitivity_quantizer(bits: float | None) -> dict[str, Any]:
    """The scheme and group sizes ``lwqc compile --policy sensitivity --bits B`` plans for when
    neither is given (its analysis predicts for the same)."""
    if bits is not None and bits <= FLOAT_OFFSET_DQ_FLOOR_BITS:
        return {"scheme": SENSITIVITY_SCHEME, "group_size": NARROW_BUDGET_GROUP_SIZES}
    return {"scheme": SENSITIVITY_SCHEME, "group_size": SENSITIVITY_GROUP_SIZES}


# The quantizer of a pipeline that calibrates anyway (lim, sensitivity): GPTQ with output-error
# ranges, the best of lwqc's quantizers on SmolLM2-135M (bench/quality-smollm2.md).
CALIBRATED_QUANTIZE = {"clip": "output", "gptq": True}


def default_passes(
    policy: Pass, backend: str, calibration: dict[str, Any] | None = None,
    analysis_options: dict[str, dict[str, Any]] | None = None,
    quantize_options: dict[str, Any] | None = None,
    lowering_options: dict[str, Any] | None = None,
) -> list[Pass]:
    """The analysis bundle (with the calibrated analyses the policy and the quantizer need),
    the policy, quantize (GPTQ with output-error ranges when the policy calibrates, unless
    ``quantize_options`` say otherwise), the lowering (with ``lowering_options``)."""
    given = {k: v for k, v in (quantize_options or {}).items() if v is not None}
    defaults = CALIBRATED_QUANTIZE if calibrated(policy.required()) else {}
    quantize = QuantizePass(**{**defaults, **given})
    needed = calibrated([*policy.required(), *quantize.required()])
    analyses = analysis_passes(needed, calibration, analysis_options)
    lowering = {k: v for k, v in (lowering_options or {}).items() if v is not None}
    return [*analyses, policy, quantize, REGISTRY[LOWERINGS[backend]](**lowering)]


def plan_passes(plan_file: Path, backend: str,
                quantize_options: dict[str, Any] | None = None,
                lowering_options: dict[str, Any] | None = None,
                calibration: dict[str, Any] | None = None) -> list[Pass]:
    """Apply ``plan_file`` and quantize as the pipeline it records did (its quantize and calib
    options), but where ``quantize_options`` and ``calibration`` give other values."""
    recorded = recorded_options(plan_file, (QuantizePass.name, CalibrationPass.name))

    def merged(name: str, given: dict[str, Any] | None) -> dict[str, Any]:
        return {**recorded.get(name, {}),
                **{k: v for k, v in (given or {}).items() if v is not None}}

    return default_passes(ApplyPlanPass(file=str(plan_file)), backend,
                          calibration=merged(CalibrationPass.name, calibration),
                          quantize_options=merged(QuantizePass.name, quantize_options),
                          lowering_options=lowering_options)


def recorded_options(plan_file: Path, names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The options of the passes ``names`` in the pipeline a plan file records, by pass name
    (none for a pass it does not record)."""
    text = read_plan(plan_file).get("pipeline")
    if not isinstance(text, str) or not text:
        return {}
    try:
        passes = parse_passes_named(text, names, REGISTRY)
    except LwqcError as exc:
        raise PlanError(f"plan file {plan_file} records a pipeline lwqc cannot read ({exc}); "
                        "restore its 'pipeline' or recompile") from None
    return {p.name: dict(p.values) for p in passes}


@dataclasses.dataclass
class CompileRequest:
    model: str
    out: Path
    passes: list[Pass]
    print_ir_after: tuple[str, ...] = ()
    trust_remote_code: bool = False
    show_progress: bool = False
    pool: TaskPool | None = None  # where measured sensitivities run (None: here)


def _check_pipeline(request: CompileRequest) -> None:
    names = [p.name for p in request.passes]
    if not any(p.kind is PassKind.POLICY for p in request.passes):
        raise PipelineError("the pipeline has no policy pass (policy-* or apply-plan)")
    if not set(names) & set(LOWERINGS.values()):
        raise PipelineError("the pipeline has no lowering pass: end it with lower-onnx")
    for name in request.print_ir_after:
        if name != "all" and name not in names:
            raise PipelineError(f"--print-ir-after {name}: no pass of that name in the pipeline")


def write_artifacts(graph: Graph, directory: Path, timings: list[PassTiming]) -> None:
    write_plan(directory / PLAN_FILE, plan_document(graph))
    if "onnx" in graph.lowered:
        onnx_rewrite.save(graph.lowered["onnx"], directory / MODEL_FILE)
        for name, content in graph.lowered.get(SIDE_FILES_KEY, {}).items():
            if name not in DECODER_FILES:
                raise LwqcError(f"the decoder builder wrote an unexpected file {name}")
            (directory / name).write_bytes(content)
    if "torch" in graph.lowered:
        torch_eager.save_packed(graph.packed, directory / PACKED_FILE)
    (directory / REPORT_FILE).write_text(render(graph, timings))


def compile_model(request: CompileRequest, log: TextIO | None = sys.stderr) -> Graph:
    """Run the whole compile; the artifact appears at ``request.out`` only if all of it worked."""
    _check_pipeline(request)
    with atomic_directory(request.out) as staging:
        graph = import_model(request.model, request.trust_remote_code)
        manager = PassManager(
            request.passes, print_ir_after=request.print_ir_after,
            show_progress=request.show_progress, log=log, pool=request.pool,
        )
        manager.run(graph)
        write_artifacts(graph, staging, manager.timings)
    if log is not None:
        total = totals(graph, graph.plan.specs)
        print(
            f"lwqc: wrote {request.out}: {total.avg_bits_physical:.4f} physical bits/weight, "
            f"{total.bytes:,} bytes of quantized weights ({total.bytes_float:,} as float)",
            file=log,
        )
    return graph
