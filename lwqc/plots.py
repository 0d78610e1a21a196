"""Figures shared by sweeps, analyze and the reproduction tools: axis conventions, saving,
and the Pareto plot of quality loss and damage against physical bits."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def metric_labels(rows: list[dict[str, Any]]) -> tuple[str, str]:
    """Axis labels of ``quality_loss`` and ``damage`` for the kind of model the rows measure."""
    if rows and "ppl" in rows[0]:
        return "ΔPPL vs float (%)", "KL(float ‖ q) nats/token"
    return "Spearman drop vs float (%)", "1 − cosine to float embeddings"


def quality_axis(axis, rows: list[dict[str, Any]]) -> None:
    """A y axis of ``quality_loss`` in percent: symmetric log scale past 1 %, a light grid."""
    axis.set_ylabel(metric_labels(rows)[0])
    axis.set_yscale("symlog", linthresh=1.0)
    axis.grid(alpha=0.3)


def save_figure(figure, path: Path) -> None:
    import matplotlib.pyplot as plt

    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_pareto(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """Delta-PPL and KL divergence against physical bits, one curve per policy; random seeds
    as a band (min to max) around their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    by_policy: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_policy.setdefault(row["policy"], []).append(row)
    quality_label, damage_label = metric_labels(rows)
    metrics = (("quality_loss", 100.0, quality_label), ("damage", 1.0, damage_label))
    for axis, (metric, factor, label) in zip(axes, metrics, strict=True):
        for policy, points in sorted(by_policy.items()):
            budgets = sorted({p["budget"] for p in points})
            groups = [[p for p in points if p["budget"] == b] for b in budgets]
            x = [np.mean([p["avg_bits_physical"] for p in g]) for g in groups]
            y = [[factor * p[metric] for p in g] for g in groups]
            style = "s--" if policy == "uniform" else "o-"
            axis.plot(x, [np.mean(v) for v in y], style, label=policy, markersize=4)
            if any(len(v) > 1 for v in y):
                axis.fill_between(x, [min(v) for v in y], [max(v) for v in y], alpha=0.2)
        if metric == "quality_loss":
            axis.axhline(0.0, color="black", linewidth=0.8, label="float")
            quality_axis(axis, rows)
        else:
            axis.set_yscale("log")
            axis.set_ylabel(label)
            axis.grid(alpha=0.3)
        axis.set_xlabel("physical bits per weight (scales and zero points included)")
    axes[0].legend(fontsize=8)
    figure.suptitle(title, fontsize=10)
    save_figure(figure, path)
