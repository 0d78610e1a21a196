"""The IR as stable, diffable text: one line per block and one line per site.

``lwqc show`` and ``--print-ir-after`` both print this text; a graph read back from
``plan.json`` prints the same text as the graph that produced it.
"""

from __future__ import annotations

from lwqc.ir.annotations import Annotation
from lwqc.ir.graph import Graph


def _format_value(value: float | int | str) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def format_stats(stats: dict[str, Annotation]) -> str:
    fields = []
    for key in sorted(stats):
        for name, value in stats[key].values().items():
            fields.append(f"{key}.{name}={_format_value(value)}")
    return " ".join(fields)


def print_ir(graph: Graph) -> str:
    """Render ``graph`` (annotations and plan included, when present) as text."""
    lines = [
        f"lwqc.ir model={graph.model_id} arch={graph.architecture} "
        f"sites={len(graph.sites)} blocks={len(graph.blocks)} params={graph.total_params}"
    ]
    current_block: int | None = None
    for site in graph:
        if site.block is not None and site.block != current_block:
            block = graph.blocks[site.block]
            header = f"block {block.index} {block.module} sites={len(block.sites)}"
            stats = format_stats(block.stats)
            lines.append(f"{header} {stats}".rstrip())
        current_block = site.block
        indent = "  " if site.block is not None else ""
        fields = [
            f"{indent}site {site.id}",
            f"role={site.role}",
            f"block={'-' if site.block is None else site.block}",
            f"shape={site.shape[0]}x{site.shape[1]}",
            f"params={site.params}",
            f"fusion={site.fusion_group}",
        ]
        stats = format_stats(site.stats)
        if stats:
            fields.append(stats)
        if graph.plan is not None:
            fields.append(f"spec={graph.plan.specs[site.id].label().replace(' ', ':')}")
        lines.append(" ".join(fields))
    return "\n".join(lines) + "\n"
