"""CLAQ (arXiv 2405.17233) as a policy: per-column k-means codebooks on every site, with
outlier-guided adaptive precision (AP) sized to the budget and optional outlier reservation.

1. Every site gets one codebook spec: ``lo`` bits for most columns, ``hi`` bits (default 4; 8
   when ``lo`` is 4) for the share s of columns holding the most outliers, and the reserved
   share ``outliers`` (CLAQ's OR: 0 unless given).
2. With ``bits=B``: ``lo`` is the widest width whose plan with s = 0 fits B (or ``lo=``), and
   s the largest share (in steps of 1e-4) whose plan still fits: physical bits, codebooks,
   column slots and reserved outliers all counted, so the paper's logical settings (2.1 bits:
   5 % of columns at 4 bits, the rest at 2; 3.1: 10 % at 4, the rest at 3) cost more here.
3. Without a budget: ``lo`` (default 3) and ``share`` (default 0.1) as given: the paper's
   3.1-bit setting.
4. The vocabulary head (role ``lm_head``, tied or not) is quantized by rows instead: rtn-asym at
   ``lo`` bits in groups of 128, charged against the same budget. Its rows are tokens, and a
   column codebook shares 2^lo values among all of them, which costs the tokens of small rows
   their identity; the paper keeps the head in float16. On SmolLM2's tied head at 3 bits the
   codebook alone costs +1135 % ΔPPL against +84 % for rtn-asym g128 (4 windows), although its
   weight error is a quarter of rtn-asym's.
Quantize with ``gptq=true`` for CLAQ proper (its codebooks are fitted inside GPTQ).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

from lwqc.ir.accounting import site_bytes
from lwqc.ir.errors import BudgetError, PipelineError
from lwqc.ir.graph import Graph
from lwqc.ir.plan import Plan
from lwqc.ir.spec import QUANT_WIDTHS, CodebookSpec, QuantSpec, make_spec
from lwqc.passes.base import Option, PassContext, PlanningPass
from lwqc.passes.budget import fraction, width

SHARE_STEPS = 10_000  # shares are multiples of 1e-4
DEFAULT_LO, DEFAULT_SHARE = 3, 0.1
HEAD_ROLE, HEAD_SCHEME, HEAD_GROUP_SIZE = "lm_head", "rtn-asym", 128


def share(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:  # also rejects nan
        raise ValueError("a share of columns in [0, 1)")
    return value


class ClaqPolicy(PlanningPass):
    """Per-column codebooks with outlier-guided adaptive precision."""

    name = "policy-claq"
    options = {
        "bits": Option(float, None, "average physical bits per weight, never exceeded"),
        "lo": Option(width, None, "width of most columns"),
        "hi": Option(width, None, "width of the outlier columns (4; 8 when lo is 4)"),
        "share": Option(share, None, "share of columns at hi, without bits= (0.1)"),
        "outliers": Option(fraction, None, "share of weights kept sparse in float16 (0)"),
    }

    def validate(self) -> None:
        v = self.values
        if v["bits"] is not None and not (math.isfinite(v["bits"]) and v["bits"] > 0):
            raise PipelineError(f"{self.name}: bits must be a positive number, got {v['bits']}")
        if v["bits"] is not None and v["share"] is not None:
            raise PipelineError(f"{self.name}: give bits= or share=, not both")
        for name in ("lo", "hi"):
            if v[name] == 16:
                raise PipelineError(f"{self.name}: {name} must be a quantized width")
        if v["lo"] is not None and v["hi"] is not None and v["lo"] >= v["hi"]:
            raise PipelineError(f"{self.name}: lo ({v['lo']}) must be below hi ({v['hi']})")

    def high(self, lo: int) -> int | None:
        if self.values["hi"] is not None:
            return self.values["hi"]
        above = [w for w in (4, 8) if w > lo]
        return above[0] if above else None

    def spec(self, lo: int, share_steps: int) -> CodebookSpec:
        hi = self.high(lo)
        fraction_high = share_steps / SHARE_STEPS
        return CodebookSpec(lo, self.values["outliers"] or 0.0,
                            hi if fraction_high else None, fraction_high)

    def site_specs(self, graph: Graph, spec: CodebookSpec) -> dict[str, QuantSpec]:
        """``spec`` on every site but the vocabulary head, which gets rows at ``spec.bits``."""
        head = make_spec(spec.bits, HEAD_SCHEME, group_size=HEAD_GROUP_SIZE,
                         outliers=spec.outliers)
        return {s: head if site.role == HEAD_ROLE else spec for s, site in graph.sites.items()}

    def bits_of(self, graph: Graph, spec: CodebookSpec) -> int:
        return 8 * sum(site_bytes(graph, s, site_spec)
                       for s, site_spec in self.site_specs(graph, spec).items())

    def within(self, graph: Graph, capacity: Fraction) -> CodebookSpec:
        lows = [self.values["lo"]] if self.values["lo"] else sorted(QUANT_WIDTHS, reverse=True)
        fitting = [lo for lo in lows if self.bits_of(graph, self.spec(lo, 0)) <= capacity]
        if not fitting:
            need = self.bits_of(graph, self.spec(min(lows), 0)) / graph.total_params
            raise BudgetError(f"--bits {self.values['bits']:g} is infeasible for CLAQ: its "
                              f"smallest plan needs {need:.3f} bits per weight")
        lo = fitting[0]
        if self.high(lo) is None:
            return self.spec(lo, 0)
        low, high = 0, SHARE_STEPS - 1  # the largest step count that fits: bisection
        while low < high:
            middle = (low + high + 1) // 2
            if self.bits_of(graph, self.spec(lo, middle)) <= capacity:
                low = middle
            else:
                high = middle - 1
        return self.spec(lo, low)

    def run(self, graph: Graph, context: PassContext) -> None:
        v = self.values
        budget: dict[str, Any] = {"scheme": "codebook"}
        if v["bits"] is not None:
            spec = self.within(graph, Fraction(str(v["bits"])) * graph.total_params)
            budget.update(mode="bits", bits=v["bits"])
        else:
            lo = v["lo"] or DEFAULT_LO
            steps = round((DEFAULT_SHARE if v["share"] is None else v["share"]) * SHARE_STEPS)
            if self.high(lo) is None and steps:
                raise PipelineError(f"{self.name}: no width above lo={lo} for the outlier columns")
            spec = self.spec(lo, steps)
            budget.update(mode="rule")
        budget.update(lo=spec.bits, hi=spec.high_bits, share=spec.high_share,
                      outliers=spec.outliers)
        specs = self.site_specs(graph, spec)
        notes = [f"CLAQ: {spec.high_share:.2%} of each site's columns (most outliers) at "
                 f"{spec.high_bits} bits, the rest at {spec.bits}"
                 if spec.high_share else f"CLAQ: every column at {spec.bits} bits"]
        heads = [s for s, site_spec in specs.items() if site_spec != spec]
        if heads:
            budget["head"] = f"{HEAD_SCHEME} g{HEAD_GROUP_SIZE}"
            notes.append(f"{', '.join(heads)}: {HEAD_SCHEME} in groups of {HEAD_GROUP_SIZE} at "
                         f"{spec.bits} bits (a vocabulary head's rows are tokens)")
        graph.plan = Plan(specs=specs, policy=self.name, budget=budget, notes=notes)
