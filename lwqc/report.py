"""``report.md``: what each block and matmul got, why, and what it costs."""

from __future__ import annotations

from typing import Any

from lwqc.ir.accounting import site_bytes, totals
from lwqc.ir.graph import Graph
from lwqc.ir.spec import KEEP_BITS
from lwqc.passes.manager import PassTiming

# Columns of the per-block table: (header, annotation key, field, format).
_SCORE_COLUMNS = (
    ("LIM", "lim", "lim", "{:.4f}"),
    ("sensitivity @4b", "sensitivity", "err4", "{:.3g}"),
    ("entropy (nats)", "entropy", "entropy", "{:.6f}"),
    ("ZD", "zd", "zd", "{:.4f}"),
    ("outlier cols", "outliers", "outlier_columns", "{}"),
    ("kurtosis", "outliers", "kurtosis", "{:.2f}"),
)


def _width(bits: int) -> str:
    return "fp" if bits == KEEP_BITS else str(bits)


def _score_cells(stats: dict, columns: tuple) -> list[str]:
    cells = []
    for _, key, field, fmt in columns:
        value = stats[key].values().get(field) if key in stats else None
        cells.append("" if value is None else fmt.format(value))
    return cells


def _row(cells: list[Any]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def render(graph: Graph, timings: list[PassTiming]) -> str:
    plan = graph.plan
    assert plan is not None
    total = totals(graph, plan.specs)
    budget = plan.budget
    lines = [
        f"# lwqc report: {graph.model_id}",
        "",
        f"- architecture: {graph.architecture}, {len(graph.blocks)} blocks, "
        f"{len(graph.sites)} matmul sites, {total.params:,} quantizable weights",
        f"- pipeline: `{graph.pipeline}`",
        f"- policy: {plan.policy}, granularity {budget.get('granularity', '-')}, "
        f"mode {budget.get('mode', '-')}, widths {budget.get('widths', '-')}",
    ]
    achieved = f"{total.avg_bits_physical:.4f}"
    if budget.get("mode") == "bits":
        slack = budget["bits"] - total.avg_bits_physical
        lines.append(f"- budget: {budget['bits']:g} physical bits/weight; plan uses {achieved} "
                     f"(slack {slack:.4f} bits/weight)")
    else:
        lines.append(f"- plan uses {achieved} physical bits/weight")
    lines += [
        f"- logical bits/weight {total.avg_bits_logical:.4f} (codes only; float kept at "
        f"{graph.keep_bits})",
        f"- size of quantizable weights: {total.bytes:,} bytes (float: {total.bytes_float:,}, "
        f"{total.bytes_float / total.bytes:.2f}x smaller)",
        "- counted: the weights of every matmul site (scales and zero points included); "
        "biases and norms are not counted",
    ]
    for site in graph:
        if site.tied is not None:
            lines.append(f"- `{site.id}` is tied to `{site.tied}`: one quantized array serves "
                         "the matmul and the embedding lookup, counted once")
    for name, why in graph.excluded:
        lines.append(f"- not counted: `{name}`: {why}")
    for note in plan.notes:
        lines.append(f"- {note}")
    if budget.get("overrides"):
        lines.append(f"- overrides: {', '.join(budget['overrides'])}")
    lines += ["", "## Blocks", ""]
    columns = tuple(c for c in _SCORE_COLUMNS if any(c[1] in site.stats for site in graph))
    headers = ["block", "module", *(c[0] for c in columns), "widths", "bits/weight"]
    lines += [_row(headers), _row(["---"] * len(headers))]
    for block in graph.blocks:
        widths = " ".join(
            f"{graph.sites[s].role}{'+'.join(map(_width, sorted(plan.specs[s].code_widths())))}"
            for s in block.sites
        )
        params = sum(graph.sites[s].params for s in block.sites)
        nbytes = sum(site_bytes(graph, s, plan.specs[s])
                     for s in block.sites)
        lines.append(_row([block.index, block.module, *_score_cells(block.stats, columns), widths,
                           f"{8 * nbytes / params:.3f}"]))
    lines += ["", "## Matmuls", ""]
    headers = ["site", "role", "block", "shape", *(c[0] for c in columns), "spec",
               "bytes"]
    lines += [_row(headers), _row(["---"] * len(headers))]
    for site in graph:
        spec = plan.specs[site.id]
        lines.append(_row([
            f"`{site.id}`", site.role, "-" if site.block is None else site.block,
            f"{site.shape[0]}x{site.shape[1]}", *_score_cells(site.stats, columns), spec.label(),
            f"{site_bytes(graph, site.id, spec):,}",
        ]))
    lines += ["", "## Widths", ""]
    for bits, params in sorted(total.params_by_bits.items()):
        lines.append(f"- {_width(bits)}: {params:,} weights ({params / total.params:.1%})")
    if timings:
        lines += ["", "## Pass timings", ""]
        lines += [f"- {t.name}: {t.seconds:.2f} s" for t in timings]
    return "\n".join(lines) + "\n"
