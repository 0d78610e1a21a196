"""Reproduce the layer-wise quantization claims of arXiv 2406.17415 on a causal LM.

Causal LMs are measured by WikiText-2 perplexity and KL divergence, encoders by STS-B
Spearman and the cosine to the float embeddings (``lwqc.sweep``).
1. Move k = 0..L blocks from the high to the low width, least important first, for the
   pairs 4->2, 8->4 and 4->3, in LIM, ZD, entropy, reverse-LIM and random order (3 seeds);
   everything else (lm_head, other blocks) stays at the high width. For each curve: the
   largest k whose delta-PPL stays within 1 %, 5 % and 10 % of float.
2. Quantizing the k least important blocks (LIM order) to 2, 3 or 4 bits vs dropping them
   (the block passes its input through); all other blocks stay float.
Writes ``results.jsonl``/``.csv``/``.json``, ``layerwise.png``, ``drop.png`` and
``summary.md`` (the numbers; the reading beside them is written by a person).

Usage: python tools/repro_layerwise.py MODEL_DIR OUT_DIR [--windows 16] [--pairs 4-2,8-4,4-3]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from lwqc.ir.errors import LwqcError
from lwqc.ir.spec import QuantSpec, make_spec
from lwqc.plots import quality_axis, save_figure
from lwqc.sweep import Sweeper

PAIRS = ((4, 2), (8, 4), (4, 3))
THRESHOLDS = (0.01, 0.05, 0.10)
SEEDS = 3


def orders(sweeper: Sweeper) -> dict[str, list[int]]:
    """Block indices from least to most important, per ranking."""
    blocks = sweeper.graph.blocks

    def by(key: str) -> list[int]:
        return sorted(range(len(blocks)), key=lambda i: blocks[i].stats[key].importance())

    result = {"lim": by("lim"), "zd": by("zd"), "entropy": by("entropy"),
              "reverse-lim": by("lim")[::-1]}
    for seed in range(SEEDS):
        result[f"random-s{seed}"] = [int(i) for i in
                                     np.random.default_rng(seed).permutation(len(blocks))]
    return result


def specs_for(sweeper: Sweeper, low_blocks: set[int], hi: int, lo: int,
              rest: int | None = None) -> dict[str, QuantSpec]:
    specs = {}
    for site in sweeper.graph:
        bits = lo if site.block in low_blocks else (rest or hi)
        specs[site.id] = make_spec(bits, "rtn-asym", group_size=128)
    return specs


def run(sweeper: Sweeper, pairs: tuple[tuple[int, int], ...]) -> list[dict]:
    n = len(sweeper.graph.blocks)
    ranking = orders(sweeper)
    for hi, lo in pairs:
        for order, blocks in ranking.items():
            for k in range(n + 1):
                low = set(blocks[:k])
                key = "-".join(map(str, sorted(low))) or "none"
                sweeper.point(
                    f"pair{hi}to{lo}-{order}-k{k}",
                    lambda low=low, hi=hi, lo=lo: sweeper.evaluate(specs_for(sweeper, low, hi, lo)),
                    study="layerwise", pair=f"{hi}->{lo}", order=order, k=k, low_blocks=key)
    for k in range(n):
        low = set(ranking["lim"][:k])
        for lo in (2, 3, 4):
            sweeper.point(f"quantize{lo}-lim-k{k}",
                          lambda low=low, lo=lo: sweeper.evaluate(
                              specs_for(sweeper, low, 16, lo, rest=16)),
                          study="drop", method=f"quantize {lo}-bit", k=k)
        sweeper.point(f"drop-lim-k{k}",
                      lambda low=low: sweeper.evaluate(specs_for(sweeper, set(), 16, 16),
                                                       dropped=tuple(sorted(low))),
                      study="drop", method="drop", k=k)
    return sweeper.write_tables()


def tolerated(rows: list[dict], pair: str, order: str, threshold: float) -> int:
    """Largest k such that every k' <= k stays within ``threshold`` delta-PPL."""
    curve = sorted((r for r in rows if r.get("pair") == pair and r["order"] == order),
                   key=lambda r: r["k"])
    best = 0
    for row in curve:
        if row["quality_loss"] > threshold:
            break
        best = row["k"]
    return best


def measured_pairs(rows: list[dict]) -> list[tuple[int, int]]:
    present = dict.fromkeys(r["pair"] for r in rows if "pair" in r)
    return [tuple(int(w) for w in pair.split("->")) for pair in present]


def plot(rows: list[dict], out: Path, n: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = measured_pairs(rows)
    figure, axes = plt.subplots(1, len(pairs), figsize=(4.5 * len(pairs), 4), sharey=True,
                                squeeze=False)
    axes = axes[0]
    for axis, (hi, lo) in zip(axes, pairs, strict=True):
        pair = f"{hi}->{lo}"
        curves = sorted({r["order"] for r in rows if r.get("pair") == pair})
        for order in [c for c in curves if not c.startswith("random")]:
            pts = sorted((r for r in rows if r.get("pair") == pair and r["order"] == order),
                         key=lambda r: r["k"])
            axis.plot([p["k"] for p in pts], [100 * p["quality_loss"] for p in pts], "o-",
                      label=order, markersize=3)
        randoms = [sorted((r for r in rows if r.get("pair") == pair and r["order"] == o),
                          key=lambda r: r["k"]) for o in curves if o.startswith("random")]
        values = np.array([[100 * p["quality_loss"] for p in curve] for curve in randoms])
        ks = list(range(n + 1))
        axis.plot(ks, values.mean(0), "k--", label=f"random (mean of {len(randoms)})")
        axis.fill_between(ks, values.min(0), values.max(0), color="grey", alpha=0.25)
        for threshold in THRESHOLDS:
            axis.axhline(100 * threshold, color="red", linewidth=0.5, linestyle=":")
        axis.set_title(f"{pair} bits", fontsize=10)
        axis.set_xlabel("k blocks at the low width")
        quality_axis(axis, rows)
    axes[0].legend(fontsize=7)
    save_figure(figure, out / "layerwise.png")

    figure, axis = plt.subplots(figsize=(6, 4))
    for method in ("quantize 2-bit", "quantize 3-bit", "quantize 4-bit", "drop"):
        pts = sorted((r for r in rows if r.get("method") == method), key=lambda r: r["k"])
        axis.plot([p["k"] for p in pts], [100 * p["quality_loss"] for p in pts], "o-",
                  label=method, markersize=3)
    axis.set_xlabel("k least important blocks (LIM order); the rest float")
    quality_axis(axis, rows)
    axis.legend(fontsize=8)
    save_figure(figure, out / "drop.png")


def summary(rows: list[dict], n: int, model: str, data: str) -> str:
    quality, damage = ("ΔPPL", "KLD") if "ppl" in rows[0] else ("Spearman drop", "1 − cos")
    lines = [f"# Layer-wise quantization on {model} ({n} blocks, {data})", "",
             f"Largest k (blocks at the low width, least important first) whose {quality} "
             "stays within each threshold:", "",
             f"| pair | order | ≤ 1 % | ≤ 5 % | ≤ 10 % | {quality} at k = L/2 | "
             f"{damage} at k = L/2 |",
             "|---|---|---|---|---|---|---|"]
    for hi, lo in measured_pairs(rows):
        pair = f"{hi}->{lo}"
        for order in sorted({r["order"] for r in rows if r.get("pair") == pair}):
            half = next(r for r in rows if r.get("pair") == pair and r["order"] == order
                        and r["k"] == n // 2)
            cells = [str(tolerated(rows, pair, order, t)) for t in THRESHOLDS]
            lines.append(f"| {pair} | {order} | {' | '.join(cells)} | "
                         f"{100 * half['quality_loss']:+.2f} % | {half['damage']:.4f} |")
    lines += ["", f"Quantize vs drop (LIM order, the other blocks float), {quality} "
              f"({damage}):", "",
              "| k | quantize 2-bit | quantize 3-bit | quantize 4-bit | drop |",
              "|---|---|---|---|---|"]
    for k in range(n):
        cells = [next(r for r in rows if r.get("method") == m and r["k"] == k)
                 for m in ("quantize 2-bit", "quantize 3-bit", "quantize 4-bit", "drop")]
        lines.append(f"| {k} | " + " | ".join(
            f"{100 * c['quality_loss']:+.2f} % ({c['damage']:.4f})" for c in cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("out", type=Path)
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument("--pairs", default="4-2,8-4,4-3", help="high-low width pairs to run")
    args = parser.parse_args(argv)
    try:
        pairs = tuple(tuple(int(w) for w in p.split("-")) for p in args.pairs.split(","))
    except ValueError:
        parser.error(f"--pairs {args.pairs!r}: expected e.g. 4-2,8-4")
    try:
        sweeper = Sweeper(args.model, args.out, windows=args.windows)
    except LwqcError as exc:
        print(f"repro_layerwise: error: {exc}", file=sys.stderr)
        return 2
    rows = run(sweeper, pairs)
    n = len(sweeper.graph.blocks)
    plot(rows, args.out, n)
    data = (f"{args.windows} WikiText-2 windows of 512 tokens" if sweeper.causal
            else "STS-B dev, 1500 pairs")
    (args.out / "summary.md").write_text(
        summary(rows, n, Path(sweeper.graph.model_id).name, data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
