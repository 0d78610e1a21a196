"""Run a pipeline: check each pass's contract, time it, and print the IR where asked.

Before anything runs: every requirement must be provided by an earlier pass, and the
pipeline's lowering passes (if any) set the graph's target capabilities. After each pass:
an analysis must have left plan and packed weights alone, and the pass's own ``ensures``
must hold.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import TextIO

from lwqc.ir.errors import PipelineError
from lwqc.ir.graph import Graph
from lwqc.ir.text import print_ir
from lwqc.passes.base import (
    MissingRequirementError,
    Pass,
    PassContext,
    PassContractError,
    PassKind,
    TaskPool,
)
from lwqc.passes.pipeline import format_pass, format_pipeline


@dataclasses.dataclass(frozen=True)
class PassTiming:
    name: str
    seconds: float


class PassManager:
    """Runs passes in order over one graph.

    ``print_ir_after`` holds pass names (or ``"all"``) after which the IR text is written to
    ``ir_stream``; ``log`` receives one timing line per pass unless it is ``None``.
    """

    def __init__(
        self,
        passes: list[Pass],
        print_ir_after: tuple[str, ...] = (),
        show_progress: bool = False,
        log: TextIO | None = None,
        ir_stream: TextIO | None = None,
        pool: TaskPool | None = None,
    ) -> None:
        self.passes = passes
        self.print_ir_after = set(print_ir_after)
        self.context = PassContext(show_progress=show_progress, pool=pool)
        self.log = log
        self.ir_stream = ir_stream or sys.stdout
        self.timings: list[PassTiming] = []

    @property
    def pipeline(self) -> str:
        return format_pipeline(self.passes)

    def check(self, available: set[str]) -> None:
        """Fail before running anything if some pass's requirement is never provided."""
        have = set(available)
        for p in self.passes:
            missing = [key for key in p.required() if key not in have]
            if missing:
                raise MissingRequirementError(
                    f"pass '{p.name}' needs {missing[0]}, which no earlier pass provides; "
                    f"add the pass that provides it before '{p.name}' in the pipeline"
                )
            have |= set(p.provides)

    def target(self, graph: Graph) -> None:
        """Make the lowering passes' capabilities the graph's target (they must agree)."""
        declared = [p.capabilities for p in self.passes if p.capabilities is not None]
        if not all(capabilities.same_storage(declared[0]) for capabilities in declared):
            names = ", ".join(p.name for p in self.passes if p.capabilities is not None)
            raise PipelineError(f"the lowerings {names} store different formats; "
                                "lower to one backend per compile")
        if declared:
            graph.target = declared[0]

    def run(self, graph: Graph) -> Graph:
        self.check(graph.available)
        self.target(graph)
        graph.pipeline = self.pipeline
        for p in self.passes:
            before = _snapshot(graph)
            start = time.perf_counter()
            p.run(graph, self.context)
            seconds = time.perf_counter() - start
            self.timings.append(PassTiming(p.name, seconds))
            if p.kind is PassKind.ANALYSIS and _snapshot(graph) != before:
                raise PassContractError(
                    f"analysis pass '{p.name}' changed the plan or packed weights")
            p.ensures(graph)
            graph.available |= set(p.provides)
            if self.log is not None:
                print(f"lwqc: {format_pass(p)} {seconds:.2f} s", file=self.log)
            if p.name in self.print_ir_after or "all" in self.print_ir_after:
                print(f"// ----- IR after {p.name} -----", file=self.ir_stream)
                self.ir_stream.write(print_ir(graph))
        return graph


def _snapshot(graph: Graph) -> tuple:
    """What an analysis must leave alone: the plan (by identity and content), packed weights."""
    plan = graph.plan
    specs = None if plan is None else dict(plan.specs)
    return id(plan), specs, {k: id(v) for k, v in graph.packed.items()}
