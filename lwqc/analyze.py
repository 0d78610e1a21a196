"""``lwqc analyze``: every score per block and per matmul, as text, CSV and a bar chart.

With ``validate``, each block is quantized alone to the low width and the damage is measured
(mean KL(float || quantized) per calibration token; encoders: 1 - cosine of hidden states);
the Spearman rank correlation between each score's importance and that damage says how well
the score predicts what matters (rho > 0: more important by the score = more damage).
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path
from typing import Any, TextIO

from lwqc.artifacts import atomic_directory
from lwqc.ir.errors import LwqcError
from lwqc.ir.frontends import import_model
from lwqc.ir.graph import Graph
from lwqc.ir.spec import make_spec
from lwqc.passes.analyses import CALIBRATED_ANALYSES, analysis_passes
from lwqc.passes.manager import PassManager
from lwqc.passes.quantizers import quantize_weight
from lwqc.passes.sensitivity import Damage
from lwqc.plots import save_figure

SCORES = ("zd", "entropy", "lim", "sensitivity")
# the quantizer of the measured per-block damage, and of the sensitivity predicted against it:
# the papers' round-to-nearest
MEASURED_SCHEME = "rtn-asym"


@dataclasses.dataclass
class AnalyzeRequest:
    model: str
    out: Path
    calibration: dict[str, Any] = dataclasses.field(default_factory=dict)  # calib options
    validate: bool = False
    low_bits: int = 2
    group_size: int = 128
    trust_remote_code: bool = False


def _rows(units: list[tuple[str, dict]]) -> list[dict[str, Any]]:
    rows = []
    for name, stats in units:
        row: dict[str, Any] = {"unit": name}
        for key in sorted(stats):
            for field, value in stats[key].values().items():
                row[f"{key}.{field}"] = value
            if key in SCORES:
                row[f"{key}.importance"] = stats[key].importance()
        rows.append(row)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def block_damage(graph: Graph, low_bits: int, group_size: int) -> list[float]:
    """Measured damage of quantizing each block alone to ``low_bits``."""
    damage = Damage(graph)
    spec = make_spec(low_bits, MEASURED_SCHEME, group_size=group_size)
    result = []
    for block in graph.blocks:
        weights = {s: quantize_weight(graph.weight(s), spec).dequantize() for s in block.sites}
        result.append(damage.of(weights))
    return result


def predicted(block_stats: dict, key: str, low_bits: int) -> float:
    """A score's importance; for sensitivity, its predicted damage at the low width itself."""
    stat = block_stats[key]
    return stat.error(low_bits) if key == "sensitivity" else stat.importance()


def correlations(graph: Graph, damage: list[float], low_bits: int) -> dict[str, float]:
    from scipy.stats import spearmanr

    return {
        key: float(spearmanr([predicted(b.stats, key, low_bits) for b in graph.blocks],
                             damage)[0])
        for key in SCORES
    }


def _plot(path: Path, graph: Graph, damage: list[float] | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(key, [b.stats[key].importance() for b in graph.blocks]) for key in SCORES]
    if damage is not None:
        panels.append(("measured damage", damage))
    figure, axes = plt.subplots(len(panels), 1, figsize=(7, 1.8 * len(panels)), sharex=True)
    indices = [b.index for b in graph.blocks]
    for axis, (title, values) in zip(axes, panels, strict=True):
        axis.bar(indices, values, color="tab:blue" if title in SCORES else "tab:red")
        axis.set_title(f"{title} (importance, higher = keep more bits)" if title in SCORES
                       else f"{title} of each block alone at the low width", fontsize=9)
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.1 or abs(hi) * 0.1 or 1.0
        axis.set_ylim(lo - pad, hi + pad)
    axes[-1].set_xlabel("block")
    axes[-1].set_xticks(indices)
    figure.suptitle(f"lwqc analyze: {Path(graph.model_id).name}", fontsize=10)
    save_figure(figure, path)


def _format_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    present = [c for c in columns if any(c in row for row in rows)]
    lines = ["  ".join(["unit".ljust(40), *(c.split(".")[0].rjust(12) for c in present)])]
    for row in rows:
        cells = [f"{row[c]:12.6g}" if c in row else " " * 12 for c in present]
        lines.append("  ".join([str(row["unit"]).ljust(40), *cells]))
    return "\n".join(lines)


def analyze(request: AnalyzeRequest, stdout: TextIO = sys.stdout) -> dict[str, Any]:
    analyses = analysis_passes([cls.name for cls in CALIBRATED_ANALYSES], request.calibration,
                               {"sensitivity": {"group_size": request.group_size,
                                                "scheme": MEASURED_SCHEME}})
    with atomic_directory(request.out) as staging:
        graph = import_model(request.model, request.trust_remote_code)
        if not graph.blocks:
            raise LwqcError(f"{graph.model_id} has no repeated blocks to compare")
        PassManager(analyses).run(graph)
        block_rows = _rows([(b.module, b.stats) for b in graph.blocks])
        site_rows = _rows([(s.id, s.stats) for s in graph])
        columns = [f"{key}.importance" for key in SCORES]
        print(f"scores per block (importance: higher = keep more bits) of {graph.model_id}",
              file=stdout)
        print(_format_table(block_rows, columns), file=stdout)
        _write_csv(staging / "blocks.csv", block_rows)
        _write_csv(staging / "sites.csv", site_rows)
        summary: dict[str, Any] = {"pipeline": graph.pipeline}
        damage = None
        if request.validate:
            damage = block_damage(graph, request.low_bits, request.group_size)
            rho = correlations(graph, damage, request.low_bits)
            _write_csv(staging / "validate.csv", [
                {"block": b.module, "damage": d,
                 **{k: predicted(b.stats, k, request.low_bits) for k in SCORES}}
                for b, d in zip(graph.blocks, damage, strict=True)
            ])
            print(f"\nSpearman rho of each score with the measured damage of one block at "
                  f"{request.low_bits} bits:", file=stdout)
            for key, value in rho.items():
                print(f"  {key:12s} {value:+.3f}", file=stdout)
            summary.update(damage=damage, spearman=rho)
        _plot(staging / "scores.png", graph, damage)
    return summary
