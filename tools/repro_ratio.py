"""Reproduce the granularity claim of the mixed-quantization scaling laws (arXiv 2410.06722).

At quantization ratios Q_r = 0.5, 0.7, 0.9 (share of parameters at the low width), compare
layer-wise units (whole blocks) with matmul-wise units (each matmul):
1. random search: 20 random assignments with low-precision share <= Q_r, each scored on
   the first ``--search-windows`` WikiText-2 windows; the best is evaluated on all windows;
2. the solver: units ranked by measured sensitivity (delta-KL at 4 bits, calibration
   windows), the least sensitive moved low while the share stays <= Q_r.
Low width 2-bit RTN (group 128), high width float: on this small model 4-bit is within noise
of float, so 2-bit is where granularity can show. Delta-PPL = (ppl_q - ppl_fp) / ppl_fp.
Writes ``results.*``, ``ratio.png`` and ``summary.md`` (numbers only).

Usage: python tools/repro_ratio.py MODEL_DIR OUT_DIR [--windows 16] [--search-windows 4]
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np

from lwqc.ir.errors import LwqcError
from lwqc.ir.spec import QuantSpec, make_spec
from lwqc.passes.solver import make_units, split_by_ratio
from lwqc.plots import quality_axis, save_figure
from lwqc.sweep import COMMON_QUANTIZER_TEXT, Sweeper

RATIOS = (0.5, 0.7, 0.9)
GRANULARITIES = ("layer", "matmul")
TRIALS = 20
LOW, HIGH = 2, 16


def specs_from_widths(units, widths) -> dict[str, QuantSpec]:
    specs = {}
    for unit, bits in zip(units, widths, strict=True):
        spec = make_spec(bits, "rtn-asym", group_size=128)
        specs.update(dict.fromkeys(unit.sites, spec))
    return specs


def low_share(sweeper: Sweeper, specs: dict[str, QuantSpec]) -> float:
    low = sum(sweeper.graph.sites[s].params for s, spec in specs.items() if spec.bits == LOW)
    return low / sweeper.graph.total_params


def run(sweeper: Sweeper, search_windows: int) -> list[dict]:
    for ratio in RATIOS:
        for granularity in GRANULARITIES:
            units = make_units(sweeper.graph, granularity)
            trials = []
            for trial in range(TRIALS):
                rng = np.random.default_rng([int(ratio * 100), trial])
                widths = split_by_ratio(units, list(rng.random(len(units))),
                                        Fraction(str(ratio)), LOW, HIGH)
                specs = specs_from_widths(units, widths)
                row = sweeper.point(
                    f"search-{granularity}-r{ratio}-t{trial}",
                    lambda s=specs: {**sweeper.evaluate(s, windows=search_windows),
                                     "low_share": low_share(sweeper, s)},
                    study="search", ratio=ratio, granularity=granularity, trial=trial)
                trials.append((row["quality_loss"], trial, specs))
            _, best_trial, best_specs = min(trials, key=lambda t: (t[0], t[1]))
            sweeper.point(f"best-{granularity}-r{ratio}",
                          lambda s=best_specs: {**sweeper.evaluate(s),
                                                "low_share": low_share(sweeper, s)},
                          study="best", ratio=ratio, granularity=granularity, trial=best_trial)
            policy = (f"policy-sensitivity{{ratio={ratio},lo={LOW},hi={HIGH},"
                      f"granularity={granularity},{COMMON_QUANTIZER_TEXT}}}")
            sweeper.point(f"solver-{granularity}-r{ratio}",
                          lambda p=policy: _evaluate_policy(sweeper, p),
                          study="solver", ratio=ratio, granularity=granularity, trial=-1)
    return sweeper.write_tables()


def _evaluate_policy(sweeper: Sweeper, policy: str) -> dict:
    specs = sweeper.plan(policy)
    return {**sweeper.evaluate(specs), "low_share": low_share(sweeper, specs)}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for granularity, color in zip(GRANULARITIES, ("tab:blue", "tab:orange"), strict=True):
        for study, style in (("best", "o-"), ("solver", "s--")):
            pts = sorted((r for r in rows if r["study"] == study
                          and r["granularity"] == granularity), key=lambda r: r["ratio"])
            axis.plot([p["low_share"] for p in pts], [100 * p["quality_loss"] for p in pts],
                      style, color=color, label=f"{granularity}, {study}", markersize=4)
        trials = [r for r in rows if r["study"] == "search" and r["granularity"] == granularity]
        axis.scatter([r["low_share"] for r in trials], [100 * r["quality_loss"] for r in trials],
                     color=color, alpha=0.15, s=8)
    axis.set_xlabel(f"quantization ratio achieved (share of weights at {LOW} bits)")
    quality_axis(axis, rows)
    axis.legend(fontsize=8)
    save_figure(figure, out / "ratio.png")


def summary(rows: list[dict], model: str, windows: int, search_windows: int) -> str:
    lines = [f"# Layer-wise vs matmul-wise mixed quantization on {model}", "",
             f"Low {LOW}-bit RTN (group 128), high float; random search {TRIALS} trials scored "
             f"on {search_windows} windows, best re-evaluated on {windows} windows of 512 tokens.",
             "", "| Q_r | granularity | achieved ratio (best) | best of random (KLD) | "
             "random trials (min / median / max, search windows) | solver (KLD) | "
             "solver ratio |", "|---|---|---|---|---|---|---|"]
    def pick(study: str, ratio: float, granularity: str) -> list[dict]:
        return [r for r in rows if r["study"] == study and r["ratio"] == ratio
                and r["granularity"] == granularity]

    for ratio in RATIOS:
        for granularity in GRANULARITIES:
            best = pick("best", ratio, granularity)[0]
            solver = pick("solver", ratio, granularity)[0]
            trial = sorted(100 * r["quality_loss"] for r in pick("search", ratio, granularity))
            lines.append(
                f"| {ratio} | {granularity} | {best['low_share']:.3f} | "
                f"{100 * best['quality_loss']:+.2f} % ({best['damage']:.4f}) | {trial[0]:+.2f} / "
                f"{trial[len(trial) // 2]:+.2f} / {trial[-1]:+.2f} % | "
                f"{100 * solver['quality_loss']:+.2f} % ({solver['damage']:.4f}) | "
                f"{solver['low_share']:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--search-windows", type=int, default=4)
    args = parser.parse_args(argv)
    try:
        sweeper = Sweeper(args.model, args.out, windows=args.windows)
    except LwqcError as exc:
        print(f"repro_ratio: error: {exc}", file=sys.stderr)
        return 2
    rows = run(sweeper, args.search_windows)
    plot(rows, args.out)
    (args.out / "summary.md").write_text(summary(
        rows, Path(sweeper.graph.model_id).name, args.windows, args.search_windows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
